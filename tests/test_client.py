# -*- test-case-name: tests.test_client -*-
"""
Tests for L{fractal.client}, over in-memory connections with a fake clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.test.iosim import ConnectionCompleter, IOPump
from twisted.trial.unittest import SynchronousTestCase

from fractal.app import UserCommand
from fractal.client import CallTimeout, ClientStopped, FractalClient, connect
from fractal.protocol import Overloaded

PORT = 7100


class Echo(UserCommand):
    """
    A user command as clients see it.
    """

    arguments = [(b"text", amp.Unicode())]
    response = [(b"user", amp.Unicode()), (b"text", amp.Unicode())]


class _ServerEcho(amp.Command):
    """
    The same command as the test server answers it.
    """

    commandName = b"Echo"
    arguments = [(b"user", amp.Unicode()), (b"text", amp.Unicode())]
    response = [(b"user", amp.Unicode()), (b"text", amp.Unicode())]
    errors = {Overloaded: b"OVERLOADED"}


class _Server(amp.AMP):
    """
    A node stand-in: echoes, refuses with a declared error, or holds the
    answer until the test releases it.
    """

    def __init__(self, received: list[tuple[str, str]], held: list[Deferred[Any]]) -> None:
        super().__init__()
        self._received = received
        self._held = held

    @_ServerEcho.responder
    def echo(self, user: str, text: str) -> Any:
        self._received.append((user, text))
        if text == "busy":
            raise Overloaded("too many open stores")
        if text == "hold":
            d: Deferred[dict[str, str]] = Deferred()
            self._held.append(d)
            return d
        return {"user": user, "text": text}


class ClientTests(SynchronousTestCase):
    """
    Tests for L{FractalClient} and L{connect}.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.received: list[tuple[str, str]] = []
        self.held: list[Deferred[Any]] = []
        self.servers: list[_Server] = []

        def buildServer() -> _Server:
            server = _Server(self.received, self.held)
            self.servers.append(server)
            return server

        self.reactor.listenTCP(PORT, Factory.forProtocol(buildServer))  # type: ignore[arg-type]
        self.completer = ConnectionCompleter(self.reactor)
        self.client = connect(
            self.reactor, f"tcp:host=127.0.0.1:port={PORT}", timeout=5, retryPolicy=lambda n: 1.0
        )

    def accept(self) -> IOPump:
        """
        Complete the client's pending connection attempt.
        """
        pump = self.completer.succeedOnce()
        assert pump is not None, "the client is not connecting"
        pump.flush()
        return pump

    def stop(self) -> None:
        """
        Disconnect the client and check no timer is left behind.
        """
        self.client.disconnect()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_call(self) -> None:
        """
        C{callRemote} sends the user key as the C{user} argument with the
        others, and fires with the answer; no timer is left afterwards.
        """
        self.assertIsInstance(self.client, FractalClient)
        pump = self.accept()
        d = self.client.callRemote(Echo, user="alice", text="hello")
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"user": "alice", "text": "hello"})
        self.assertEqual(self.received, [("alice", "hello")])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.stop()

    def test_callBeforeConnected(self) -> None:
        """
        A call made before the connection is up waits for it, then goes.
        """
        d = self.client.callRemote(Echo, user="bob", text="early")
        self.assertNoResult(d)
        pump = self.accept()
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"user": "bob", "text": "early"})
        self.stop()

    def test_declaredError(self) -> None:
        """
        A framework error the node declares arrives as its typed exception.
        """
        pump = self.accept()
        d = self.client.callRemote(Echo, user="carol", text="busy")
        pump.flush()
        failure = self.failureResultOf(d, Overloaded)
        self.assertIn("too many open stores", str(failure.value))
        self.stop()

    def test_timeoutWaitingForConnection(self) -> None:
        """
        A call that cannot get a connection within its timeout fails with
        L{CallTimeout}, and is not sent when the connection comes later.
        """
        d = self.client.callRemote(Echo, user="dave", text="lost", timeout=2)
        self.reactor.advance(1.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        failure = self.failureResultOf(d, CallTimeout)
        self.assertIn("Echo", str(failure.value))
        self.assertIn("2 seconds", str(failure.value))
        pump = self.accept()
        pump.flush()
        self.assertEqual(self.received, [])
        self.stop()

    def test_timeoutWaitingForAnswer(self) -> None:
        """
        A call whose answer does not come within the client's timeout fails
        with L{CallTimeout}; the late answer is dropped quietly and the
        connection goes on serving.
        """
        pump = self.accept()
        d = self.client.callRemote(Echo, user="erin", text="hold")
        pump.flush()
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.failureResultOf(d, CallTimeout)
        self.held[0].callback({"user": "erin", "text": "late"})
        pump.flush()
        after = self.client.callRemote(Echo, user="erin", text="again")
        pump.flush()
        self.assertEqual(self.successResultOf(after)["text"], "again")
        self.stop()

    def test_connectionLostDuringCall(self) -> None:
        """
        A call in flight when the connection drops fails at once with the
        loss, rather than waiting for its timeout.
        """
        pump = self.accept()
        d = self.client.callRemote(Echo, user="fay", text="hold")
        pump.flush()
        self.servers[0].transport.loseConnection()
        pump.flush()
        self.failureResultOf(d, ConnectionDone, ConnectionLost)
        self.stop()

    def test_reconnect(self) -> None:
        """
        After the connection drops, the client reconnects after its retry
        delay and later calls use the new connection.
        """
        pump = self.accept()
        self.servers[0].transport.loseConnection()
        pump.flush()
        self.assertIsNone(self.completer.succeedOnce())
        d = self.client.callRemote(Echo, user="gus", text="after")
        self.reactor.advance(1.0)
        pump = self.accept()
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"user": "gus", "text": "after"})
        self.assertEqual(len(self.servers), 2)
        self.stop()

    def test_retryAfterRefusal(self) -> None:
        """
        A refused connection attempt is retried after the retry delay; a call
        waiting meanwhile goes once a connection succeeds.
        """
        self.completer.failOnce()
        d = self.client.callRemote(Echo, user="hal", text="patient")
        self.assertIsNone(self.completer.succeedOnce())
        self.reactor.advance(1.0)
        pump = self.accept()
        pump.flush()
        self.assertEqual(self.successResultOf(d)["text"], "patient")
        self.stop()

    def test_whenConnected(self) -> None:
        """
        L{FractalClient.whenConnected} fires once connected, or fails with
        L{CallTimeout}.
        """
        d = self.client.whenConnected(timeout=1)
        self.reactor.advance(1)
        self.failureResultOf(d, CallTimeout)
        d = self.client.whenConnected()
        self.accept()
        self.assertIsNone(self.successResultOf(d))
        self.stop()

    def test_disconnect(self) -> None:
        """
        L{FractalClient.disconnect} closes the connection; calls waiting for
        a connection, and calls made afterwards, fail with L{ClientStopped}.
        """
        pump = self.accept()
        stopped = self.client.disconnect()
        pump.flush()
        self.successResultOf(stopped)
        self.failureResultOf(self.client.callRemote(Echo, user="ian", text="x"), ClientStopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_disconnectWhileWaiting(self) -> None:
        """
        A call waiting for a connection fails with L{ClientStopped} when the
        client is disconnected.
        """
        d = self.client.callRemote(Echo, user="jo", text="x")
        self.successResultOf(self.client.disconnect())
        self.failureResultOf(d, ClientStopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_callWhenConnected(self) -> None:
        """
        A call made from the callback of L{FractalClient.whenConnected}, while
        the connection is being set up, goes out on that connection.
        """
        calls: list[Deferred[Any]] = []
        connected = self.client.whenConnected()
        connected.addCallback(
            lambda _: calls.append(self.client.callRemote(Echo, user="kim", text="eager"))
        )
        pump = self.accept()
        pump.flush()
        self.assertEqual(self.successResultOf(calls[0])["text"], "eager")
        self.stop()

    def test_callWhenLost(self) -> None:
        """
        A call made from the errback of a call lost with its connection waits
        for the next connection.
        """
        pump = self.accept()
        retries: list[Deferred[Any]] = []
        d = self.client.callRemote(Echo, user="lee", text="hold")
        d.addErrback(
            lambda _: retries.append(self.client.callRemote(Echo, user="lee", text="retry"))
        )
        pump.flush()
        self.servers[0].transport.loseConnection()
        pump.flush()
        self.assertNoResult(retries[0])
        self.reactor.advance(1.0)
        pump = self.accept()
        pump.flush()
        self.assertEqual(self.successResultOf(retries[0])["text"], "retry")
        self.stop()

    def test_badTimeout(self) -> None:
        """
        A timeout that is not positive is refused.
        """
        self.assertRaises(
            ValueError, connect, self.reactor, "tcp:host=127.0.0.1:port=1", timeout=0
        )
        self.stop()

# -*- test-case-name: tests.test_client -*-
"""
Tests for L{fractal.client}, over in-memory connections with a fake clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
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


class Wait(UserCommand):
    """
    A user command with an argument named C{timeout}, as applications may
    declare.
    """

    arguments = [(b"timeout", amp.Float())]
    response = [(b"waited", amp.Float())]


class _ServerWait(amp.Command):
    commandName = b"Wait"
    arguments = [(b"user", amp.Unicode()), (b"timeout", amp.Float())]
    response = [(b"waited", amp.Float())]


class Options(amp.Command):
    """
    Optional arguments and answers, a dashed wire name, and an error the
    command does not declare.
    """

    arguments = [
        (b"user", amp.Unicode()),
        (b"note", amp.Unicode(optional=True)),
        (b"page-size", amp.Integer(optional=True)),
    ]
    response = [(b"note", amp.Unicode(optional=True)), (b"page-size", amp.Integer())]


class _Upper(amp.Unicode):
    """
    An argument that customises how it is put in a box.
    """

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        strings[name] = objects.pop(name.decode("ascii")).upper().encode("utf-8")


class Shout(amp.Command):
    """
    A command whose argument customises AMP's encoding, so the client sends
    it through AMP's own C{callRemote}.
    """

    arguments = [(b"user", amp.Unicode()), (b"text", _Upper())]
    response = [(b"text", amp.Unicode())]


class Note(amp.Command):
    """
    A command that asks for no answer.
    """

    arguments = [(b"user", amp.Unicode()), (b"text", amp.Unicode())]
    requiresAnswer = False


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

    @_ServerWait.responder
    def wait(self, user: str, timeout: float) -> Any:
        self._received.append((user, f"wait {timeout:g}"))
        return {"waited": timeout}

    @Options.responder
    def options(self, user: str, note: str | None, page_size: int | None) -> Any:
        self._received.append((user, f"options {note} {page_size}"))
        if page_size == 0:
            raise ZeroDivisionError("undeclared")
        return {"note": note, "page_size": page_size or 10}

    @Shout.responder
    def shout(self, user: str, text: str) -> Any:
        return {"text": text}

    @Note.responder
    def note(self, user: str, text: str) -> Any:
        self._received.append((user, text))
        return {}


class _ClientTestCase(SynchronousTestCase):
    """
    A client connecting to a node stand-in over an in-memory network.
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


class ClientTests(_ClientTestCase):
    """
    Tests for L{FractalClient} and L{connect}.
    """

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


class CallArgumentTests(_ClientTestCase):
    """
    How L{FractalClient.callRemote} and L{FractalClient.callRemoteWithTimeout}
    read their arguments, and how calls are encoded and answers decoded.
    """

    def test_timeoutArgumentOfCommand(self) -> None:
        """
        A command argument named C{timeout} reaches the node when the command
        declares one, and the call keeps the client's own timeout.
        """
        pump = self.accept()
        d = self.client.callRemote(Wait, user="amy", timeout=0.5)
        self.reactor.advance(1)
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"waited": 0.5})
        self.assertEqual(self.received, [("amy", "wait 0.5")])
        self.stop()

    def test_timeoutKeywordStillTheCallTimeout(self) -> None:
        """
        For a command with no C{timeout} argument, C{timeout=} is still the
        call's timeout and is not sent.
        """
        pump = self.accept()
        d = self.client.callRemote(Echo, user="bo", text="hold", timeout=1)
        pump.flush()
        self.assertEqual(self.received, [("bo", "hold")])
        self.reactor.advance(1)
        self.failureResultOf(d, CallTimeout)
        self.stop()

    def test_timeoutsOfManyCalls(self) -> None:
        """
        Calls with different timeouts each fail at their own deadline, a
        shorter one made after a longer one included; one timer serves them
        all, and none is left once they have ended.
        """
        pump = self.accept()
        slow = [self.client.callRemote(Echo, user="ula", text="hold") for _ in range(3)]
        self.reactor.advance(1)
        quick = self.client.callRemoteWithTimeout(1.5, Echo, user="ula", text="hold")
        answered = self.client.callRemoteWithTimeout(1, Echo, user="ula", text="now")
        pump.flush()
        self.assertEqual(self.successResultOf(answered)["text"], "now")
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.reactor.advance(1.4)
        self.assertNoResult(quick)
        self.reactor.advance(0.1)
        self.assertIn("1.5 seconds", str(self.failureResultOf(quick, CallTimeout).value))
        for d in slow:
            self.assertNoResult(d)
        self.reactor.advance(2.4)
        for d in slow:
            self.assertNoResult(d)
        self.reactor.advance(0.1)
        for d in slow:
            self.assertIn("5 seconds", str(self.failureResultOf(d, CallTimeout).value))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.stop()

    def test_cancelledByCaller(self) -> None:
        """
        A call its caller cancels fails with L{CancelledError}, not
        L{CallTimeout}, and leaves no timer.
        """
        pump = self.accept()
        d = self.client.callRemote(Echo, user="vic", text="hold")
        pump.flush()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.stop()

    def test_callRemoteWithTimeout(self) -> None:
        """
        L{FractalClient.callRemoteWithTimeout} takes the call's timeout first
        and sends every keyword, C{timeout} included, to the command.
        """
        pump = self.accept()
        d = self.client.callRemoteWithTimeout(2, Wait, user="cy", timeout=30.0)
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"waited": 30.0})
        held = self.client.callRemoteWithTimeout(2, Echo, user="cy", text="hold")
        pump.flush()
        self.reactor.advance(1.9)
        self.assertNoResult(held)
        self.reactor.advance(0.1)
        failure = self.failureResultOf(held, CallTimeout)
        self.assertIn("2 seconds", str(failure.value))
        self.stop()

    def test_userByPosition(self) -> None:
        """
        The user key may be given by position; giving two different keys is
        an error and sends nothing.
        """
        pump = self.accept()
        d = self.client.callRemote(Echo, "dee", text="pos")
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"user": "dee", "text": "pos"})
        twice = self.client.callRemote(Echo, "dee", user="eve", text="x")
        self.failureResultOf(twice, TypeError)
        pump.flush()
        self.assertEqual(self.received, [("dee", "pos")])
        self.stop()

    def test_badArguments(self) -> None:
        """
        An argument the command does not have, or a required one missing,
        fails the call with L{amp.InvalidSignature} and sends nothing.
        """
        pump = self.accept()
        unknown = self.client.callRemote(Echo, user="fin", text="x", colour="red")
        self.assertIn("colour", str(self.failureResultOf(unknown, amp.InvalidSignature).value))
        missing = self.client.callRemote(Echo, user="fin")
        self.assertIn("text", str(self.failureResultOf(missing, amp.InvalidSignature).value))
        pump.flush()
        self.assertEqual(self.received, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.stop()

    def test_valueTooLong(self) -> None:
        """
        A value over AMP's 65,535 bytes fails the call with L{amp.TooLong}
        and sends nothing; one of exactly 65,535 bytes goes through.
        """
        pump = self.accept()
        long = self.client.callRemote(Echo, user="mo", text="x" * 65536)
        self.failureResultOf(long, amp.TooLong)
        largest = self.client.callRemote(Echo, user="mo", text="y" * 65535)
        pump.flush()
        self.assertEqual(len(self.successResultOf(largest)["text"]), 65535)
        self.assertEqual([text[:1] for _, text in self.received], ["y"])
        self.stop()

    def test_optionalArguments(self) -> None:
        """
        Optional arguments may be left out or given as L{None}; dashed wire
        names are given with underscores; optional answers left out come
        back as L{None}.
        """
        pump = self.accept()
        bare = self.client.callRemote(Options, user="gil")
        given = self.client.callRemote(Options, user="gil", note="n", page_size=3)
        none = self.client.callRemote(Options, user="gil", note=None, page_size=None)
        pump.flush()
        self.assertEqual(self.successResultOf(bare), {"note": None, "page_size": 10})
        self.assertEqual(self.successResultOf(given), {"note": "n", "page_size": 3})
        self.assertEqual(self.successResultOf(none), {"note": None, "page_size": 10})
        self.assertEqual(
            self.received,
            [("gil", "options None None"), ("gil", "options n 3"), ("gil", "options None None")],
        )
        self.stop()

    def test_undeclaredError(self) -> None:
        """
        An error the command does not declare arrives as
        L{amp.UnknownRemoteError}.
        """
        pump = self.accept()
        d = self.client.callRemote(Options, user="hub", page_size=0)
        pump.flush()
        self.failureResultOf(d, amp.UnknownRemoteError)
        self.flushLoggedErrors(ZeroDivisionError)
        self.stop()

    def test_unhandledCommand(self) -> None:
        """
        A command the node does not know fails with AMP's
        L{amp.UnhandledCommand}.
        """

        class Unknown(amp.Command):
            arguments = [(b"user", amp.Unicode())]

        pump = self.accept()
        d = self.client.callRemote(Unknown, user="ira")
        pump.flush()
        self.failureResultOf(d, amp.UnhandledCommand)
        self.stop()

    def test_customisedEncoding(self) -> None:
        """
        A command whose argument customises AMP's encoding is sent as AMP
        would send it.
        """
        pump = self.accept()
        d = self.client.callRemote(Shout, user="jan", text="quiet")
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"text": "QUIET"})
        self.stop()

    def test_noAnswer(self) -> None:
        """
        A command that requires no answer fires with L{None} once sent.
        """
        pump = self.accept()
        d = self.client.callRemote(Note, user="kai", text="fyi")
        self.assertIsNone(self.successResultOf(d))
        pump.flush()
        self.assertEqual(self.received, [("kai", "fyi")])
        self.stop()

    def test_answersInPieces(self) -> None:
        """
        Answers that arrive a byte at a time, or several in one chunk with a
        partial one after them, are each read whole.
        """
        pump = self.accept()
        calls = [self.client.callRemote(Echo, user="lu", text=str(i)) for i in range(3)]
        pump.pump()  # the calls reach the server, which answers
        answers = pump.serverIO.getOutBuffer()
        assert answers is not None
        end = answers.index(b"\x00\x00") + 2  # the end of the first answer
        pump.client.dataReceived(answers[: end + 3])
        self.assertEqual(self.successResultOf(calls[0])["text"], "0")
        self.assertNoResult(calls[1])
        for i in range(end + 3, len(answers)):
            pump.client.dataReceived(answers[i : i + 1])
        self.assertEqual([self.successResultOf(d)["text"] for d in calls[1:]], ["1", "2"])
        after = self.client.callRemote(Echo, user="lu", text="whole")
        pump.flush()
        self.assertEqual(self.successResultOf(after)["text"], "whole")
        self.stop()

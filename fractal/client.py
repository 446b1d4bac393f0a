# -*- test-case-name: tests.test_client -*-
"""
Calling a fractal node: a reconnecting AMP client with per-call timeouts::

    from fractal.client import connect

    client = connect(reactor, "tcp:host=127.0.0.1:port=7100", timeout=5)
    answer = await client.callRemote(Deliver, user="alice@example.com",
                                     sender="bob", subject="hi", body="...")
    await client.disconnect()

The client keeps one connection open, reconnecting with back-off whenever it
drops.  Every call is bounded by a timeout that covers waiting for a
connection and waiting for the answer: when it expires the call fails with
L{CallTimeout}, never hangs, and is never sent afterwards.  Errors a node
declares (the command's own and L{fractal.protocol}'s) arrive as the typed
exceptions the command lists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from fractal.routing.smart import ClusterClient, connectCluster

__all__ = [
    "DEFAULT_TIMEOUT",
    "CallTimeout",
    "ClientStopped",
    "FractalClient",
    "connect",
    "ClusterClient",
    "connectCluster",
]

DEFAULT_TIMEOUT = 10.0
"""
Seconds a call may take, waiting for a connection included, unless the client
or the call says otherwise.
"""

RetryPolicy = Callable[[int], float]


class CallTimeout(Exception):
    """
    A call got no answer within its timeout.  If it had been sent, it may or
    may not have run on the node.
    """


class ClientStopped(Exception):
    """
    The client was disconnected with L{FractalClient.disconnect}; it makes no
    more calls.
    """


class _ClientAMP(amp.AMP):
    """
    The client's side of a connection: it sends calls and answers none, so a
    node cannot call anything on the client (not even AMP's C{StartTLS}), and
    it tells its client when it connects and when it is lost.
    """

    def __init__(self, client: FractalClient) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._client = client

    def locateResponder(self, name: bytes) -> None:
        return None

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        self._client._connectionMade(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        # Forget the connection before AMP fails its outstanding calls, so a
        # call made from one of their errbacks waits for the next connection.
        self._client._connectionLost(self)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class _ClientFactory(Factory):
    def __init__(self, client: FractalClient) -> None:
        self._client = client

    def buildProtocol(self, addr: object) -> _ClientAMP:
        protocol = _ClientAMP(self._client)
        protocol.factory = self
        return protocol


class FractalClient:
    """
    A client of a fractal node, over one reconnecting AMP connection.

    @ivar timeout: the default per-call timeout, in seconds.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        endpoint: IStreamClientEndpoint,
        timeout: float = DEFAULT_TIMEOUT,
        retryPolicy: RetryPolicy | None = None,
    ) -> None:
        """
        Start connecting to C{endpoint}.

        @param clock: the reactor (or a L{twisted.internet.task.Clock} in
            tests) that times calls and reconnection attempts.
        @param endpoint: where the node is.
        @param timeout: the default per-call timeout, in seconds.
        @param retryPolicy: seconds to wait before reconnection attempt
            number C{n} (counting from 1); by default an exponential back-off
            from 0.1 to 5 seconds, with jitter.
        """
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        self._clock = clock
        self.timeout = timeout
        self._stopped = False
        self._connection: _ClientAMP | None = None
        self._waiting: list[Deferred[amp.AMP]] = []
        # ClientService only (re)connects.  The client tracks the connection
        # itself rather than asking ClientService.whenConnected, which must
        # not be called from code its own state machine is running (such as
        # a callback of an earlier whenConnected).
        self._service = ClientService(
            endpoint,
            _ClientFactory(self),
            retryPolicy=retryPolicy or backoffPolicy(initialDelay=0.1, maxDelay=5.0),
            clock=clock,
        )
        self._service.startService()

    def _connectionMade(self, connection: _ClientAMP) -> None:
        self._connection = connection
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(connection)

    def _connectionLost(self, connection: _ClientAMP) -> None:
        if self._connection is connection:
            self._connection = None

    def _waitForConnection(self) -> Deferred[amp.AMP]:
        """
        The current connection, or the next one.
        """
        if self._connection is not None:
            return succeed(self._connection)

        def cancel(d: Deferred[amp.AMP]) -> None:
            if d in self._waiting:
                self._waiting.remove(d)

        waiter: Deferred[amp.AMP] = Deferred(cancel)
        self._waiting.append(waiter)
        return waiter

    def _connectionFor(self, user: str | None) -> Deferred[amp.AMP]:
        """
        The connection a call for C{user} goes on, once there is one.

        This is the one place that chooses a connection; a client that knows
        the shard map chooses the user's owner here.

        @param user: the user key of the call, or L{None}.
        """
        return self._waitForConnection()

    def callRemote(
        self,
        command: type[amp.Command],
        user: str | None = None,
        *,
        timeout: float | None = None,
        **arguments: Any,
    ) -> Deferred[dict[str, Any]]:
        """
        Call C{command} on the node.

        @param command: an AMP command, usually a L{fractal.app.UserCommand}.
        @param user: the user key the call is for: the C{user} argument of a
            L{fractal.app.UserCommand}.
        @param timeout: seconds before the call fails with L{CallTimeout};
            L{FractalClient.timeout} by default.
        @param arguments: the command's other arguments, by name.
        @return: a L{Deferred} that fires with the answer as a C{dict}, or
            fails with one of the command's declared errors, L{CallTimeout},
            L{ClientStopped}, or the connection's loss.
        """
        if self._stopped:
            return fail(ClientStopped("the client is disconnected"))
        if user is not None:
            arguments["user"] = user
        limit = self.timeout if timeout is None else timeout
        name = command.commandName.decode("ascii", "replace")

        def send(connection: amp.AMP) -> Deferred[dict[str, Any]]:
            answer: Deferred[dict[str, Any]] = connection.callRemote(  # type: ignore[no-untyped-call]
                command, **arguments
            )
            return answer

        def timedOut(result: object, seconds: float) -> object:
            raise CallTimeout(f"{name} got no answer within {seconds:g} seconds")

        call = self._connectionFor(user).addCallback(send)
        call.addTimeout(limit, self._clock, onTimeoutCancel=timedOut)
        return call

    def whenConnected(self, timeout: float | None = None) -> Deferred[None]:
        """
        Wait until the client is connected.

        @param timeout: seconds before failing with L{CallTimeout};
            L{FractalClient.timeout} by default.
        @return: a L{Deferred} that fires with L{None} once connected.
        """
        limit = self.timeout if timeout is None else timeout

        def timedOut(result: object, seconds: float) -> object:
            raise CallTimeout(f"not connected within {seconds:g} seconds")

        connected = self._connectionFor(None).addCallback(lambda connection: None)
        connected.addTimeout(limit, self._clock, onTimeoutCancel=timedOut)
        return connected

    def disconnect(self) -> Deferred[None]:
        """
        Close the connection and stop reconnecting.  Calls still waiting for
        a connection fail with L{ClientStopped}; calls in flight fail with the
        connection's loss.

        @return: a L{Deferred} that fires once the connection is closed.
        """
        self._stopped = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(ClientStopped("the client was disconnected"))
        stopped: Deferred[None] = self._service.stopService()
        return stopped


def connect(
    reactor: Any,
    description: str,
    timeout: float = DEFAULT_TIMEOUT,
    retryPolicy: RetryPolicy | None = None,
) -> FractalClient:
    """
    Connect to a fractal node.

    @param reactor: the reactor, which must provide
        L{twisted.internet.interfaces.IReactorTime} and whatever the endpoint
        needs (C{IReactorTCP} for C{tcp:}).
    @param description: a client endpoint description, for example
        C{"tcp:host=127.0.0.1:port=7100"}.
    @param timeout: the default per-call timeout, in seconds.
    @param retryPolicy: see L{FractalClient.__init__}.
    @return: a client, already connecting; calls made before the connection
        is up wait for it (within their timeout).
    @raise ValueError: if C{description} is not a valid endpoint description.
    """
    endpoint = clientFromString(reactor, description)  # type: ignore[no-untyped-call]
    return FractalClient(reactor, endpoint, timeout=timeout, retryPolicy=retryPolicy)


def __getattr__(name: str) -> Any:
    """
    The smart client, L{fractal.routing.smart.ClusterClient} and
    L{fractal.routing.smart.connectCluster}, importable from here too (looked
    up lazily, as that module builds on this one).
    """
    if name in ("ClusterClient", "connectCluster"):
        from fractal.routing import smart

        return getattr(smart, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

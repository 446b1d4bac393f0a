# -*- test-case-name: tests.test_client -*-
# mypy: disable-error-code="no-untyped-call"
"""
Calling a fractal node: a reconnecting AMP client with per-call timeouts::

    from fractal.client import connect

    client = connect(reactor, "tcp:host=127.0.0.1:port=7100", timeout=5)
    answer = await client.callRemote(Deliver, user="alice@example.com",
                                     sender="bob", subject="hi", body="...")
    answer = await client.callRemoteWithTimeout(2.5, Deliver, user=..., ...)
    await client.disconnect()

The client keeps one connection open, reconnecting with back-off whenever it
drops.  Every call is bounded by a timeout that covers waiting for a
connection and waiting for the answer: when it expires the call fails with
L{CallTimeout}, never hangs, and is never sent afterwards.  Errors a node
declares (the command's own and L{fractal.protocol}'s) arrive as the typed
exceptions the command lists.

Every keyword argument of L{FractalClient.callRemote} is an argument of the
command, C{user} included, with one exception kept for compatibility: a
C{timeout} keyword sets the call's timeout when the command has no argument
named C{timeout}.  L{FractalClient.callRemoteWithTimeout} takes the timeout
as its first positional argument, so it cannot collide with any argument.

Calls are encoded and answers decoded straight from the command's schema
(made once per command), each call's box is written to the transport
without building an C{AmpBox}, answers are read from the connection in one
loop (L{fractal._framing}), and one timer per client times all its calls
out; a command whose arguments or methods customise AMP's encoding goes
through AMP's own C{callRemote} instead.  Writing boxes beside AMP relies
on private parts of Twisted's AMP: the client reaches them only through
L{fractal._framing}, which lists them and whose tests check them.  Over TLS, a connection carries
calls only once its handshake (and the check of the node's certificate)
has passed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    INegotiated,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from fractal._framing import (
    argumentSchema,
    boxParser,
    canReadBoxes,
    expectAnswer,
    failedReason,
    nextTag,
    readBoxes,
    takeAnswer,
    usualArguments,
    writableTransport,
)

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


@implementer(IHandshakeListener)
class _ClientAMP(amp.AMP):
    """
    The client's side of a connection: it sends calls and answers none, so a
    node cannot call anything on the client (not even AMP's C{StartTLS}), and
    it tells its client when it connects and when it is lost.  Over TLS it is
    connected only once the handshake, with the check of the node's
    certificate, has succeeded: no call is sent to a node not yet verified.
    """

    def __init__(self, client: FractalClient) -> None:
        super().__init__()
        self._client = client

    def locateResponder(self, name: bytes) -> None:
        return None

    def dataReceived(self, data: bytes) -> None:
        """
        Read the complete answers at the start of C{data} in one loop; give
        the rest (a partial box) to AMP's parser.
        """
        if not canReadBoxes(self):
            super().dataReceived(data)
            return
        offset = readBoxes(self, data)
        if offset < len(data):
            super().dataReceived(data[offset:])

    def _answerReceived(self, box: amp.AmpBox) -> None:
        """
        Fire the call C{box} answers.  Unlike AMP, add no errback that drops
        the connection: the call's L{Deferred} is the caller's, who handles
        its result (L{FractalClient} hands every call's to its caller).
        """
        takeAnswer(self, box[amp.ANSWER]).callback(box)

    def _errorReceived(self, box: amp.AmpBox) -> None:
        """
        Fail the call C{box} answers with an error, as AMP does, but without
        AMP's connection-dropping errback (see L{_answerReceived}).
        """
        question = takeAnswer(self, box[amp.ERROR])
        code = box[amp.ERROR_CODE]
        description = box[amp.ERROR_DESCRIPTION].decode("utf-8", "replace")
        errorType = amp.PROTOCOL_ERRORS.get(code)
        if errorType is not None:
            question.errback(Failure(errorType(code, description)))
        else:
            question.errback(Failure(amp.RemoteAmpError(code, description)))

    def connectionMade(self) -> None:
        super().connectionMade()
        if not INegotiated.providedBy(self.transport):
            self._client._connectionMade(self)

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake succeeded, the node's certificate verified: the
        connection may carry calls.
        """
        if self.transport is not None and not getattr(self.transport, "disconnecting", False):
            self._client._connectionMade(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        # Forget the connection before AMP fails its outstanding calls, so a
        # call made from one of their errbacks waits for the next connection.
        self._client._connectionLost(self)
        super().connectionLost(reason)


class _ClientFactory(Factory):
    def __init__(self, client: FractalClient) -> None:
        self._client = client

    def buildProtocol(self, addr: object) -> _ClientAMP:
        protocol = _ClientAMP(self._client)
        protocol.factory = self
        return protocol


class _Codec:
    """
    How the client encodes one command's call and decodes its answer, as
    AMP's C{Command} does, made once per command.

    @ivar argumentNames: the Python names of the command's arguments.
    @ivar usual: whether the command encodes and decodes as plain AMP does;
        for any other command L{send} uses AMP's own C{callRemote}.
    """

    def __init__(self, command: type[amp.Command]) -> None:
        self.command = command
        self.name: bytes = command.commandName
        self.requiresAnswer: bool = command.requiresAnswer
        self.reverseErrors: dict[bytes, type[Exception]] = command.reverseErrors  # type: ignore[attr-defined]
        self.arguments = argumentSchema(command.arguments, "toStringProto")
        self._parseAnswer = boxParser(command.response)
        self.argumentNames = frozenset(name for _, name, _, _ in self.arguments)
        self.usual = (
            command.__init__ is amp.Command.__init__
            and all(
                getattr(command, method).__func__ is getattr(amp.Command, method).__func__
                for method in ("makeArguments", "parseResponse")
            )
            and command._doCommand is amp.Command._doCommand
            and usualArguments(command.arguments, ("toBox", "retrieve"))
            and usualArguments(command.response, ("fromBox", "retrieve"))
            and all(len(wire) <= amp.MAX_KEY_LENGTH for wire, _ in command.arguments)
            and 0 < len(self.name) <= amp.MAX_VALUE_LENGTH
        )
        # The wire form of each key, and of the box's start: its command
        # name, then the key of its tag (whose value is the call's own).
        self._keys = [_string(wire) for wire, _, _, _ in self.arguments]
        self._head = _string(amp.COMMAND) + _string(self.name)
        if self.requiresAnswer:
            self._head += _string(amp.ASK)

    def send(self, connection: amp.AMP, arguments: dict[str, Any]) -> Deferred[Any]:
        """
        Send a call with C{arguments} on C{connection}.

        The box is written to the connection's transport as AMP's
        C{_sendBoxCommand} and C{sendBox} would write it (a tag from the
        connection, the call's L{Deferred} among the connection's
        outstanding requests), but without building an L{amp.AmpBox} and
        sorting and framing its keys on every call.  A connection in a state
        plain AMP calls are not made in (switched protocols, starting TLS)
        goes through AMP's own C{callRemote}.

        @return: fires with the answer as a C{dict} (L{None} for a command
            that requires no answer), or fails with the command's declared
            error, L{amp.InvalidSignature} for arguments that do not fit,
            L{amp.TooLong} for a value over 65,535 bytes, or the connection's
            loss.
        """
        transport = writableTransport(connection) if self.usual else None
        if transport is None:
            answer: Deferred[Any] | None = connection.callRemote(self.command, **arguments)
            return succeed(None) if answer is None else answer
        reason = failedReason(connection)
        if reason is not None:
            return fail(reason)
        try:
            parts = self.encode(arguments, connection)
        except Exception:
            return fail()
        if not self.requiresAnswer:
            parts[0] = self._head
            transport.write(b"".join(parts))
            return succeed(None)
        tag = nextTag(connection)
        parts[0] = self._head + _string(tag)
        transport.write(b"".join(parts))
        answer = expectAnswer(connection, tag)
        return answer.addCallbacks(self.decode, self.translateError, (connection,))

    def encode(self, arguments: dict[str, Any], connection: amp.AMP) -> list[bytes]:
        """
        The wire form of a call with C{arguments}: its argument pairs and the
        box's end, after an empty first item for the box's start.

        @raise amp.InvalidSignature: for an argument the command does not
            have, or a required one missing.
        @raise amp.TooLong: for a value over 65,535 bytes.
        """
        parts = [b""]
        used = 0
        for key, (wire, name, optional, toString) in zip(self._keys, self.arguments):
            value = arguments.get(name)
            if value is None:
                if name not in arguments:
                    if optional:
                        continue
                    raise amp.InvalidSignature(
                        f"forgot {name} for {self.name.decode('ascii', 'replace')}"
                    )
                used += 1
                if optional:
                    continue
            else:
                used += 1
            data = toString(value, connection)
            if isinstance(data, str):
                raise TypeError(f"argument {name} encodes as str, not bytes")
            if len(data) > amp.MAX_VALUE_LENGTH:
                raise amp.TooLong(False, True, data, wire)
            parts += (key, len(data).to_bytes(2, "big"), data)
        if used != len(arguments):
            unknown = sorted(set(arguments) - self.argumentNames)
            raise amp.InvalidSignature(f"{unknown[0]} is not a valid argument")
        parts.append(b"\x00\x00")
        return parts

    def decode(self, box: amp.AmpBox, connection: amp.AMP) -> dict[str, Any]:
        """
        The answer in C{box}, as a C{dict}.
        """
        return self._parseAnswer(box, connection)

    def timedOut(self, result: object, seconds: float) -> object:
        """
        A call of this command was cancelled by its timeout: fail it with
        L{CallTimeout}.
        """
        name = self.name.decode("ascii", "replace")
        raise CallTimeout(f"{name} got no answer within {seconds:g} seconds")

    def translateError(self, reason: Failure) -> Failure:
        """
        A remote error as the command's declared exception.
        """
        reason.trap(amp.RemoteAmpError)
        remote: amp.RemoteAmpError = reason.value  # type: ignore[assignment]
        errorType = self.reverseErrors.get(remote.errorCode, amp.UnknownRemoteError)
        return Failure(errorType(remote.description))


_codecs: dict[type[amp.Command], _Codec] = {}


def _string(data: bytes) -> bytes:
    """
    C{data} as AMP frames a key or a value: its length in two bytes, then
    itself.
    """
    return len(data).to_bytes(2, "big") + data


class _Deadlines:
    """
    The timeouts of a client's calls, with one timer for all of them rather
    than one per call (as C{Deferred.addTimeout} would set): the timer is
    set for the earliest deadline and, when it fires, cancels every call
    that is due and is set again for the next.  A call that ends removes
    itself; when none is left, neither is the timer.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._calls: dict[Deferred[Any], tuple[float, float, Callable[[Any, float], object]]] = {}
        self._expired: set[Deferred[Any]] = set()
        self._timer: IDelayedCall | None = None
        self._timerAt = math.inf

    def add(
        self,
        call: Deferred[Any],
        seconds: float,
        timedOut: Callable[[Any, float], object],
    ) -> None:
        """
        Cancel C{call} if it has no result within C{seconds}, and then make
        its result what C{timedOut(failure, seconds)} returns or raises.
        """
        if call.called and not isinstance(call.result, Deferred):
            return
        deadline = self._clock.seconds() + seconds
        self._calls[call] = (deadline, seconds, timedOut)
        call.addBoth(self._ended, call)
        if deadline < self._timerAt:
            self._setTimer(deadline)

    def _setTimer(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timerAt = deadline
        self._timer = self._clock.callLater(
            max(0.0, deadline - self._clock.seconds()), self._expire
        )

    def _ended(self, result: object, call: Deferred[Any]) -> object:
        entry = self._calls.pop(call, None)
        if not self._calls and self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timerAt = math.inf
        if call in self._expired:
            self._expired.discard(call)
            if entry is not None and isinstance(result, Failure) and result.check(CancelledError):
                return entry[2](result, entry[1])
        return result

    def _expire(self) -> None:
        """
        Cancel every call that is due, and set the timer for the next one.
        """
        due = max(self._timerAt, self._clock.seconds())
        self._timer = None
        self._timerAt = math.inf
        expired = [call for call, (deadline, _, _) in self._calls.items() if deadline <= due]
        for call in expired:
            self._expired.add(call)
            call.cancel()
        if self._calls:
            self._setTimer(min(deadline for deadline, _, _ in self._calls.values()))


def _codecFor(command: type[amp.Command]) -> _Codec:
    """
    The L{_Codec} of C{command}, made on its first use.
    """
    codec = _codecs.get(command)
    if codec is None:
        codec = _codecs[command] = _Codec(command)
    return codec


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
        self._deadlines = _Deadlines(clock)
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

    def _connectionNow(self, user: object) -> amp.AMP | None:
        """
        The connection L{_connectionFor} would choose for C{user} if it is up
        now, else L{None}: the fast path of a call.
        """
        return self._connection

    def callRemote(
        self, command: type[amp.Command], user: str | None = None, /, **arguments: Any
    ) -> Deferred[dict[str, Any]]:
        """
        Call C{command} on the node.

        @param command: an AMP command, usually a L{fractal.app.UserCommand}.
        @param user: the user key the call is for: the C{user} argument of a
            L{fractal.app.UserCommand}, which may as well be given by keyword.
        @param arguments: the command's arguments, by name.  For
            compatibility, C{timeout} is the call's timeout in seconds (see
            L{callRemoteWithTimeout}) unless the command has an argument
            named C{timeout}, which it then is.
        @return: a L{Deferred} that fires with the answer as a C{dict}, or
            fails with one of the command's declared errors, L{CallTimeout},
            L{ClientStopped}, L{amp.InvalidSignature} (arguments that do not
            fit the command), or the connection's loss.
        """
        timeout = None
        if "timeout" in arguments and "timeout" not in _codecFor(command).argumentNames:
            timeout = arguments.pop("timeout")
        return self._call(command, user, timeout, arguments)

    def callRemoteWithTimeout(
        self,
        timeout: float | None,
        command: type[amp.Command],
        user: str | None = None,
        /,
        **arguments: Any,
    ) -> Deferred[dict[str, Any]]:
        """
        Call C{command} on the node within C{timeout} seconds.  Every keyword
        argument, C{timeout} too, is an argument of the command.

        @param timeout: seconds before the call fails with L{CallTimeout};
            L{None} for L{FractalClient.timeout}.
        @param command: see L{callRemote}.
        @param user: see L{callRemote}.
        @param arguments: the command's arguments, by name.
        @return: see L{callRemote}.
        """
        return self._call(command, user, timeout, arguments)

    def _call(
        self,
        command: type[amp.Command],
        user: str | None,
        timeout: float | None,
        arguments: dict[str, Any],
    ) -> Deferred[dict[str, Any]]:
        """
        Send one call: on the chosen connection at once if it is up, else
        once it is, all within the call's timeout.
        """
        if self._stopped:
            return fail(ClientStopped("the client is disconnected"))
        if user is None:
            user = arguments.get("user")
        elif arguments.setdefault("user", user) != user:
            return fail(TypeError("two user keys given, by position and by name"))
        codec = _codecFor(command)
        connection = self._connectionNow(user)
        if connection is not None:
            call = codec.send(connection, arguments)
        else:
            call = self._connectionFor(user).addCallback(codec.send, arguments)
        self._deadlines.add(call, self.timeout if timeout is None else timeout, codec.timedOut)
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
    endpoint = clientFromString(reactor, description)
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

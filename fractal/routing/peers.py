# -*- test-case-name: tests.test_routing_peers -*-
# mypy: disable-error-code="no-untyped-call"
"""
Links to peer nodes, and forwarding raw AMP boxes over them.

A node that receives a call for a user it does not own relays the box, as it
came, to the owner and relays the owner's answer box back.  It reads nothing
of the box but the user key (its caller did that) and the C{_ask} tag, which
it swaps for a tag of the peer link's own and swaps back on the answer, as
the epsilon AMP router does with its route key.  The forwarding node
therefore needs none of the application's command classes.

Each peer has one persistent connection kept up by a
L{twisted.application.internet.ClientService} (reconnecting with backoff).
A call for a peer whose link was up and is now down (its connection was
lost, and reconnecting fails) fails at once with
L{fractal.protocol.OwnerUnavailable}; a call on a link that has not been up
yet (peers start in any order) waits at most C{connectTimeout} for it; a
call the peer does not answer within C{callTimeout} fails the same way.  A
call that was never sent fails with L{fractal.protocol.CallNotSent} (an
L{OwnerUnavailable}), so the forwarding node knows it may route it again; a
call sent and not answered may have run, and is not; except when the peer
has said it is stopping (it answered a call L{fractal.protocol.NodeStopping}):
it answers every call it accepted before it closes its connections, so the
calls it leaves unanswered, and those made until the link is up again, fail
with L{fractal.protocol.PeerStopped}, a L{CallNotSent}.
Nothing here waits without a bound, and one slow or dead peer holds up only
the calls for its own users.
"""

from __future__ import annotations

import random
from typing import Callable, Iterable

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    INegotiated,
    IProtocol,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from fractal.certs import NodeCredentials, peerClientCreator
from fractal.protocol import (
    FRAMEWORK_ERRORS,
    CallNotSent,
    NodeStopping,
    OwnerUnavailable,
    PeerStopped,
)
from fractal.routing.interfaces import ITopology, NodeAddress, ShardMap

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_RETRY_POLICY",
    "DEFAULT_MAX_IN_FLIGHT",
    "PeerLink",
    "PeerLinks",
    "EndpointFactory",
    "peerEndpointFactory",
]

DEFAULT_CALL_TIMEOUT = 5.0
"""
Seconds a forwarded call waits for the owner's answer before failing with
L{OwnerUnavailable}.
"""

DEFAULT_CONNECT_TIMEOUT = 3.0
"""
Seconds a forwarded call waits for a peer link that has not been up yet.
Longer than the longest wait between reconnection attempts
(L{DEFAULT_RETRY_POLICY}), so at least one attempt falls inside it.
"""


def _jitter() -> float:
    return random.random() * 0.2


DEFAULT_RETRY_POLICY = backoffPolicy(initialDelay=0.1, maxDelay=1.0, jitter=_jitter)
"""
Seconds before each reconnection attempt to a peer: from 0.1 growing to 1
second, plus up to 0.2 seconds of jitter.  Attempts are cheap (a refused
connection on a dead node), and a short wait means a restarted peer is used
again quickly.
"""

DEFAULT_MAX_IN_FLIGHT = 200
"""
The most forwarded calls one peer link has in flight at once; more wait, in
order, for room (within the call timeout).  One link carries the calls of all
of a node's clients for that peer, and the peer bounds the calls outstanding
on each connection (L{fractal.server.ServerLimits.maxOutstanding}, 256 by
default): this keeps the link under that bound rather than have its calls
refused as C{Overloaded}.
"""

EndpointFactory = Callable[[NodeAddress], IStreamClientEndpoint]
"""
Makes the client endpoint that reaches a peer's peer listener.
"""

_NODE_STOPPING = FRAMEWORK_ERRORS[NodeStopping]
_ERROR_CODE = b"_error_code"
_ANSWER = b"_answer"
_ERROR = b"_error"
_ASK = b"_ask"


def peerEndpointFactory(
    reactor: object, credentials: NodeCredentials | None = None
) -> EndpointFactory:
    """
    The endpoint factory of a real node: parse each peer's C{peer}
    description and, when the node has credentials, wrap it in mutual TLS
    that checks the peer's node id.

    @param reactor: the reactor to connect with.
    @param credentials: a L{fractal.certs.NodeCredentials}, or L{None} for
        plain TCP (see L{fractal.certs.checkPeerTransport}).
    """

    def endpointFor(address: NodeAddress) -> IStreamClientEndpoint:
        if address.peer is None:
            raise ValueError(f"node {address.node!r} has no peer endpoint")
        endpoint: IStreamClientEndpoint = clientFromString(reactor, address.peer)
        if credentials is not None:
            endpoint = wrapClientTLS(peerClientCreator(credentials, address.node), endpoint)
        return endpoint

    return endpointFor


@implementer(amp.IBoxReceiver)
class _PeerClientReceiver:
    """
    The receiving side of one connection to a peer: it matches answer boxes
    to the calls waiting for them.
    """

    def __init__(self, link: PeerLink) -> None:
        self._link = link
        self.sender: amp.IBoxSender | None = None

    def startReceivingBoxes(self, boxSender: amp.IBoxSender) -> None:
        self.sender = boxSender
        if not INegotiated.providedBy(getattr(boxSender, "transport", None)):
            self._link._connected(self)
        # Over TLS, the link is up only once the handshake, with the check of
        # the peer's node id, has succeeded: see handshakeCompleted.

    def handshakeCompleted(self) -> None:
        transport = getattr(self.sender, "transport", None)
        if transport is not None and not transport.disconnecting:
            self._link._connected(self)

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        self._link._answerReceived(box)

    def stopReceivingBoxes(self, reason: Failure) -> None:
        self._link._disconnected(self, reason)


@implementer(IHandshakeListener)
class _PeerClientProtocol(amp.BinaryBoxProtocol):
    """
    The framing of one connection to a peer, telling its receiver when a TLS
    handshake has finished.
    """

    def __init__(self, link: PeerLink) -> None:
        self._peerReceiver = _PeerClientReceiver(link)
        amp.BinaryBoxProtocol.__init__(self, self._peerReceiver)

    def handshakeCompleted(self) -> None:
        self._peerReceiver.handshakeCompleted()


class _ObservedEndpoint:
    """
    A client endpoint that tells its link when a connection attempt fails,
    so the link knows its peer is down without waiting for the next retry.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, link: PeerLink) -> None:
        self._endpoint = endpoint
        self._link = link

    def connect(self, factory: Factory) -> Deferred[IProtocol]:
        d = self._endpoint.connect(factory)

        def failed(reason: Failure) -> Failure:
            self._link._attemptFailed(reason)
            return reason

        return d.addErrback(failed)


implementer(IStreamClientEndpoint)(_ObservedEndpoint)


class PeerLink:
    """
    The persistent link to one peer node, and the forwarded calls waiting on
    it.

    @ivar node: the peer's node id.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        node: str,
        endpoint: IStreamClientEndpoint,
        callTimeout: float = DEFAULT_CALL_TIMEOUT,
        connectTimeout: float = DEFAULT_CONNECT_TIMEOUT,
        retryPolicy: Callable[[int], float] | None = None,
        maxInFlight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        """
        @param clock: the clock for timeouts and reconnection delays.
        @param node: the peer's node id.
        @param endpoint: how to reach the peer's peer listener.
        @param callTimeout: see L{DEFAULT_CALL_TIMEOUT}.
        @param connectTimeout: see L{DEFAULT_CONNECT_TIMEOUT}.
        @param retryPolicy: seconds to wait before each reconnection
            attempt, by the number of failed attempts so far.
        @param maxInFlight: see L{DEFAULT_MAX_IN_FLIGHT}.
        """
        if maxInFlight < 1:
            raise ValueError(f"maxInFlight must be positive, not {maxInFlight!r}")
        self.node = node
        self._maxInFlight = maxInFlight
        self._backlog: list[tuple[amp.AmpBox, Deferred[amp.AmpBox], IDelayedCall]] = []
        self._clock = clock
        self._callTimeout = callTimeout
        self._connectTimeout = connectTimeout
        self._receiver: _PeerClientReceiver | None = None
        self._peerStopping = False
        self._down: str | None = None
        self._everConnected = False
        self._lastError: str | None = None
        self._nextTag = 0
        self._waiting: dict[bytes, tuple[bytes, Deferred[amp.AmpBox], IDelayedCall]] = {}
        self._queued: list[tuple[amp.AmpBox, Deferred[amp.AmpBox], IDelayedCall]] = []
        self.service = ClientService(
            _ObservedEndpoint(endpoint, self),  # type: ignore[arg-type]
            Factory.forProtocol(lambda: _PeerClientProtocol(self)),
            retryPolicy=retryPolicy or DEFAULT_RETRY_POLICY,
            clock=clock,
        )

    @property
    def connected(self) -> bool:
        """
        Whether the link is up now.
        """
        return self._receiver is not None

    def forward(self, box: amp.AmpBox) -> Deferred[amp.AmpBox | None]:
        """
        Send C{box}, a call, to the peer and return its answer.

        @param box: the call's box, as received; it is not changed.
        @return: a Deferred that fires with the answer box (an C{_answer} or
            C{_error} box carrying C{box}'s own C{_ask} tag) or with L{None}
            at once when C{box} asks for no answer; or fails with
            L{OwnerUnavailable} when the peer is down, not connected within
            the connect timeout, or does not answer within the call timeout.
        """
        if _ASK not in box:
            if self._receiver is not None and self._receiver.sender is not None:
                self._receiver.sender.sendBox(amp.AmpBox(box))
            return succeed(None)
        if self._receiver is None:
            if self._down is not None:
                return fail(self._notSent(self._down))
            d: Deferred[amp.AmpBox] = Deferred()
            entry: tuple[amp.AmpBox, Deferred[amp.AmpBox], IDelayedCall]
            timeout = self._clock.callLater(
                self._connectTimeout, lambda: self._queueTimedOut(entry)
            )
            entry = (box, d, timeout)
            self._queued.append(entry)
            return d  # type: ignore[return-value]
        d = Deferred()
        self._submit(box, d)
        return d  # type: ignore[return-value]

    def _submit(self, box: amp.AmpBox, d: Deferred[amp.AmpBox]) -> None:
        """
        Send a call now, or hold it until fewer calls are in flight.
        """
        if len(self._waiting) < self._maxInFlight:
            self._send(box, d)
            return
        entry: tuple[amp.AmpBox, Deferred[amp.AmpBox], IDelayedCall]
        timeout = self._clock.callLater(self._callTimeout, lambda: self._backlogTimedOut(entry))
        entry = (box, d, timeout)
        self._backlog.append(entry)

    def _backlogTimedOut(
        self, entry: tuple[amp.AmpBox, Deferred[amp.AmpBox], IDelayedCall]
    ) -> None:
        self._backlog.remove(entry)
        entry[1].errback(
            self._notSent(f"no room on the link within {self._callTimeout:g} s (calls queued)")
        )

    def _drain(self) -> None:
        """
        Send held calls while there is room in flight.
        """
        while self._backlog and self._receiver is not None:
            if len(self._waiting) >= self._maxInFlight:
                return
            box, d, timeout = self._backlog.pop(0)
            # The call keeps the deadline it got when it was made.
            remaining = max(0.0, timeout.getTime() - self._clock.seconds())
            timeout.cancel()
            self._send(box, d, remaining)

    def _send(
        self, box: amp.AmpBox, d: Deferred[amp.AmpBox], timeLimit: float | None = None
    ) -> None:
        assert self._receiver is not None and self._receiver.sender is not None
        self._nextTag += 1
        tag = b"%x" % (self._nextTag,)
        relayed = amp.AmpBox(box)
        relayed[_ASK] = tag
        timeout = self._clock.callLater(
            self._callTimeout if timeLimit is None else timeLimit, self._callTimedOut, tag
        )
        self._waiting[tag] = (box[_ASK], d, timeout)
        self._receiver.sender.sendBox(relayed)

    def _unavailable(self, why: str) -> OwnerUnavailable:
        return OwnerUnavailable(f"owner node {self.node!r} is unavailable: {why}")

    def _notSent(self, why: str) -> CallNotSent:
        if self._peerStopping:
            return PeerStopped(f"owner node {self.node!r} is stopping: {why}")
        return CallNotSent(f"owner node {self.node!r} is unavailable: {why}")

    def _queueTimedOut(
        self, entry: tuple[amp.AmpBox, Deferred[amp.AmpBox], IDelayedCall]
    ) -> None:
        self._queued.remove(entry)
        why = f"not connected within {self._connectTimeout:g} s"
        if self._lastError is not None:
            why += f" (last attempt: {self._lastError})"
        entry[1].errback(self._notSent(why))

    def _callTimedOut(self, tag: bytes) -> None:
        _, d, _ = self._waiting.pop(tag)
        d.errback(self._unavailable(f"no answer within {self._callTimeout:g} s"))
        self._drain()

    def _connected(self, receiver: _PeerClientReceiver) -> None:
        self.log.info("peer link to {node} is up", node=self.node)
        self._receiver = receiver
        self._peerStopping = False
        self._everConnected = True
        self._down = None
        queued, self._queued = self._queued, []
        for box, d, timeout in queued:
            timeout.cancel()
            self._submit(box, d)

    def _attemptFailed(self, reason: Failure) -> None:
        self._lastError = reason.getErrorMessage()
        if not self._everConnected:
            # Peers start in any order: until a link has been up once, a
            # refused attempt means "not started yet", and calls wait (for
            # the connect timeout at most) for a later attempt.
            return
        self._down = f"cannot connect: {reason.getErrorMessage()}"
        queued, self._queued = self._queued, []
        for _, d, timeout in queued:
            timeout.cancel()
            d.errback(self._notSent(self._down))

    def _disconnected(self, receiver: _PeerClientReceiver, reason: Failure) -> None:
        if receiver is not self._receiver:
            self._lastError = reason.getErrorMessage()
            if self._everConnected and self._receiver is None:
                # A new connection failed before it was up (for example, its
                # TLS handshake): say why to the calls that come next.
                self._down = f"cannot connect: {reason.getErrorMessage()}"
            return
        self.log.info("peer link to {node} is down: {why}", node=self.node,
                      why=reason.getErrorMessage())
        self._receiver = None
        self._down = "connection lost"
        waiting, self._waiting = self._waiting, {}
        backlog, self._backlog = self._backlog, []
        for _, d, timeout in waiting.values():
            timeout.cancel()
            if self._peerStopping:
                d.errback(self._notSent("it closed the connection without running the call"))
            else:
                d.errback(self._unavailable("connection lost before it answered"))
        for _, d, timeout in backlog:
            timeout.cancel()
            d.errback(self._notSent("connection lost before the call was sent"))

    def _answerReceived(self, box: amp.AmpBox) -> None:
        tag = box.get(_ANSWER)
        key = _ANSWER
        if tag is None:
            tag, key = box.get(_ERROR), _ERROR
        entry = self._waiting.pop(tag, None) if tag is not None else None
        if entry is None:
            # A late answer to a call that timed out, or a peer speaking out
            # of turn: nobody is waiting for it.
            return
        originalTag, d, timeout = entry
        timeout.cancel()
        if key == _ERROR and box.get(_ERROR_CODE) == _NODE_STOPPING:
            self._peerStopping = True
        answer = amp.AmpBox(box)
        answer[key] = originalTag
        d.callback(answer)
        self._drain()

    def stop(self) -> None:
        """
        Fail every call still waiting; used when the link's service stops.
        """
        self._down = "the node is stopping"
        queued, self._queued = self._queued, []
        backlog, self._backlog = self._backlog, []
        waiting, self._waiting = self._waiting, {}
        for _, d, timeout in queued + backlog + list(waiting.values()):
            timeout.cancel()
            d.errback(self._unavailable(self._down))


class _LinkService(MultiService):
    """
    Runs one L{PeerLink}'s connection, failing its waiting calls on stop.
    """

    def __init__(self, link: PeerLink) -> None:
        MultiService.__init__(self)
        self.link = link
        link.service.setServiceParent(self)

    def stopService(self) -> Deferred[None]:
        self.link.stop()
        return MultiService.stopService(self)  # type: ignore[no-any-return]


class PeerLinks(MultiService):
    """
    One L{PeerLink} for every other node in the topology's shard map, kept
    in step with the map as it changes.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        topology: ITopology,
        endpointFor: EndpointFactory,
        callTimeout: float = DEFAULT_CALL_TIMEOUT,
        connectTimeout: float = DEFAULT_CONNECT_TIMEOUT,
        retryPolicy: Callable[[int], float] | None = None,
        maxInFlight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        """
        @param clock: the clock for timeouts and reconnection delays.
        @param topology: the source of the shard map.
        @param endpointFor: makes the endpoint reaching a peer (see
            L{peerEndpointFactory}).
        @param callTimeout: see L{DEFAULT_CALL_TIMEOUT}.
        @param connectTimeout: see L{DEFAULT_CONNECT_TIMEOUT}.
        @param retryPolicy: see L{PeerLink.__init__}.
        @param maxInFlight: see L{DEFAULT_MAX_IN_FLIGHT}.
        """
        MultiService.__init__(self)
        self._maxInFlight = maxInFlight
        self._clock = clock
        self._topology = topology
        self._endpointFor = endpointFor
        self._callTimeout = callTimeout
        self._connectTimeout = connectTimeout
        self._retryPolicy = retryPolicy
        self._links: dict[str, _LinkService] = {}
        self._unwatch: Callable[[], None] | None = None
        self._mapChanged(topology.currentMap())

    def _peersOf(self, shardMap: ShardMap) -> Iterable[NodeAddress]:
        for address in shardMap.nodes.values():
            if address.node != self._topology.localNode and address.peer is not None:
                yield address

    def _mapChanged(self, shardMap: ShardMap) -> None:
        current = {address.node: address for address in self._peersOf(shardMap)}
        for node in list(self._links):
            if node not in current:
                self._links.pop(node).disownServiceParent()
        for node, address in current.items():
            if node not in self._links:
                link = PeerLink(
                    self._clock,
                    node,
                    self._endpointFor(address),
                    self._callTimeout,
                    self._connectTimeout,
                    self._retryPolicy,
                    self._maxInFlight,
                )
                service = _LinkService(link)
                self._links[node] = service
                service.setServiceParent(self)

    def startService(self) -> None:
        self._unwatch = self._topology.watch(self._mapChanged)
        MultiService.startService(self)

    def stopService(self) -> Deferred[None]:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        return MultiService.stopService(self)  # type: ignore[no-any-return]

    def link(self, node: str) -> PeerLink | None:
        """
        The link to C{node}, if it is a peer.
        """
        service = self._links.get(node)
        return service.link if service is not None else None

    def forward(self, node: str, box: amp.AmpBox) -> Deferred[amp.AmpBox | None]:
        """
        Forward C{box} to C{node}; see L{PeerLink.forward}.

        @raise nothing: a node that is not a known peer gives a failed
            Deferred (L{OwnerUnavailable}).
        """
        service = self._links.get(node)
        if service is None:
            return fail(CallNotSent(f"owner node {node!r} has no peer link"))
        return service.link.forward(box)

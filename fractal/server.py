# -*- test-case-name: tests.test_server -*-
# mypy: disable-error-code="no-untyped-call"
"""
The AMP front door of a node.

A node reads boxes, not commands: for each box it reads the command name and
the C{user} key, checks the key, asks the topology which node owns the key's
slot and either runs the call here or hands the raw box to a forwarder (or
answers L{NotOwner} when there is none).  Only the application's declared
L{fractal.app.UserCommand}s are callable; there is no C{amp_*} method
fallback and no C{StartTLS}.  A slot this node was fenced out of (the durable
backend refused a write of one of its stores for a stale epoch) is not served
whatever the map says, until the map gives it to this node at a newer epoch:
its calls are answered L{OwnerUnavailable} (L{FractalServer.fenceSlot}).

A call this node forwards, or was about to run, while its slot changes hands
is not failed to the client: when the owner refuses it without running it
(L{NotOwner}, L{NodeStopping}, L{OwnerUnavailable}, or a peer link that could
not send it), or the slot left this node while its store was being opened,
or its durable write was refused for a stale epoch, the call is routed again
once the node's map changes (or after a short wait), within
L{RerouteLimits}; then it is answered L{OwnerUnavailable}, saying so.

Each call runs in the user's store inside one transaction.  An exception the
command does not declare rolls the transaction back and fails that call alone
(L{CallFailed}); the connection and every other call carry on.

Limits, each with a clear answer: the bytes of one box (beyond
L{ServerLimits.maxBoxBytes} the rest of the box is skipped, not held, and the
call answered L{InvalidRequest}), the keys of one box (L{InvalidRequest}) and
the calls outstanding on one connection (L{Overloaded}).  And backpressure:
a client that sends calls without reading their answers does not make the
node buffer answers without bound.  Each connection is a push producer for
its transport; when the transport's write buffer passes its bound (64 KiB for
Twisted's TCP transports), the node stops reading that connection, so it
takes no new calls from it, until the buffer has drained.  Answers to the
calls already running are still buffered, at most
L{ServerLimits.maxOutstanding} of them.  Other connections are not affected.
"""

from __future__ import annotations

from typing import Any, Callable, Coroutine, Protocol

from attrs import frozen
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.protocols.amp import (
    ANSWER,
    ASK,
    COMMAND,
    ERROR,
    ERROR_CODE,
    ERROR_DESCRIPTION,
    UNHANDLED_ERROR_CODE,
    AmpBox,
    BinaryBoxProtocol,
    IBoxReceiver,
    IBoxSender,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from fractal._framing import boxMaker, boxParser, canReadBoxes, readBoxes, usualArguments
from fractal.app import Application, Responder
from fractal.durable.interfaces import IShipper, StaleEpoch
from fractal.keys import InvalidUserKey, slotForKey, validateKey
from fractal.pool import StoreLease, StorePool
from fractal.protocol import (
    FRAMEWORK_ERRORS,
    USER_ARGUMENT,
    CallFailed,
    CallNotSent,
    InvalidRequest,
    NodeStopping,
    NotOwner,
    Overloaded,
    OwnerUnavailable,
    PeerStopped,
    StoreUnavailable,
)
from fractal.routing._routes import RouteMemo
from fractal.routing.interfaces import ITopology, ShardMap, SlotOwner

__all__ = [
    "ServerLimits",
    "RerouteLimits",
    "IForwarder",
    "FencedSlot",
    "FractalServer",
    "NodeProtocol",
]

_MAX_DESCRIPTION = 1000
"""
The longest error description sent, in characters.
"""


@frozen
class ServerLimits:
    """
    What one connection may ask of a node.

    @ivar maxBoxBytes: the most bytes of one box (keys, values and their
        length prefixes).  The rest of a bigger box is skipped as it arrives,
        and the call is answered L{InvalidRequest}.
    @ivar maxKeysPerBox: the most keys in one box, C{_command} and C{_ask}
        included; a call with more is answered L{InvalidRequest}.
    @ivar maxOutstanding: the most calls of one connection running at once;
        more are answered L{Overloaded}.
    """

    maxBoxBytes: int = 1 << 20
    maxKeysPerBox: int = 128
    maxOutstanding: int = 256


@frozen
class RerouteLimits:
    """
    How long a node keeps routing again a call whose slot is changing hands
    (see L{FractalServer.reroute}).

    @ivar attempts: the most times one call is routed again.
    @ivar within: seconds after the first refusal within which it may be.
    @ivar delay: seconds to wait for a new map before the first retry; each
        retry waits twice as long as the one before, at most C{maxDelay}.
        A map that changes the owner of the call's slot ends the wait at
        once.
    @ivar maxDelay: the longest wait before one retry.
    """

    attempts: int = 10
    within: float = 5.0
    delay: float = 0.05
    maxDelay: float = 1.0


@frozen
class _Retry:
    """
    Where a call that is being routed again stands.
    """

    started: float
    attempt: int
    why: str
    hint: str | None = None


_REROUTED_CODES = frozenset(
    FRAMEWORK_ERRORS[error] for error in (NotOwner, NodeStopping, OwnerUnavailable)
)
"""
The codes of the answers of an owner that refused a forwarded call without
running it, after which the forwarding node routes the call again.
"""


@frozen
class FencedSlot:
    """
    A slot this node has stopped serving because the durable backend refused
    a write of one of its stores for a stale epoch: another writer has
    claimed the slot at a newer epoch.

    @ivar slot: the slot.
    @ivar store: the name of the store whose write was refused.
    @ivar epoch: the epoch at which this node owned the slot, in its map.
    @ivar current: the newer epoch stored (or fenced) in the backend.
    """

    slot: int
    store: str
    epoch: int
    current: int

    def describe(self) -> str:
        """
        Why the calls of the slot are refused, for the refused calls and the
        log.
        """
        return (
            f"this node no longer serves slot {self.slot}: it was fenced out at epoch "
            f"{self.epoch} (store {self.store} is at epoch {self.current}); the call did not run"
        )


class IForwarder(Protocol):
    """
    Runs a call on the node that owns its user: the cluster's seam.
    """

    def __call__(self, box: AmpBox, owner: SlotOwner, key: str) -> Deferred[AmpBox | None]:
        """
        Send C{box}, unchanged, to C{owner} and return its answer.

        @param box: the call's box as received (with this connection's
            C{_ask} tag).
        @param owner: the owner of the user's slot in the current map.
        @param key: the user key, already validated.
        @return: fires with the owner's answer box (an C{_answer} or an
            C{_error} box; its tag is replaced by this connection's), or
            L{None} for a call that asks no answer, or fails
            with a framework error such as L{OwnerUnavailable} or L{NotOwner}.
        """


InternalResponder = Callable[[AmpBox], "AmpBox | Deferred[AmpBox]"]
"""
Answers one of a node's internal commands: the request box in, the response
box (without C{_answer} tag) out, or a L{Deferred} of it.  Raising a framework
error (L{fractal.protocol.FRAMEWORK_ERRORS}) answers that error.
"""


class FractalServer:
    """
    The node's call dispatcher, shared by all its client connections.

    @ivar application: the application whose commands are callable.
    @ivar pool: the store pool.
    @ivar topology: who owns which slot.
    @ivar shipper: the durable shipper, for C{ack="durable"} commands.
    @ivar limits: the per-connection limits.
    @ivar forward: the forwarder for calls this node does not own, or L{None}
        to answer those with L{NotOwner}.
    @ivar internalCommands: the node's own commands (shard map, health), by
        command name: each is called with the request box and returns the
        response box (without tag), or a L{Deferred} firing with it.  They
        take no user key and run before any routing.
    @ivar callsServed: calls answered successfully.
    @ivar callsFailed: calls answered with an error (of any kind).
    @ivar responderErrors: calls whose responder raised an undeclared error.
    @ivar inFlight: calls started and not yet answered.
    @ivar clock: the clock of the waits before routing a call again, or
        L{None} to answer a refused call at once.  Calls are routed again
        only by a node that forwards calls (L{forward}, which
        L{fractal.routing.cluster.joinCluster} sets).
    @ivar reroute: the L{RerouteLimits}.
    @ivar callsRerouted: how many times calls were routed again.
    """

    log = Logger()

    def __init__(
        self,
        application: Application,
        pool: StorePool,
        topology: ITopology,
        shipper: IShipper | None = None,
        limits: ServerLimits = ServerLimits(),
        forward: IForwarder | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param clock: see L{clock}; a node passes its reactor.
        @raise ValueError: if a command of C{application} is acknowledged
            durably and there is no C{shipper}.
        """
        if application.requiresDurable and shipper is None:
            durable = sorted(
                r.command.__name__ for r in application.responders.values() if r.ack == "durable"
            )
            raise ValueError(
                f"application {application.name!r} acknowledges {', '.join(durable)} "
                "durably (ack='durable'), but the node has no durable shipper"
            )
        self.application = application
        self.pool = pool
        self.topology = topology
        self.shipper = shipper
        self.limits = limits
        self.forward = forward
        self.internalCommands: dict[bytes, InternalResponder] = {}
        self.callsServed = 0
        self.callsFailed = 0
        self.responderErrors = 0
        self.inFlight = 0
        self.clock = clock
        self.reroute = RerouteLimits()
        self.callsRerouted = 0
        self._stopping = False
        self._drainWaiters: list[Deferred[None]] = []
        self._connections: set[NodeProtocol] = set()
        self._routes: RouteMemo[bytes, tuple[str, SlotOwner]] = RouteMemo(_routeKey)
        self._fenced: dict[int, FencedSlot] = {}

    def buildProtocol(self, addr: object, forwarding: bool = True) -> NodeProtocol:
        """
        A protocol for one new connection.

        @param forwarding: whether calls for users of other nodes are handed to
            L{forward}; C{False} answers them with L{NotOwner} (for calls
            forwarded by a peer: at most one hop).
        """
        return NodeProtocol(self, forwarding)

    def factory(self) -> Factory:
        """
        The protocol factory of the client listener: calls for other nodes'
        users go to L{forward}.
        """
        return Factory.forProtocol(lambda: NodeProtocol(self, True))

    def peerFactory(self) -> Factory:
        """
        The protocol factory of a peer listener: calls there were forwarded
        once already, so those for other nodes' users are answered
        L{NotOwner} rather than forwarded again.
        """
        return Factory.forProtocol(lambda: NodeProtocol(self, False))

    @property
    def connections(self) -> int:
        """
        The number of client connections open now.
        """
        return len(self._connections)

    @property
    def stopping(self) -> bool:
        """
        Whether new calls are refused because the node is stopping.
        """
        return self._stopping

    def stopAccepting(self) -> None:
        """
        From now on, answer new calls with L{NodeStopping}; calls already
        running carry on.
        """
        self._stopping = True

    def whenDrained(self) -> Deferred[None]:
        """
        @return: fires once no call is running.
        """
        if self.inFlight == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drainWaiters.append(d)
        return d

    def disconnectAll(self, peers: bool = True) -> None:
        """
        Close every client connection.

        @param peers: close the connections of the peer listener too.  A
            stopping node keeps them open while it hands its slots off, so
            the calls its peers forward meanwhile are answered
            L{NodeStopping} (and routed again by them) rather than lost with
            a closed connection.
        """
        for connection in list(self._connections):
            if connection.transport is not None and (peers or connection.forwarding):
                connection.transport.loseConnection()

    def fenceSlot(self, key: str, error: StaleEpoch) -> FencedSlot | None:
        """
        Stop serving C{key}'s slot: the backend refused a write of C{key}'s
        store with C{error}.  From now on the slot's calls are answered
        L{OwnerUnavailable} (retryable: the call did not run), until the map
        gives this node the slot at an epoch above C{error.current}, or gives
        it to another node (then its calls go there).

        @return: the fence, or L{None} if the current map already gives the
            slot to another node or to this one at a newer epoch.
        """
        shardMap = self.topology.currentMap()
        slot = slotForKey(key, shardMap.slots)
        owner = shardMap.ownerOf(slot)
        if owner.node != self.topology.localNode or owner.epoch > error.current:
            return None
        fence = FencedSlot(slot, error.store, owner.epoch, error.current)
        if self._fenced.get(slot) != fence:
            self._fenced[slot] = fence
            self.log.error(
                "Stopped serving slot {slot}: store {store} was fenced at epoch {current} "
                "while this node owns the slot at epoch {epoch}; its calls are refused "
                "until the slot is this node's at a newer epoch",
                slot=slot,
                store=error.store,
                epoch=owner.epoch,
                current=error.current,
                fenced=fence,
            )
        return fence

    def restoreFence(self, fence: FencedSlot) -> bool:
        """
        Stop serving C{fence.slot} again, as L{fenceSlot} did before this
        node restarted (L{fractal.node.FENCED_SLOTS_FILE}): its calls are
        answered L{OwnerUnavailable} on the same terms, and
        L{fencedSlots} lists it.

        @return: whether the fence holds: C{False}, and nothing changes, if
            the current map gives the slot to another node or to this one
            at an epoch above C{fence.current}.
        """
        owner = self.topology.currentMap().ownerOf(fence.slot)
        if owner.node != self.topology.localNode or owner.epoch > fence.current:
            return False
        self._fenced[fence.slot] = fence
        self.log.error(
            "Not serving slot {slot}: store {store} was fenced at epoch {current} while "
            "this node owned the slot at epoch {epoch}, before it restarted; its calls are "
            "refused until the slot is this node's at a newer epoch",
            slot=fence.slot,
            store=fence.store,
            epoch=fence.epoch,
            current=fence.current,
            fenced=fence,
            restored=True,
        )
        return True

    def fencedSlots(self) -> list[FencedSlot]:
        """
        The slots this node does not serve now because it was fenced out of
        them, by slot.
        """
        shardMap = self.topology.currentMap()
        return [
            fence
            for slot, fence in sorted(self._fenced.items())
            if self._fenceOf(slot, shardMap.ownerOf(slot)) is not None
        ]

    def _fenceOf(self, slot: int, owner: SlotOwner) -> FencedSlot | None:
        """
        The fence of C{slot}, owned by C{owner} in the current map, if it
        still holds; a fence the map has overtaken is dropped.
        """
        fence = self._fenced.get(slot)
        if fence is None:
            return None
        if owner.node == self.topology.localNode and owner.epoch <= fence.current:
            return fence
        del self._fenced[slot]
        if owner.node == self.topology.localNode:
            self.log.info(
                "Serving slot {slot} again: this node owns it at epoch {epoch}, "
                "above the fenced epoch {current}",
                slot=slot,
                epoch=owner.epoch,
                current=fence.current,
            )
        return None

    # -- called by NodeProtocol -------------------------------------------

    def _route(self, raw: bytes) -> tuple[str, SlotOwner] | InvalidUserKey:
        """
        The user key in C{raw} and the owner of its slot, or why the key is
        refused.

        The answer for a key is remembered for as long as the topology's map
        is the same object (L{RouteMemo}), so a busy user's calls skip
        decoding, validation and hashing.
        """
        try:
            return self._routes.lookup(self.topology.currentMap(), raw)
        except UnicodeDecodeError:
            return InvalidUserKey("user key is not valid UTF-8")
        except InvalidUserKey as e:
            return e

    def _callDone(self, failed: bool) -> None:
        """
        Account for one finished call.
        """
        self.inFlight -= 1
        if failed:
            self.callsFailed += 1
        else:
            self.callsServed += 1
        if self.inFlight == 0 and self._drainWaiters:
            waiters, self._drainWaiters = self._drainWaiters, []
            for waiter in waiters:
                waiter.callback(None)


def _describeArgument(error: BaseException) -> str:
    """
    Say why a box's arguments could not be parsed.
    """
    if isinstance(error, KeyError):
        name = error.args[0] if error.args else b"?"
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        return f"missing argument {name!r}"
    return f"bad argument: {type(error).__name__}: {error}"


@implementer(IPushProducer)
class _ReadPauser:
    """
    The push producer a L{NodeProtocol} registers on its transport: the
    transport pauses it when its write buffer passes its bound and resumes it
    once the buffer has drained, and that pauses and resumes reading the
    connection.
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: NodeProtocol) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:
        self._protocol._pauseReading()

    def resumeProducing(self) -> None:
        self._protocol._resumeReading()

    def stopProducing(self) -> None:
        """
        The connection is going away; L{NodeProtocol.stopReceivingBoxes}
        sees to the rest.
        """


@implementer(IBoxReceiver)
class NodeProtocol(BinaryBoxProtocol):
    """
    One client connection to a node: parses boxes with AMP's framing and runs
    each call through its L{FractalServer}.

    @ivar outstanding: the calls of this connection running now.
    @ivar readingPaused: whether reading is paused because the transport's
        write buffer is full (the client is not reading its answers).
    """

    log = Logger()

    def __init__(self, server: FractalServer, forwarding: bool = True) -> None:
        """
        @param server: the node's dispatcher.
        @param forwarding: see L{FractalServer.buildProtocol}.
        """
        BinaryBoxProtocol.__init__(self, self)
        self.server = server
        self.forwarding = forwarding
        self.outstanding = 0
        self._boxBytes = 0
        self._oversized = False
        self._lost = False
        self.readingPaused = False

    # -- backpressure -------------------------------------------------------

    def _pauseReading(self) -> None:
        """
        The transport's write buffer is over its bound: read nothing more
        from this connection (the boxes already read but not parsed wait too)
        until it has drained.
        """
        if self.readingPaused or self._lost:
            return
        self.readingPaused = True
        # AMP's framing stops parsing, and the transport stops reading.
        self.pauseProducing()

    def _resumeReading(self) -> None:
        """
        The transport's write buffer has drained: read again, starting with
        any boxes received before the pause.
        """
        if not self.readingPaused:
            return
        self.readingPaused = False
        if not self._lost:
            self.resumeProducing()

    # -- framing ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        Parse the complete boxes at the start of C{data} in one loop, then
        hand anything else (a partial box, a box over a limit, a key too
        long) to AMP's own parser, which does exactly what it would have done
        with all of C{data}: the loop only saves AMP's per-string state
        machine on the common path.
        """
        if not canReadBoxes(self):
            BinaryBoxProtocol.dataReceived(self, data)
            return
        offset = readBoxes(self, data, self.server.limits.maxBoxBytes)
        if offset < len(data):
            BinaryBoxProtocol.dataReceived(self, data[offset:])

    def proto_value(self, string: bytes) -> str:
        """
        Count the bytes of the box being received, pair by pair.  Once a box
        grows beyond L{ServerLimits.maxBoxBytes}, keep only its C{_ask} and
        C{_command} and skip the rest of it, so it can be answered
        L{InvalidRequest} without holding its bytes.  (The one string still
        being framed is bounded by AMP's 16-bit lengths.)
        """
        key = self._currentKey
        assert key is not None and self._currentBox is not None
        if not self._oversized:
            self._boxBytes += len(string) + len(key) + 4
            if self._boxBytes <= self.server.limits.maxBoxBytes:
                state: str = BinaryBoxProtocol.proto_value(self, string)
                return state
            self._oversized = True
            box = self._currentBox
            self._currentBox = AmpBox({k: box[k] for k in (ASK, COMMAND) if k in box})
        if key == ASK or key == COMMAND:
            self._currentBox[key] = string
        self._currentKey = None
        self.MAX_LENGTH = self._MAX_KEY_LENGTH
        return "key"

    # -- IBoxReceiver -------------------------------------------------------

    def startReceivingBoxes(self, boxSender: IBoxSender) -> None:
        """
        The connection is up: register as the transport's push producer, so
        that a full write buffer pauses reading (see L{_pauseReading}).
        """
        self.server._connections.add(self)
        register = getattr(self.transport, "registerProducer", None)
        if register is not None:
            try:
                register(_ReadPauser(self), True)
            except RuntimeError:
                # Another producer is registered already: that one decides.
                self.log.warn("Connection has a producer already; no backpressure on it")

    def stopReceivingBoxes(self, reason: Failure) -> None:
        """
        The connection is gone; calls still running finish, and their answers
        are dropped.
        """
        self._lost = True
        self.server._connections.discard(self)

    def ampBoxReceived(self, box: AmpBox) -> None:
        """
        Route and run one call.
        """
        self._boxBytes = 0
        server = self.server
        ask = box.get(ASK)
        name = box.get(COMMAND)
        if self._oversized:
            self._oversized = False
            self.log.warn(
                "Refusing a box of more than {limit} bytes from {peer}",
                limit=server.limits.maxBoxBytes,
                peer=self.transport.getPeer() if self.transport else None,
            )
            self._refuse(
                ask,
                InvalidRequest(f"the box is larger than {server.limits.maxBoxBytes} bytes"),
            )
            return
        if name is None:
            # Not a call: an answer to something a node never asks.
            self.log.warn("Ignoring a box that is not a call: keys {keys}", keys=sorted(box))
            return
        if len(box) > server.limits.maxKeysPerBox:
            self._refuse(
                ask,
                InvalidRequest(
                    f"the box has {len(box)} keys; the limit is {server.limits.maxKeysPerBox}"
                ),
            )
            return
        if server._stopping:
            self._refuse(ask, NodeStopping("the node is stopping; call again"))
            return
        if self.outstanding >= server.limits.maxOutstanding:
            self._refuse(
                ask,
                Overloaded(
                    f"{self.outstanding} calls are outstanding on this connection; "
                    f"the limit is {server.limits.maxOutstanding}"
                ),
            )
            return
        internal = server.internalCommands.get(name)
        if internal is not None:
            self._internal(internal, box, ask)
            return
        raw = box.get(USER_ARGUMENT)
        if raw is None:
            self._refuse(ask, InvalidRequest("missing argument 'user'"))
            return
        route = server._route(raw)
        if isinstance(route, Exception):
            self._refuse(ask, route)
            return
        key, owner = route
        if owner.node != server.topology.localNode:
            self._forward(box, ask, owner, key)
            return
        self._local(box, ask, name, key, owner, None)

    def _local(
        self,
        box: AmpBox,
        ask: bytes | None,
        name: bytes,
        key: str,
        owner: SlotOwner,
        retry: _Retry | None,
    ) -> None:
        """
        Run a call for a slot this node owns.

        @param retry: L{None} for a call just received (not yet counted as
            running), or where a call being routed again stands.
        """
        server = self.server
        if server._fenced:
            fence = server._fenceOf(slotForKey(key, server.topology.currentMap().slots), owner)
            if fence is not None:
                if retry is None:
                    self._refuse(ask, OwnerUnavailable(fence.describe()))
                elif not self._reroute(box, ask, key, retry, fence.describe()):
                    self._finish(ask, self._gaveUpBox(ask, retry))
                return
        responder = server.application.responders.get(name)
        refusal: AmpBox | None = None
        kwargs: dict[str, Any] = {}
        if responder is None:
            refusal = _errorBox(
                ask, UNHANDLED_ERROR_CODE, f"Unhandled Command: {name.decode('ascii', 'replace')!r}"
            )
        else:
            try:
                kwargs = _argumentParser(responder.command)(box, self)
            except Exception as e:
                refusal = _errorBox(
                    ask, FRAMEWORK_ERRORS[InvalidRequest], _describeArgument(e)
                )
        if refusal is not None or responder is None:
            assert refusal is not None
            if retry is None:
                self._refuseBox(refusal)
            else:
                self._finish(ask, refusal)
            return
        del kwargs["user"]
        if retry is None:
            self._begin()
        lease = server.pool.tryAcquire(key)
        if lease is not None:
            self._run(lease, responder, kwargs, ask, key, box, retry)
        else:
            server.pool.acquire(key).addCallbacks(
                self._acquired,
                lambda f: self._finish(ask, self._frameworkErrorBox(ask, f, key)),
                (box, responder, kwargs, ask, key, retry),
            )

    def _acquired(
        self,
        lease: StoreLease,
        box: AmpBox,
        responder: Responder,
        kwargs: dict[str, Any],
        ask: bytes | None,
        key: str,
        retry: _Retry | None,
    ) -> None:
        """
        The store of a call is open: run the call if this node still owns
        its slot.  A slot handed off meanwhile has had its stores closed and
        shipped already, so the call must run at the new owner.
        """
        owner = self.server.topology.currentMap().ownerOfKey(key)
        if owner.node == self.server.topology.localNode:
            self._run(lease, responder, kwargs, ask, key, box, retry)
            return
        lease.release()
        why = f"the user's slot moved to node {owner.node!r} while its store was being opened"
        if not self._reroute(box, ask, key, retry, why):
            self._finish(ask, _errorBox(ask, FRAMEWORK_ERRORS[NotOwner], owner.node))

    # -- routing again ------------------------------------------------------

    def _reroute(
        self,
        box: AmpBox,
        ask: bytes | None,
        key: str,
        retry: _Retry | None,
        why: str,
        hint: str | None = None,
    ) -> bool:
        """
        Route a running call again, the node's owner of its slot having
        refused it without running it, once the node's map changes or after
        a short wait; or answer it with a clear L{OwnerUnavailable} if it has
        been routed again too often or for too long.

        The call goes to the owner in the node's map then; if the map has
        not changed meanwhile and the refusing node named another owner
        (C{hint}, from L{NotOwner}), it goes there: that node's map is newer.

        @return: C{False} if the call is not routed again and not answered
            (a peer connection: the forwarding node routes again; or a node
            that forwards nothing, has no clock or allows no attempts); the
            caller answers.
        """
        server = self.server
        clock = server.clock
        limits = server.reroute
        if clock is None or server.forward is None or not self.forwarding or limits.attempts < 1:
            return False
        now = clock.seconds()
        started = now if retry is None else retry.started
        attempt = 0 if retry is None else retry.attempt
        if attempt >= limits.attempts or now - started >= limits.within:
            self._finish(ask, self._gaveUpBox(ask, _Retry(started, attempt, why)))
            return True
        server.callsRerouted += 1
        following = _Retry(started, attempt + 1, why)
        refusedOn = server.topology.currentMap()
        wait = min(limits.maxDelay, limits.delay * 2**attempt, started + limits.within - now)
        state: dict[str, Any] = {}

        def again() -> None:
            if state.pop("waiting", None) is None:
                return
            state["unwatch"]()
            if state["timer"].active():
                state["timer"].cancel()
            if self._lost:
                # Nobody to answer any more: the call is over.
                self._finish(ask, self._gaveUpBox(ask, following))
                return
            shardMap = server.topology.currentMap()
            owner = shardMap.ownerOfKey(key)
            if (
                shardMap is refusedOn
                and hint is not None
                and hint != owner.node
                and hint != server.topology.localNode
                and hint in shardMap.nodes
            ):
                owner = SlotOwner(hint, owner.epoch)
            if owner.node != server.topology.localNode:
                self._forward(box, ask, owner, key, following)
            else:
                name = box[COMMAND]
                self._local(box, ask, name, key, owner, following)

        state["waiting"] = True
        state["timer"] = clock.callLater(max(0.0, wait), again)
        # A new owner in the map ends the wait, in a turn of its own (not
        # inside the topology's notification of its observers).
        slot = slotForKey(key, refusedOn.slots)

        def changed(shardMap: ShardMap) -> None:
            # Only a new owner of this call's slot is worth trying at once:
            # while many slots move, the map changes many times a second.
            if shardMap.ownerOf(slot) != refusedOn.ownerOf(slot):
                clock.callLater(0, again)

        state["unwatch"] = server.topology.watch(changed)
        return True

    def _gaveUpBox(self, ask: bytes | None, retry: _Retry) -> AmpBox:
        """
        The answer to a call routed again too often or for too long.
        """
        seconds = (self.server.clock.seconds() if self.server.clock else retry.started) - (
            retry.started
        )
        return _errorBox(
            ask,
            FRAMEWORK_ERRORS[OwnerUnavailable],
            f"the user's slot is changing hands and no node ran the call "
            f"({retry.attempt + 1} attempts in {seconds:.1f}s; last: {retry.why}); "
            "the call did not run: call again",
        )

    # -- running a call -----------------------------------------------------

    def _begin(self) -> None:
        """
        Count a call as running.
        """
        self.outstanding += 1
        self.server.inFlight += 1

    def _finish(self, ask: bytes | None, box: AmpBox) -> None:
        """
        A running call is answered with C{box}.
        """
        self.outstanding -= 1
        # Send before accounting: the last call of a drain lets the node
        # close its connections.
        if ask is not None and not self._lost:
            self.sendBox(box)
        self.server._callDone(ERROR_CODE in box)

    def _run(
        self,
        lease: StoreLease,
        responder: Responder,
        kwargs: dict[str, Any],
        ask: bytes | None,
        key: str,
        request: AmpBox | None = None,
        retry: _Retry | None = None,
    ) -> None:
        """
        Run the responder in one transaction of the user's store and answer.

        @param request: the call's box, to route it again if its durable
            write is refused for a stale epoch.
        @param retry: where the call stands if it is being routed again.

        A synchronous responder's response is serialised inside the
        transaction too, so a response that does not fit the command's
        C{response} rolls the call back like any other error.
        """
        method = lease.prepared[responder.command.commandName]
        command = responder.command
        makeResponse = _responseMaker(command)

        def serialize(result: Any) -> AmpBox:
            if result is None:
                result = {}
            box: AmpBox = (
                makeResponse(result, self)
                if type(result) is dict
                else command.makeResponse(result, self)
            )
            return box

        def call() -> AmpBox | Deferred[Any]:
            result = method(**kwargs)
            if type(result) is dict:
                box: AmpBox = makeResponse(result, self)
                return box
            if isinstance(result, dict):
                return serialize(result)
            if isinstance(result, Deferred):
                return result
            if isinstance(result, Coroutine):
                return Deferred.fromCoroutine(result)
            return serialize(result)

        try:
            result = lease.store.transact(call)
        except Exception:
            lease.release()
            self._finish(ask, self._responderErrorBox(ask, Failure(), responder, key))
            return
        # An AmpBox first: Deferred is an abstract class (Awaitable), whose
        # isinstance check costs several times a plain class's.
        if not isinstance(result, AmpBox) and isinstance(result, Deferred):
            result.addBoth(_releasing, lease)
            result.addCallback(serialize)
            result.addCallbacks(
                self._respond,
                lambda f: self._finish(ask, self._responderErrorBox(ask, f, responder, key)),
                (responder, ask, key, request, retry),
            )
        else:
            lease.release()
            self._respond(result, responder, ask, key, request, retry)

    def _respond(
        self,
        box: AmpBox,
        responder: Responder,
        ask: bytes | None,
        key: str,
        request: AmpBox | None = None,
        retry: _Retry | None = None,
    ) -> None:
        """
        Answer a call with its response C{box}, once durable if its command is
        acknowledged durably.  A durable write refused for a stale epoch (the
        slot moved during the call) leaves nothing acknowledged: the call is
        routed again, or, when it was forwarded here, answered
        L{OwnerUnavailable} so that the node that forwarded it does.
        """
        if ask is not None:
            box[ANSWER] = ask
        if responder.ack == "durable":
            shipper = self.server.shipper
            assert shipper is not None

            def notDurable(failure: Failure) -> None:
                if not failure.check(StaleEpoch):
                    self._finish(ask, self._notDurableBox(ask, failure, key))
                    return
                why = (
                    "its commit was refused by the durable backend for a stale epoch "
                    "(the slot moved during the call)"
                )
                if request is not None and self._reroute(request, ask, key, retry, why):
                    return
                if self.forwarding:
                    self._finish(ask, self._notDurableBox(ask, failure, key))
                    return
                # A forwarded call: the forwarding node routes it again.
                self._finish(
                    ask,
                    _errorBox(
                        ask,
                        FRAMEWORK_ERRORS[OwnerUnavailable],
                        f"{why}; nothing was acknowledged: call again",
                    ),
                )

            maybeDeferred(shipper.whenDurable, key).addCallbacks(
                lambda _: self._finish(ask, box), notDurable
            )
        else:
            self._finish(ask, box)

    def _forward(
        self,
        box: AmpBox,
        ask: bytes | None,
        owner: SlotOwner,
        key: str,
        retry: _Retry | None = None,
    ) -> None:
        """
        Hand a call for another node's user to the forwarder, or answer
        L{NotOwner}.  An owner's refusal of a call it did not run sends the
        call through routing again (L{_reroute}).

        @param retry: L{None} for a call just received (not yet counted as
            running), or where a call being routed again stands.
        """
        forward = self.server.forward if self.forwarding else None
        if forward is None:
            if retry is None:
                self._refuse(ask, NotOwner(owner.node))
            else:
                self._finish(ask, _errorBox(ask, FRAMEWORK_ERRORS[NotOwner], owner.node))
            return
        if retry is None:
            self._begin()

        def relay(answer: AmpBox | None) -> None:
            if answer is None:
                # The call asked for no answer.
                self._finish(ask, AmpBox())
                return
            code = answer.get(ERROR_CODE) if ERROR in answer else None
            if code in _REROUTED_CODES:
                description = answer.get(ERROR_DESCRIPTION, b"").decode("utf-8", "replace")
                why = f"node {owner.node!r} refused it: {description}"
                hint = description if code == FRAMEWORK_ERRORS[NotOwner] else None
                if self._reroute(box, ask, key, retry, why, hint):
                    return
            relayed = AmpBox(answer)
            relayed.pop(ANSWER, None)
            tag = ERROR if ERROR in relayed else ANSWER
            relayed.pop(ERROR, None)
            if ask is not None:
                relayed[tag] = ask
            self._finish(ask, relayed)

        def failed(failure: Failure) -> None:
            # A call that could not be sent is routed again once it is
            # being routed again already (its slot is changing hands), or its
            # owner is stopping gracefully (and hands its slots off), or the
            # map has moved its slot meanwhile; a call for an owner that is
            # simply down fails at once.
            if (
                failure.check(CallNotSent)
                and (
                    retry is not None
                    or failure.check(PeerStopped)
                    or self.server.topology.currentMap().ownerOfKey(key).node != owner.node
                )
                and self._reroute(box, ask, key, retry, failure.getErrorMessage())
            ):
                return
            self._finish(ask, self._frameworkErrorBox(ask, failure, key, OwnerUnavailable))

        maybeDeferred(forward, box, owner, key).addCallbacks(relay, failed)

    def _internal(self, responder: InternalResponder, box: AmpBox, ask: bytes | None) -> None:
        """
        Run one of the node's internal commands.
        """
        self._begin()

        def answered(response: AmpBox) -> None:
            response = AmpBox(response)
            if ask is not None:
                response[ANSWER] = ask
            self._finish(ask, response)

        maybeDeferred(responder, box).addCallbacks(
            answered,
            lambda f: self._finish(
                ask, self._frameworkErrorBox(ask, f, "(internal)", CallFailed)
            ),
        )

    # -- errors -------------------------------------------------------------

    def _refuse(self, ask: bytes | None, error: Exception) -> None:
        """
        Answer a call that is not run with a framework error.
        """
        self._refuseBox(_errorBox(ask, FRAMEWORK_ERRORS[type(error)], str(error)))

    def _refuseBox(self, box: AmpBox) -> None:
        """
        Answer a call that is not run with an error box.
        """
        self.server.callsFailed += 1
        if ERROR in box and not self._lost:
            self.sendBox(box)

    def _frameworkErrorBox(
        self,
        ask: bytes | None,
        failure: Failure,
        key: str,
        otherwise: type[Exception] = StoreUnavailable,
    ) -> AmpBox:
        """
        The error box for a call that failed before its responder ran.
        """
        errorType = failure.check(*FRAMEWORK_ERRORS)
        if errorType is None:
            self.log.failure("Call for user {key!r} failed", failure, key=key)
            return _errorBox(ask, FRAMEWORK_ERRORS[otherwise], "the call could not be run")
        return _errorBox(ask, FRAMEWORK_ERRORS[errorType], str(failure.value))

    def _responderErrorBox(
        self, ask: bytes | None, failure: Failure, responder: Responder, key: str
    ) -> AmpBox:
        """
        The error box for a responder that raised: its declared error, or
        L{CallFailed} for an undeclared one (logged).
        """
        allErrors: dict[type[Exception], bytes] = responder.command.allErrors  # type: ignore[attr-defined]
        errorType = failure.check(*allErrors)
        if errorType is not None:
            return _errorBox(ask, allErrors[errorType], str(failure.value))
        self.server.responderErrors += 1
        self.log.failure(
            "{command} for user {key!r} raised an undeclared error; "
            "its transaction was rolled back",
            failure,
            command=responder.command.__name__,
            key=key,
        )
        return _errorBox(
            ask,
            FRAMEWORK_ERRORS[CallFailed],
            f"{responder.command.__name__} failed on the node with an error it does "
            "not declare; its transaction was rolled back (see the node's log)",
        )

    def _notDurableBox(self, ask: bytes | None, failure: Failure, key: str) -> AmpBox:
        """
        The error box for a committed call whose commit could not be stored
        durably.
        """
        self.log.failure("Commit for user {key!r} was not stored durably", failure, key=key)
        return _errorBox(
            ask,
            FRAMEWORK_ERRORS[StoreUnavailable],
            "the call was committed locally but could not be stored durably",
        )


def _routeKey(shardMap: ShardMap, raw: bytes) -> tuple[str, SlotOwner]:
    """
    The user key in C{raw} and the owner of its slot in C{shardMap}.

    @raise UnicodeDecodeError: if C{raw} is not UTF-8.
    @raise InvalidUserKey: if the key is not valid.
    """
    key = validateKey(raw.decode("utf-8"))
    return key, shardMap.ownerOfKey(key)


_parsers: dict[type[amp.Command], Callable[[AmpBox, Any], dict[str, Any]]] = {}


def _argumentParser(command: type[amp.Command]) -> Callable[[AmpBox, Any], dict[str, Any]]:
    """
    A function parsing C{command}'s arguments from a box, as
    C{command.parseArguments} does, made once per command.

    For the usual arguments (those that neither override
    L{amp.Argument.fromBox} nor L{amp.Argument.retrieve}), it converts each
    value straight from the box, without copying the box or converting each
    argument's wire name on every call; any other command is parsed by its
    own C{parseArguments}.
    """
    parser = _parsers.get(command)
    if parser is not None:
        return parser
    usual = (
        getattr(command.parseArguments, "__func__", None)
        is amp.Command.parseArguments.__func__  # type: ignore[attr-defined]
        and usualArguments(command.arguments, ("fromBox", "retrieve"))
    )
    parser = boxParser(command.arguments) if usual else command.parseArguments
    _parsers[command] = parser
    return parser


_responseMakers: dict[type[amp.Command], Callable[[Any, Any], Any]] = {}


def _responseMaker(command: type[amp.Command]) -> Callable[[dict[str, Any], Any], Any]:
    """
    A function making C{command}'s response box from a C{dict}, as
    C{command.makeResponse} does, made once per command.

    For a command that keeps AMP's C{makeResponse} and response type and
    whose response arguments are usual (neither override
    L{amp.Argument.toBox} nor L{amp.Argument.retrieve}, distinct Python
    names), it converts each value straight into a box that serializes
    without a C{struct.pack} per length (L{fractal._framing.WireBox}),
    without copying the C{dict} or converting each argument's wire name on
    every call; any other command's response is made by its own
    C{makeResponse}.
    """
    maker = _responseMakers.get(command)
    if maker is not None:
        return maker
    names = [wire.replace(b"-", b"_") for wire, _ in command.response]
    usual = (
        getattr(command.makeResponse, "__func__", None)
        is amp.Command.makeResponse.__func__  # type: ignore[attr-defined]
        and command.responseType is AmpBox
        and len(set(names)) == len(names)
        and usualArguments(command.response, ("toBox", "retrieve"))
    )
    maker = boxMaker(command.response) if usual else command.makeResponse
    _responseMakers[command] = maker
    return maker


def _releasing(result: object, lease: StoreLease) -> object:
    """
    Release C{lease} and pass C{result} on.
    """
    lease.release()
    return result


def _errorBox(ask: bytes | None, code: bytes, description: str) -> AmpBox:
    """
    An AMP error answer.
    """
    if len(description) > _MAX_DESCRIPTION:
        description = description[: _MAX_DESCRIPTION - 3] + "..."
    box = AmpBox()
    box[ERROR_CODE] = code
    box[ERROR_DESCRIPTION] = description.encode("utf-8", "replace")
    if ask is not None:
        box[ERROR] = ask
    return box


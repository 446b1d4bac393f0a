# -*- test-case-name: tests.test_node -*-
# mypy: disable-error-code="no-untyped-call"
"""
A fractal node: the service that wires the store pool, the AMP front door and
its listener, with a graceful stop.

The node also keeps its local copies of stores honest as slot ownership
changes, the same way for every topology whose map can change.  A slot it
gains (one it did not own in its previous map, or owns now at a newer epoch
than before) may have been written by another node meanwhile, so its local
copies of the slot's stores are stale: before serving the slot, the node
closes them (waiting for the calls that hold them), moves them into
C{DATA/stale/} (L{fractal.stale}), and serves the slot's users from stores
restored from durable storage on their first call.  The shipper ships at the
epoch at which the node's local copies were written (L{FractalNode.epochForKey}),
never at another owner's.  A slot it loses has its stores closed (and so
shipped) at once.

Across restarts, the node keeps in C{DATA/owned-slots} the slots whose local
copies it may serve, with their epochs.  A slot its first map gives it that
the file does not list at that epoch (a static configuration that gave the
slot to another node for a while, a slot failed over to a PostgreSQL node at
registration) is gained like any other.  Without the file (a node's first
start) every slot of its first map is taken as its own.

It keeps in C{DATA/fenced-slots} the slots it was fenced out of
(L{FractalServer.fenceSlot}), so that a restart does not serve a fenced slot
from its stale local copy until its next write is refused: at start, before
serving, it stops serving again each recorded slot its map still gives it at
an epoch not above the one it was fenced at (L{FractalServer.restoreFence}),
and forgets the others.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterable, Mapping, TypeGuard

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from fractal._manholeconfig import _splitDescription
from fractal.app import Application
from fractal.durable._threads import RunInThread, reactorThreads
from fractal.durable.interfaces import IShipper, StaleEpoch
from fractal.keys import isStoreName, slotForKey, slotOfStoreName, storeNameForKey
from fractal.pool import DEFAULT_IDLE_TIMEOUT, StorePool
from fractal.routing.interfaces import ITopology, ShardMap
from fractal.routing.topology import SingleNodeTopology
from fractal.server import FencedSlot, FractalServer, ServerLimits
from fractal.stale import DEFAULT_STALE_KEEP, DEFAULT_STALE_MAX, pruneStale, setAsideStores

__all__ = [
    "DEFAULT_DRAIN_TIMEOUT",
    "FENCED_SLOTS_FILE",
    "FractalNode",
    "OWNED_SLOTS_FILE",
    "clientDescriptionFor",
]

OWNED_SLOTS_FILE = "owned-slots"
"""
The file in a node's data directory that lists the slots whose local copies
the node may serve, with the epoch each was written at.
"""

FENCED_SLOTS_FILE = "fenced-slots"
"""
The file in a node's data directory that lists the slots the node was fenced
out of: for each, the store whose write was refused, the epoch the node owned
the slot at and the newer epoch the backend holds.
"""

DEFAULT_DRAIN_TIMEOUT = 30.0
"""
Seconds a stopping node waits for its calls in flight.
"""


def clientDescriptionFor(listen: str) -> str:
    """
    A client endpoint description that reaches a node listening on C{listen},
    as far as it can be told from the description alone.

    C{"tcp:7100:interface=127.0.0.1"} gives C{"tcp:host=127.0.0.1:port=7100"};
    a wildcard or missing interface is taken as loopback.  A TLS listener
    (C{"ssl:7100:interface=10.0.0.1:privateKey=...:certKey=..."}) gives the
    plain C{tcp:} address of its port: clients add the TLS themselves, with
    the cluster CA, checking the node id (the smart client's C{authority}).
    Other kinds of endpoint are returned unchanged.

    @param listen: a server endpoint description.
    """
    kind, _, rest = listen.partition(":")
    if kind == "ssl":
        args, kwargs = _splitDescription(listen)
        sslPort = kwargs.get("port", args[1] if len(args) > 1 else None)
        if not sslPort:
            return listen
        sslHost = kwargs.get("interface", "")
        if sslHost in ("", "0.0.0.0", "::"):
            sslHost = "127.0.0.1"
        sslHost = sslHost.replace(":", "\\:")
        return f"tcp:host={sslHost}:port={sslPort}"
    if kind not in ("tcp", "tcp6") or not rest:
        return listen
    port = None
    interface = "127.0.0.1" if kind == "tcp" else "::1"
    for part in rest.split(":"):
        name, equals, value = part.partition("=")
        if not equals:
            port = port or name
        elif name == "port":
            port = value
        elif name == "interface" and value not in ("", "0.0.0.0", "::"):
            interface = value
    if port is None:
        return listen
    host = interface.replace(":", "\\:")
    return f"tcp:host={host}:port={port}"


def _isCount(value: object) -> TypeGuard[int]:
    """
    Whether C{value} is a non-negative JSON integer.
    """
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _readOwnedSlots(dataDir: FilePath[str], slotCount: int) -> dict[int, int] | None:
    """
    The slots, with their epochs, that C{dataDir}'s L{OWNED_SLOTS_FILE}
    lists, or L{None} if it is missing, unreadable, not one this version
    wrote, or for another slot count.  Blocking.
    """
    try:
        state = json.loads(dataDir.child(OWNED_SLOTS_FILE).getContent())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(state, dict)
        or state.get("version") != 1
        or state.get("slots") != slotCount
        or not isinstance(state.get("owned"), dict)
    ):
        return None
    owned: dict[int, int] = {}
    for slot, epoch in state["owned"].items():
        if not (isinstance(slot, str) and slot.isdigit() and int(slot) < slotCount):
            return None
        if not _isCount(epoch):
            return None
        owned[int(slot)] = epoch
    return owned


def _writeOwnedSlots(dataDir: FilePath[str], slotCount: int, owned: Mapping[int, int]) -> None:
    """
    Replace C{dataDir}'s L{OWNED_SLOTS_FILE} with C{owned}, durably.
    Blocking.
    """
    content = json.dumps(
        {"version": 1, "slots": slotCount, "owned": {str(s): e for s, e in sorted(owned.items())}}
    ).encode("ascii")
    _replaceDurably(dataDir, OWNED_SLOTS_FILE, content)


def _replaceDurably(dataDir: FilePath[str], name: str, content: bytes) -> None:
    """
    Replace the file C{name} of C{dataDir} with C{content}, durably: a
    temporary file, written and synced, renamed over it, then the directory
    synced.  Blocking.
    """
    dataDir.makedirs(ignoreExistingDirectory=True)
    temporary = dataDir.child(name + ".new").path
    with open(temporary, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, dataDir.child(name).path)
    fd = os.open(dataDir.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _readFencedSlots(dataDir: FilePath[str], slotCount: int) -> list[FencedSlot]:
    """
    The fences C{dataDir}'s L{FENCED_SLOTS_FILE} lists, by slot; none if it
    is missing.  Blocking.

    @raise ValueError: if the file cannot be read, is not one this version
        wrote, is for another slot count, or lists a fence that cannot be
        (saying which).
    """
    path = dataDir.child(FENCED_SLOTS_FILE)
    try:
        content = path.getContent()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ValueError(f"cannot be read: {e}") from None
    try:
        state = json.loads(content)
    except ValueError:
        raise ValueError("is not JSON") from None
    if not isinstance(state, dict) or state.get("version") != 1:
        raise ValueError("is not a version 1 fenced slots file")
    if state.get("slots") != slotCount:
        raise ValueError(f"is not for {slotCount} slots")
    entries = state.get("fenced")
    if not isinstance(entries, list):
        raise ValueError("has no list of fenced slots")
    fences: dict[int, FencedSlot] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError("lists a fence that is not an object")
        slot, store = entry.get("slot"), entry.get("store")
        epoch, current = entry.get("epoch"), entry.get("current")
        if not (
            _isCount(slot)
            and _isCount(epoch)
            and _isCount(current)
            and isinstance(store, str)
            and isStoreName(store)
            and slot < slotCount
            and epoch <= current
            and slotOfStoreName(store, slotCount) == slot
            and slot not in fences
        ):
            raise ValueError(f"lists a fence that cannot be: {entry!r}")
        fences[slot] = FencedSlot(slot, store, epoch, current)
    return [fences[slot] for slot in sorted(fences)]


def _writeFencedSlots(
    dataDir: FilePath[str], slotCount: int, fences: Iterable[FencedSlot]
) -> None:
    """
    Replace C{dataDir}'s L{FENCED_SLOTS_FILE} with C{fences}, durably
    (L{_replaceDurably}).  Blocking.
    """
    content = json.dumps(
        {
            "version": 1,
            "slots": slotCount,
            "fenced": [
                {"slot": f.slot, "store": f.store, "epoch": f.epoch, "current": f.current}
                for f in sorted(fences, key=lambda f: f.slot)
            ],
        },
        indent=1,
    ).encode("ascii")
    _replaceDurably(dataDir, FENCED_SLOTS_FILE, content)


class FractalNode(MultiService):
    """
    One fractal node.

    Starting it listens for AMP clients on C{listen}.  Stopping it (the
    L{Deferred} of L{stopService}, which C{twistd} waits for on SIGTERM) runs,
    in this order:

        1. stop listening, so no new connection arrives;
        2. answer new calls on open connections with
           L{fractal.protocol.NodeStopping};
        3. wait for every call in flight to be answered (drain), at most
           C{drainTimeout} seconds;
        4. close every store (after a drain timeout, also those still held by
           a call), each first shipped by the shipper when there is one
           (L{fractal.durable.interfaces.IShipper.storeClosing});
        5. close the client connections (but not those of peers, which
           forward calls: they are answered L{fractal.protocol.NodeStopping},
           so the peers route them again, while the node hands its slots
           off);
        6. stop the other child services (added by others: shipper, console,
           peers, topology), in reverse order of addition;
        7. close the peers' connections;
        8. wait for the records of its owned and fenced slots
           (L{OWNED_SLOTS_FILE}, L{FENCED_SLOTS_FILE}) being written;

    and then fires.

    @ivar reactor: the reactor.
    @ivar nodeId: this node's id in its cluster.
    @ivar application: the application served.
    @ivar dataDir: where the node's stores live.
    @ivar pool: the L{StorePool}.
    @ivar topology: who owns which slot.
    @ivar shipper: the durable shipper, or L{None}.  When it is told a store
        is fenced at a newer epoch, the node stops serving the store's slot
        (L{FractalServer.fenceSlot}), closes the slot's stores and records
        the fence in L{FENCED_SLOTS_FILE}, so that it holds across restarts.
    @ivar server: the L{FractalServer} answering client connections; its
        C{forward} attribute is the seam for forwarding calls to other nodes.
    @ivar listen: the server endpoint description listened on.
    @ivar drainTimeout: the most seconds a stop waits for calls in flight.
    @ivar staleKeep: seconds a set-aside stale store is kept.
    @ivar staleMax: the most set-aside stale stores kept.
    @ivar gainsAnnounced: whether the topology tells the node of the slots it
        gains, by calling L{prepareSlots} before it serves them (as
        L{fractal.postgres.topology.PostgresTopology} does through its
        C{slotsGained} hook, connected by
        L{fractal.postgres.deploy.servePostgres}); otherwise (the default)
        the node finds them in each new map.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        application: Application,
        dataDir: FilePath[str],
        listen: str,
        nodeId: str = "n1",
        topology: ITopology | None = None,
        maxOpenStores: int | None = None,
        idleTimeout: float = DEFAULT_IDLE_TIMEOUT,
        shipper: IShipper | None = None,
        limits: ServerLimits = ServerLimits(),
        drainTimeout: float = DEFAULT_DRAIN_TIMEOUT,
        staleKeep: float = DEFAULT_STALE_KEEP,
        staleMax: int = DEFAULT_STALE_MAX,
        runInThread: RunInThread | None = None,
        wallClock: Callable[[], float] = time.time,
    ) -> None:
        """
        @param reactor: the reactor: listening and time.
        @param application: the application to serve.
        @param dataDir: the node's data directory, created if missing.
        @param listen: a server endpoint description for AMP clients.
        @param nodeId: this node's id.
        @param topology: who owns which slot; by default this node owns all
            of them (L{SingleNodeTopology}).
        @param maxOpenStores: the most user stores open at once; by default
            derived from the process's descriptor limit.
        @param idleTimeout: seconds after which an unused store is closed.
        @param shipper: the durable shipper, or L{None}.
        @param limits: what one client connection may ask.
        @param drainTimeout: the most seconds a stop waits for calls in
            flight before closing their stores anyway.
        @param staleKeep: seconds a stale store set aside in C{DATA/stale/}
            is kept (L{fractal.stale.DEFAULT_STALE_KEEP}).
        @param staleMax: the most stale stores kept there, the newest
            (L{fractal.stale.DEFAULT_STALE_MAX}).
        @param runInThread: runs the blocking work of closing stores'
            connections (L{fractal.pool.StorePool}) and of setting stale
            stores aside and pruning them; the reactor's thread pool by
            default.
        @param wallClock: the time of day, for the names and ages of stale
            stores.
        @raise ValueError: if the application acknowledges any command
            durably and there is no shipper, or if C{topology} serves another
            node than C{nodeId}.
        """
        super().__init__()
        if topology is None:
            topology = SingleNodeTopology(nodeId, clientDescriptionFor(listen))
        if topology.localNode != nodeId:
            raise ValueError(
                f"the topology is for node {topology.localNode!r}, not {nodeId!r}"
            )
        self.reactor = reactor
        self.nodeId = nodeId
        self.application = application
        self.dataDir = dataDir
        self.listen = listen
        self.topology = topology
        self.shipper = shipper
        self.drainTimeout = drainTimeout
        self.staleKeep = staleKeep
        self.staleMax = staleMax
        self.gainsAnnounced = False
        self._run = runInThread if runInThread is not None else reactorThreads(reactor)
        self._wallClock = wallClock
        shardMap = topology.currentMap()
        owned = {
            slot: owner.epoch for slot, owner in enumerate(shardMap.owners) if owner.node == nodeId
        }
        saved = _readOwnedSlots(dataDir, shardMap.slots)
        if saved is None:
            trusted = dict(owned)
        else:
            trusted = {slot: epoch for slot, epoch in owned.items() if saved.get(slot) == epoch}
        gainedAtStart = {slot: epoch for slot, epoch in owned.items() if slot not in trusted}
        if shipper is None:
            # No durable copy to restore from: the local copy is the only one.
            trusted.update(gainedAtStart)
            gainedAtStart = {}
        # The epoch at which this node's local copies of each slot's stores
        # were written: the slots it owns when it starts and had at that
        # epoch when it last ran (nobody took them meanwhile), then each slot
        # it gains once its stale copies are set aside; slots it had before
        # and not now keep their epoch, so their last changes ship at it.
        self._slotEpochs: dict[int, int] = {
            slot: epoch for slot, epoch in (saved or {}).items() if slot not in owned
        }
        self._slotEpochs.update(trusted)
        # The slots OWNED_SLOTS_FILE lists.
        self._kept = set(trusted)
        self._owned = set(owned)
        self._preparing: dict[int, int] = {}
        self._saving: Deferred[None] = succeed(None)
        self.pool = StorePool(
            reactor,
            dataDir,
            prepare=application.installOn,
            pageSize=application.pageSize,
            maxOpenStores=maxOpenStores,
            idleTimeout=idleTimeout,
            shipper=shipper,
            runInThread=self._run,
        )
        self.server = FractalServer(
            application, self.pool, topology, shipper, limits, clock=reactor
        )
        # The fences FENCED_SLOTS_FILE lists (or is being written to list).
        self._fences: dict[int, FencedSlot] = {}
        self._fencesMovedPast = self._restoreFences(shardMap.slots)
        if shipper is not None:
            shipper.addFencedObserver(self._fenced)
        self._listener = StreamServerEndpointService(
            serverFromString(reactor, listen), self.server.factory()
        )
        self._listener.setName("listener")
        self._listener.setServiceParent(self)
        topology.watch(self._mapChanged)
        if gainedAtStart:
            self._setAsideAtStart(gainedAtStart)

    def _setAsideAtStart(self, gained: dict[int, int]) -> None:
        """
        Set aside the stale copies of the slots the node's first map gives
        it that it did not have when it last ran.  The node is being built
        (before the reactor runs): this is done at once, blocking, so that
        neither a call nor the shipper's search for unshipped stores ever
        sees them.  If it cannot be done now, it is done as for any gained
        slot (L{prepareSlots}).
        """
        stale = self.dataDir.child("stale")
        slotCount = self.topology.currentMap().slots
        try:
            moved = setAsideStores(
                self.pool.storesDir, stale, gained, slotCount, (), self._wallClock
            )
        except OSError:
            self.log.failure(
                "Node {node}: cannot set aside the stale stores of {slots} slots at start",
                node=self.nodeId,
                slots=len(gained),
            )
            self.prepareSlots(gained, gained)
            return
        self._slotEpochs.update(gained)
        self._kept.update(gained)
        if not moved:
            return
        self.log.info(
            "Node {node} set aside {count} stale local stores of {slots} slots it did not "
            "have when it last ran into {where}; they are restored from durable storage "
            "on their first call",
            node=self.nodeId,
            count=len(moved),
            slots=len(gained),
            where=stale.path,
        )

    def _restoreFences(self, slotCount: int) -> bool:
        """
        Stop serving again the slots L{FENCED_SLOTS_FILE} lists whose fences
        still hold in the first map (L{FractalServer.restoreFence}).  The
        node is being built (before the reactor runs): this is done at once,
        blocking, so that no call is served from a fenced slot's stale local
        copy.  A file that cannot be read or understood is reported and
        ignored (it is replaced when the fences next change).

        @return: whether the file lists fences the map has moved past (the
            slot is another node's, or this node's at a newer epoch), so
            that it must be written again without them.
        """
        where = self.dataDir.child(FENCED_SLOTS_FILE).path
        try:
            recorded = _readFencedSlots(self.dataDir, slotCount)
        except ValueError as e:
            self.log.error(
                "Node {node}: ignoring {where}, which {problem}: the slots it records as "
                "fenced are served (until their next write is refused) unless the map "
                "moved them; it is replaced when a slot is next fenced",
                node=self.nodeId,
                where=where,
                problem=str(e),
            )
            return False
        for fence in recorded:
            if self.server.restoreFence(fence):
                self._fences[fence.slot] = fence
        movedPast = [fence for fence in recorded if fence.slot not in self._fences]
        if movedPast:
            self.log.info(
                "Node {node}: forgetting the fences of slots {slots} recorded in {where}: "
                "the map now gives them to another node or to this one at a newer epoch",
                node=self.nodeId,
                slots=", ".join(str(fence.slot) for fence in movedPast),
                where=where,
            )
        return bool(movedPast)

    def privilegedStartService(self) -> None:
        """
        Create the data directory, then bind the listener.
        """
        self.dataDir.makedirs(ignoreExistingDirectory=True)
        super().privilegedStartService()

    def startService(self) -> None:
        """
        Create the data directory, then start the children (the listener
        binds now unless L{privilegedStartService} bound it).
        """
        self.dataDir.makedirs(ignoreExistingDirectory=True)
        slotCount = self.topology.currentMap().slots
        try:
            # Before anything is served: once this node has run with a map
            # that does not give it a slot, it must not trust its copies of
            # that slot's stores at its next start.
            _writeOwnedSlots(self.dataDir, slotCount, self._keptEpochs())
        except OSError:
            self.log.failure("Cannot record the owned slots in {where}", where=self.dataDir.path)
        if self._fencesMovedPast:
            try:
                _writeFencedSlots(self.dataDir, slotCount, self._fences.values())
                self._fencesMovedPast = False
            except OSError:
                self.log.failure(
                    "Cannot record the fenced slots in {where}", where=self.dataDir.path
                )
        super().startService()
        self.reactor.callWhenRunning(self._pruneStale)

    def stats(self) -> dict[str, Any]:
        """
        The node's live figures, for consoles and metrics.
        """
        server = self.server
        pool = self.pool
        return {
            "node": self.nodeId,
            "application": self.application.name,
            "openStores": len(pool.openKeys()),
            "maxOpenStores": pool.maxOpenStores,
            "storesOpened": pool.opened,
            "storesClosed": pool.closedCount,
            "connections": server.connections,
            "inFlight": server.inFlight,
            "stopping": server.stopping,
            "callsServed": server.callsServed,
            "callsFailed": server.callsFailed,
            "responderErrors": server.responderErrors,
            "fencedSlots": len(server.fencedSlots()),
        }

    def _fenced(self, key: str, error: StaleEpoch) -> None:
        """
        The shipper was told that C{key}'s store is fenced at a newer epoch
        (L{IShipper.addFencedObserver}): stop serving the key's slot
        (L{FractalServer.fenceSlot}), whatever the topology, close the
        slot's stores (once the calls holding them are done) rather than
        leave them open until they idle out, and have a topology that can
        reload its map (one with a C{refresh()} method, as
        L{fractal.postgres.topology.PostgresTopology} has) learn who owns the
        slot now, so the slot's calls go there.  The fence is recorded in
        L{FENCED_SLOTS_FILE}, so that it holds across a restart.
        """
        fence = self.server.fenceSlot(key, error)
        self._recordFences()
        shardMap = self.topology.currentMap()
        slot = slotForKey(key, shardMap.slots)
        if fence is not None or shardMap.ownerOf(slot).node != self.nodeId:
            self.pool.closeStoresOf([slot], shardMap.slots)
        refresh = getattr(self.topology, "refresh", None)
        if callable(refresh):
            refresh()

    # -- slots changing hands ---------------------------------------------

    def epochForKey(self, key: str) -> int:
        """
        The epoch at which to ship C{key}'s store: the epoch at which this
        node's local copies of the slot's stores were written.  While the
        node owns the slot that is its epoch; for a slot it has lost, the
        epoch it owned it at (so the last changes of its stores are shipped
        at it, and refused if the new owner has written); for a slot it has
        just gained, the epoch before, until its stale copies are set aside;
        for a slot it never owned, C{0}.  Never another owner's epoch, so a
        stale copy can never be shipped over another owner's records.  The
        shipper's C{epochForKey} (L{fractal.durable.shipper.Shipper.serveNode}).
        """
        return self._slotEpochs.get(slotForKey(key, self.topology.currentMap().slots), 0)

    def _mapChanged(self, shardMap: ShardMap) -> None:
        """
        A new map: close the stores of the slots this node no longer owns
        (each shipped first), and prepare the slots it has gained
        (L{prepareSlots}) unless the topology announces them itself.  A node
        without a shipper has no durable copy to restore from: its local
        copy is the only one, so it keeps serving it.
        """
        self._recordFences()
        lost: list[int] = []
        gained: dict[int, int] = {}
        owned: set[int] = set()
        for slot, owner in enumerate(shardMap.owners):
            if owner.node != self.nodeId:
                if slot in self._owned:
                    lost.append(slot)
                continue
            owned.add(slot)
            known = max(self._slotEpochs.get(slot, 0), self._preparing.get(slot, 0))
            if owner.epoch > known and not self.gainsAnnounced:
                gained[slot] = owner.epoch
        self._owned = owned
        if lost:
            self.pool.closeStoresOf(lost, shardMap.slots)
        if gained and self.shipper is None:
            self._slotEpochs.update(gained)
            self._kept.update(gained)
            self._saveOwnedSlots()
        elif gained:
            self.prepareSlots(gained, gained)

    def prepareSlots(
        self, slots: Iterable[int], epochs: Mapping[int, int] | None = None
    ) -> Deferred[None]:
        """
        Get ready to serve C{slots}, which this node has gained: their local
        copies may be older than what another owner has stored since.  No
        store of theirs is handed out until this is done (calls wait,
        L{StorePool.holdSlots}); their open stores are closed, once the
        calls holding them are done (L{StorePool.closeStoresOf}), each
        shipped at the epoch it was written at; then their local copies are
        moved into C{DATA/stale/} (L{fractal.stale.setAsideStores}) and that
        directory pruned.  Their first calls restore them from durable
        storage.

        Once their copies are set aside, the slots are recorded in
        L{OWNED_SLOTS_FILE} with their epochs (before they are served, so
        that after a crash their new local copies are trusted).

        @param slots: the gained slots.
        @param epochs: the epoch at which this node owns each; when a slot's
            is missing, the epoch the map shows once it is done.
        @return: fires when the slots may be served; never fails (a failure
            is logged).
        """
        chosen = sorted(set(slots))
        slotCount = self.topology.currentMap().slots
        for slot in chosen:
            self._preparing[slot] = max(
                self._preparing.get(slot, 0), epochs.get(slot, 0) if epochs else 0
            )
        release = self.pool.holdSlots(chosen, slotCount)
        stale = self.dataDir.child("stale")
        pool = self.pool

        def setAside(_: object) -> Deferred[list[str]]:
            busy = [storeNameForKey(key) for key in pool.openKeys()]
            return self._run(
                lambda: setAsideStores(
                    pool.storesDir, stale, chosen, slotCount, busy, self._wallClock
                )
            )

        def report(moved: list[str]) -> Deferred[None]:
            if moved:
                self.log.info(
                    "Node {node} set aside {count} stale local stores of {slots} gained "
                    "slots into {where}; they are restored from durable storage on "
                    "their first call",
                    node=self.nodeId,
                    count=len(moved),
                    slots=len(chosen),
                    where=stale.path,
                )
            return self._pruneStale()

        def failed(failure: Failure) -> None:
            self.log.failure(
                "Node {node}: cannot set aside the stale stores of {slots} gained slots",
                failure,
                node=self.nodeId,
                slots=len(chosen),
            )

        def settled(_: object) -> Deferred[None]:
            shardMap = self.topology.currentMap()
            for slot in chosen:
                epoch = self._preparing.pop(slot, 0)
                owner = shardMap.ownerOf(slot)
                if owner.node == self.nodeId:
                    epoch = max(epoch, owner.epoch)
                if epoch:
                    self._slotEpochs[slot] = max(self._slotEpochs.get(slot, 0), epoch)
                    self._kept.add(slot)
            return self._saveOwnedSlots()

        d: Deferred[Any] = pool.closeStoresOf(chosen, slotCount).closed
        d.addCallback(setAside).addCallback(report).addErrback(failed).addBoth(settled)
        d.addBoth(lambda _: release())
        return d

    def _keptEpochs(self) -> dict[int, int]:
        """
        What L{OWNED_SLOTS_FILE} should list now.
        """
        return {slot: self._slotEpochs[slot] for slot in self._kept if slot in self._slotEpochs}

    def _saveOwnedSlots(self) -> Deferred[None]:
        """
        Write L{OWNED_SLOTS_FILE} off the reactor thread, after the writes
        asked before; never fails (a failure is logged).

        @return: fires once written.
        """
        slotCount = self.topology.currentMap().slots

        def save(_: object) -> Deferred[None]:
            owned = self._keptEpochs()
            d: Deferred[None] = maybeDeferred(
                self._run, lambda: _writeOwnedSlots(self.dataDir, slotCount, owned)
            )
            return d.addErrback(
                lambda f: self.log.failure(
                    "Cannot record the owned slots in {where}", f, where=self.dataDir.path
                )
            )

        done: Deferred[None] = Deferred()
        self._saving = self._saving.addCallback(save)
        self._saving.addCallback(lambda _: done.callback(None))
        return done

    def _recordFences(self) -> None:
        """
        Have L{FENCED_SLOTS_FILE} list the fences that hold now
        (L{FractalServer.fencedSlots}), if they changed: a slot fenced, or a
        fence the map has moved past.
        """
        fences = {fence.slot: fence for fence in self.server.fencedSlots()}
        if fences != self._fences:
            self._fences = fences
            self._saveFences()

    def _saveFences(self) -> Deferred[None]:
        """
        Write L{FENCED_SLOTS_FILE} off the reactor thread, after the writes
        asked before; never fails (a failure is logged, and the fences hold
        in memory).

        @return: fires once written.
        """
        slotCount = self.topology.currentMap().slots

        def save(_: object) -> Deferred[None]:
            fences = list(self._fences.values())
            d: Deferred[None] = maybeDeferred(
                self._run, lambda: _writeFencedSlots(self.dataDir, slotCount, fences)
            )
            return d.addErrback(
                lambda f: self.log.failure(
                    "Cannot record the fenced slots in {where}", f, where=self.dataDir.path
                )
            )

        self._saving = self._saving.addCallback(save)
        return self._savesDone()

    def _savesDone(self) -> Deferred[None]:
        """
        @return: fires once the writes of L{OWNED_SLOTS_FILE} and
            L{FENCED_SLOTS_FILE} asked so far are done.
        """
        done: Deferred[None] = Deferred()
        self._saving.addCallback(lambda _: done.callback(None))
        return done

    def _pruneStale(self) -> Deferred[None]:
        """
        Delete the stale stores set aside longer than L{staleKeep} ago or
        beyond the newest L{staleMax}; never fails.
        """
        stale = self.dataDir.child("stale")
        now = self._wallClock()

        def report(removed: list[str]) -> None:
            if removed:
                self.log.info(
                    "Deleted {count} stale stores set aside more than {keep:g}s ago "
                    "or beyond the newest {most} in {where}",
                    count=len(removed),
                    keep=self.staleKeep,
                    most=self.staleMax,
                    where=stale.path,
                )

        def failed(failure: Failure) -> None:
            self.log.failure("Cannot prune the stale stores in {where}", failure, where=stale.path)

        d: Deferred[Any] = maybeDeferred(
            self._run, lambda: pruneStale(stale, now, self.staleKeep, self.staleMax)
        )
        return d.addCallbacks(report, failed)

    def stopService(self) -> Deferred[None]:
        """
        Stop gracefully, in the order given in the class docstring.

        @return: fires when the node has stopped.
        """
        Service.stopService(self)
        self.log.info(
            "Node {node} stopping: {inFlight} calls in flight, {open} stores open",
            node=self.nodeId,
            inFlight=self.server.inFlight,
            open=len(self.pool.openKeys()),
        )
        d: Deferred[Any] = (
            maybeDeferred(self._listener.stopService)
            if self._listener.running
            else succeed(None)
        )
        self.server.stopAccepting()
        d.addCallback(lambda _: self._drain())
        d.addCallback(lambda drained: self.pool.close(force=not drained))
        d.addCallback(lambda _: self.server.disconnectAll(peers=False))
        d.addCallback(lambda _: self._stopOthers())
        d.addCallback(lambda _: self.server.disconnectAll())
        # A fence learnt while the stores were shipped is on disk before the
        # node reports itself stopped.
        d.addCallback(lambda _: self._savesDone())
        d.addCallback(lambda _: self.log.info("Node {node} stopped", node=self.nodeId))
        return d

    def _drain(self) -> Deferred[bool]:
        """
        Wait for the calls in flight, at most L{drainTimeout} seconds.

        @return: fires with C{True} once drained, C{False} on timeout.
        """
        d = self.server.whenDrained()
        d.addTimeout(self.drainTimeout, self.reactor)

        def timedOut(failure: Failure) -> bool:
            failure.trap(defer.TimeoutError)
            self.log.warn(
                "Node {node}: {inFlight} calls still running after {timeout} s; "
                "closing their stores anyway",
                node=self.nodeId,
                inFlight=self.server.inFlight,
                timeout=self.drainTimeout,
            )
            return False

        return d.addCallbacks(lambda _: True, timedOut)

    def _stopOthers(self) -> Deferred[Any]:
        """
        Stop every child service but the listener, in reverse order.
        """
        stops = []
        for service in reversed(list(self)):
            if service is self._listener or not service.running:
                continue
            stops.append(maybeDeferred(service.stopService).addErrback(self._stopFailed, service))
        return DeferredList(stops)

    def _stopFailed(self, failure: Failure, service: Any) -> None:
        """
        Log a child service that failed to stop; the node stops anyway.
        """
        self.log.failure("Service {service!r} failed to stop", failure, service=service)

# -*- test-case-name: tests.test_postgres_topology -*-
"""
L{PostgresTopology}: cluster membership, slot ownership, failover and
rebalancing kept in PostgreSQL.

Membership
==========
A node registers (a new I{incarnation} of its row in C{nodes}) and then
heartbeats: each heartbeat extends its lease to I{now + lease} on the node's
clock.  A node whose lease has run out is dead: the coordinator marks it so,
and its heartbeats fail from then on, so a node that was paused (SIGSTOP)
past its lease learns that it lost its membership and registers again as a
new incarnation.  A node also stops serving its slots on its own once its
lease may have run out (a little before, to allow for the time a heartbeat
takes), without waiting to hear it from the database.  Heartbeats are short
transactions of their own, sent on time whatever else the node is doing with
the database (see L{PostgresTopology.tick}).

Ownership
=========
C{slot_owners} holds C{(slot, node, epoch, target)} for every slot.  Every
change of owner bumps the slot's epoch in the transaction that moves it, and
the durable backend (L{fractal.postgres.backend}) checks a write's epoch
against that row in the write's own transaction: once a slot has moved, its
old owner cannot store anything for it.

Coordination
============
Every node tries, at each heartbeat, to coordinate; a transaction-scoped
advisory lock lets one coordinator act at a time.  The coordinator:

    - marks the nodes whose lease ran out dead;
    - moves every slot of a dead or departed node to its rendezvous owner
      among the live nodes (L{fractal.routing.rendezvous}) at epoch+1, at
      once: the new owner restores each store from its durable chain on its
      first call;
    - for a slot whose live owner is not its rendezvous owner (a node has
      joined), asks for a handoff by setting C{target}; at most C{maxMoves}
      handoffs are under way at a time, so a large change does not stampede
      the backend.

Handoff
=======
The owner of a slot with a C{target} stops serving it (its map shows the
target as the owner, at the current epoch, so calls are forwarded there), has
its final changes shipped (the C{releaseSlots} hook), then moves the slot to
the target at epoch+1 in one transaction.  A graceful stop hands off every
slot the same way: the node marks itself gone and the coordination in the
same transaction moves its slots.

Every change of the map bumps C{cluster.map_version} and sends a
notification on the schema's channel; nodes listen and reload the map at
once, and reload it at every heartbeat anyway in case a notification was
missed.

Local copies
============
A node serves its local copy of a store only if nobody else can have owned
the store's slot since the copy was written: the slots it holds when it
registers (their rows still name it, so nobody took them) and the slots it
keeps.  A slot that comes to it from another node (or back to it) is
I{gained}: the C{slotsGained} hook is called before the node serves it, so the
node can set aside its old local copies and restore from durable storage.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import psycopg
from attrs import frozen
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, DeferredLock, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from fractal.durable.interfaces import StaleEpoch
from fractal.keys import DEFAULT_SLOTS, slotForKey, storeNameForKey
from fractal.postgres.connection import Database, NotificationListener
from fractal.routing.interfaces import ITopology, NodeAddress, ShardMap, SlotOwner
from fractal.routing.rendezvous import rendezvousOwners
from fractal.routing.topology import TopologyError, _watchWith, checkNodeId

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_MAX_MOVES",
    "NotRegistered",
    "PostgresTopology",
]

DEFAULT_LEASE = 10.0
"""
Seconds a node's membership lasts without a heartbeat.
"""

DEFAULT_MAX_MOVES = 32
"""
The most slot handoffs under way at once during rebalancing.
"""

_LOCAL_MARGIN = 0.8
"""
A node stops serving its slots once this fraction of its lease has passed
since its last successful heartbeat began, before the coordinator can declare
it dead.
"""

Cursor = psycopg.Cursor[Any]


class NotRegistered(RuntimeError):
    """
    The topology has no shard map yet: register the node first.
    """


@frozen
class _Row:
    slot: int
    node: str
    epoch: int
    target: str | None


@frozen
class _Snapshot:
    """
    What a node reads of the cluster in one transaction.
    """

    version: int
    slots: tuple[_Row, ...]
    nodes: tuple[tuple[str, str, str | None, str], ...]


@frozen
class _Registered:
    incarnation: int
    snapshot: _Snapshot
    gained: frozenset[int]


@frozen
class _Ticked:
    coordinated: bool
    snapshot: _Snapshot | None


def _bump(cursor: Cursor, channel: str) -> int:
    cursor.execute(
        "UPDATE cluster SET map_version = map_version + 1 WHERE id = 1 RETURNING map_version"
    )
    row = cursor.fetchone()
    assert row is not None
    version = int(row[0])
    cursor.execute("SELECT pg_notify(%s, %s)", (channel, str(version)))
    return version


def _coordinate(cursor: Cursor, now: float, maxMoves: int, channel: str) -> dict[int, str]:
    """
    The coordinator's work, in the caller's transaction, which holds the
    coordinator lock.

    @return: the slots moved at once (failover and bootstrap), with their new
        owners.
    """
    cursor.execute("SELECT slots FROM cluster WHERE id = 1 FOR UPDATE")
    row = cursor.fetchone()
    assert row is not None
    slots = int(row[0])
    cursor.execute(
        "UPDATE nodes SET state = 'dead' WHERE state = 'live' AND lease_expires < %s "
        "RETURNING node",
        (now,),
    )
    changed = bool(cursor.fetchall())
    cursor.execute("SELECT node FROM nodes WHERE state = 'live' ORDER BY node")
    live = [r[0] for r in cursor.fetchall()]
    moved: dict[int, str] = {}
    if not live:
        if changed:
            _bump(cursor, channel)
        return moved
    desired = _desired(tuple(live), slots)
    liveSet = set(live)
    cursor.execute("SELECT slot, node, epoch, target FROM slot_owners ORDER BY slot")
    rows = {r[0]: _Row(r[0], r[1], int(r[2]), r[3]) for r in cursor.fetchall()}
    missing = [s for s in range(slots) if s not in rows]
    if missing:
        cursor.executemany(
            "INSERT INTO slot_owners (slot, node, epoch) VALUES (%s, %s, 1)",
            [(s, desired[s]) for s in missing],
        )
        moved.update((s, desired[s]) for s in missing)
    failover = [r for r in rows.values() if r.node not in liveSet]
    if failover:
        cursor.executemany(
            "UPDATE slot_owners SET node = %s, epoch = epoch + 1, target = NULL WHERE slot = %s",
            [(desired[r.slot], r.slot) for r in failover],
        )
        moved.update((r.slot, desired[r.slot]) for r in failover)
    failed = {r.slot for r in failover}
    retarget: list[tuple[str | None, int]] = []
    inFlight = 0
    for r in rows.values():
        if r.slot in failed:
            continue
        want = None if r.node == desired[r.slot] else desired[r.slot]
        if r.target is not None and r.target != want:
            retarget.append((want, r.slot))
            if want is not None:
                inFlight += 1
        elif r.target is not None:
            inFlight += 1
    pending = {slot for (_, slot) in retarget}
    for r in rows.values():
        if inFlight >= maxMoves:
            break
        if r.slot in failed or r.slot in pending or r.target is not None:
            continue
        if r.node != desired[r.slot]:
            retarget.append((desired[r.slot], r.slot))
            inFlight += 1
    if retarget:
        cursor.executemany("UPDATE slot_owners SET target = %s WHERE slot = %s", retarget)
    if changed or moved or retarget:
        _bump(cursor, channel)
    return moved


def _snapshotIfNewer(cursor: Cursor, known: int) -> _Snapshot | None:
    """
    The cluster's state if its map version is not C{known}, else L{None}.
    """
    cursor.execute("SELECT map_version FROM cluster WHERE id = 1")
    row = cursor.fetchone()
    if row is not None and int(row[0]) == known:
        return None
    return _snapshot(cursor)


@functools.lru_cache(maxsize=8)
def _desired(live: tuple[str, ...], slots: int) -> tuple[str, ...]:
    """
    L{rendezvousOwners}, remembered for the last few member sets: the
    coordinator asks for the same one at every round.
    """
    return rendezvousOwners(live, slots)


def _snapshot(cursor: Cursor) -> _Snapshot:
    cursor.execute("SELECT map_version FROM cluster WHERE id = 1")
    row = cursor.fetchone()
    version = int(row[0]) if row else 0
    cursor.execute("SELECT slot, node, epoch, target FROM slot_owners ORDER BY slot")
    slots = tuple(_Row(r[0], r[1], int(r[2]), r[3]) for r in cursor.fetchall())
    cursor.execute("SELECT node, client, peer, state FROM nodes ORDER BY node")
    nodes = tuple((r[0], r[1], r[2], r[3]) for r in cursor.fetchall())
    return _Snapshot(version, slots, nodes)


@implementer(ITopology, IService)
class PostgresTopology(Service):
    """
    The shard map of a cluster that runs itself on PostgreSQL.

    Register the node (L{register}, or L{registerBlocking} before the reactor
    runs) before anything asks for the map; then run it as a service: it
    heartbeats, coordinates, hands off slots and follows the map until it is
    stopped, when it hands off every slot it owns and leaves.

    @ivar localNode: this node's id.
    @ivar address: this node's addresses, as registered.
    @ivar incarnation: this node's current registration, C{0} before the
        first.
    @ivar lease: seconds a membership lasts without a heartbeat.
    @ivar heartbeat: seconds between heartbeats (and coordination rounds, and
        map polls).
    @ivar coordinated: how many rounds this node has coordinated.
    @ivar releaseSlots: the hook called before slots are given up (see
        L{__init__}); settable until the service starts.
    @ivar slotsGained: the hook called with gained slots (see L{__init__});
        settable until the service starts.
    """

    log = Logger()

    def __init__(
        self,
        database: Database,
        address: NodeAddress,
        clock: IReactorTime,
        reactor: IReactorFDSet | None = None,
        slots: int = DEFAULT_SLOTS,
        lease: float = DEFAULT_LEASE,
        heartbeat: float | None = None,
        maxMoves: int = DEFAULT_MAX_MOVES,
        releaseSlots: Callable[[list[int]], Deferred[Any] | None] | None = None,
        slotsGained: Callable[[list[int]], Deferred[Any] | None] | None = None,
    ) -> None:
        """
        @param database: the cluster's database, its schema initialised.
        @param address: this node's id and addresses.
        @param clock: the clock of leases and heartbeats; every node of a
            cluster must use clocks that agree (the wall clock of one machine,
            or synchronised machines).
        @param reactor: watches the notification connection; without one the
            map is only polled, at each heartbeat.
        @param slots: the cluster's slot count; it must match the cluster's.
        @param lease: see L{DEFAULT_LEASE}.
        @param heartbeat: seconds between heartbeats; a quarter of the lease
            by default.
        @param maxMoves: see L{DEFAULT_MAX_MOVES}.
        @param releaseSlots: called with slots this node is about to give up
            (a handoff or a graceful stop) once it has stopped serving them;
            it ships their final changes, and the slots move when the
            L{Deferred} it returns fires.
        @param slotsGained: called with slots this node has just gained from
            another node: its local copies of their stores are stale.  The
            node serves those slots once the L{Deferred} it returns (if any)
            fires, so it can set the copies aside first.
        @raise TopologyError: for a malformed node id or settings.
        """
        checkNodeId(address.node)
        if not address.client:
            raise TopologyError(f"node {address.node!r} has no client endpoint")
        if slots < 1 or lease <= 0 or maxMoves < 1:
            raise TopologyError("slots, lease and maxMoves must be positive")
        self.localNode = address.node
        self.address = address
        self.lease = lease
        self.heartbeat = heartbeat if heartbeat is not None else lease / 4
        self.incarnation = 0
        self.coordinated = 0
        self._database = database
        self._clock = clock
        self._reactor = reactor
        self._slots = slots
        self._maxMoves = maxMoves
        self.releaseSlots = releaseSlots
        self.slotsGained = slotsGained
        self._observers: list[Callable[[ShardMap], None]] = []
        self._snapshot: _Snapshot | None = None
        self._map: ShardMap | None = None
        self._owned: frozenset[int] = frozenset()
        self._releasing: set[int] = set()
        self._preparing: dict[int, SlotOwner | None] = {}
        self._leaseDeadline = 0.0
        self._leaseRanOut = False
        self._leaseTimer: IDelayedCall | None = None
        self._lock = DeferredLock()
        self._loop: LoopingCall | None = None
        self._listener: NotificationListener | None = None
        self._listening: Deferred[Any] | None = None
        self._beating = False
        self._rounding = False
        self._refreshAgain = False
        self._refreshing = False

    # ITopology

    def currentMap(self) -> ShardMap:
        """
        The newest map this node knows, with the slots it is handing off
        shown at their target, and with every slot it owns shown elsewhere
        once its lease may have run out.

        @raise NotRegistered: before the node has registered.
        """
        if self._map is None:
            raise NotRegistered(f"node {self.localNode!r} has not registered yet")
        if not self._leaseRanOut and self._clock.seconds() >= self._leaseDeadline:
            self._expireLocally()
        return self._map

    def watch(self, observer: Callable[[ShardMap], None]) -> Callable[[], None]:
        return _watchWith(self._observers, observer)

    # registration

    def _registerIn(self, cursor: Cursor, now: float) -> _Registered:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (self._database.advisoryKey("coordinator"),))
        cursor.execute(
            "INSERT INTO cluster (id, slots) VALUES (1, %s) ON CONFLICT (id) DO NOTHING",
            (self._slots,),
        )
        cursor.execute("SELECT slots FROM cluster WHERE id = 1")
        row = cursor.fetchone()
        assert row is not None
        if int(row[0]) != self._slots:
            raise TopologyError(
                f"the cluster has {row[0]} slots; node {self.localNode!r} is configured "
                f"with {self._slots}"
            )
        cursor.execute(
            "INSERT INTO nodes AS n (node, client, peer, incarnation, lease_expires, state) "
            "VALUES (%s, %s, %s, 1, %s, 'live') "
            "ON CONFLICT (node) DO UPDATE SET client = excluded.client, peer = excluded.peer, "
            "incarnation = n.incarnation + 1, lease_expires = excluded.lease_expires, "
            "state = 'live' RETURNING incarnation",
            (self.localNode, self.address.client, self.address.peer, now + self.lease),
        )
        row = cursor.fetchone()
        assert row is not None
        incarnation = int(row[0])
        moved = _coordinate(cursor, now, self._maxMoves, self._database.channel)
        _bump(cursor, self._database.channel)
        snapshot = _snapshot(cursor)
        # Slots created now were never owned by anyone: not gained.  Slots
        # failed over to this node now were another node's: gained.
        cursor.execute("SELECT slot FROM slot_owners WHERE epoch > 1 AND slot = ANY(%s)",
                       ([s for s, n in moved.items() if n == self.localNode],))
        gained = frozenset(int(r[0]) for r in cursor.fetchall())
        return _Registered(incarnation, snapshot, gained)

    def register(self) -> Deferred[ShardMap]:
        """
        Register this node as a new incarnation and load the map.

        @return: fires with the map.
        """
        now = self._clock.seconds()

        def registered(result: _Registered) -> ShardMap:
            return self._registered(result, now)

        return self._locked(
            lambda: self._database.transact(lambda c: self._registerIn(c, now)).addCallback(
                registered
            )
        )

    def registerBlocking(self) -> ShardMap:
        """
        L{register} in the calling thread, for start-up before the reactor
        runs.

        @return: the map.
        """
        now = self._clock.seconds()
        return self._registered(self._database.transactBlocking(lambda c: self._registerIn(c, now)), now)

    def _registered(self, result: _Registered, now: float) -> ShardMap:
        self.incarnation = result.incarnation
        self._leaseDeadline = now + self.lease * _LOCAL_MARGIN
        self._leaseRanOut = False
        self._scheduleLeaseTimer()
        mine = frozenset(r.slot for r in result.snapshot.slots if r.node == self.localNode)
        self._owned = mine - result.gained
        self._releasing.clear()
        self.log.info(
            "Node {node} registered (incarnation {incarnation}), owning {count} slots",
            node=self.localNode,
            incarnation=self.incarnation,
            count=len(mine),
        )
        self._apply(result.snapshot, force=True)
        assert self._map is not None
        return self._map

    # the map

    def _apply(self, snapshot: _Snapshot, force: bool = False) -> bool:
        """
        Take a snapshot read from the database as the new state, if newer.

        @return: whether it was taken (and the map published).
        """
        if not force and self._snapshot is not None and snapshot.version <= self._snapshot.version:
            return False
        if len(snapshot.slots) != self._slots:
            self.log.warn("The cluster's slot table is incomplete; keeping the old map")
            return False
        self._snapshot = snapshot
        owned = frozenset(r.slot for r in snapshot.slots if r.node == self.localNode)
        gained = sorted(owned - self._owned)
        self._releasing &= owned
        for slot in list(self._preparing):
            if slot not in owned:
                del self._preparing[slot]
        self._owned = owned
        if gained and self.slotsGained is not None:
            # Until they are prepared, calls for them go where they went.
            previous = self._map
            for slot in gained:
                before = previous.owners[slot] if previous is not None else None
                self._preparing[slot] = (
                    before if before is not None and before.node != self.localNode else None
                )
            d = maybeDeferred(self.slotsGained, gained)

            def prepared(result: object) -> None:
                if isinstance(result, Failure):
                    self.log.failure("Preparing gained slots failed", result)
                for slot in gained:
                    self._preparing.pop(slot, None)
                if self._snapshot is not None:
                    self._publish()

            d.addBoth(prepared)
        if not self._startHandoffs():
            self._publish()
        return True

    def _publish(self) -> None:
        snapshot = self._snapshot
        assert snapshot is not None
        addresses = {
            node: NodeAddress(node, client, peer) for (node, client, peer, _) in snapshot.nodes
        }
        live = sorted(n for (n, _, _, state) in snapshot.nodes if state == "live")
        elsewhere = [n for n in live if n != self.localNode]
        fallback: tuple[str, ...] | None = None
        # A map is published for every change anywhere in the cluster, and
        # most slots keep their owner: those keep their SlotOwner too.
        previous = self._map.owners if self._map is not None else ()
        owners = []
        used = set(live)
        for r in snapshot.slots:
            node = r.node
            if node == self.localNode and (
                self._leaseRanOut or r.slot in self._releasing or r.slot in self._preparing
            ):
                # Not serving it: show where its calls should go, at the
                # current epoch (this node's final ships still carry it).
                if r.target is not None and r.slot in self._releasing and not self._leaseRanOut:
                    node = r.target
                elif self._preparing.get(r.slot) is not None:
                    before = self._preparing[r.slot]
                    assert before is not None
                    node = before.node
                elif elsewhere:
                    if fallback is None:
                        fallback = rendezvousOwners(elsewhere, self._slots)
                    node = fallback[r.slot]
            owner = previous[r.slot] if r.slot < len(previous) else None
            if owner is None or owner.node != node or owner.epoch != r.epoch:
                owner = SlotOwner(node, r.epoch)
            used.add(node)
            owners.append(owner)
        used.add(self.localNode)
        if self.localNode not in addresses:
            addresses[self.localNode] = self.address
        shardMap = ShardMap(
            owners=tuple(owners),
            nodes={n: addresses[n] for n in sorted(used)},
            version=snapshot.version,
        )
        self._map = shardMap
        for observer in list(self._observers):
            try:
                observer(shardMap)
            except Exception:
                self.log.failure("Shard map observer failed")

    def epochForKey(self, key: str) -> int:
        """
        The epoch at which this node owns C{key}'s slot, for the durable
        writes of its store: the shipper's C{epochForKey}.  It stays this
        node's epoch while the node hands the slot off, so its final ships
        are accepted, and it is never another node's epoch, so a node never
        ships a stale local copy of a store it does not own.

        @raise StaleEpoch: if this node does not own the slot, or has just
            gained it and not yet set aside its old local copies.
        @raise NotRegistered: before the node has registered.
        """
        if self._snapshot is None:
            raise NotRegistered(f"node {self.localNode!r} has not registered yet")
        row = self._snapshot.slots[slotForKey(key, self._slots)]
        if row.node != self.localNode:
            raise StaleEpoch(storeNameForKey(key), 0, row.epoch)
        if row.slot in self._preparing:
            # Gained, and the old local copy not yet set aside: whatever is
            # open now is stale and must not be shipped at the new epoch
            # (closing it would).  Reported as fenced by the epoch before,
            # so the store ships again once reopened from its chain.
            raise StaleEpoch(storeNameForKey(key), 0, row.epoch - 1)
        return row.epoch

    def ownedSlots(self) -> frozenset[int]:
        """
        The slots the database says this node owns, as of the newest map.
        """
        return self._owned

    def slotEpoch(self, slot: int) -> int:
        """
        The epoch of C{slot}'s ownership in the database, as of the newest
        map read (also while this node prepares a slot it has gained, when
        its published map does not show it yet).

        @raise NotRegistered: before the node has registered.
        """
        if self._snapshot is None:
            raise NotRegistered(f"node {self.localNode!r} has not registered yet")
        return self._snapshot.slots[slot].epoch

    # leases

    def _scheduleLeaseTimer(self) -> None:
        if self._leaseTimer is not None and self._leaseTimer.active():
            self._leaseTimer.cancel()
        delay = max(0.0, self._leaseDeadline - self._clock.seconds())
        self._leaseTimer = self._clock.callLater(delay, self._expireLocally)

    def _expireLocally(self) -> None:
        if self._leaseRanOut or self._map is None:
            return
        if self._clock.seconds() < self._leaseDeadline:
            self._scheduleLeaseTimer()
            return
        self._leaseRanOut = True
        self.log.warn(
            "Node {node}: no successful heartbeat for {seconds:.1f}s; no longer serving "
            "its slots until it hears from the database",
            node=self.localNode,
            seconds=self.lease * _LOCAL_MARGIN,
        )
        self._publish()

    # the periodic round

    def _locked(self, f: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        return self._lock.run(f)

    def _heartbeatIn(self, cursor: Cursor, now: float) -> bool:
        cursor.execute(
            "UPDATE nodes SET lease_expires = %s WHERE node = %s AND incarnation = %s "
            "AND state = 'live' AND lease_expires >= %s RETURNING node",
            (now + self.lease, self.localNode, self.incarnation, now),
        )
        return cursor.fetchone() is not None

    def _roundIn(self, cursor: Cursor, now: float, known: int) -> _Ticked:
        cursor.execute(
            "SELECT pg_try_advisory_xact_lock(%s)",
            (self._database.advisoryKey("coordinator"),),
        )
        row = cursor.fetchone()
        coordinated = bool(row and row[0])
        if coordinated:
            _coordinate(cursor, now, self._maxMoves, self._database.channel)
        return _Ticked(coordinated, _snapshotIfNewer(cursor, known))

    def tick(self) -> Deferred[None]:
        """
        One round: heartbeat (or register again if the membership was lost),
        then coordinate if no other node is coordinating, and reload the map
        if it changed.

        The heartbeat is a short transaction of its own, outside the lock
        that orders this node's other work on the map, and a heartbeat is
        sent every interval even while the previous round still waits for
        that lock, so nothing else this node does can delay it.

        @return: fires when the round is over; never fails (a database that
            cannot be reached is logged, and the lease runs out).
        """
        if self._beating:
            return succeed(None)
        self._beating = True
        now = self._clock.seconds()

        def beaten(alive: bool) -> Deferred[Any] | None:
            self._beating = False
            if not alive:
                self.log.warn(
                    "Node {node} lost its membership (incarnation {incarnation}); "
                    "registering again",
                    node=self.localNode,
                    incarnation=self.incarnation,
                )
                return self.register()
            self._leaseDeadline = now + self.lease * _LOCAL_MARGIN
            self._scheduleLeaseTimer()
            if self._leaseRanOut:
                self._leaseRanOut = False
                if self._snapshot is not None:
                    self._publish()
            if self._listener is not None and self._listener.lost and self.running:
                # The notification connection failed (a database restart):
                # listen again; until then the rounds poll.
                self._listener = None
                self._listen()
            if self._rounding:
                return None
            self._rounding = True
            return self._locked(run).addCallback(ticked).addBoth(rounded)

        def run() -> Deferred[Any]:
            return self._database.transact(
                lambda c: self._roundIn(c, self._clock.seconds(), self._knownVersion())
            )

        def ticked(result: _Ticked) -> None:
            if result.coordinated:
                self.coordinated += 1
            if result.snapshot is not None:
                self._apply(result.snapshot)
            else:
                self._startHandoffs()

        def rounded(result: object) -> object:
            self._rounding = False
            return result

        def failed(failure: Any) -> None:
            self._beating = False
            self.log.warn("Cluster round failed: {error}", error=failure.getErrorMessage())

        d = self._database.transact(lambda c: self._heartbeatIn(c, now)).addCallback(beaten)
        return d.addErrback(failed)

    def _beat(self) -> None:
        self.tick()

    def refresh(self) -> Deferred[None]:
        """
        Reload the map now (on a notification).

        @return: fires when reloaded; never fails.
        """
        if self._refreshing:
            self._refreshAgain = True
            return succeed(None)
        self._refreshing = True

        def run() -> Deferred[Any]:
            known = self._knownVersion()
            return self._database.transact(lambda c: _snapshotIfNewer(c, known))

        def loaded(snapshot: _Snapshot | None) -> None:
            if snapshot is not None:
                self._apply(snapshot)

        def done(_: object) -> Deferred[None] | None:
            self._refreshing = False
            if self._refreshAgain:
                self._refreshAgain = False
                return self.refresh()
            return None

        d = self._locked(run).addCallback(loaded)
        d.addErrback(
            lambda f: self.log.warn("Reloading the map failed: {error}", error=f.getErrorMessage())
        )
        return d.addBoth(done)

    def _knownVersion(self) -> int:
        return self._snapshot.version if self._snapshot is not None else -1

    # handoff

    def _startHandoffs(self) -> bool:
        """
        Hand off the slots of this node that the coordinator gave a target
        and that are not being handed off yet: publish the map that sends
        their calls to their target, then release them.

        @return: whether a map was published.
        """
        snapshot = self._snapshot
        if snapshot is None or not self.running:
            return False
        slots = [
            r.slot
            for r in snapshot.slots
            if r.node == self.localNode and r.target is not None and r.slot not in self._releasing
        ]
        if not slots:
            return False
        self._releasing.update(slots)
        self._publish()
        self.log.info(
            "Node {node} handing off {count} slots", node=self.localNode, count=len(slots)
        )
        d: Deferred[Any] = maybeDeferred(self.releaseSlots or (lambda s: None), slots)
        d.addCallback(lambda _: self._locked(lambda: self._database.transact(
            lambda c: self._releaseIn(c, slots))))

        def released(snapshot: _Snapshot) -> None:
            # Slots the coordinator took back meanwhile (their target left)
            # were not moved: serve them again; the moved ones are not ours.
            self._releasing.difference_update(slots)
            if not self._apply(snapshot):
                self._publish()

        d.addCallback(released)

        def failed(failure: Any) -> None:
            # Serve the slots again; the next round tries once more.
            self._releasing.difference_update(slots)
            self._publish()
            self.log.failure("Handoff of {count} slots failed", failure, count=len(slots))

        d.addErrback(failed)
        return True

    def _releaseIn(self, cursor: Cursor, slots: list[int]) -> _Snapshot:
        cursor.execute("SELECT 1 FROM cluster WHERE id = 1 FOR UPDATE")
        cursor.execute(
            "UPDATE slot_owners s SET node = s.target, epoch = s.epoch + 1, target = NULL "
            "FROM nodes n WHERE s.slot = ANY(%s) AND s.node = %s AND s.target = n.node "
            "AND n.state = 'live' RETURNING s.slot",
            (slots, self.localNode),
        )
        if cursor.fetchall():
            _bump(cursor, self._database.channel)
        # Start the next handoffs now rather than at the next round, so the
        # limit is on handoffs under way, not on handoffs per round.
        cursor.execute(
            "SELECT pg_try_advisory_xact_lock(%s)", (self._database.advisoryKey("coordinator"),)
        )
        row = cursor.fetchone()
        if row is not None and row[0]:
            _coordinate(cursor, self._clock.seconds(), self._maxMoves, self._database.channel)
        return _snapshot(cursor)

    # IService

    def startService(self) -> None:
        """
        Start heartbeating and listening for map changes.

        @raise NotRegistered: if the node has not registered.
        """
        if self._map is None:
            raise NotRegistered(f"node {self.localNode!r} must register before it starts")
        Service.startService(self)  # type: ignore[no-untyped-call]
        # The loop does not wait for a round to finish: the next heartbeat
        # is due on time however long the round waits for the map lock.
        self._loop = LoopingCall(self._beat)
        self._loop.clock = self._clock
        self._loop.start(self.heartbeat, now=False)
        if self._reactor is not None:
            self._listen()
        self._startHandoffs()

    def _listen(self) -> None:
        if self._reactor is None or self._listening is not None:
            return

        def listening(listener: NotificationListener) -> None:
            self._listener = listener
            if not self.running:
                listener.stop()
            else:
                self.refresh()

        def failed(failure: Any) -> None:
            self.log.warn(
                "Cannot listen for map changes ({error}); polling every {seconds}s",
                error=failure.getErrorMessage(),
                seconds=self.heartbeat,
            )

        def done(_: object) -> None:
            self._listening = None

        self._listening = self._database.listen(self._reactor, self._notified)
        self._listening.addCallbacks(listening, failed).addBoth(done)

    def _notified(self, payload: str) -> None:
        self.refresh()

    def stopService(self) -> Deferred[None]:
        """
        Hand off every slot and leave the cluster.

        @return: fires when done; a database that cannot be reached is logged
            and the slots move when the lease runs out instead.
        """
        Service.stopService(self)  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if self._leaseTimer is not None and self._leaseTimer.active():
            self._leaseTimer.cancel()
        self._leaseTimer = None
        owned = sorted(self._owned)
        self._releasing.update(owned)
        if self._snapshot is not None:
            self._publish()
        now = self._clock.seconds()
        d: Deferred[Any] = maybeDeferred(self.releaseSlots or (lambda s: None), owned)
        d.addCallback(lambda _: self._locked(lambda: self._database.transact(
            lambda c: self._leaveIn(c, now))))
        d.addCallback(lambda snapshot: self._apply(snapshot))
        d.addErrback(lambda f: self.log.warn("Leaving the cluster failed: {error}", error=f.getErrorMessage()))
        return d.addCallback(lambda _: None)

    def _leaveIn(self, cursor: Cursor, now: float) -> _Snapshot:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (self._database.advisoryKey("coordinator"),))
        cursor.execute(
            "UPDATE nodes SET state = 'gone', lease_expires = %s "
            "WHERE node = %s AND incarnation = %s",
            (now, self.localNode, self.incarnation),
        )
        _coordinate(cursor, now, self._maxMoves, self._database.channel)
        return _snapshot(cursor)


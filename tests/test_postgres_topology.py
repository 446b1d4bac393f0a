"""
Tests for L{fractal.postgres.topology}: membership, leases, epochs, failover,
rebalancing with handoff, coordination and notifications, against a real
PostgreSQL server (see L{tests._postgres}) with the time of every node on a
L{Clock} and every query run synchronously.
"""

from __future__ import annotations

import select
from typing import Any

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from fractal.durable.interfaces import StaleEpoch
from fractal.keys import slotOfStoreName, storeNameForKey
from fractal.postgres.backend import PostgresBackend
from fractal.postgres.topology import NotRegistered, PostgresTopology
from fractal.routing.interfaces import ITopology, NodeAddress, ShardMap, SlotOwner
from fractal.routing.rendezvous import rendezvousOwners
from fractal.routing.topology import TopologyError
from fractal.testing import recordInfo
from tests._postgres import makeDatabase

SLOTS = 64
LEASE = 10.0


class _Node:
    """
    One node's topology, its clock, and what its hooks saw.
    """

    def __init__(self, test: SynchronousTestCase, database: Any, name: str, **kw: Any) -> None:
        self.clock = Clock()
        self.released: list[list[int]] = []
        self.gained: list[list[int]] = []
        self.holdRelease: Deferred[None] | None = None
        self.maps: list[ShardMap] = []
        port = 7100 + int(name[1:])
        self.topology = PostgresTopology(
            database,
            NodeAddress(name, f"tcp:host=127.0.0.1:port={port}", f"tcp:host=127.0.0.1:port={port + 100}"),
            self.clock,
            slots=SLOTS,
            lease=LEASE,
            releaseSlots=self._release,
            slotsGained=self.gained.append,
            **kw,
        )
        self.topology.watch(self.maps.append)
        self._test = test

    def _release(self, slots: list[int]) -> Deferred[None] | None:
        self.released.append(list(slots))
        return self.holdRelease

    def start(self) -> None:
        self._test.successResultOf(self.topology.register())
        self.topology.startService()
        self._test.addCleanup(self.stop)

    def stop(self) -> None:
        if self.topology.running:
            self._test.successResultOf(self.topology.stopService())

    def owners(self) -> list[str]:
        return [o.node for o in self.topology.currentMap().owners]


def _rows(database: Any) -> dict[int, tuple[str, int, str | None]]:
    def read(cursor: Any) -> dict[int, tuple[str, int, str | None]]:
        cursor.execute("SELECT slot, node, epoch, target FROM slot_owners")
        return {r[0]: (r[1], int(r[2]), r[3]) for r in cursor.fetchall()}

    result: dict[int, tuple[str, int, str | None]] = database.transactBlocking(read)
    return result


def _advance(seconds: float, *nodes: _Node, step: float = 1.0) -> None:
    """
    Advance the clocks of C{nodes} together, in steps.
    """
    done = 0.0
    while done < seconds:
        for node in nodes:
            node.clock.advance(step)
        done += step


class MembershipTests(SynchronousTestCase):
    """
    Registering, heartbeats and the map.
    """

    def setUp(self) -> None:
        self.database = makeDatabase(self)

    def node(self, name: str, **kw: Any) -> _Node:
        return _Node(self, self.database, name, **kw)

    def test_interfaces(self) -> None:
        """
        The topology provides L{ITopology} and L{IService}.
        """
        n1 = self.node("n1")
        self.assertTrue(verifyObject(ITopology, n1.topology))
        self.assertTrue(verifyObject(IService, n1.topology))

    def test_notRegistered(self) -> None:
        """
        Before it registers, the topology has no map and cannot start.
        """
        n1 = self.node("n1")
        self.assertRaises(NotRegistered, n1.topology.currentMap)
        self.assertRaises(NotRegistered, n1.topology.startService)

    def test_firstNodeOwnsAll(self) -> None:
        """
        The first node to register owns every slot at epoch 1, none of them
        counted as gained from another node.
        """
        n1 = self.node("n1")
        shardMap = self.successResultOf(n1.topology.register())
        self.assertEqual(shardMap.slots, SLOTS)
        self.assertEqual({(o.node, o.epoch) for o in shardMap.owners}, {("n1", 1)})
        self.assertEqual(set(shardMap.nodes), {"n1"})
        self.assertEqual(n1.gained, [])
        self.assertEqual(n1.topology.incarnation, 1)

    def test_slotCountMismatch(self) -> None:
        """
        A node configured with another slot count than the cluster's is
        refused.
        """
        self.node("n1").start()
        other = PostgresTopology(
            self.database, NodeAddress("n2", "tcp:host=127.0.0.1:port=1"), Clock(), slots=SLOTS * 2
        )
        self.failureResultOf(other.register(), TopologyError)

    def test_badSettings(self) -> None:
        """
        A malformed node id, a missing client endpoint, or a non-positive
        lease is a L{TopologyError}.
        """
        for address, kw in [
            (NodeAddress("../x", "tcp:host=h:port=1"), {}),
            (NodeAddress("n1", ""), {}),
            (NodeAddress("n1", "tcp:host=h:port=1"), {"lease": 0}),
        ]:
            self.assertRaises(TopologyError, PostgresTopology, self.database, address, Clock(), **kw)

    def test_heartbeatKeepsLease(self) -> None:
        """
        A running node's heartbeats keep it a member far past one lease, and
        its map keeps it as the owner.
        """
        n1 = self.node("n1")
        n1.start()
        _advance(LEASE * 5, n1)
        self.assertEqual(set(n1.owners()), {"n1"})
        self.assertEqual(n1.topology.incarnation, 1)
        self.assertGreater(n1.topology.coordinated, 0)


    def test_heartbeatNotBlockedByRound(self) -> None:
        """
        While the node's other work on the map holds its lock (a slow round,
        a handoff), heartbeats still go out every interval, so the node keeps
        its lease and keeps serving.
        """
        n1 = self.node("n1")
        n1.start()
        locked = n1.topology._lock.acquire()
        self.successResultOf(locked)
        _advance(LEASE * 3, n1, step=n1.topology.heartbeat)

        def lease(cursor: Any) -> float:
            cursor.execute("SELECT lease_expires FROM nodes WHERE node = 'n1'")
            return float(cursor.fetchone()[0])

        self.assertGreater(self.database.transactBlocking(lease), n1.clock.seconds())
        self.assertEqual(set(n1.owners()), {"n1"})
        n1.topology._lock.release()


class FailoverTests(SynchronousTestCase):
    """
    Lease expiry, failover, returning nodes, coordination.
    """

    def setUp(self) -> None:
        self.database = makeDatabase(self)
        self.backend = PostgresBackend(self.database)

    def node(self, name: str, **kw: Any) -> _Node:
        return _Node(self, self.database, name, **kw)

    def twoNodes(self) -> tuple[_Node, _Node]:
        """
        n1 and n2 running and balanced.
        """
        n1, n2 = self.node("n1"), self.node("n2")
        n1.start()
        n2.start()
        _advance(LEASE, n1, n2)
        desired = list(rendezvousOwners(["n1", "n2"], SLOTS))
        self.assertEqual(n1.owners(), desired)
        self.assertEqual(n2.owners(), desired)
        return n1, n2

    def test_leaseExpiryFailsOver(self) -> None:
        """
        A node that stops heartbeating is declared dead once its lease has
        run out, and its slots move to the live node at epoch+1, in the map
        the live node serves; the other slots keep their epoch.
        """
        n1, n2 = self.twoNodes()
        before = _rows(self.database)
        n2slots = [s for s, (node, _, _) in before.items() if node == "n2"]
        self.assertTrue(n2slots)
        _advance(LEASE / 2, n1)
        self.assertEqual(_rows(self.database), before)
        _advance(LEASE, n1)
        after = _rows(self.database)
        for slot, (node, epoch, target) in after.items():
            self.assertEqual(node, "n1")
            self.assertIsNone(target)
            self.assertEqual(epoch, before[slot][1] + (1 if slot in n2slots else 0))
        self.assertEqual(set(n1.owners()), {"n1"})
        self.assertEqual(sorted(s for g in n1.gained for s in g), sorted(n2slots))

    def test_pausedNodeStopsServingLocally(self) -> None:
        """
        A node that cannot heartbeat stops showing itself as the owner of its
        slots once most of its lease has passed on its own clock, before
        anyone declares it dead.
        """
        n1, n2 = self.twoNodes()
        n2.topology._loop.stop()  # type: ignore[union-attr]
        n2.clock.advance(LEASE * 0.5)
        self.assertIn("n2", n2.owners())
        n2.clock.advance(LEASE * 0.4)
        self.assertNotIn("n2", n2.owners())
        self.assertEqual(set(n2.owners()), {"n1"})

    def test_returningNodeNeverServesOldCopies(self) -> None:
        """
        A node paused past its lease comes back as a new incarnation: its old
        slots are the survivor's at a higher epoch, its writes at the old
        epoch are refused by the backend, and the slots it gets back by
        rebalancing come at a new epoch, reported as gained (so its old
        local copies are set aside) and never as kept.
        """
        n1, n2 = self.twoNodes()
        before = _rows(self.database)
        key = next(
            f"user{i}" for i in range(10000)
            if before[slotOfStoreName(storeNameForKey(f"user{i}"), SLOTS)][0] == "n2"
        )
        store = storeNameForKey(key)
        slot = slotOfStoreName(store, SLOTS)
        oldEpoch = before[slot][1]
        self.successResultOf(
            self.backend.append(recordInfo(store, oldEpoch, 1, 0, b"s"), b"s")
        )
        # SIGSTOP n2: its clock stands still while n1's runs.
        _advance(LEASE * 2, n1)
        self.assertEqual(_rows(self.database)[slot][0], "n1")
        # SIGCONT: n2's clock catches up, without a round yet.
        n2.topology._loop.stop()  # type: ignore[union-attr]
        n2.clock.advance(LEASE * 2)
        self.assertNotEqual(n2.topology.currentMap().ownerOf(slot).node, "n2")
        self.failureResultOf(
            self.backend.append(recordInfo(store, oldEpoch, 2, 1, b"late"), b"late"), StaleEpoch
        )
        self.successResultOf(n2.topology.tick())
        self.assertEqual(n2.topology.incarnation, 2)
        self.assertEqual(n2.topology.ownedSlots(), frozenset())
        n2.gained.clear()
        n2.topology._loop.start(n2.topology.heartbeat, now=False)  # type: ignore[union-attr]
        _advance(LEASE * 4, n1, n2)
        after = _rows(self.database)
        self.assertEqual([after[s][0] for s in range(SLOTS)], list(rendezvousOwners(["n1", "n2"], SLOTS)))
        self.assertEqual(after[slot], ("n2", oldEpoch + 2, None))
        regained = sorted(s for g in n2.gained for s in g)
        self.assertEqual(regained, sorted(s for s, (n, _, _) in after.items() if n == "n2"))
        self.assertEqual(n2.topology.currentMap().ownerOf(slot).node, "n2")

    def test_coordinatorExclusive(self) -> None:
        """
        While another session holds the coordinator lock, a node's rounds do
        not coordinate (a dead node's slots stay put); once it is free, the
        next round does.
        """
        n1, n2 = self.twoNodes()
        n2.topology._loop.stop()  # type: ignore[union-attr]
        holder = self.database.connect()
        self.addCleanup(holder.close)
        holder.execute("SELECT pg_advisory_lock(%s)", (self.database.advisoryKey("coordinator"),))
        coordinated = n1.topology.coordinated
        _advance(LEASE * 2, n1)
        self.assertEqual(n1.topology.coordinated, coordinated)
        self.assertIn("n2", {node for node, _, _ in _rows(self.database).values()})
        holder.execute("SELECT pg_advisory_unlock(%s)", (self.database.advisoryKey("coordinator"),))
        _advance(n1.topology.heartbeat, n1)
        self.assertEqual(n1.topology.coordinated, coordinated + 1)
        self.assertEqual({node for node, _, _ in _rows(self.database).values()}, {"n1"})

    def test_gracefulStopHandsOff(self) -> None:
        """
        Stopping a node gives up its slots: the release hook runs first with
        all of them, and only when it has finished do they move to the
        remaining node at epoch+1.
        """
        n1, n2 = self.twoNodes()
        before = _rows(self.database)
        n2slots = sorted(s for s, (node, _, _) in before.items() if node == "n2")
        n2.holdRelease = Deferred()
        d = n2.topology.stopService()
        self.assertEqual(n2.released[-1], n2slots)
        self.assertEqual(set(n2.owners()), {"n1"})
        self.assertEqual(_rows(self.database), before)
        n2.holdRelease.callback(None)
        self.successResultOf(d)
        after = _rows(self.database)
        for slot in n2slots:
            self.assertEqual(after[slot], ("n1", before[slot][1] + 1, None))

        def state(cursor: Any) -> str:
            cursor.execute("SELECT state FROM nodes WHERE node = 'n2'")
            return str(cursor.fetchone()[0])

        self.assertEqual(self.database.transactBlocking(state), "gone")


class RebalanceTests(SynchronousTestCase):
    """
    A joining node takes its share through rate-limited handoffs.
    """

    def setUp(self) -> None:
        self.database = makeDatabase(self)

    def test_joinHandsOffRateLimited(self) -> None:
        """
        When n2 joins, n1 hands off the slots rendezvous hashing gives n2,
        never more than C{maxMoves} at a time, each released only after the
        release hook finished, and each arriving at n2 at epoch 2 as gained;
        the other slots stay at epoch 1.
        """
        n1 = _Node(self, self.database, "n1", maxMoves=5)
        n1.start()
        n2 = _Node(self, self.database, "n2", maxMoves=5)
        n2.start()
        desired = rendezvousOwners(["n1", "n2"], SLOTS)
        toMove = sorted(s for s in range(SLOTS) if desired[s] == "n2")
        self.assertGreater(len(toMove), 5)
        for _ in range(100):
            rows = _rows(self.database)
            self.assertLessEqual(sum(1 for (_, _, t) in rows.values() if t is not None), 5)
            if [rows[s][0] for s in range(SLOTS)] == list(desired):
                break
            _advance(n1.topology.heartbeat, n1, n2, step=n1.topology.heartbeat)
        rows = _rows(self.database)
        self.assertEqual([rows[s][0] for s in range(SLOTS)], list(desired))
        for slot in range(SLOTS):
            self.assertEqual(rows[slot][1], 2 if slot in toMove else 1)
        self.assertTrue(all(len(batch) <= 5 for batch in n1.released))
        self.assertEqual(sorted(s for b in n1.released for s in b), toMove)
        self.assertEqual(sorted(s for g in n2.gained for s in g), toMove)
        self.assertEqual(n1.owners(), list(desired))

    def test_handoffStopsServingFirst(self) -> None:
        """
        While its release hook runs, the old owner shows the slot at the
        new owner with the old epoch (calls are forwarded, and its final
        ships still carry its epoch); the database still names the old
        owner until the hook finishes.
        """
        n1 = _Node(self, self.database, "n1", maxMoves=1)
        n1.holdRelease = Deferred()
        n1.start()
        n2 = _Node(self, self.database, "n2", maxMoves=1)
        n2.start()
        n1.clock.advance(n1.topology.heartbeat)
        [[slot]] = n1.released
        self.assertEqual(n1.topology.currentMap().ownerOf(slot).node, "n2")
        self.assertEqual(n1.topology.currentMap().ownerOf(slot).epoch, 1)
        self.assertEqual(_rows(self.database)[slot], ("n1", 1, "n2"))
        n1.holdRelease.callback(None)
        self.assertEqual(_rows(self.database)[slot], ("n2", 2, None))


    def test_handoffPublishedOnce(self) -> None:
        """
        A snapshot that gives this node a slot to hand off is published
        once, already showing the slot at its target (never first as still
        served here), and the new map keeps the L{SlotOwner} of every slot
        whose owner did not change: a map is published for every change in
        the cluster, so each must cost little.
        """
        n1 = _Node(self, self.database, "n1", maxMoves=1)
        n1.holdRelease = Deferred()
        n1.start()
        n2 = _Node(self, self.database, "n2", maxMoves=1)
        n2.start()
        before = n1.topology.currentMap()
        published = len(n1.maps)
        n1.clock.advance(n1.topology.heartbeat)
        [[slot]] = n1.released
        [after] = n1.maps[published:]
        self.assertEqual(after.ownerOf(slot), SlotOwner("n2", 1))
        for number, (old, new) in enumerate(zip(before.owners, after.owners)):
            if number != slot:
                self.assertIs(new, old)
        n1.holdRelease.callback(None)

    def test_handoffTargetGone(self) -> None:
        """
        If the target of a handoff dies while the old owner ships, the
        coordinator takes the handoff back (or points it elsewhere) and the
        old owner, once its release finds the slot not moved, serves again
        every slot the database says is its own with no handoff asked.
        """
        hold: Deferred[None] = Deferred()
        n1 = _Node(self, self.database, "n1", maxMoves=1)
        n1.holdRelease = hold
        n1.start()
        n3 = _Node(self, self.database, "n3", maxMoves=1)
        n2 = _Node(self, self.database, "n2", maxMoves=1)
        n2.start()
        n1.clock.advance(n1.topology.heartbeat)
        [[slot]] = n1.released
        self.assertEqual(n1.owners()[slot], "n2")
        n3.start()
        n2.topology._loop.stop()  # type: ignore[union-attr]
        n1.holdRelease = None
        _advance(LEASE * 2, n1, n3)
        self.assertNotEqual(_rows(self.database)[slot][2], "n2")
        hold.callback(None)
        _advance(LEASE, n1, n3)
        rows = _rows(self.database)
        owners = n1.owners()
        for s, (node, _, target) in rows.items():
            if node == "n1" and target is None:
                self.assertEqual(owners[s], "n1", f"slot {s} not served by its owner")
        self.assertNotEqual(rows[slot][0], "n2")


class NotificationTests(SynchronousTestCase):
    """
    Map changes reach the other nodes by LISTEN/NOTIFY.
    """

    def test_notifyDelivery(self) -> None:
        """
        A listening node reloads the map when another node changes it,
        without waiting for its own round.
        """
        database = makeDatabase(self)
        reactor = MemoryReactorClock()
        n1 = _Node(self, database, "n1", reactor=reactor)
        n1.start()
        [listener] = list(reactor.readers)
        version = n1.topology.currentMap().version
        n2 = _Node(self, database, "n2")
        n2.start()
        readable, _, _ = select.select([listener.fileno()], [], [], 10.0)
        self.assertTrue(readable, "no notification arrived within 10 seconds")
        listener.doRead()
        self.assertGreater(n1.topology.currentMap().version, version)
        self.assertIn("n2", n1.topology.currentMap().nodes)
        self.assertGreaterEqual(n1.topology.currentMap().version, n2.topology.currentMap().version)
        self.assertTrue(n1.released, "n1 did not start handing off to the joining node")
        n1.stop()
        self.assertEqual(list(reactor.readers), [])

    def test_listenAgain(self) -> None:
        """
        When the notification connection is lost, the next heartbeat listens
        again on a new one.
        """
        database = makeDatabase(self)
        reactor = MemoryReactorClock()
        n1 = _Node(self, database, "n1", reactor=reactor)
        n1.start()
        [listener] = list(reactor.readers)
        listener.stop()
        self.assertEqual(list(reactor.readers), [])
        n1.clock.advance(n1.topology.heartbeat)
        [again] = list(reactor.readers)
        self.assertIsNot(again, listener)
        self.assertFalse(again.lost)


class LocalCopyTests(SynchronousTestCase):
    """
    What a node may ship and serve of the slots it gains and loses.
    """

    def setUp(self) -> None:
        self.database = makeDatabase(self)

    def test_epochForKey(self) -> None:
        """
        L{PostgresTopology.epochForKey} gives the node's epoch for keys of
        its own slots and refuses, with L{StaleEpoch}, keys of slots another
        node owns, so a stale local copy is never shipped at someone else's
        epoch.
        """
        n1 = _Node(self, self.database, "n1")
        self.assertRaises(NotRegistered, n1.topology.epochForKey, "alice")
        n1.start()
        self.assertEqual(n1.topology.epochForKey("alice"), 1)
        n2 = _Node(self, self.database, "n2")
        n2.start()
        _advance(LEASE, n1, n2)
        rows = _rows(self.database)
        for i in range(40):
            key = f"user{i}"
            node, epoch, _ = rows[slotOfStoreName(storeNameForKey(key), SLOTS)]
            mine, other = (n1, n2) if node == "n1" else (n2, n1)
            self.assertEqual(mine.topology.epochForKey(key), epoch)
            error = self.assertRaises(StaleEpoch, other.topology.epochForKey, key)
            self.assertEqual(error.current, epoch)

    def test_gainedServedOnlyWhenPrepared(self) -> None:
        """
        A gained slot is not shown as the node's own, and nothing of it is
        shipped, until the Deferred of its C{slotsGained} hook fires (its old
        local copies are being set aside); then it is.
        """
        n1, n2 = _Node(self, self.database, "n1"), _Node(self, self.database, "n2")
        n1.start()
        n2.start()
        _advance(LEASE, n1, n2)
        hold: Deferred[None] = Deferred()
        n1.topology.slotsGained = lambda slots: hold
        n2.topology._loop.stop()  # type: ignore[union-attr]
        _advance(LEASE * 2, n1)
        rows = _rows(self.database)
        self.assertEqual({n for n, _, _ in rows.values()}, {"n1"})
        self.assertIn("n2", n1.owners())
        slot = n1.owners().index("n2")
        key = next(f"u{i}" for i in range(10000) if slotOfStoreName(storeNameForKey(f"u{i}"), SLOTS) == slot)
        error = self.assertRaises(StaleEpoch, n1.topology.epochForKey, key)
        self.assertEqual(error.current, rows[slot][1] - 1)
        hold.callback(None)
        self.assertEqual(set(n1.owners()), {"n1"})
        self.assertEqual(n1.topology.epochForKey(key), rows[slot][1])

"""
Tests for how a node keeps its local copies of stores honest as slots change
hands, the same way for every topology whose map can change
(L{fractal.node.FractalNode.prepareSlots}, L{fractal.stale}): a slot that
comes back to a node at a newer epoch is served from durable storage, never
from the node's stale local copy, and that copy is never shipped over the
other owner's records.

Deterministic: real nodes with real stores on disk over a simulated network
with one clock (L{fractal.testing.SimulatedCluster}), their shippers on one
in-memory backend.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from examples import mailbox
from fractal.durable._threads import runSynchronously
from fractal.durable.shipper import Shipper
from fractal.keys import InvalidUserKey, slotForKey, storeNameForKey
from fractal.pool import StorePool
from fractal.protocol import OwnerUnavailable
from fractal.routing.interfaces import NodeAddress, ShardMap
from fractal.stale import pruneStale, setAsideStores
from fractal.store import Store
from fractal.testing import (
    ManualTopology,
    MemoryDurableBackend,
    SimulatedCluster,
    StaticTopology,
    reassign,
)
from tests.test_durable_node import Add, DurableNodeCounter, _DurableNodeMixin, application

SLOTS = 16


def _value(backend: MemoryDurableBackend, case: SynchronousTestCase, user: str) -> int:
    """
    The counter of C{user}'s store as restored from C{backend}.
    """
    destination = FilePath(case.mktemp())
    shipper = Shipper(backend, Clock(), runInThread=runSynchronously)
    case.assertTrue(case.successResultOf(shipper.restore(user, destination)))
    store = Store(destination)
    try:
        counter = store.findFirst(DurableNodeCounter)
        return 0 if counter is None else int(counter.value)
    finally:
        store.close()


class MovedAwayAndBackTests(SynchronousTestCase):
    """
    A slot of n1 moves to n2 and back on a L{fractal.testing.ManualTopology},
    each move at a newer epoch (L{fractal.testing.reassign}).
    """

    def setUp(self) -> None:
        self.backend = MemoryDurableBackend()
        self.queued: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def start(self, **nodeArguments: Any) -> None:
        self.cluster = SimulatedCluster(
            application,
            FilePath(self.mktemp()),
            nodes=2,
            slots=SLOTS,
            manual=True,
            durable=self.backend,
            **nodeArguments,
        )
        self.cluster.start()
        self.addCleanup(self.cluster.stop)
        self.user = next(
            u for u in (f"user{i}" for i in range(200)) if self.cluster.ownerOf(u) == "n1"
        )
        self.slot = self.cluster.slotOf(self.user)
        self.n1 = self.cluster.nodes["n1"]
        self.n2 = self.cluster.nodes["n2"]

    def later(self, f: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queued.append((f, d))
        return d

    def runQueued(self) -> None:
        while self.queued:
            f, d = self.queued.pop(0)
            d.callback(f())

    def add(self, node: str, amount: int) -> Deferred[Any]:
        d = self.cluster.client(node).callRemote(Add, user=self.user, amount=amount)
        self.cluster.flush()
        self.cluster.advance(0)
        return d

    def move(self, node: str) -> ShardMap:
        shardMap = reassign(self.n1.topology.currentMap(), [self.slot], node)
        self.cluster.setMap(shardMap)
        return shardMap

    def storeEpochs(self) -> list[int]:
        name = storeNameForKey(self.user)
        return [info.epoch for info in self.backend.appended if info.store == name]

    def test_servedFromDurableNotStaleCopy(self) -> None:
        """
        n1 writes (5) and ships; the slot moves to n2, which restores the
        store and writes (105) and ships; the slot comes back to n1 at epoch
        3: n1 serves n2's writes (106), not its stale copy (which would give
        6), ships on from n2's chain at epoch 3, and keeps its stale copy in
        C{DATA/stale/}.  Nothing n2 wrote is lost.
        """
        self.start()
        self.assertEqual(self.successResultOf(self.add("n1", 5)), {"value": 5})
        self.cluster.advance(1.0)
        self.move("n2")
        self.assertEqual(self.successResultOf(self.add("n2", 100)), {"value": 105})
        self.cluster.advance(1.0)
        self.assertEqual(self.move("n1").ownerOf(self.slot).epoch, 3)
        self.assertEqual(self.successResultOf(self.add("n1", 1)), {"value": 106})
        self.cluster.advance(1.0)
        self.assertEqual(_value(self.backend, self, self.user), 106)
        self.assertEqual(self.storeEpochs(), [1, 2, 3])
        [stale] = self.n1.dataDir.child("stale").children()
        self.assertTrue(stale.basename().startswith(storeNameForKey(self.user) + "-"))

    def test_staleOpenStoreNeverShipped(self) -> None:
        """
        A stale copy open on n1 when the slot comes back, with a commit made
        after the slot had left (999), is closed without being shipped over
        n2's records (its ship, at n1's old epoch, is refused), set aside,
        and n1 serves n2's writes.
        """
        self.start()
        self.successResultOf(self.add("n1", 5))
        self.cluster.advance(1.0)
        self.move("n2")
        self.successResultOf(self.add("n2", 100))
        self.cluster.advance(1.0)
        lease = self.successResultOf(self.n1.pool.acquire(self.user))
        counter = lease.store.findFirst(DurableNodeCounter)
        lease.store.transact(lambda: setattr(counter, "value", 999))
        lease.release()
        self.move("n1")
        self.assertNotIn(self.user, self.n1.pool.openKeys())
        self.assertEqual(self.successResultOf(self.add("n1", 1)), {"value": 106})
        self.cluster.advance(1.0)
        self.assertEqual(_value(self.backend, self, self.user), 106)
        self.assertEqual(self.storeEpochs(), [1, 2, 3])

    def test_lostSlotShippedAtOnce(self) -> None:
        """
        When the slot leaves n1, n1 closes its store at once, shipping its
        last commit (not shipped yet) at its own epoch, so n2 restores it.
        """
        self.start()
        self.successResultOf(self.add("n1", 5))
        self.move("n2")
        self.assertNotIn(self.user, self.n1.pool.openKeys())
        self.assertEqual(self.successResultOf(self.add("n2", 100)), {"value": 105})
        self.assertEqual(self.n1.epochForKey(self.user), 1)

    def test_callsWaitForSetAside(self) -> None:
        """
        A call for a gained slot waits while the node sets its stale copies
        aside (which runs off the reactor thread), then runs on the store
        restored from durable storage.
        """
        self.start(runInThread=self.later)
        self.successResultOf(self.add("n1", 5))
        self.cluster.advance(1.0)
        self.move("n2")
        self.runQueued()
        self.successResultOf(self.add("n2", 100))
        self.cluster.advance(1.0)
        self.move("n1")
        call = self.add("n1", 1)
        self.assertNoResult(call)
        self.assertEqual(self.n1.epochForKey(self.user), 1)
        self.runQueued()
        self.cluster.flush()
        self.assertEqual(self.successResultOf(call), {"value": 106})
        self.assertEqual(self.n1.epochForKey(self.user), 3)

    def test_epochForKey(self) -> None:
        """
        L{FractalNode.epochForKey} is the epoch at which the node's local
        copy of a store was written: its epoch for a slot it owns, the epoch
        it last owned a lost slot at, the new epoch of a gained slot once its
        stale copies are set aside, and C{0} for a slot it never owned.
        """
        self.start()
        other = next(
            u for u in (f"user{i}" for i in range(200)) if self.cluster.ownerOf(u) == "n2"
        )
        self.assertEqual(self.n1.epochForKey(self.user), 1)
        self.assertEqual(self.n1.epochForKey(other), 0)
        self.move("n2")
        self.assertEqual(self.n1.epochForKey(self.user), 1)
        self.assertEqual(self.n2.epochForKey(self.user), 2)
        self.move("n1")
        self.assertEqual(self.n1.epochForKey(self.user), 3)


class FencedStoresClosedTests(_DurableNodeMixin, SynchronousTestCase):
    """
    A node fenced out of a slot closes the slot's stores at once.
    """

    def test_closedAtFence(self) -> None:
        """
        Once the backend refuses a ship of alice's store for a stale epoch,
        alice's store is closed (not left open until it idles out); a store
        of another slot stays open.
        """
        node = self.makeNode(FilePath(self.mktemp()))
        self.addCleanup(node.stopService)
        client, pump = self.connect()
        other = next(
            u for u in (f"user{i}" for i in range(100)) if slotForKey(u) != slotForKey("alice")
        )
        for user in ("alice", other):
            client.callRemote(Add, user=user, amount=1)
        pump.flush()
        self.reactor.advance(1.0)
        self.successResultOf(self.backend.fence(storeNameForKey("alice"), 2))
        client.callRemote(Add, user="alice", amount=1)
        pump.flush()
        self.assertIn("alice", node.pool.openKeys())
        self.reactor.advance(1.0)
        self.assertNotIn("alice", node.pool.openKeys())
        self.assertIn(other, node.pool.openKeys())


class TwoWritersTests(_DurableNodeMixin, SynchronousTestCase):
    """
    Two lone nodes on one durable backend, each sure it owns every slot at
    epoch 1: a misconfigured static cluster.
    """

    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_secondWriterStopsServing(self) -> None:
        """
        n2 restores alice's store from n1's chain and ships a commit; when
        n1 then ships its own next commit, it finds n2's record at its own
        epoch: n1 stops serving alice's slot (L{OwnerUnavailable}, as a
        fenced node does), closes the store, ships nothing more of it and
        logs an error saying two nodes write the store; n2's commits stay
        the newest stored and n2 serves on.
        """
        n1 = self.makeNode(FilePath(self.mktemp()))
        self.addCleanup(n1.stopService)
        c1, p1 = self.connect()
        n2 = self.makeNode(FilePath(self.mktemp()))
        self.addCleanup(n2.stopService)
        c2, p2 = self.connect()

        def add(client: Any, pump: Any) -> Any:
            results: list[Any] = []
            client.callRemote(Add, user="alice", amount=1).addBoth(results.append)
            pump.flush()
            self.reactor.advance(0)
            pump.flush()
            [result] = results
            return result

        self.assertEqual(add(c1, p1), {"value": 1})
        self.reactor.advance(1.0)
        self.assertEqual(add(c2, p2), {"value": 2})
        self.reactor.advance(1.0)
        self.assertEqual(add(c1, p1), {"value": 2})
        self.reactor.advance(1.0)
        refused = add(c1, p1)
        self.assertIsInstance(refused, Failure)
        refused.trap(OwnerUnavailable)
        self.assertNotIn("alice", n1.pool.openKeys())
        self.assertEqual(len(n1.server.fencedSlots()), 1)
        [event] = [e for e in self.events if "Two nodes write" in e.get("log_format", "")]
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertIn(storeNameForKey("alice"), formatEvent(event))
        count = len(self.backend.appended)
        self.assertEqual(add(c2, p2), {"value": 3})
        self.reactor.advance(1.0)
        self.assertEqual(len(self.backend.appended), count + 1)
        self.assertEqual(_value(self.backend, self, "alice"), 3)


class PoolHoldTests(SynchronousTestCase):
    """
    L{StorePool.holdSlots} keeps the stores of chosen slots from being
    handed out.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = StorePool(self.clock, FilePath(self.mktemp()), maxOpenStores=8)
        self.addCleanup(self.pool.close)
        self.alice = slotForKey("alice", SLOTS)
        self.other = next(
            u for u in (f"user{i}" for i in range(100)) if slotForKey(u, SLOTS) != self.alice
        )

    def test_acquireWaits(self) -> None:
        """
        While alice's slot is held, acquiring her store waits (and
        C{tryAcquire} answers L{None}, even for an open store); other slots
        are served; once the hold ends, the wait ends with her store.
        """
        self.successResultOf(self.pool.acquire("alice")).release()
        release = self.pool.holdSlots([self.alice], SLOTS)
        self.assertIsNone(self.pool.tryAcquire("alice"))
        waiting = self.pool.acquire("alice")
        self.assertNoResult(waiting)
        self.successResultOf(self.pool.acquire(self.other)).release()
        release()
        lease = self.successResultOf(waiting)
        self.assertEqual(lease.key, "alice")
        lease.release()
        release()
        self.successResultOf(self.pool.acquire("alice")).release()

    def test_nested(self) -> None:
        """
        Holds of one slot nest: the store is handed out once every hold has
        ended.
        """
        first = self.pool.holdSlots([self.alice], SLOTS)
        second = self.pool.holdSlots([self.alice, 3], SLOTS)
        waiting = self.pool.acquire("alice")
        first()
        self.assertNoResult(waiting)
        second()
        self.successResultOf(waiting).release()

    def test_invalidKey(self) -> None:
        """
        An invalid key is refused as ever while slots are held.
        """
        self.pool.holdSlots([self.alice], SLOTS)
        self.failureResultOf(self.pool.acquire("\x00"), InvalidUserKey)
        self.assertIsNone(self.pool.tryAcquire("\x00"))


class SetAsideTests(SynchronousTestCase):
    """
    Moving stale local copies out of the way (L{fractal.stale}).
    """

    def test_setAside(self) -> None:
        """
        Only the stores of the chosen slots, and not those kept, move to the
        stale directory.
        """
        stores = FilePath(self.mktemp())
        names = {}
        for user in [f"u{i}" for i in range(20)]:
            name = storeNameForKey(user)
            stores.child(name[:2]).child(name).makedirs()
            names[name] = slotForKey(user, 4)
        keep = next(n for n, s in names.items() if s == 1)
        stale = FilePath(self.mktemp())
        moved = setAsideStores(stores, stale, [1], 4, keep=[keep])
        self.assertEqual(sorted(moved), sorted(n for n, s in names.items() if s == 1 and n != keep))
        left = {p.basename() for prefix in stores.children() for p in prefix.children()}
        self.assertEqual(left, {n for n, s in names.items() if s != 1} | {keep})
        self.assertEqual(len(stale.children()), len(moved))

    def test_pruneStale(self) -> None:
        """
        L{pruneStale} deletes the stale stores set aside longer ago than the
        time kept, and the oldest beyond the count kept, whole directories;
        it leaves alone what it did not name.
        """
        stale = FilePath(self.mktemp())
        for name in ["a-100.0", "b-900.5", "c-950.0", "d-990.0", "notes", "e-soon"]:
            stale.child(name).makedirs()
            stale.child(name).child("db.sqlite").setContent(b"x")
        removed = pruneStale(stale, now=1000.0, keep=500.0, maxCount=2)
        self.assertEqual(sorted(removed), ["a-100.0", "b-900.5"])
        self.assertEqual(sorted(c.basename() for c in stale.children()),
                         ["c-950.0", "d-990.0", "e-soon", "notes"])
        self.assertEqual(sorted(pruneStale(stale, now=2000.0, keep=500.0, maxCount=2)),
                         ["c-950.0", "d-990.0"])
        self.assertEqual(sorted(c.basename() for c in stale.children()), ["e-soon", "notes"])
        self.assertEqual(pruneStale(FilePath(self.mktemp()), 0.0, 1.0, 1), [])


class WithoutShipperTests(SynchronousTestCase):
    """
    A node without durable shipping has nothing to restore a gained slot's
    stores from.
    """

    def test_localCopyKept(self) -> None:
        """
        When a slot comes back to a node without a shipper, its local copy,
        the only one, is served again, not set aside.
        """
        cluster = SimulatedCluster(
            mailbox.application, FilePath(self.mktemp()), nodes=2, slots=SLOTS, manual=True
        )
        cluster.start()
        self.addCleanup(cluster.stop)
        user = next(u for u in (f"user{i}" for i in range(200)) if cluster.ownerOf(u) == "n1")
        slot = cluster.slotOf(user)
        n1 = cluster.nodes["n1"]

        def call(command: Any, **kw: Any) -> Any:
            d = cluster.client("n1").callRemote(command, user=user, **kw)
            cluster.flush()
            cluster.advance(0)
            return self.successResultOf(d)

        call(mailbox.Deliver, sender="bob", subject="hi", body="text")
        cluster.setMap(reassign(n1.topology.currentMap(), [slot], "n2"))
        cluster.setMap(reassign(n1.topology.currentMap(), [slot], "n1"))
        self.assertEqual(call(mailbox.Stats)["total"], 1)
        self.assertFalse(n1.dataDir.child("stale").exists())


class AcrossRestartsTests(_DurableNodeMixin, SynchronousTestCase):
    """
    A node remembers which slots' local copies it may serve
    (C{DATA/owned-slots}), so a slot its first map gives it after a restart
    is gained unless it had that slot, at that epoch, when it last ran.
    """

    def start(self, dataDir: FilePath[str], topology: Any) -> tuple[Any, Callable[[str], Any]]:
        """
        Start a node of id C{topology.localNode} with a shipper on
        C{self.backend}; return it and a function calling L{Add} on it.
        """
        node = self.makeNode(dataDir, topology=topology)
        client, pump = self.connect()
        return node, lambda user: self.call(client, pump, user)

    def stop(self, node: Any) -> None:
        self.successResultOf(node.stopService())

    def test_staticConfigurationChange(self) -> None:
        """
        n1 alone writes alice (1); the static configuration then adds n2,
        which owns alice's slot: n2 restores her store and writes (2); then
        n1 is alone again and owns the slot, at epoch 1 as before: it sets
        its old copy aside and serves n2's write (3), instead of serving its
        copy (which would give 2) and shipping it over n2's records.
        """
        a1 = NodeAddress("n1", "tcp:host=127.0.0.1:port=7100", "tcp:host=127.0.0.1:port=7200")
        a2 = NodeAddress("n2", "tcp:host=127.0.0.1:port=7101", "tcp:host=127.0.0.1:port=7201")
        both = StaticTopology("n1", [a1, a2]).currentMap()
        user = next(u for u in (f"user{i}" for i in range(200)) if both.ownerOfKey(u).node == "n2")
        d1, d2 = FilePath(self.mktemp()), FilePath(self.mktemp())
        n1, add = self.start(d1, StaticTopology("n1", [a1]))
        self.assertEqual(add(user), {"value": 1})
        self.stop(n1)
        n1, _ = self.start(d1, StaticTopology("n1", [a1, a2]))
        n2, add = self.start(d2, StaticTopology("n2", [a1, a2]))
        self.assertEqual(add(user), {"value": 2})
        self.stop(n2)
        self.stop(n1)
        n1, add = self.start(d1, StaticTopology("n1", [a1]))
        self.assertEqual(add(user), {"value": 3})
        self.reactor.advance(1.0)
        self.assertEqual(_value(self.backend, self, user), 3)
        [stale] = d1.child("stale").children()
        self.assertTrue(stale.basename().startswith(storeNameForKey(user) + "-"))
        self.stop(n1)

    def test_ownSlotsTrusted(self) -> None:
        """
        A node restarted with the map it had trusts its local copies, even
        of a slot it gained back at a newer epoch before it stopped: a
        commit it made there and did not ship (the backend refused nothing,
        it was down) is still served.  Restarted with that slot at a newer
        epoch again, it sets its copy aside.
        """
        single = StaticTopology("n1", [NodeAddress("n1", "tcp:host=127.0.0.1:port=7100")])
        other = NodeAddress("n2", "tcp:host=127.0.0.1:port=7101")
        slot = slotForKey("alice")
        dataDir = FilePath(self.mktemp())
        topology = ManualTopology("n1", single.currentMap())
        n1, add = self.start(dataDir, topology)
        self.assertEqual(add("alice"), {"value": 1})
        self.reactor.advance(1.0)
        topology.setMap(reassign(topology.currentMap(), [slot], "n2", other))
        topology.setMap(reassign(topology.currentMap(), [slot], "n1"))
        regained = topology.currentMap()
        self.assertEqual(add("alice"), {"value": 2})
        self.backend.available = False
        self.assertEqual(add("alice"), {"value": 3})
        self.stop(n1)
        self.backend.available = True
        n1, add = self.start(dataDir, ManualTopology("n1", regained))
        self.assertEqual(add("alice"), {"value": 4})
        self.assertEqual(len(dataDir.child("stale").children()), 1)
        self.reactor.advance(1.0)
        self.stop(n1)
        later = reassign(reassign(regained, [slot], "n2", other), [slot], "n1")
        n1, add = self.start(dataDir, ManualTopology("n1", later))
        self.assertEqual(add("alice"), {"value": 5})
        self.assertEqual(len(dataDir.child("stale").children()), 2)
        self.stop(n1)

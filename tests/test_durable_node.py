"""
Durable shipping through a whole node: C{ack="durable"} through the AMP
front door, restore of a missing local copy, graceful stop, fencing.

Real nodes, real stores on disk and real AMP over iosim; the backend is the
in-memory one, and the shipper's blocking work runs synchronously.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from fractal import app
from fractal.durable._memory import BackendUnavailable
from fractal.durable._threads import runSynchronously
from fractal.durable.interfaces import StaleEpoch
from fractal.durable.record import decodeRecord
from fractal.durable.shipper import Shipper
from fractal.keys import DEFAULT_SLOTS, slotForKey, storeNameForKey
from fractal.node import FENCED_SLOTS_FILE, FractalNode
from fractal.protocol import NotOwner, OwnerUnavailable, StoreUnavailable
from fractal.routing.interfaces import NodeAddress, ShardMap, SlotOwner
from fractal.server import FencedSlot
from fractal.store import Item, integer
from fractal.testing import ManualTopology, MemoryDurableBackend, StaticTopology, reassign


class Add(app.UserCommand):
    """
    Add to the user's counter; acknowledged locally.
    """

    arguments = [(b"amount", amp.Integer())]
    response = [(b"value", amp.Integer())]


class AddDurably(app.UserCommand):
    """
    Add to the user's counter; acknowledged once durable.
    """

    arguments = [(b"amount", amp.Integer())]
    response = [(b"value", amp.Integer())]
    ack = "durable"


class DurableNodeCounter(Item):
    typeName = "test_durable_node_counter"
    value = integer(default=0)

    @Add.responder
    def add(self, amount: int) -> dict[str, Any]:
        self.value += amount
        return {"value": self.value}

    @AddDurably.responder
    def addDurably(self, amount: int) -> dict[str, Any]:
        return self.add(amount)


application = app.Application("durable-counter", powerups=[DurableNodeCounter])


class _DurableNodeMixin:
    """
    Starting nodes with a shipper on one in-memory backend, and connecting to
    them over iosim.
    """

    reactor: MemoryReactorClock
    backend: MemoryDurableBackend
    mktemp: Any

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.backend = MemoryDurableBackend()

    def makeNode(
        self, dataDir: FilePath[str], interval: float = 1.0, topology: Any = None
    ) -> FractalNode:
        """
        A node with a shipper on C{self.backend}, started.

        @param topology: the node's topology (the node is its C{localNode});
            a lone node's by default.
        """
        shipper = Shipper(
            self.backend,
            self.reactor,
            runInThread=runSynchronously,
            interval=interval,
            storesDirectory=dataDir.child("stores"),
        )
        self.reactor.tcpServers.clear()
        node = FractalNode(
            self.reactor,
            application,
            dataDir,
            "tcp:7100:interface=127.0.0.1",
            nodeId="n1" if topology is None else topology.localNode,
            shipper=shipper,
            topology=topology,
            runInThread=runSynchronously,
        )
        shipper.serveNode(node)
        node.startService()
        return node

    def connect(self) -> tuple[amp.AMP, iosim.IOPump]:
        [(_, factory, _, _)] = self.reactor.tcpServers
        client, _, pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(None), amp.AMP, clock=self.reactor
        )
        return client, pump

    def call(self, client: amp.AMP, pump: iosim.IOPump, user: str) -> Any:
        """
        Call L{Add} for C{user}; the result, or the failure.
        """
        results: list[Any] = []
        client.callRemote(Add, user=user, amount=1).addBoth(results.append)
        pump.flush()
        self.reactor.advance(0)
        pump.flush()
        [result] = results
        return result


class DurableNodeTests(_DurableNodeMixin, SynchronousTestCase):
    """
    A node with a shipper.
    """

    def test_durableAckWaits(self) -> None:
        """
        A command acknowledged durably is answered only once the backend has
        stored the record with its commit; a locally acknowledged one is
        answered at once even while the backend holds every write.
        """
        node = self.makeNode(FilePath(self.mktemp()), interval=60.0)
        self.addCleanup(node.stopService)
        client, pump = self.connect()
        self.backend.holdAppends = True
        local = client.callRemote(Add, user="alice", amount=1)
        pump.flush()
        self.assertEqual(self.successResultOf(local), {"value": 1})
        durable = client.callRemote(AddDurably, user="alice", amount=2)
        pump.flush()
        self.reactor.advance(0)
        pump.flush()
        self.assertNoResult(durable)
        self.backend.holdAppends = False
        self.backend.releaseAppends()
        pump.flush()
        self.assertEqual(self.successResultOf(durable), {"value": 3})

    def test_groupCommitAcrossUsers(self) -> None:
        """
        Durable calls of many users outstanding at once are acknowledged
        after one ship cycle, one record per user.
        """
        node = self.makeNode(FilePath(self.mktemp()), interval=60.0)
        self.addCleanup(node.stopService)
        client, pump = self.connect()
        users = [f"user{i}" for i in range(20)]
        for user in users:
            client.callRemote(Add, user=user, amount=1)
        pump.flush()
        self.reactor.advance(0)
        before = len(self.backend.appended)
        calls = [client.callRemote(AddDurably, user=user, amount=1) for user in users]
        pump.flush()
        self.reactor.advance(0)
        pump.flush()
        for d in calls:
            self.assertEqual(self.successResultOf(d), {"value": 2})
        self.assertEqual(len(self.backend.appended) - before, len(users))

    def test_restoreOntoFreshDataDirectory(self) -> None:
        """
        Every durably acknowledged write is found by a node started on an
        empty data directory with the same backend: the store is restored
        on first use.
        """
        node = self.makeNode(FilePath(self.mktemp()))
        client, pump = self.connect()
        for amount in (1, 2, 3):
            d = client.callRemote(AddDurably, user="alice", amount=amount)
            pump.flush()
            self.reactor.advance(0)
            pump.flush()
            self.successResultOf(d)
        # The disk is lost: no graceful stop of the old node's stores.
        fresh = FilePath(self.mktemp())
        other = self.makeNode(fresh)
        self.addCleanup(other.stopService)
        client, pump = self.connect()
        d = client.callRemote(Add, user="alice", amount=10)
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"value": 16})
        name = storeNameForKey("alice")
        self.assertTrue(fresh.child("stores").child(name[:2]).child(name).child("db.sqlite").exists())
        self.successResultOf(node.stopService())

    def test_restoreIsReported(self) -> None:
        """
        A store restored because its local copy is missing is reported by a
        structured event giving the restored point: the record's sequence
        number and when the image it holds was taken, which every write
        acknowledged before that time is in (and the text says so).
        """
        node = self.makeNode(FilePath(self.mktemp()))
        client, pump = self.connect()
        for amount in (1, 2):
            d = client.callRemote(AddDurably, user="alice", amount=amount)
            pump.flush()
            self.reactor.advance(0)
            pump.flush()
            self.successResultOf(d)
        name = storeNameForKey("alice")
        head = self.successResultOf(self.backend.head(name))
        assert head is not None
        shipped = decodeRecord(self.successResultOf(self.backend.read(name, head.seq)))
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        other = self.makeNode(FilePath(self.mktemp()))
        self.addCleanup(other.stopService)
        client, pump = self.connect()
        d = client.callRemote(Add, user="alice", amount=10)
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"value": 13})
        [event] = [e for e in events if e.get("store") == name and "seq" in e]
        self.assertEqual(event["key"], "alice")
        self.assertEqual(event["seq"], head.seq)
        self.assertEqual(event["takenAt"], shipped.takenAt)
        text = formatEvent(event)
        self.assertIn(f"to record {head.seq}", text)
        self.assertIn(f"takenAt={shipped.takenAt:.6f}", text)
        self.assertIn("not shipped and is lost", text)
        self.successResultOf(node.stopService())

    def test_gracefulStopShipsEverything(self) -> None:
        """
        Stopping a node ships every store changed since its last ship, even
        with a long ship interval.
        """
        node = self.makeNode(FilePath(self.mktemp()), interval=3600.0)
        client, pump = self.connect()
        for user in ["a", "b", "c"]:
            client.callRemote(Add, user=user, amount=5)
        pump.flush()
        self.successResultOf(node.stopService())
        other = self.makeNode(FilePath(self.mktemp()))
        self.addCleanup(other.stopService)
        client, pump = self.connect()
        calls = [client.callRemote(Add, user=user, amount=1) for user in ["a", "b", "c"]]
        pump.flush()
        self.assertEqual([self.successResultOf(d)["value"] for d in calls], [6, 6, 6])

    def test_cleanRestartResumesNothing(self) -> None:
        """
        A node stopped cleanly and started again on the same data directory
        resumes shipping no store (its stores' closes checkpointed them
        after their last ships, yet their state files say they are
        unchanged); their next commits ship deltas on their chains.
        """
        dataDir = FilePath(self.mktemp())
        node = self.makeNode(dataDir)
        client, pump = self.connect()
        for user in ["a", "b", "c"]:
            client.callRemote(Add, user=user, amount=5)
        pump.flush()
        self.successResultOf(node.stopService())
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        other = self.makeNode(dataDir)
        self.addCleanup(other.stopService)
        self.assertEqual([e for e in events if "Resuming" in e.get("log_format", "")], [])
        client, pump = self.connect()
        calls = [client.callRemote(Add, user=user, amount=1) for user in ["a", "b", "c"]]
        pump.flush()
        self.assertEqual([self.successResultOf(d)["value"] for d in calls], [6, 6, 6])
        self.reactor.advance(1)
        for user in ["a", "b", "c"]:
            records = self.successResultOf(self.backend.records(storeNameForKey(user)))
            self.assertEqual([(r.seq, r.baseSeq) for r in records], [(1, 0), (2, 1)])

    def test_staleEpochRefusesDurableAck(self) -> None:
        """
        When the backend has been fenced at a newer epoch, a durable call is
        not acknowledged as durable: it fails with a clear error.
        """
        node = self.makeNode(FilePath(self.mktemp()))
        self.addCleanup(node.stopService)
        client, pump = self.connect()
        d = client.callRemote(Add, user="alice", amount=1)
        pump.flush()
        self.successResultOf(d)
        self.successResultOf(self.backend.fence(storeNameForKey("alice"), 99))
        results: list[Any] = []
        # AMP hands an error nobody handles yet to its unhandledError, so
        # collect the outcome before it arrives.
        client.callRemote(AddDurably, user="alice", amount=1).addBoth(results.append)
        pump.flush()
        self.reactor.advance(0)
        pump.flush()
        [failure] = results
        self.assertTrue(failure.check(StoreUnavailable))
        self.assertIn("could not be stored durably", str(failure.value))
        self.assertTrue(node.shipper.lag().stores[0].fenced)  # type: ignore[union-attr]
        self.flushLoggedErrors(StaleEpoch)


def _sameSlot(key: str, slots: int = DEFAULT_SLOTS) -> str:
    """
    Another user key whose slot is C{key}'s.
    """
    slot = slotForKey(key, slots)
    return next(
        other
        for other in (f"{key}-{i}" for i in range(1000000))
        if slotForKey(other, slots) == slot
    )


def _otherSlot(key: str, slots: int = DEFAULT_SLOTS) -> str:
    """
    A user key whose slot is not C{key}'s.
    """
    slot = slotForKey(key, slots)
    return next(
        other for other in (f"{key}-{i}" for i in range(100)) if slotForKey(other, slots) != slot
    )


class RefreshingTopology(ManualTopology):
    """
    A L{ManualTopology} that, like a topology backed by a shared service,
    can be asked to reload its map: C{refresh()} applies the map set aside
    with L{nextOnRefresh}.
    """

    def __init__(self, localNode: str, initial: ShardMap) -> None:
        super().__init__(localNode, initial)
        self.refreshes = 0
        self.onRefresh: ShardMap | None = None

    def refresh(self) -> None:
        """
        Reload the map.
        """
        self.refreshes += 1
        if self.onRefresh is not None:
            self.setMap(self.onRefresh)
            self.onRefresh = None


class FencingTests(_DurableNodeMixin, SynchronousTestCase):
    """
    A node whose writes the backend refuses for a stale epoch stops serving
    the slot, in every topology.
    """

    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def start(self, topology: Any = None) -> tuple[FractalNode, amp.AMP, iosim.IOPump]:
        node = self.makeNode(FilePath(self.mktemp()), topology=topology)
        self.addCleanup(node.stopService)
        client, pump = self.connect()
        return node, client, pump

    def fenceAlice(self, node: FractalNode, client: amp.AMP, pump: iosim.IOPump) -> None:
        """
        Have alice's store shipped at epoch 1, then fenced at epoch 2 by
        another writer, and have the node try to ship it once more.
        """
        self.assertEqual(self.call(client, pump, "alice"), {"value": 1})
        self.reactor.advance(1.0)
        self.successResultOf(self.backend.fence(storeNameForKey("alice"), 2))
        self.assertEqual(self.call(client, pump, "alice"), {"value": 2})
        self.reactor.advance(1.0)

    def test_staticTopologyStopsServingFencedSlot(self) -> None:
        """
        On a lone node (whose map never changes), once the backend refuses a
        ship of alice's store for a stale epoch, every call of a user of
        alice's slot is refused with L{OwnerUnavailable}, saying which slot
        and epochs, and not run; users of other slots are served on.  An
        event gives the slot, the store and both epochs, and the node's
        stats count the slot.
        """
        node, client, pump = self.start()
        self.fenceAlice(node, client, pump)
        refused = self.call(client, pump, "alice")
        self.assertIsInstance(refused, Failure)
        refused.trap(OwnerUnavailable)
        slot = slotForKey("alice")
        self.assertIn(f"no longer serves slot {slot}", str(refused.value))
        self.assertIn("at epoch 1", str(refused.value))
        self.assertIn("epoch 2", str(refused.value))
        self.call(client, pump, _sameSlot("alice")).trap(OwnerUnavailable)
        self.assertEqual(self.call(client, pump, _otherSlot("alice")), {"value": 1})
        store = storeNameForKey("alice")
        self.assertEqual(node.server.fencedSlots(), [FencedSlot(slot, store, 1, 2)])
        self.assertEqual(node.stats()["fencedSlots"], 1)
        [event] = [e for e in self.events if e.get("fenced") is not None]
        self.assertEqual(
            (event["slot"], event["store"], event["epoch"], event["current"]),
            (slot, store, 1, 2),
        )
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertIn(f"Stopped serving slot {slot}", formatEvent(event))
        # Nothing the refused calls asked was run: alice's count is 2.
        store = self.successResultOf(node.pool.openStore("alice"))
        self.assertEqual(store.findUnique(DurableNodeCounter).value, 2)

    def test_newerEpochServesAgain(self) -> None:
        """
        A fenced slot is served again once the map gives this node the slot
        at an epoch above the fenced one; when the map gives it to another
        node, its calls are that node's (L{NotOwner} without a forwarder).
        Served again, alice's store is the durable one (value 1), not the
        local copy whose last commit (value 2) the backend refused: that
        copy is set aside in C{DATA/stale/}.
        """
        single = StaticTopology("n1", [NodeAddress("n1", "tcp:host=127.0.0.1:port=7100")])
        topology = ManualTopology("n1", single.currentMap())
        node, client, pump = self.start(topology)
        self.fenceAlice(node, client, pump)
        slot = slotForKey("alice")
        self.call(client, pump, "alice").trap(OwnerUnavailable)
        other = NodeAddress("n2", "tcp:host=127.0.0.1:port=7200")
        topology.setMap(reassign(topology.currentMap(), [slot], "n2", other))
        self.call(client, pump, "alice").trap(NotOwner)
        self.assertEqual(node.server.fencedSlots(), [])
        topology.setMap(reassign(topology.currentMap(), [slot], "n1"))
        self.assertEqual(topology.currentMap().ownerOf(slot), SlotOwner("n1", 3))
        self.assertEqual(self.call(client, pump, "alice"), {"value": 2})
        self.assertEqual(node.stats()["fencedSlots"], 0)
        [stale] = node.dataDir.child("stale").children()
        self.assertTrue(stale.basename().startswith(storeNameForKey("alice") + "-"))

    def test_fencedSlotAtNewerEpochNotRefused(self) -> None:
        """
        A refusal for an epoch the map has already overtaken (this node owns
        the slot at a newer epoch now) does not stop the slot being served.
        """
        node, client, pump = self.start()
        error = StaleEpoch(storeNameForKey("alice"), 0, 0)
        self.assertIsNone(node.server.fenceSlot("alice", error))
        self.assertEqual(self.call(client, pump, "alice"), {"value": 1})

    def test_topologyRefreshedWhenFenced(self) -> None:
        """
        A topology that can reload its map (as the PostgreSQL one can) is
        asked to when a slot is fenced, so the slot's calls go to the owner it
        learns of: the same mechanism serves every topology.
        """
        single = StaticTopology("n1", [NodeAddress("n1", "tcp:host=127.0.0.1:port=7100")])
        topology = RefreshingTopology("n1", single.currentMap())
        node, client, pump = self.start(topology)
        topology.onRefresh = reassign(
            topology.currentMap(),
            [slotForKey("alice")],
            "n2",
            NodeAddress("n2", "tcp:host=127.0.0.1:port=7200"),
        )
        self.fenceAlice(node, client, pump)
        self.assertEqual(topology.refreshes, 1)
        failure = self.call(client, pump, "alice")
        failure.trap(NotOwner)
        self.assertEqual(failure.value.owner, "n2")
        self.assertEqual(node.server.fencedSlots(), [])


class FencesAcrossRestartsTests(_DurableNodeMixin, SynchronousTestCase):
    """
    A node records the slots it was fenced out of in C{DATA/fenced-slots},
    so a restart does not serve a fenced slot from its stale local copy.
    """

    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def start(self, dataDir: FilePath[str], topology: Any) -> tuple[FractalNode, Any]:
        """
        Start a node on C{dataDir}; return it and a function calling L{Add}
        for a user on it.
        """
        node = self.makeNode(dataDir, topology=topology)
        client, pump = self.connect()
        return node, lambda user: self.call(client, pump, user)

    def startFenced(self, dataDir: FilePath[str], topology: Any) -> None:
        """
        Start a node, have alice's store shipped at epoch 1 and then fenced
        at epoch 2 by another writer, have the node's next ship refused, and
        stop the node: its local copy of alice's store (value 2) is stale.
        A user of another slot has a store of value 1.
        """
        node, add = self.start(dataDir, topology)
        self.assertEqual(add(_otherSlot("alice")), {"value": 1})
        self.assertEqual(add("alice"), {"value": 1})
        self.reactor.advance(1.0)
        self.successResultOf(self.backend.fence(storeNameForKey("alice"), 2))
        self.assertEqual(add("alice"), {"value": 2})
        self.reactor.advance(1.0)
        add("alice").trap(OwnerUnavailable)
        self.successResultOf(node.stopService())
        self.flushLoggedErrors(StaleEpoch)

    def recorded(self, dataDir: FilePath[str]) -> list[Any]:
        """
        The fences C{DATA/fenced-slots} lists.
        """
        state = json.loads(dataDir.child(FENCED_SLOTS_FILE).getContent())
        fenced: list[Any] = state["fenced"]
        return fenced

    def test_fenceHoldsAcrossRestart(self) -> None:
        """
        A node fenced out of alice's slot on a static topology and restarted
        on the same data directory refuses the slot's calls with
        L{OwnerUnavailable} at once, with no write of its refused first (the
        backend is out of reach, so the shipper cannot even try to resume
        alice's unshipped commit), rather than serve its stale copy (which
        would answer 3); it lists the fence in C{fencedSlots()} and its
        stats, and logs it as a fence.
        """
        single = [NodeAddress("n1", "tcp:host=127.0.0.1:port=7100")]
        dataDir = FilePath(self.mktemp())
        slot, store = slotForKey("alice"), storeNameForKey("alice")
        self.startFenced(dataDir, StaticTopology("n1", single))
        self.assertEqual(
            self.recorded(dataDir), [{"slot": slot, "store": store, "epoch": 1, "current": 2}]
        )
        del self.events[:]
        self.backend.available = False
        node, add = self.start(dataDir, StaticTopology("n1", single))
        self.addCleanup(node.stopService)
        refused = add("alice")
        self.assertIsInstance(refused, Failure)
        refused.trap(OwnerUnavailable)
        self.assertIn(f"no longer serves slot {slot}", str(refused.value))
        add(_sameSlot("alice")).trap(OwnerUnavailable)
        self.assertEqual(add(_otherSlot("alice")), {"value": 2})
        self.assertEqual(
            [e for e in self.events if "is fenced" in e.get("log_format", "")], []
        )
        self.assertEqual(node.server.fencedSlots(), [FencedSlot(slot, store, 1, 2)])
        self.assertEqual(node.stats()["fencedSlots"], 1)
        [event] = [e for e in self.events if e.get("fenced") is not None]
        self.assertEqual(event["fenced"], FencedSlot(slot, store, 1, 2))
        self.assertEqual(event["log_level"], LogLevel.error)
        self.flushLoggedErrors(BackendUnavailable)

    def test_newerEpochAtRestartServes(self) -> None:
        """
        Restarted with a map that gives it alice's slot at an epoch above the
        fenced one, the node serves the slot, from durable storage (value 1,
        plus 1), and the record of the fence is removed.
        """
        single = StaticTopology("n1", [NodeAddress("n1", "tcp:host=127.0.0.1:port=7100")])
        other = NodeAddress("n2", "tcp:host=127.0.0.1:port=7200")
        slot = slotForKey("alice")
        dataDir = FilePath(self.mktemp())
        self.startFenced(dataDir, ManualTopology("n1", single.currentMap()))
        self.assertEqual(len(self.recorded(dataDir)), 1)
        later = reassign(reassign(single.currentMap(), [slot], "n2", other), [slot], "n1")
        self.assertEqual(later.ownerOf(slot), SlotOwner("n1", 3))
        node, add = self.start(dataDir, ManualTopology("n1", later))
        self.addCleanup(node.stopService)
        self.assertEqual(node.server.fencedSlots(), [])
        self.assertEqual(self.recorded(dataDir), [])
        self.assertEqual(add("alice"), {"value": 2})

    def test_liftedFenceForgotten(self) -> None:
        """
        A fence lifted while the node runs (its map gives it the slot at a
        newer epoch) is removed from the record, so a restart on that map
        serves the slot.
        """
        single = StaticTopology("n1", [NodeAddress("n1", "tcp:host=127.0.0.1:port=7100")])
        other = NodeAddress("n2", "tcp:host=127.0.0.1:port=7200")
        slot = slotForKey("alice")
        dataDir = FilePath(self.mktemp())
        topology = ManualTopology("n1", single.currentMap())
        node, add = self.start(dataDir, topology)
        self.addCleanup(node.stopService)
        self.assertEqual(add("alice"), {"value": 1})
        self.reactor.advance(1.0)
        self.successResultOf(self.backend.fence(storeNameForKey("alice"), 2))
        self.assertEqual(add("alice"), {"value": 2})
        self.reactor.advance(1.0)
        self.flushLoggedErrors(StaleEpoch)
        self.assertEqual(len(self.recorded(dataDir)), 1)
        topology.setMap(reassign(topology.currentMap(), [slot], "n2", other))
        self.assertEqual(self.recorded(dataDir), [])
        topology.setMap(reassign(topology.currentMap(), [slot], "n1"))
        self.assertEqual(add("alice"), {"value": 2})

    def test_damagedRecordIgnored(self) -> None:
        """
        A C{DATA/fenced-slots} that is not JSON, not this version's, for
        another slot count, or lists a fence that cannot be (a slot out of
        range, a store name that is a user key or a path, a store of another
        slot) is reported in an error event naming the file and ignored: the
        node starts and serves; the file is left as it was, and nothing is
        written outside the data directory.
        """
        slot = slotForKey("alice")
        store = storeNameForKey("alice")

        def fence(**changes: Any) -> bytes:
            entry = {"slot": slot, "store": store, "epoch": 1, "current": 2, **changes}
            state = {"version": 1, "slots": DEFAULT_SLOTS, "fenced": [entry]}
            return json.dumps(state).encode("ascii")

        damaged = [
            b"\x00{not json",
            b'{"version": 2, "slots": 4096, "fenced": []}',
            fence().replace(b"4096", b"16"),
            fence(slot=DEFAULT_SLOTS),
            fence(store="alice"),
            fence(store="../../alice"),
            fence(store=storeNameForKey(_otherSlot("alice"))),
            fence(epoch=3),
            fence(current=True),
        ]
        for content in damaged:
            del self.events[:]
            self.backend = MemoryDurableBackend()
            dataDir = FilePath(self.mktemp())
            dataDir.makedirs()
            dataDir.child(FENCED_SLOTS_FILE).setContent(content)
            node, add = self.start(dataDir, None)
            self.assertEqual(add("alice"), {"value": 1}, content)
            self.assertEqual(node.server.fencedSlots(), [])
            [event] = [e for e in self.events if e.get("problem") is not None]
            self.assertEqual(event["log_level"], LogLevel.error)
            self.assertEqual(event["where"], dataDir.child(FENCED_SLOTS_FILE).path)
            self.assertIn("ignoring", formatEvent(event))
            self.successResultOf(node.stopService())
            self.assertEqual(dataDir.child(FENCED_SLOTS_FILE).getContent(), content)
            self.assertEqual(dataDir.parent().listdir(), [dataDir.basename()])


class TapDurableOptionsTests(SynchronousTestCase):
    """
    The C{twistd fractal} options of durable shipping.
    """

    def makeNode(self, *arguments: str) -> Any:
        """
        The node C{twistd fractal} builds from C{arguments}, on a memory
        reactor of its own, so that nothing it registers outlives the test.
        """
        from fractal.tap import Options, makeService

        options = Options()
        options.parseOptions(["--app", "tests.test_durable_node:application", *arguments])
        return makeService(options, MemoryReactorClock())

    def test_shipsByDefault(self) -> None:
        """
        By default a node ships to C{DATA/durable} every second, and the
        shipper is one of the node's services.
        """
        data = FilePath(self.mktemp())
        node = self.makeNode("--data", data.path)
        shipper = node.shipper
        self.assertIsInstance(shipper, Shipper)
        self.assertEqual(shipper.backend.root, data.child("durable"))
        self.assertEqual(shipper.interval, 1.0)
        self.assertIs(shipper.parent, node)

    def test_options(self) -> None:
        """
        C{--durable DIR} and C{--ship-interval} choose the directory and the
        interval; C{--durable none} ships nothing, which an application that
        acknowledges durably refuses.
        """
        elsewhere = FilePath(self.mktemp())
        node = self.makeNode("--durable", elsewhere.path, "--ship-interval", "0.25")
        self.assertEqual(node.shipper.backend.root, elsewhere)
        self.assertEqual(node.shipper.interval, 0.25)
        with self.assertRaises(ValueError) as e:
            self.makeNode("--durable", "none")
        self.assertIn("no durable shipper", str(e.exception))

    def test_recordFormat(self) -> None:
        """
        A node writes the newest record format unless C{--record-format}
        (or C{record-format} in the file) says 1; any other value is a usage
        error that names the option.
        """
        self.assertEqual(self.makeNode("--data", self.mktemp()).shipper.recordFormat, 2)
        node = self.makeNode("--data", self.mktemp(), "--record-format", "1")
        self.assertEqual(node.shipper.recordFormat, 1)
        config = FilePath(self.mktemp())
        config.setContent(b"record-format = 1\n")
        node = self.makeNode("--data", self.mktemp(), "--config", config.path)
        self.assertEqual(node.shipper.recordFormat, 1)
        for bad in ["0", "3", "two", "1.0"]:
            error = self.assertRaises(
                usage.UsageError, self.makeNode, "--record-format", bad
            )
            self.assertIn("--record-format must be 1 or 2", str(error))

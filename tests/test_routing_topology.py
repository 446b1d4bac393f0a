"""
Tests for L{fractal.routing.interfaces} and L{fractal.routing.topology}.
"""

from __future__ import annotations

from attrs import frozen
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from fractal.keys import InvalidUserKey, slotForKey
from fractal.routing._conformance import TopologyTestsMixin
from fractal.routing.interfaces import ITopology, NodeAddress, ShardMap, SlotOwner
from fractal.routing.rendezvous import rendezvousOwners
from fractal.routing.topology import (
    ManualTopology,
    SingleNodeTopology,
    StaticTopology,
    TopologyError,
    reassign,
)


class ShardMapTests(SynchronousTestCase):
    """
    Tests for L{ShardMap}.
    """

    def setUp(self) -> None:
        self.nodes = {
            "n1": NodeAddress("n1", "tcp:host=127.0.0.1:port=1"),
            "n2": NodeAddress("n2", "tcp:host=127.0.0.1:port=2"),
        }
        self.map = ShardMap(
            owners=(SlotOwner("n1", 1), SlotOwner("n2", 3), SlotOwner("n1", 2)),
            nodes=self.nodes,
        )

    def test_ownerOf(self) -> None:
        """
        L{ShardMap.ownerOf} gives the owner of a slot and refuses slots out of
        range.
        """
        self.assertEqual(self.map.ownerOf(1), SlotOwner("n2", 3))
        self.assertRaises(IndexError, self.map.ownerOf, 3)
        self.assertRaises(IndexError, self.map.ownerOf, -1)

    def test_ownerOfKey(self) -> None:
        """
        L{ShardMap.ownerOfKey} hashes the key with the map's slot count.
        """
        for key in ["alice", "bob", "carol"]:
            self.assertEqual(
                self.map.ownerOfKey(key), self.map.ownerOf(slotForKey(key, 3))
            )
        self.assertRaises(InvalidUserKey, self.map.ownerOfKey, "")

    def test_slotsOf(self) -> None:
        """
        L{ShardMap.slotsOf} lists a node's slots.
        """
        self.assertEqual(self.map.slotsOf("n1"), [0, 2])
        self.assertEqual(self.map.slotsOf("n3"), [])

    def test_ownerWithoutAddress(self) -> None:
        """
        A map whose owner has no address, or with no slots, is refused.
        """
        self.assertRaises(ValueError, ShardMap, owners=(SlotOwner("n9", 1),), nodes=self.nodes)
        self.assertRaises(ValueError, ShardMap, owners=(), nodes=self.nodes)


class SingleNodeTopologyTests(SynchronousTestCase):
    """
    Tests for L{SingleNodeTopology}.
    """

    def test_interface(self) -> None:
        """
        L{SingleNodeTopology} provides L{ITopology}.
        """
        self.assertTrue(verifyObject(ITopology, SingleNodeTopology("n1", "tcp:host=h:port=1")))

    def test_ownsEverything(self) -> None:
        """
        The single node owns every slot at epoch 1.
        """
        topology = SingleNodeTopology("solo", "tcp:host=h:port=1", slots=16)
        shardMap = topology.currentMap()
        self.assertEqual(shardMap.slots, 16)
        self.assertEqual(shardMap.slotsOf("solo"), list(range(16)))
        self.assertEqual(shardMap.ownerOfKey("alice"), SlotOwner("solo", 1))

    def test_watch(self) -> None:
        """
        Watching a fixed map never calls the observer, and the returned
        callable stops the (empty) stream of calls.
        """
        topology = SingleNodeTopology("solo", "tcp:host=h:port=1")
        calls: list[ShardMap] = []
        stop = topology.watch(calls.append)
        stop()
        self.assertEqual(calls, [])

    def test_badSlotCount(self) -> None:
        """
        A non-positive slot count is refused.
        """
        self.assertRaises(ValueError, SingleNodeTopology, "solo", "x", slots=0)


@frozen
class _Entry:
    """
    The shape of a L{fractal.config.NodeEntry}.
    """

    id: str
    client: str | None
    peer: str | None


class StaticTopologyTests(SynchronousTestCase):
    """
    Tests for L{StaticTopology}.
    """

    def nodes(self, *ids: str) -> list[NodeAddress]:
        return [
            NodeAddress(i, f"tcp:host=127.0.0.1:port={n}", f"tcp:host=127.0.0.1:port={n + 100}")
            for n, i in enumerate(ids, 7000)
        ]

    def test_interface(self) -> None:
        """
        L{StaticTopology} provides L{ITopology}.
        """
        self.assertTrue(verifyObject(ITopology, StaticTopology("a", self.nodes("a", "b"))))

    def test_rendezvousAtEpochOne(self) -> None:
        """
        The slots are assigned by rendezvous hashing, all at epoch 1, and
        the map holds every member's addresses.
        """
        topology = StaticTopology("b", self.nodes("a", "b", "c"), slots=64)
        shardMap = topology.currentMap()
        self.assertEqual(topology.localNode, "b")
        self.assertEqual(
            [owner.node for owner in shardMap.owners], list(rendezvousOwners(["a", "b", "c"], 64))
        )
        self.assertEqual({owner.epoch for owner in shardMap.owners}, {1})
        self.assertEqual(set(shardMap.nodes), {"a", "b", "c"})
        self.assertEqual(shardMap.nodes["c"].peer, "tcp:host=127.0.0.1:port=7102")

    def test_sameMapOnEveryNode(self) -> None:
        """
        Every node computes the same map, whatever order the nodes are
        listed in.
        """
        nodes = self.nodes("a", "b", "c")
        first = StaticTopology("a", nodes).currentMap()
        second = StaticTopology("c", list(reversed(nodes))).currentMap()
        self.assertEqual(first.owners, second.owners)

    def test_fromConfigNodes(self) -> None:
        """
        L{StaticTopology.fromConfigNodes} takes the C{[[node]]} tables of a
        configuration file.
        """
        entries = [
            _Entry(i, f"tcp:host=127.0.0.1:port={n}", f"tcp:host=127.0.0.1:port={n + 100}")
            for n, i in enumerate(["n1", "n2"], 7000)
        ]
        topology = StaticTopology.fromConfigNodes("n2", entries, slots=16)
        self.assertEqual(
            topology.currentMap().nodes["n1"],
            NodeAddress("n1", "tcp:host=127.0.0.1:port=7000", "tcp:host=127.0.0.1:port=7100"),
        )

    def test_errors(self) -> None:
        """
        Repeated ids, malformed ids, missing endpoints and a local node that
        is not a member are refused with a message naming the node.
        """
        nodes = self.nodes("a", "b")
        cases = [
            (nodes + self.nodes("a"), "'a' is used by more than one"),
            ([NodeAddress("../x", "tcp:host=h:port=1", "p")], "'../x' is not"),
            ([NodeAddress("10.0.0.1", "tcp:host=h:port=1", "p")], "'10.0.0.1' is not"),
            (nodes + [NodeAddress("A", "c", "p")], "'A' is used by more than one"),
            ([nodes[0], NodeAddress("b", "", "p")], "'b' has no 'client'"),
            ([nodes[0], NodeAddress("b", "c", None)], "'b' has no 'peer'"),
            ([], "at least one node"),
        ]
        for given, message in cases:
            error = self.assertRaises(TopologyError, StaticTopology, "a", given)
            self.assertIn(message, str(error))
        error = self.assertRaises(TopologyError, StaticTopology, "z", nodes)
        self.assertIn("'z' is not in the cluster", str(error))
        self.assertRaises(TopologyError, StaticTopology, "a", nodes, slots=0)

    def test_loneNodeNeedsNoPeer(self) -> None:
        """
        A cluster of one node needs no peer endpoint.
        """
        topology = StaticTopology("a", [NodeAddress("a", "tcp:host=h:port=1")], slots=4)
        self.assertEqual(topology.currentMap().slotsOf("a"), [0, 1, 2, 3])

    def test_watch(self) -> None:
        """
        A static map never changes, so watchers are never called.
        """
        calls: list[ShardMap] = []
        StaticTopology("a", self.nodes("a", "b")).watch(calls.append)()
        self.assertEqual(calls, [])


class ManualTopologyTests(SynchronousTestCase):
    """
    Tests for L{ManualTopology} and L{reassign}.
    """

    def setUp(self) -> None:
        self.nodes = [
            NodeAddress(n, f"{n}/client", f"{n}/peer") for n in ["n1", "n2", "n3"]
        ]
        self.topology = ManualTopology.fromNodes("n1", self.nodes, slots=16)

    def test_interface(self) -> None:
        """
        L{ManualTopology} provides L{ITopology} and starts from the static
        assignment.
        """
        self.assertTrue(verifyObject(ITopology, self.topology))
        self.assertEqual(
            self.topology.currentMap(),
            StaticTopology("n1", self.nodes, slots=16).currentMap(),
        )

    def test_setMapTellsWatchers(self) -> None:
        """
        A new map becomes current and every watcher hears of it until it
        stops watching.
        """
        seen: list[ShardMap] = []
        stop = self.topology.watch(seen.append)
        newer = reassign(self.topology.currentMap(), [0, 1], "n3")
        self.topology.setMap(newer)
        self.assertEqual(self.topology.currentMap(), newer)
        self.assertEqual(seen, [newer])
        stop()
        self.topology.setMap(reassign(newer, [2], "n2"))
        self.assertEqual(seen, [newer])

    def test_setMapRefusesOlder(self) -> None:
        """
        A map that is not newer, or has another slot count, is refused.
        """
        current = self.topology.currentMap()
        self.assertRaises(TopologyError, self.topology.setMap, current)
        other = StaticTopology("n1", self.nodes, slots=8).currentMap()
        self.assertRaises(
            TopologyError,
            self.topology.setMap,
            ShardMap(other.owners, other.nodes, version=current.version + 1),
        )

    def test_reassign(self) -> None:
        """
        L{reassign} moves slots at the next epoch, keeps the others, bumps
        the version, and can bring in a new node's address.
        """
        current = self.topology.currentMap()
        slot = next(s for s in range(16) if current.ownerOf(s).node != "n4")
        moved = reassign(current, [slot], "n4", NodeAddress("n4", "n4/client", "n4/peer"))
        self.assertEqual(moved.version, current.version + 1)
        self.assertEqual(moved.ownerOf(slot), SlotOwner("n4", current.ownerOf(slot).epoch + 1))
        for other in range(16):
            if other != slot:
                self.assertEqual(moved.ownerOf(other), current.ownerOf(other))
        self.assertRaises(TopologyError, reassign, current, [0], "n9")
        self.assertRaises(TopologyError, reassign, current, [16], "n1")


class SingleNodeTopologyConformanceTests(TopologyTestsMixin, SynchronousTestCase):
    """
    L{SingleNodeTopology} meets the L{ITopology} contract.
    """

    def makeTopology(self) -> ITopology:
        return SingleNodeTopology("solo", "tcp:host=127.0.0.1:port=7100", slots=32)


class StaticTopologyConformanceTests(TopologyTestsMixin, SynchronousTestCase):
    """
    L{StaticTopology} meets the L{ITopology} contract.
    """

    def makeTopology(self) -> ITopology:
        nodes = [NodeAddress(n, f"{n}/client", f"{n}/peer") for n in ["n1", "n2", "n3"]]
        return StaticTopology("n2", nodes, slots=32)


class ManualTopologyConformanceTests(TopologyTestsMixin, SynchronousTestCase):
    """
    L{ManualTopology} meets the L{ITopology} contract, before and after a
    change.
    """

    def makeTopology(self) -> ITopology:
        nodes = [NodeAddress(n, f"{n}/client", f"{n}/peer") for n in ["n1", "n2"]]
        topology = ManualTopology.fromNodes("n1", nodes, slots=32)
        topology.setMap(reassign(topology.currentMap(), [0, 1, 2], "n1"))
        return topology

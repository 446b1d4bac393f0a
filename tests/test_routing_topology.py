"""
Tests for L{fractal.routing.interfaces} and L{fractal.routing.topology}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from fractal.keys import InvalidUserKey, slotForKey
from fractal.routing.interfaces import ITopology, NodeAddress, ShardMap, SlotOwner
from fractal.routing.topology import SingleNodeTopology


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

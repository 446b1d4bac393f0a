# -*- test-case-name: tests.test_routing_topology -*-
"""
The conformance tests every L{ITopology} runs; public as
L{fractal.testing.TopologyTestsMixin}.
"""

from __future__ import annotations

from typing import Any

from zope.interface.verify import verifyObject

from fractal.routing.interfaces import ITopology, ShardMap

__all__ = ["TopologyTestsMixin"]


class TopologyTestsMixin:
    """
    Tests of the L{ITopology} contract that any topology must meet, however
    it learns its map.

    Mix into a L{twisted.trial.unittest.SynchronousTestCase} (or
    C{TestCase}) subclass that defines C{makeTopology()}, returning a
    topology that already has a map, serving a node that owns at least one
    slot.
    """

    def makeTopology(self) -> ITopology:
        raise NotImplementedError("define makeTopology")

    def _check(self) -> Any:
        return self

    def test_provides(self) -> None:
        """
        The topology provides L{ITopology}.
        """
        self._check().assertTrue(verifyObject(ITopology, self.makeTopology()))

    def test_mapIsComplete(self) -> None:
        """
        The current map is a L{ShardMap} that gives every slot an owner at an
        epoch of at least 1, every owner an address, and has the local node
        among its members.
        """
        topology = self.makeTopology()
        shardMap = topology.currentMap()
        check = self._check()
        check.assertIsInstance(shardMap, ShardMap)
        check.assertGreater(shardMap.slots, 0)
        for owner in shardMap.owners:
            check.assertGreaterEqual(owner.epoch, 1)
            check.assertIn(owner.node, shardMap.nodes)
        check.assertIn(topology.localNode, shardMap.nodes)
        for nodeId, address in shardMap.nodes.items():
            check.assertEqual(address.node, nodeId)

    def test_mapIsStable(self) -> None:
        """
        Asking twice without a change in between gives the same map.
        """
        topology = self.makeTopology()
        self._check().assertEqual(topology.currentMap(), topology.currentMap())

    def test_watchCanStop(self) -> None:
        """
        C{watch} returns a callable that stops the calls, and calling it
        twice is harmless.
        """
        seen: list[ShardMap] = []
        stop = self.makeTopology().watch(seen.append)
        self._check().assertTrue(callable(stop))
        stop()
        stop()
        for shardMap in seen:
            self._check().assertIsInstance(shardMap, ShardMap)

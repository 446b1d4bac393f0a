# -*- test-case-name: tests.test_routing_topology -*-
"""
Topologies whose shard map is fixed when the node starts.
"""

from __future__ import annotations

from typing import Callable

from zope.interface import implementer

from fractal.keys import DEFAULT_SLOTS
from fractal.routing.interfaces import ITopology, NodeAddress, ShardMap, SlotOwner

__all__ = ["SingleNodeTopology"]


@implementer(ITopology)
class SingleNodeTopology:
    """
    A cluster of one node, which owns every slot at epoch 1.

    This is the topology of C{twistd fractal} run without a cluster
    configuration.

    @ivar localNode: the node's id.
    """

    def __init__(
        self, localNode: str, client: str, slots: int = DEFAULT_SLOTS
    ) -> None:
        """
        @param localNode: the node's id.
        @param client: the client endpoint description that reaches the node.
        @param slots: the number of slots.
        """
        if slots < 1:
            raise ValueError(f"slot count must be positive, not {slots!r}")
        self.localNode = localNode
        owner = SlotOwner(localNode, 1)
        self._map = ShardMap(
            owners=(owner,) * slots, nodes={localNode: NodeAddress(localNode, client)}
        )

    def currentMap(self) -> ShardMap:
        return self._map

    def watch(self, observer: Callable[[ShardMap], None]) -> Callable[[], None]:
        # The map of a single node never changes, so there is nothing to tell.
        return lambda: None

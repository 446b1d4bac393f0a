# -*- test-case-name: tests.test_routing_topology -*-
"""
The shard map and the topology interface.

A cluster has a fixed number of slots (L{fractal.keys.DEFAULT_SLOTS} by
default).  Every user key hashes to one slot (L{fractal.keys.slotForKey}), and
every slot is owned by one node at an epoch.  The epoch of a slot grows each
time its ownership moves; durable writes carry it, so a node that lost a slot
cannot overwrite its new owner's work (fencing).
"""

from __future__ import annotations

from typing import Callable, Mapping

from attrs import field, frozen
from zope.interface import Attribute, Interface

from fractal.keys import slotForKey

__all__ = ["NodeAddress", "SlotOwner", "ShardMap", "ITopology"]


@frozen
class NodeAddress:
    """
    How to reach one node.

    @ivar node: the node's id, unique in its cluster.
    @ivar client: the Twisted client endpoint description clients use to call
        the node, for example C{"tcp:host=127.0.0.1:port=7100"}.
    @ivar peer: the client endpoint description other nodes use to forward
        calls to this node, or L{None} for a single node with no peers.
    """

    node: str
    client: str
    peer: str | None = None


@frozen
class SlotOwner:
    """
    The owner of one slot.

    @ivar node: the owning node's id.
    @ivar epoch: the epoch of the ownership, at least 1.
    """

    node: str
    epoch: int


def _nodeDict(nodes: Mapping[str, NodeAddress]) -> dict[str, NodeAddress]:
    return dict(nodes)


@frozen
class ShardMap:
    """
    An immutable map from every slot of a cluster to its owner.

    @ivar owners: the owner of each slot; slot C{i} is C{owners[i]}.
    @ivar nodes: the address of every node that owns a slot or is a member.
    @ivar version: grows whenever the map changes, so a newer map can be told
        from an older one.
    """

    owners: tuple[SlotOwner, ...]
    nodes: Mapping[str, NodeAddress] = field(converter=_nodeDict)
    version: int = 1

    def __attrs_post_init__(self) -> None:
        if not self.owners:
            raise ValueError("a shard map needs at least one slot")
        for owner in self.owners:
            if owner.node not in self.nodes:
                raise ValueError(f"slot owner {owner.node!r} has no address in the map")

    @property
    def slots(self) -> int:
        """
        The number of slots in the cluster.
        """
        return len(self.owners)

    def ownerOf(self, slot: int) -> SlotOwner:
        """
        The owner of C{slot}.

        @raise IndexError: if C{slot} is not in C{range(self.slots)}.
        """
        if not 0 <= slot < len(self.owners):
            raise IndexError(f"slot {slot} is not in range({len(self.owners)})")
        return self.owners[slot]

    def ownerOfKey(self, key: str) -> SlotOwner:
        """
        The owner of the slot C{key} hashes to.

        @raise fractal.keys.InvalidUserKey: if C{key} is not a valid key.
        """
        return self.owners[slotForKey(key, len(self.owners))]

    def slotsOf(self, node: str) -> list[int]:
        """
        The slots owned by C{node}, in ascending order.
        """
        return [slot for slot, owner in enumerate(self.owners) if owner.node == node]


class ITopology(Interface):
    """
    The source of a node's shard map: a fixed configuration, or a shared
    membership service that moves slots when nodes join, leave or die.

    Implementations that need to run (heartbeats, watching a database) also
    provide L{twisted.application.service.IService}.
    """

    localNode = Attribute("The id (C{str}) of the node this topology object serves.")

    def currentMap() -> ShardMap:
        """
        The newest shard map this node knows.
        """

    def watch(observer: Callable[[ShardMap], None]) -> Callable[[], None]:
        """
        Call C{observer} with each new shard map from now on.

        @return: a callable that stops the calls.
        """

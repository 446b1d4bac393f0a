# -*- test-case-name: tests.test_routing_topology -*-
"""
Topologies whose shard map is fixed when the node starts.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Protocol

from zope.interface import implementer

from fractal.keys import DEFAULT_SLOTS
from fractal.routing.interfaces import ITopology, NodeAddress, ShardMap, SlotOwner
from fractal.routing.rendezvous import rendezvousOwners

__all__ = [
    "SingleNodeTopology",
    "StaticTopology",
    "ManualTopology",
    "reassign",
    "TopologyError",
    "NODE_ID_PATTERN",
    "checkNodeId",
]

NODE_ID_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,62}")
"""
What a node id may look like: 1 to 63 ASCII letters, digits, C{.}, C{_} or
C{-}, starting with a letter.  Node ids name certificate files and are
checked as DNS names in certificates, so they are kept this plain (an id of
digits and dots would read as an IP address).
"""


class TopologyError(ValueError):
    """
    A cluster description cannot be used: the message says which node and
    which key is wrong.
    """


class _NodeEntry(Protocol):
    """
    The shape of one C{[[node]]} table of a cluster configuration (as
    L{fractal.config.NodeEntry} has it).
    """

    @property
    def id(self) -> str: ...

    @property
    def client(self) -> str | None: ...

    @property
    def peer(self) -> str | None: ...


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


def checkNodeId(nodeId: object) -> str:
    """
    Check that C{nodeId} is an acceptable node id (see L{NODE_ID_PATTERN}).

    @return: C{nodeId}.
    @raise TopologyError: if it is not.
    """
    if not isinstance(nodeId, str) or NODE_ID_PATTERN.fullmatch(nodeId) is None:
        raise TopologyError(
            f"node id {nodeId!r} is not 1-63 letters, digits, '.', '_' or '-' "
            "starting with a letter"
        )
    return nodeId


@implementer(ITopology)
class StaticTopology:
    """
    A fixed cluster, as written in a shared configuration file: every listed
    node is a member, the slots are spread over them by rendezvous hashing
    (L{fractal.routing.rendezvous}), and every slot is at epoch 1.

    Every node computes the same map from the same member list, so no node
    has to ask another who owns what.

    @ivar localNode: the id of the node this object serves.
    """

    def __init__(
        self, localNode: str, nodes: Iterable[NodeAddress], slots: int = DEFAULT_SLOTS
    ) -> None:
        """
        @param localNode: the id of the node this object serves; one of
            C{nodes}.
        @param nodes: the address of every member.
        @param slots: the cluster's slot count.
        @raise TopologyError: if a node id is malformed or repeats, a node
            has no client or peer endpoint (a lone node needs no peer
            endpoint), or C{localNode} is not a member.
        """
        if slots < 1:
            raise TopologyError(f"slot count must be positive, not {slots!r}")
        members: dict[str, NodeAddress] = {}
        addresses = list(nodes)
        for address in addresses:
            checkNodeId(address.node)
            if address.node.lower() in {m.lower() for m in members}:
                # Certificates compare names without case, so ids must too.
                raise TopologyError(f"node id {address.node!r} is used by more than one node")
            if not address.client:
                raise TopologyError(f"node {address.node!r} has no 'client' endpoint")
            if len(addresses) > 1 and not address.peer:
                raise TopologyError(
                    f"node {address.node!r} has no 'peer' endpoint; "
                    "every node of a cluster needs one"
                )
            members[address.node] = address
        if not members:
            raise TopologyError("a cluster needs at least one node")
        if localNode not in members:
            raise TopologyError(
                f"node {localNode!r} is not in the cluster "
                f"(members: {', '.join(sorted(members))})"
            )
        self.localNode = localNode
        owners = rendezvousOwners(members, slots)
        self._map = ShardMap(
            owners=tuple(SlotOwner(node, 1) for node in owners), nodes=members
        )

    @classmethod
    def fromConfigNodes(
        cls, localNode: str, entries: Iterable[_NodeEntry], slots: int = DEFAULT_SLOTS
    ) -> StaticTopology:
        """
        Build the topology from the C{[[node]]} tables of a configuration
        file (L{fractal.config.FractalConfig.nodes}).

        @param localNode: the id of the node this object serves.
        @param entries: the tables, each with C{id}, C{client} and C{peer}.
        @param slots: the cluster's slot count.
        @raise TopologyError: as L{StaticTopology.__init__} does.
        """
        return cls(
            localNode,
            [NodeAddress(entry.id, entry.client or "", entry.peer) for entry in entries],
            slots,
        )

    def currentMap(self) -> ShardMap:
        return self._map

    def watch(self, observer: Callable[[ShardMap], None]) -> Callable[[], None]:
        # A static map never changes.
        return lambda: None


def _watchWith(
    observers: list[Callable[[ShardMap], None]], observer: Callable[[ShardMap], None]
) -> Callable[[], None]:
    """
    Add C{observer} to the C{observers} of a topology that changes, for its
    L{ITopology.watch}.

    @return: the call that removes C{observer} again (harmless after the
        first time).
    """
    observers.append(observer)

    def stop() -> None:
        if observer in observers:
            observers.remove(observer)

    return stop


@implementer(ITopology)
class ManualTopology:
    """
    A topology whose map is set by hand: it starts from a given map (or from
    the static assignment of a member list) and changes whenever
    L{ManualTopology.setMap} is called, telling its watchers.

    It serves tests of map changes (in L{fractal.testing.SimulatedCluster})
    and operators who drive ownership from outside.

    @ivar localNode: the id of the node this object serves.
    """

    def __init__(self, localNode: str, initial: ShardMap) -> None:
        """
        @param localNode: the id of the node this object serves.
        @param initial: the first map.
        """
        self.localNode = localNode
        self._map = initial
        self._observers: list[Callable[[ShardMap], None]] = []

    @classmethod
    def fromNodes(
        cls, localNode: str, nodes: Iterable[NodeAddress], slots: int = DEFAULT_SLOTS
    ) -> ManualTopology:
        """
        Start from the map L{StaticTopology} would give C{nodes}.
        """
        return cls(localNode, StaticTopology(localNode, nodes, slots).currentMap())

    def currentMap(self) -> ShardMap:
        return self._map

    def setMap(self, shardMap: ShardMap) -> None:
        """
        Make C{shardMap} the current map and tell every watcher.

        @raise TopologyError: if its version is not newer than the current
            map's, or its slot count differs.
        """
        if shardMap.version <= self._map.version:
            raise TopologyError(
                f"map version {shardMap.version} is not newer than {self._map.version}"
            )
        if shardMap.slots != self._map.slots:
            raise TopologyError(
                f"a map of {shardMap.slots} slots cannot follow one of {self._map.slots}"
            )
        self._map = shardMap
        for observer in list(self._observers):
            observer(shardMap)

    def watch(self, observer: Callable[[ShardMap], None]) -> Callable[[], None]:
        return _watchWith(self._observers, observer)


def reassign(
    shardMap: ShardMap,
    slots: Iterable[int],
    node: str,
    address: NodeAddress | None = None,
) -> ShardMap:
    """
    The map that follows C{shardMap} when C{slots} move to C{node}: each
    moved slot's epoch grows by one, and the map's version by one.

    @param shardMap: the current map.
    @param slots: the slots that move.
    @param node: their new owner.
    @param address: C{node}'s address, if it is not in C{shardMap} yet.
    @raise TopologyError: if C{node} has no address, or a slot is out of
        range.
    """
    nodes = dict(shardMap.nodes)
    if address is not None:
        nodes[address.node] = address
    if node not in nodes:
        raise TopologyError(f"node {node!r} has no address in the map")
    owners = list(shardMap.owners)
    for slot in slots:
        if not 0 <= slot < len(owners):
            raise TopologyError(f"slot {slot} is not in range({len(owners)})")
        if owners[slot].node != node:
            owners[slot] = SlotOwner(node, owners[slot].epoch + 1)
    return ShardMap(owners=tuple(owners), nodes=nodes, version=shardMap.version + 1)

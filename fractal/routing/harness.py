# -*- test-case-name: tests.test_routing_cluster -*-
# mypy: disable-error-code="no-untyped-call"
"""
N real fractal nodes in one process, for deterministic cluster tests.

L{SimulatedCluster} builds real L{fractal.node.FractalNode}s (real stores on
disk, real front doors, real peer links) that share one
L{twisted.internet.testing.MemoryReactorClock}: their listeners are recorded
by the memory reactor and put on a L{SimulatedNetwork}, where every byte
moves only when the test flushes the network or advances the clock.  The
test can cut, hold, delay and restore each node's links, and call the
cluster through plain or smart clients that live on the same network::

    cluster = SimulatedCluster(application, FilePath(self.mktemp()), nodes=3)
    cluster.start()
    client = cluster.client(smart=True)
    d = client.callRemote(Deliver, user="alice", ...)
    cluster.flush()
    self.successResultOf(d)
    cluster.cut("n2")
    ...
    cluster.stop()

With C{durable=} a backend (say a L{fractal.testing.MemoryDurableBackend}),
every node ships its stores there and restores them from there, so a test can
move users between nodes (C{manual=True} and L{SimulatedCluster.setMap}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.python.filepath import FilePath

from fractal.client import FractalClient
from fractal.durable._threads import runSynchronously
from fractal.durable.interfaces import IDurableBackend
from fractal.keys import DEFAULT_SLOTS, slotForKey
from fractal.routing.cluster import ClusterService, joinCluster
from fractal.routing.interfaces import ITopology, NodeAddress, ShardMap
from fractal.routing.peers import EndpointFactory
from fractal.routing.simulation import SimulatedNetwork
from fractal.routing.smart import AnyOfEndpoints, ClusterClient
from fractal.routing.topology import ManualTopology, StaticTopology

if TYPE_CHECKING:
    from fractal.app import Application
    from fractal.node import FractalNode

__all__ = ["SimulatedCluster", "CLIENT_HOST"]

CLIENT_HOST = "client"
"""
The host name of the clients made by L{SimulatedCluster.client}, for
L{SimulatedCluster.cut} and friends.
"""

_CLIENT_PORT = 7100
_PEER_PORT = 7200


class SimulatedCluster:
    """
    N real nodes of one application over a simulated network with one
    clock.

    @ivar reactor: the memory reactor and clock every node uses.
    @ivar network: the L{SimulatedNetwork} between nodes and clients.
    @ivar nodes: the nodes, by id.
    @ivar clusters: each node's L{ClusterService}, by id.
    @ivar addresses: each node's addresses, by id.
    """

    def __init__(
        self,
        application: Application,
        directory: FilePath[str],
        nodes: int | Sequence[str] = 3,
        slots: int = DEFAULT_SLOTS,
        callTimeout: float = 5.0,
        connectTimeout: float = 2.0,
        retryDelay: float = 1.0,
        manual: bool = False,
        durable: IDurableBackend | None = None,
        **nodeArguments: Any,
    ) -> None:
        """
        @param application: the application every node serves.
        @param directory: where the nodes' data directories go (one child
            per node id).
        @param nodes: how many nodes (named C{n1}, C{n2}, ...), or their ids.
        @param slots: the cluster's slot count.
        @param callTimeout: see L{fractal.routing.peers.DEFAULT_CALL_TIMEOUT}.
        @param connectTimeout: see
            L{fractal.routing.peers.DEFAULT_CONNECT_TIMEOUT}.
        @param retryDelay: seconds between reconnection attempts, for peer
            links and clients alike (fixed, so tests can count on it).
        @param manual: give each node a L{ManualTopology}, so the test can
            change the map with L{setMap}; by default each node has the
            L{StaticTopology} of the cluster.
        @param durable: a durable backend every node ships to (each through
            a L{fractal.durable.shipper.Shipper} of its own, on the shared
            clock, its blocking work run synchronously), or L{None} for
            nodes without durable shipping.
        @param nodeArguments: more keyword arguments for each
            L{fractal.node.FractalNode}.
        """
        from fractal.durable.shipper import Shipper
        from fractal.node import FractalNode as _FractalNode

        ids = [f"n{i}" for i in range(1, nodes + 1)] if isinstance(nodes, int) else list(nodes)
        self.reactor = MemoryReactorClock()
        self.network = SimulatedNetwork(self.reactor)
        self.retryDelay = retryDelay
        self.addresses: dict[str, NodeAddress] = {}
        self._listens: dict[int, tuple[str, str]] = {}
        for index, nodeId in enumerate(ids):
            client = f"tcp:host=127.0.0.1:port={_CLIENT_PORT + index}"
            peer = f"tcp:host=127.0.0.1:port={_PEER_PORT + index}"
            self.addresses[nodeId] = NodeAddress(nodeId, client, peer)
            self._listens[_CLIENT_PORT + index] = (nodeId, client)
            self._listens[_PEER_PORT + index] = (nodeId, peer)
        self.nodes: dict[str, FractalNode] = {}
        self.clusters: dict[str, ClusterService] = {}
        # Setting stale copies aside runs at once: the memory reactor has no
        # thread pool.
        nodeArguments.setdefault("runInThread", runSynchronously)
        for index, nodeId in enumerate(ids):
            topology: ITopology
            if manual:
                topology = ManualTopology.fromNodes(nodeId, self.addresses.values(), slots)
            else:
                topology = StaticTopology(nodeId, self.addresses.values(), slots)
            shipper = None
            if durable is not None:
                shipper = Shipper(
                    durable,
                    self.reactor,
                    runInThread=runSynchronously,
                    storesDirectory=directory.child(nodeId).child("stores"),
                )
                nodeArguments["shipper"] = shipper
            node = _FractalNode(
                self.reactor,
                application,
                dataDir=directory.child(nodeId),
                listen=f"tcp:{_CLIENT_PORT + index}:interface=127.0.0.1",
                nodeId=nodeId,
                topology=topology,
                **nodeArguments,
            )
            if shipper is not None:
                shipper.serveNode(node)
            self.clusters[nodeId] = joinCluster(
                node,
                endpointFor=self._peerEndpoints(nodeId),
                callTimeout=callTimeout,
                connectTimeout=connectTimeout,
                retryPolicy=lambda attempt: retryDelay,
            )
            self.nodes[nodeId] = node
        self._clients: list[FractalClient] = []
        self._listened = 0
        self._unlisten: dict[str, list[Any]] = {}

    def _peerEndpoints(self, source: str) -> EndpointFactory:
        """
        How node C{source} reaches its peers: over the simulated network.
        """

        def endpointFor(address: NodeAddress) -> IStreamClientEndpoint:
            return self.network.endpoint(source, str(address.peer))

        return endpointFor

    def _registerListeners(self) -> None:
        """
        Put the listeners the memory reactor recorded since last time on the
        network.
        """
        servers = self.reactor.tcpServers
        for port, factory, _, _ in servers[self._listened :]:
            nodeId, address = self._listens[port]
            self._unlisten.setdefault(nodeId, []).append(
                self.network.listen(nodeId, address, factory)
            )
        self._listened = len(servers)

    def start(self, nodes: Iterable[str] | None = None) -> None:
        """
        Start the nodes (all by default) and let them connect to each other.
        """
        chosen = [self.nodes[nodeId] for nodeId in (self.nodes if nodes is None else nodes)]
        # Bind every listener before any node starts connecting to its peers.
        for node in chosen:
            node.privilegedStartService()
        self._registerListeners()
        for node in chosen:
            node.startService()
        self.flush()

    def stop(self, nodes: Iterable[str] | None = None) -> None:
        """
        Stop the nodes (all by default, and every client made by
        L{client}), gracefully, moving the network until they have.

        @raise AssertionError: if a node does not finish stopping.
        """
        if nodes is None:
            for client in self._clients:
                client.disconnect()
            self._clients = []
        stopping = []
        for nodeId in self.nodes if nodes is None else nodes:
            node = self.nodes[nodeId]
            if node.running:
                stopping.append(node.stopService())
            for unlisten in self._unlisten.pop(nodeId, []):
                unlisten()
        self.flush()
        for _ in range(100):
            if all(d.called for d in stopping):
                break
            self.advance(1.0)
        if not all(d.called for d in stopping):
            raise AssertionError("the nodes did not stop")

    def setMap(self, shardMap: ShardMap, nodes: Iterable[str] | None = None) -> None:
        """
        Make C{shardMap} the current map of the nodes (all by default; name
        some to leave the others with a stale map), then move the network.

        @raise TypeError: if the cluster was not made with C{manual=True}.
        """
        for nodeId in self.nodes if nodes is None else nodes:
            topology = self.nodes[nodeId].topology
            if not isinstance(topology, ManualTopology):
                raise TypeError("setMap needs a SimulatedCluster(..., manual=True)")
            topology.setMap(shardMap)
        self.flush()

    def kill(self, nodeId: str) -> None:
        """
        Make C{nodeId} vanish as if its machine died: every link to it is
        cut (connections drop, new ones are refused) until L{restore}.
        """
        self.network.cut(nodeId)

    def cut(self, a: str, b: str | None = None) -> None:
        """
        See L{SimulatedNetwork.cut}; C{"client"} names the clients' host.
        """
        self.network.cut(a, b)

    def hold(self, a: str, b: str | None = None) -> None:
        """
        See L{SimulatedNetwork.hold}.
        """
        self.network.hold(a, b)

    def delay(self, a: str, b: str | None, seconds: float) -> None:
        """
        See L{SimulatedNetwork.delay}.
        """
        self.network.delay(a, b, seconds)

    def restore(self, a: str, b: str | None = None) -> None:
        """
        See L{SimulatedNetwork.restore}.
        """
        self.network.restore(a, b)

    def flush(self) -> None:
        """
        Move every byte that can move now.
        """
        self.network.flush()

    def advance(self, seconds: float) -> None:
        """
        Let C{seconds} pass on the shared clock, moving bytes as they come.
        """
        self.network.advance(seconds)

    def ownerOf(self, user: str) -> str:
        """
        The id of the node that owns C{user}.
        """
        return next(iter(self.nodes.values())).topology.currentMap().ownerOfKey(user).node

    def slotOf(self, user: str) -> int:
        """
        The slot C{user} hashes to.
        """
        return slotForKey(user, next(iter(self.nodes.values())).topology.currentMap().slots)

    def client(
        self,
        node: str | Sequence[str] | None = None,
        smart: bool = False,
        timeout: float = 10.0,
    ) -> FractalClient:
        """
        A client on the network's C{"client"} host.

        @param node: the node the client connects to (the seed of a smart
            client), or several to try in turn; the first node by default.
        @param smart: make a L{ClusterClient} that calls owners directly.
        @param timeout: the client's per-call timeout.
        """
        if node is None:
            nodes = [next(iter(self.nodes))]
        elif isinstance(node, str):
            nodes = [node]
        else:
            nodes = list(node)
        endpoint: IStreamClientEndpoint = AnyOfEndpoints(
            [self.network.endpoint(CLIENT_HOST, self.addresses[n].client) for n in nodes]
        )
        client: FractalClient
        if smart:
            client = ClusterClient(
                self.reactor,
                endpoint,
                timeout=timeout,
                retryPolicy=lambda attempt: self.retryDelay,
                endpointFor=lambda description: self.network.endpoint(CLIENT_HOST, description),
            )
        else:
            client = FractalClient(
                self.reactor, endpoint, timeout=timeout, retryPolicy=lambda attempt: self.retryDelay
            )
        self._clients.append(client)
        self.flush()
        return client

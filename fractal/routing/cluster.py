# -*- test-case-name: tests.test_routing_cluster -*-
# mypy: disable-error-code="no-untyped-call"
"""
Making a node part of a cluster: the forwarder behind the front door, the
links to the other nodes and the peer listener that accepts their forwarded
calls.

The routing decision is the front door's (L{fractal.server}): a call for a
slot this node owns at the current epoch runs here; any other call from a
client is handed to L{ClusterRouter}, which relays the raw box to the owner
over a L{fractal.routing.peers.PeerLinks} link.  Calls arriving on the peer
listener were forwarded already, so a node never forwards them again: it
answers L{fractal.protocol.NotOwner}, naming the owner it believes in (at
most one hop).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.protocols import amp

from fractal.certs import NodeCredentials, checkPeerTransport, peerServerFactory
from fractal.protocol import GetShardMap, Health
from fractal.routing.interfaces import ITopology, SlotOwner
from fractal.routing.peers import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_IN_FLIGHT,
    EndpointFactory,
    PeerLinks,
    peerEndpointFactory,
)

if TYPE_CHECKING:
    from fractal.node import FractalNode
    from fractal.server import FractalServer

__all__ = [
    "ClusterRouter",
    "ClusterService",
    "joinCluster",
    "peerListenFor",
    "serveClusterCommands",
    "serveShardMap",
]


class ClusterRouter:
    """
    The forwarder of a clustered node (L{fractal.server.IForwarder}): it
    sends a call's raw box to the slot's owner over the peer links.
    """

    def __init__(self, links: PeerLinks) -> None:
        """
        @param links: the links to the other nodes.
        """
        self._links = links

    def __call__(
        self, box: amp.AmpBox, owner: SlotOwner, key: str
    ) -> Deferred[amp.AmpBox | None]:
        """
        Forward C{box} to C{owner.node}.

        @return: fires with the owner's answer box (L{None} for a call that
            asks for no answer), or fails with
            L{fractal.protocol.OwnerUnavailable}.
        """
        return self._links.forward(owner.node, box)


def serveClusterCommands(server: FractalServer, links: PeerLinks | None = None) -> None:
    """
    Make C{server} answer the internal commands of L{fractal.protocol}:
    L{GetShardMap} with its topology's current map, so smart clients can
    learn it from any node, clustered or not, and L{Health}.

    @param links: the node's peer links, for L{Health}; L{None} for a node
        without peers.
    """
    topology = server.topology

    def getShardMap(box: amp.AmpBox) -> amp.AmpBox:
        response: amp.AmpBox = GetShardMap.makeResponse({"map": topology.currentMap()}, None)
        return response

    def health(box: amp.AmpBox) -> amp.AmpBox:
        shardMap = topology.currentMap()
        up: list[str] = []
        down: list[str] = []
        for node in sorted(shardMap.nodes):
            link = links.link(node) if links is not None else None
            if link is not None:
                (up if link.connected else down).append(node)
        response: amp.AmpBox = Health.makeResponse(
            {
                "node": topology.localNode,
                "mapVersion": shardMap.version,
                "slotsOwned": len(shardMap.slotsOf(topology.localNode)),
                "peersUp": up,
                "peersDown": down,
            },
            None,
        )
        return response

    server.internalCommands[GetShardMap.commandName] = getShardMap
    server.internalCommands[Health.commandName] = health


serveShardMap = serveClusterCommands
"""
The former name of L{serveClusterCommands}.
"""


def peerListenFor(peer: str) -> str:
    """
    The server endpoint description to listen on for a peer client
    description: C{"tcp:host=H:port=P"} gives C{"tcp:P:interface=H"}.

    @raise ValueError: for another kind of description; give the peer
        listener explicitly then.
    """
    kind, _, rest = peer.partition(":")
    fields: dict[str, str] = {}
    for part in rest.replace("\\:", "\0").split(":"):
        name, equals, value = part.partition("=")
        if equals:
            fields[name] = value.replace("\0", "\\:")
    if kind not in ("tcp", "tcp6") or "host" not in fields or "port" not in fields:
        raise ValueError(
            f"cannot derive a listening endpoint from peer endpoint {peer!r}; "
            "give 'peer-listen' explicitly"
        )
    return f"{kind}:{fields['port']}:interface={fields['host']}"


class _Members:
    """
    The node ids of the topology's current map, looked up afresh on each
    test, so a node that joins later is let in.
    """

    def __init__(self, topology: ITopology) -> None:
        self._topology = topology

    def __contains__(self, nodeId: object) -> bool:
        return nodeId in self._topology.currentMap().nodes


class ClusterService(MultiService):
    """
    The cluster part of one node: its peer links and its peer listener.

    @ivar links: the L{PeerLinks} to every other node.
    @ivar router: the L{ClusterRouter} installed as the node's forwarder.
    @ivar peerListen: the server endpoint description of the peer listener.
    """

    def __init__(
        self,
        node: FractalNode,
        peerListen: str,
        credentials: NodeCredentials | None,
        endpointFor: EndpointFactory,
        callTimeout: float = DEFAULT_CALL_TIMEOUT,
        connectTimeout: float = DEFAULT_CONNECT_TIMEOUT,
        retryPolicy: Callable[[int], float] | None = None,
    ) -> None:
        MultiService.__init__(self)
        self.setName("cluster")
        self.peerListen = peerListen
        self.links = PeerLinks(
            node.reactor,
            node.topology,
            endpointFor,
            callTimeout=callTimeout,
            connectTimeout=connectTimeout,
            retryPolicy=retryPolicy,
            # Peers run with the same limits: stay within what one
            # connection may have outstanding there.
            maxInFlight=min(DEFAULT_MAX_IN_FLIGHT, node.server.limits.maxOutstanding),
        )
        self.links.setServiceParent(self)
        self.router = ClusterRouter(self.links)
        factory: Any = node.server.peerFactory()
        if credentials is not None:
            factory = peerServerFactory(credentials, _Members(node.topology), factory)
        listener = StreamServerEndpointService(serverFromString(node.reactor, peerListen), factory)
        listener.setName("peer-listener")
        listener.setServiceParent(self)


def joinCluster(
    node: FractalNode,
    peerListen: str | None = None,
    credentials: NodeCredentials | None = None,
    insecure: bool = False,
    endpointFor: EndpointFactory | None = None,
    callTimeout: float = DEFAULT_CALL_TIMEOUT,
    connectTimeout: float = DEFAULT_CONNECT_TIMEOUT,
    retryPolicy: Callable[[int], float] | None = None,
) -> ClusterService:
    """
    Make C{node} a member of the cluster its topology describes: add the
    peer links and the peer listener as a child service, and install the
    forwarder in its front door.

    @param node: the node, not yet started.
    @param peerListen: the server endpoint description of the peer listener;
        derived from the node's C{peer} address by default (see
        L{peerListenFor}).
    @param credentials: the node's TLS credentials for mutual TLS with its
        peers, or L{None} for plain TCP.
    @param insecure: allow plain TCP on addresses that are not loopback.
    @param endpointFor: how to reach a peer; by default its C{peer}
        description, in mutual TLS when there are C{credentials}.
    @param callTimeout: see L{fractal.routing.peers.DEFAULT_CALL_TIMEOUT}.
    @param connectTimeout: see
        L{fractal.routing.peers.DEFAULT_CONNECT_TIMEOUT}.
    @param retryPolicy: seconds before each reconnection to a peer.
    @return: the cluster service, already a child of C{node}.
    @raise fractal.certs.InsecurePeers: if plain TCP would cross a
        non-loopback address without C{insecure}.
    @raise ValueError: if the node has no peer address and no C{peerListen}.
    """
    shardMap = node.topology.currentMap()
    own = shardMap.nodes[node.nodeId]
    if peerListen is None:
        if own.peer is None:
            raise ValueError(f"node {node.nodeId!r} has no peer endpoint to listen on")
        peerListen = peerListenFor(own.peer)
    checkPeerTransport(
        [(peerListen, True)]
        + [(a.peer, False) for a in shardMap.nodes.values() if a.peer is not None],
        credentials,
        insecure,
    )
    if endpointFor is None:
        endpointFor = peerEndpointFactory(node.reactor, credentials)
    service = ClusterService(
        node,
        peerListen,
        credentials,
        endpointFor,
        callTimeout=callTimeout,
        connectTimeout=connectTimeout,
        retryPolicy=retryPolicy,
    )
    service.setServiceParent(node)
    node.server.forward = service.router
    serveClusterCommands(node.server, service.links)
    return service

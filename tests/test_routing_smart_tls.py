"""
The smart client over client-facing TLS (L{fractal.routing.smart} with an
C{authority}), against two real nodes in this process that listen for
clients with real certificates on loopback: it calls an owner only once the
owner's certificate has been checked to name the node the shard map gives.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _globalReactor
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from examples.mailbox import Stats, application
from fractal.certs import createAuthority, createNodeCertificate, loadCredentials, nodeIdOf
from fractal.client import CallTimeout
from fractal.node import FractalNode
from fractal.routing.cluster import joinCluster
from fractal.routing.interfaces import NodeAddress
from fractal.routing.smart import ClusterClient, connectCluster
from fractal.routing.topology import StaticTopology
from tests._ports import freePorts

NODES = ("n1", "n2")
USERS = [f"user{i}@example.com" for i in range(12)]


class SmartClientTLSTests(TestCase):
    """
    L{ClusterClient} with the cluster CA as C{authority}.
    """

    def setUp(self) -> None:
        self.certs = FilePath(self.mktemp())
        createAuthority(self.certs)
        for node in NODES:
            createNodeCertificate(self.certs, node)
        self.authority = loadCredentials(self.certs, "n1").authority
        ports = freePorts(2 * len(NODES))
        self.addresses = [
            NodeAddress(
                node,
                f"tcp:host=127.0.0.1:port={ports[2 * i]}",
                f"tcp:host=127.0.0.1:port={ports[2 * i + 1]}",
            )
            for i, node in enumerate(NODES)
        ]
        self.ports = {node: ports[2 * i] for i, node in enumerate(NODES)}
        self.nodes: dict[str, FractalNode] = {}

    def startNode(self, node: str, certificate: str, certs: FilePath[str] | None = None) -> None:
        """
        Start node C{node}, its client listener presenting the certificate
        of C{certificate} from C{certs} (this test's CA by default).
        """
        certs = certs or self.certs
        key = certs.child(f"{certificate}.key").path
        crt = certs.child(f"{certificate}.crt").path
        listen = f"ssl:{self.ports[node]}:interface=127.0.0.1:privateKey={key}:certKey={crt}"
        topology = StaticTopology(node, self.addresses, slots=64)
        fractalNode = FractalNode(
            _globalReactor,
            application,
            FilePath(self.mktemp()),
            listen,
            nodeId=node,
            topology=topology,
        )
        joinCluster(fractalNode, retryPolicy=lambda attempt: 0.1)
        fractalNode.startService()
        self.addCleanup(fractalNode.stopService)
        self.nodes[node] = fractalNode

    def client(self, seed: str = "n1", timeout: float = 10) -> ClusterClient:
        client = connectCluster(
            _globalReactor,
            f"tcp:host=127.0.0.1:port={self.ports[seed]}",
            timeout=timeout,
            retryPolicy=lambda attempt: 0.1,
            fallbackAfter=0.5,
            refreshInterval=None,
            authority=self.authority,
        )
        self.addCleanup(client.disconnect)
        return client

    def owned(self, node: str, client: ClusterClient) -> list[str]:
        assert client.shardMap is not None
        return [u for u in USERS if client.shardMap.ownerOfKey(u).node == node]

    async def test_callsVerifiedOwner(self) -> None:
        """
        Each call goes straight to its owner over TLS, whose certificate
        names the node the map gives; the seed forwards none of them.
        """
        for node in NODES:
            self.startNode(node, node)
        client = self.client()
        shardMap = await client.refreshMap()
        assert shardMap is not None
        answers = [await client.callRemote(Stats, user=u) for u in USERS]
        self.assertEqual([a["total"] for a in answers], [0] * len(USERS))
        connection = client._owners["n2"]._connection
        assert connection is not None
        self.assertEqual(nodeIdOf(connection.transport.getPeerCertificate()), "n2")
        # n1 answered the map and its own users' calls, nothing forwarded.
        self.assertEqual(self.nodes["n1"].server.callsServed, 1 + len(self.owned("n1", client)))
        self.assertEqual(self.nodes["n2"].server.callsServed, len(self.owned("n2", client)))

    async def test_ownerNamingAnotherNodeNotCalled(self) -> None:
        """
        A node at n2's address whose certificate names n1 is never sent a
        call: the client's connection there is never up, and n2's users'
        calls go, after C{fallbackAfter}, to n1, which forwards them over
        the peer link.
        """
        self.startNode("n1", "n1")
        self.startNode("n2", "n1")
        client = self.client()
        await client.refreshMap()
        users = self.owned("n2", client)
        self.assertTrue(users)
        answers = [await client.callRemote(Stats, user=u) for u in users]
        self.assertEqual([a["total"] for a in answers], [0] * len(users))
        self.assertIsNone(client._owners["n2"]._connection)
        # Every call went through n1: the map, and each call forwarded.
        self.assertEqual(self.nodes["n1"].server.callsServed, 1 + len(users))

    async def test_seedFromAnotherAuthority(self) -> None:
        """
        A first node whose certificate comes from another CA is not trusted
        even for the map: the client learns nothing and calls time out,
        none of them run.
        """
        other = FilePath(self.mktemp())
        createAuthority(other)
        createNodeCertificate(other, "n1")
        self.startNode("n1", "n1", certs=other)
        self.startNode("n2", "n2")
        client = self.client(timeout=1)
        self.assertIsNone(await client.refreshMap())
        self.assertIsNone(client.shardMap)
        failure: Any = await self.assertFailure(
            client.callRemote(Stats, user=USERS[0]), CallTimeout
        )
        self.assertIn("Stats", str(failure))
        self.assertEqual(self.nodes["n1"].server.callsServed, 0)
        self.assertEqual(self.nodes["n2"].server.callsServed, 0)

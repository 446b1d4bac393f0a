"""
Tests for the cluster options of C{twistd fractal} (L{fractal.tap}): a
C{--config} describing several nodes makes the chosen node a cluster member.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from fractal.certs import createAuthority, createNodeCertificate
from fractal.protocol import GetShardMap
from fractal.routing.cluster import ClusterRouter, ClusterService
from fractal.routing.topology import StaticTopology
from fractal.tap import Options, makeService

APP = "examples.mailbox:application"


class ClusterTapTests(SynchronousTestCase):
    """
    Tests for building a cluster node from the shared config file.
    """

    def config(self, text: str) -> FilePath[str]:
        path = FilePath(self.mktemp())
        path.setContent(text.encode())
        return path

    def threeNodes(self, host: str = "127.0.0.1", top: str = "") -> FilePath[str]:
        data = FilePath(self.mktemp())
        return self.config(
            f'app = "{APP}"\n{top}\n'
            + "".join(
                f'[[node]]\nid = "n{i}"\nlisten = "tcp:{7100 + i}:interface={host}"\n'
                f'peer = "tcp:host={host}:port={7200 + i}"\ndata = "{data.path}/n{i}"\n'
                for i in (1, 2, 3)
            )
        )

    def build(self, *argv: str) -> object:
        """
        The node C{twistd fractal} builds from C{argv}, on a memory reactor
        of its own, so that nothing it registers outlives the test.
        """
        options = Options()
        options.parseOptions(list(argv))
        return makeService(options, MemoryReactorClock())

    def test_clusterNode(self) -> None:
        """
        C{--config} with three nodes and C{--node n2} builds node n2 with a
        static topology of the three, a cluster service listening for peers
        on the address derived from its C{peer} entry, and the router as its
        forwarder; its C{client} address is derived from C{listen}.
        """
        node = self.build("--config", self.threeNodes().path, "--node", "n2")
        topology = node.topology  # type: ignore[attr-defined]
        self.assertIsInstance(topology, StaticTopology)
        self.assertEqual(topology.localNode, "n2")
        shardMap = topology.currentMap()
        self.assertEqual(sorted(shardMap.nodes), ["n1", "n2", "n3"])
        self.assertEqual(shardMap.nodes["n3"].client, "tcp:host=127.0.0.1:port=7103")
        cluster = node.getServiceNamed("cluster")  # type: ignore[attr-defined]
        self.assertIsInstance(cluster, ClusterService)
        self.assertEqual(cluster.peerListen, "tcp:7202:interface=127.0.0.1")
        self.assertIsInstance(node.server.forward, ClusterRouter)  # type: ignore[attr-defined]
        self.assertIn(
            GetShardMap.commandName, node.server.internalCommands  # type: ignore[attr-defined]
        )

    def test_singleNodeServesMap(self) -> None:
        """
        A single node answers L{GetShardMap} too, so smart clients work
        against it, and has no cluster service.
        """
        node = self.build("--app", APP, "--data", self.mktemp())
        self.assertIn(
            GetShardMap.commandName, node.server.internalCommands  # type: ignore[attr-defined]
        )
        self.assertRaises(KeyError, node.getServiceNamed, "cluster")  # type: ignore[attr-defined]

    def test_plainTCPOffLoopbackRefused(self) -> None:
        """
        Peers on an address that is not loopback need C{--certs} or
        C{--insecure-peers}.
        """
        path = self.threeNodes(host="10.1.2.3")
        error = self.assertRaises(
            usage.UsageError, self.build, "--config", path.path, "--node", "n1"
        )
        self.assertIn("--insecure-peers", str(error))
        node = self.build("--config", path.path, "--node", "n1", "--insecure-peers")
        self.assertIsInstance(node.getServiceNamed("cluster"), ClusterService)  # type: ignore[attr-defined]

    def test_certs(self) -> None:
        """
        C{certs} in the file loads the node's credentials; a directory
        without them is a clear usage error.
        """
        certs = FilePath(self.mktemp())
        createAuthority(certs)
        createNodeCertificate(certs, "n1")
        path = self.threeNodes(host="10.1.2.3", top=f'certs = "{certs.path}"')
        node = self.build("--config", path.path, "--node", "n1")
        self.assertIsInstance(node.getServiceNamed("cluster"), ClusterService)  # type: ignore[attr-defined]
        error = self.assertRaises(
            usage.UsageError, self.build, "--config", path.path, "--node", "n2"
        )
        self.assertIn("'n2'", str(error))

    def test_badCluster(self) -> None:
        """
        A node without a peer address is a usage error naming it.
        """
        path = self.config(
            f'app = "{APP}"\n[[node]]\nid = "a"\nlisten = "tcp:1:interface=127.0.0.1"\n'
            'peer = "tcp:host=127.0.0.1:port=2"\n'
            '[[node]]\nid = "b"\nlisten = "tcp:3:interface=127.0.0.1"\n'
        )
        error = self.assertRaises(usage.UsageError, self.build, "--config", path.path, "--node", "a")
        self.assertIn("'b' has no 'peer'", str(error))

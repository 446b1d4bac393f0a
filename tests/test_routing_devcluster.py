"""
Tests for L{fractal.routing.devcluster}, the C{fractal dev-cluster}
command.
"""

from __future__ import annotations

import tomllib

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from fractal.certs import loadCredentials
from fractal.routing.devcluster import DevClusterOptions
from fractal.routing.interfaces import NodeAddress
from fractal.routing.topology import StaticTopology


class DevClusterTests(SynchronousTestCase):
    """
    Tests for L{DevClusterOptions}.
    """

    def write(self, *argv: str) -> tuple[FilePath[str], list[list[str]], list[str]]:
        directory = FilePath(self.mktemp())
        options = DevClusterOptions()
        options.parseOptions(["--dir", directory.path, *argv])
        lines: list[str] = []
        commands = options.write(out=lines.append)
        return directory, commands, lines

    def test_config(self) -> None:
        """
        The generated file describes N loopback nodes with distinct client
        and peer ports and data directories, one C{twistd} command each.
        """
        directory, commands, lines = self.write("-n", "4", "--port", "9001")
        document = tomllib.loads(directory.child("cluster.toml").getContent().decode())
        self.assertEqual(document["app"], "examples.mailbox:application")
        nodes = document["node"]
        self.assertEqual([n["id"] for n in nodes], ["n1", "n2", "n3", "n4"])
        self.assertEqual(nodes[3]["listen"], "tcp:9004:interface=127.0.0.1")
        self.assertEqual(nodes[3]["peer"], "tcp:host=127.0.0.1:port=9104")
        self.assertEqual(nodes[0]["data"], directory.child("n1").path)
        topology = StaticTopology(
            "n1", [NodeAddress(n["id"], n["client"], n["peer"]) for n in nodes]
        )
        self.assertEqual(len(set(o.node for o in topology.currentMap().owners)), 4)
        self.assertEqual(len(commands), 4)
        self.assertEqual(commands[1][-4:], ["--config", directory.child("cluster.toml").path,
                                            "--node", "n2"])
        self.assertIn("  " + " ".join(commands[0]), lines)

    def test_tls(self) -> None:
        """
        With C{--tls} the command makes node certificates and names their
        directory in the config; running it again reuses them.
        """
        directory, _, _ = self.write("-n", "2", "--tls")
        document = tomllib.loads(directory.child("cluster.toml").getContent().decode())
        certs = FilePath(document["certs"])
        self.assertEqual(loadCredentials(certs, "n2").nodeId, "n2")
        options = DevClusterOptions()
        options.parseOptions(["--dir", directory.path, "-n", "2", "--tls"])
        options.write(out=lambda line: None)
        self.assertEqual(loadCredentials(certs, "n1").nodeId, "n1")

    def test_badCount(self) -> None:
        """
        A node count out of range is a usage error.
        """
        from twisted.python.usage import UsageError

        self.assertRaises(UsageError, DevClusterOptions().parseOptions, ["-n", "0"])

"""
Tests for the C{--postgres} options of C{twistd fractal} (L{fractal.tap}),
against a real PostgreSQL server (see L{tests._postgres}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from fractal.postgres.backend import PostgresBackend
from fractal.postgres.topology import PostgresTopology
from fractal.tap import Options, makeService
from tests._postgres import makeDatabase, postgresDSN


class PostgresTapTests(SynchronousTestCase):
    """
    C{--postgres DSN} runs the node on a cluster kept in PostgreSQL.
    """

    def service(self, options: Options) -> Any:
        """
        L{makeService} on a reactor of the test's own, with the node's
        database connections closed when the test ends.

        Never the global reactor: registering arms the lease timer, and the
        node's PostgreSQL thread pools add start-up and shutdown triggers,
        which a node built but never started would leave for later tests.
        """
        node: Any = makeService(options, MemoryReactorClock())
        self.addCleanup(node.shipper.backend.database.close)
        self.addCleanup(node.topology._database.close)
        return node

    def options(self, *arguments: str) -> Options:
        options = Options()
        options.parseOptions(
            ["--app", "tests.test_durable_node:application", "--data", self.mktemp(), *arguments]
        )
        return options

    def test_postgresNode(self) -> None:
        """
        With C{--postgres}, the node's topology is a registered
        L{PostgresTopology} that runs as one of its services, its shipper
        ships to a L{PostgresBackend} at the topology's epochs, and it joins
        the cluster's peer network.
        """
        database = makeDatabase(self)
        options = self.options(
            "--postgres", postgresDSN(),
            "--postgres-schema", database.schema,
            "--listen", "tcp:7411:interface=127.0.0.1",
            "--peer-listen", "tcp:7412:interface=127.0.0.1",
            "--lease", "4",
        )
        node = self.service(options)
        topology = node.topology
        self.assertIsInstance(topology, PostgresTopology)
        self.assertIn(topology, list(node))
        self.assertEqual(topology.lease, 4.0)
        self.assertIsInstance(node.shipper.backend, PostgresBackend)
        self.assertEqual(node.shipper._epochForKey("alice"), 1)
        self.assertEqual(set(topology.currentMap().nodes), {"n1"})
        address = topology.currentMap().nodes["n1"]
        self.assertEqual(address.client, "tcp:host=127.0.0.1:port=7411")
        self.assertEqual(address.peer, "tcp:host=127.0.0.1:port=7412")
        self.assertIsNotNone(node.getServiceNamed("cluster"))

        def nodes(cursor: Any) -> list[tuple[str, str]]:
            cursor.execute("SELECT node, state FROM nodes")
            return [(r[0], r[1]) for r in cursor.fetchall()]

        self.assertEqual(database.transactBlocking(nodes), [("n1", "live")])

    def test_configFile(self) -> None:
        """
        C{postgres}, C{postgres-schema} and C{lease} can be written in the
        configuration file, and the node's C{[[node]]} table gives its
        addresses.
        """
        database = makeDatabase(self)
        config = FilePath(self.mktemp())
        config.setContent(
            (
                f'app = "tests.test_durable_node:application"\n'
                f'postgres = "{postgresDSN()}"\n'
                f'postgres-schema = "{database.schema}"\n'
                f"lease = 6.5\n"
                f"[[node]]\n"
                f'id = "a1"\n'
                f'listen = "tcp:7421:interface=127.0.0.1"\n'
                f'peer = "tcp:host=127.0.0.1:port=7422"\n'
            ).encode()
        )
        options = Options()
        options.parseOptions(["--config", config.path, "--data", self.mktemp()])
        node = self.service(options)
        self.assertIsInstance(node.topology, PostgresTopology)
        self.assertEqual(node.topology.lease, 6.5)
        self.assertEqual(
            node.topology.currentMap().nodes["a1"].peer, "tcp:host=127.0.0.1:port=7422"
        )

    def test_needsPeerAddress(self) -> None:
        """
        Without a peer address the node cannot be reached by its peers: a
        usage error says how to give one.
        """
        database = makeDatabase(self)
        options = self.options("--postgres", postgresDSN(), "--postgres-schema", database.schema)
        error = self.assertRaises(usage.UsageError, makeService, options, MemoryReactorClock())
        self.assertIn("--peer-listen", str(error))

    def test_needsSchema(self) -> None:
        """
        A database without the cluster's tables is a usage error naming
        C{fractal db init}; a database that cannot be reached is one too.
        """
        database = makeDatabase(self, init=False)
        options = self.options(
            "--postgres", postgresDSN(), "--postgres-schema", database.schema,
            "--peer-listen", "tcp:7412:interface=127.0.0.1",
        )
        self.assertIn("fractal db init", str(self.assertRaises(usage.UsageError, makeService, options, MemoryReactorClock())))
        options = self.options(
            "--postgres", "host=127.0.0.1 port=1 dbname=x user=x connect_timeout=1",
            "--peer-listen", "tcp:7412:interface=127.0.0.1",
        )
        self.assertIn("cannot use the database", str(self.assertRaises(usage.UsageError, makeService, options, MemoryReactorClock())))

    def test_badLease(self) -> None:
        """
        A lease that is not a positive number is refused at option time.
        """
        self.assertRaises(usage.UsageError, self.options, "--lease", "0")

    def test_handoffAndStaleOptions(self) -> None:
        """
        C{--handoff-drain}, C{--stale-keep} and C{--stale-max} take positive
        numbers (C{stale-max} a whole one), from the command line or the
        configuration file; a node is built with them.
        """
        options = self.options(
            "--handoff-drain", "2.5", "--stale-keep", "3600", "--stale-max", "7"
        )
        self.assertEqual(
            (options["handoff-drain"], options["stale-keep"], options["stale-max"]),
            (2.5, 3600.0, 7),
        )
        for bad in [("--stale-max", "0"), ("--stale-max", "1.5"), ("--stale-keep", "-1"),
                    ("--handoff-drain", "0")]:
            self.assertRaises(usage.UsageError, self.options, *bad)
        database = makeDatabase(self)
        config = FilePath(self.mktemp())
        config.setContent(
            (
                f'app = "tests.test_durable_node:application"\n'
                f'postgres = "{postgresDSN()}"\n'
                f'postgres-schema = "{database.schema}"\n'
                f"stale-keep = 60\n"
                f"stale-max = 3\n"
                f"handoff-drain = 1.5\n"
                f"[[node]]\n"
                f'id = "a1"\n'
                f'listen = "tcp:7431:interface=127.0.0.1"\n'
                f'peer = "tcp:host=127.0.0.1:port=7432"\n'
            ).encode()
        )
        options = Options()
        options.parseOptions(["--config", config.path, "--data", self.mktemp()])
        self.assertEqual(
            (options["handoff-drain"], options["stale-keep"], options["stale-max"]),
            (1.5, 60.0, 3),
        )
        self.assertIsInstance(self.service(options).topology, PostgresTopology)

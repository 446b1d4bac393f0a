"""
Tests for L{fractal.node}: wiring a node and stopping it gracefully.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.python.filepath import FilePath
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from fractal import app
from fractal.durable._threads import runSynchronously
from fractal.node import FractalNode, clientDescriptionFor
from fractal.protocol import NodeStopping
from fractal.routing.topology import SingleNodeTopology
from fractal.server import NodeProtocol
from fractal.store import Item, integer


def callRemote(client: amp.AMP, command: type[amp.Command], **kw: Any) -> Deferred[Any]:
    """
    Call C{command} on C{client}, with the result in a new L{Deferred}: AMP
    drops a connection whose call fails without an errback, and a test looks
    at the result only after the pump has run.
    """
    result: Deferred[Any] = Deferred()
    client.callRemote(command, **kw).chainDeferred(result)
    return result


def _registrations(reactor: Any) -> tuple[list[object], list[object], set[object]]:
    """
    What is registered with a real reactor to run later: its system event
    triggers, by event and phase, its delayed calls, and what it reads
    (listening ports among them).
    """
    triggers: list[object] = [
        (event, phase, list(getattr(three, phase)))
        for event, three in sorted(reactor._eventTriggers.items())
        for phase in ("before", "during", "after")
    ]
    return triggers, list(reactor.getDelayedCalls()), set(reactor.getReaders())


class Bump(app.UserCommand):
    response = [(b"value", amp.Integer())]


class Slow(app.UserCommand):
    response = [(b"value", amp.Integer())]


class Sync(app.UserCommand):
    ack = "durable"


class NodeTestCounter(Item):
    typeName = "test_node_counter"
    value = integer(default=0)

    pending: list[Deferred[dict[str, Any]]] = []

    @Bump.responder
    def bump(self) -> dict[str, Any]:
        self.value += 1
        return {"value": self.value}

    @Slow.responder
    def slow(self) -> Deferred[dict[str, Any]]:
        d: Deferred[dict[str, Any]] = Deferred()
        NodeTestCounter.pending.append(d)
        return d


class NodeTestSyncer(Item):
    typeName = "test_node_syncer"
    unused = integer(default=0)

    @Sync.responder
    def sync(self) -> dict[str, Any]:
        return {}


application = app.Application("counter", powerups=[NodeTestCounter])


class _Recorder(Service):
    """
    A child service that records when it is stopped, relative to the pool.
    """

    def __init__(self, node: FractalNode, log: list[str]) -> None:
        self.node = node
        self.log = log

    def stopService(self) -> None:
        Service.stopService(self)
        self.log.append(f"other stopped with {len(self.node.pool.openKeys())} stores open")


class ClientDescriptionTests(SynchronousTestCase):
    """
    Tests for L{clientDescriptionFor}.
    """

    def test_tcp(self) -> None:
        """
        A TCP listening description gives the client description reaching
        it, on loopback when the interface is a wildcard or missing.
        """
        self.assertEqual(
            clientDescriptionFor("tcp:7100:interface=127.0.0.1"), "tcp:host=127.0.0.1:port=7100"
        )
        self.assertEqual(clientDescriptionFor("tcp:port=7200"), "tcp:host=127.0.0.1:port=7200")
        self.assertEqual(
            clientDescriptionFor("tcp:7100:interface=0.0.0.0"), "tcp:host=127.0.0.1:port=7100"
        )
        self.assertEqual(
            clientDescriptionFor("tcp:7100:interface=10.1.2.3:backlog=5"),
            "tcp:host=10.1.2.3:port=7100",
        )

    def test_ssl(self) -> None:
        """
        A TLS listening description gives the plain TCP address of its port,
        on loopback when the interface is a wildcard or missing, for clients
        that add the TLS themselves.
        """
        self.assertEqual(
            clientDescriptionFor(
                "ssl:7101:interface=10.0.0.1:privateKey=certs/n1.key:certKey=certs/n1.crt"
            ),
            "tcp:host=10.0.0.1:port=7101",
        )
        self.assertEqual(
            clientDescriptionFor("ssl:port=7102:privateKey=/a\\:b/n2.key:certKey=n2.crt"),
            "tcp:host=127.0.0.1:port=7102",
        )
        self.assertEqual(
            clientDescriptionFor("ssl:7103:interface=fe80\\:\\:1:privateKey=k:certKey=c"),
            "tcp:host=fe80\\:\\:1:port=7103",
        )

    def test_other(self) -> None:
        """
        Other descriptions are returned unchanged.
        """
        self.assertEqual(clientDescriptionFor("unix:/tmp/x"), "unix:/tmp/x")


class FractalNodeTests(SynchronousTestCase):
    """
    Tests for L{FractalNode}.
    """

    def setUp(self) -> None:
        NodeTestCounter.pending = []
        self.reactor = MemoryReactorClock()
        self.dataDir = FilePath(self.mktemp()).child("data")

    def makeNode(self, **kw: Any) -> FractalNode:
        """
        A node on the memory reactor, listening on C{tcp:7100} on loopback.
        """
        kw.setdefault("runInThread", runSynchronously)
        return FractalNode(
            self.reactor, application, self.dataDir, "tcp:7100:interface=127.0.0.1", **kw
        )

    def connect(self, node: FractalNode) -> tuple[amp.AMP, iosim.IOPump]:
        """
        Connect a real AMP client to the protocol factory the node listens
        with.
        """
        [(port, factory, _, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (7100, "127.0.0.1"))
        client, server, pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(None), amp.AMP, clock=self.reactor
        )
        self.assertIsInstance(server, NodeProtocol)
        return client, pump

    def test_attributes(self) -> None:
        """
        A node exposes its parts; by default it owns every slot alone.
        """
        node = self.makeNode(nodeId="n7", maxOpenStores=9, idleTimeout=30)
        self.assertIs(node.reactor, self.reactor)
        self.assertEqual(node.nodeId, "n7")
        self.assertIs(node.application, application)
        self.assertEqual(node.pool.maxOpenStores, 9)
        self.assertEqual(node.pool.idleTimeout, 30)
        self.assertEqual(node.pool.dataDir, self.dataDir)
        self.assertIsNone(node.shipper)
        self.assertIsInstance(node.topology, SingleNodeTopology)
        self.assertEqual(node.topology.localNode, "n7")
        self.assertEqual(
            node.topology.currentMap().nodes["n7"].client, "tcp:host=127.0.0.1:port=7100"
        )

    def test_applicationPageSize(self) -> None:
        """
        A node creates user stores with its application's page size.
        """
        sized = app.Application("counter", powerups=[NodeTestCounter], pageSize=2048)
        node = FractalNode(
            self.reactor, sized, self.dataDir, "tcp:7100:interface=127.0.0.1",
            runInThread=runSynchronously,
        )
        node.startService()
        self.addCleanup(node.stopService)
        client, pump = self.connect(node)
        d = callRemote(client, Bump, user="a")
        pump.flush()
        self.assertEqual(self.successResultOf(d)["value"], 1)
        lease = self.successResultOf(node.pool.acquire("a"))
        self.assertEqual(
            lease.store._cursor.execute("PRAGMA page_size").fetchone(), (2048,)
        )
        lease.release()

    def test_topologyOfAnotherNode(self) -> None:
        """
        A topology serving another node id is refused.
        """
        with self.assertRaises(ValueError) as e:
            self.makeNode(nodeId="n1", topology=SingleNodeTopology("n2", "tcp:host=x:port=1"))
        self.assertIn("'n2'", str(e.exception))

    def test_durableWithoutShipper(self) -> None:
        """
        A node for an application that acknowledges durably refuses to be
        built without a shipper.
        """
        durable = app.Application("sync", powerups=[NodeTestSyncer])
        with self.assertRaises(ValueError) as e:
            FractalNode(self.reactor, durable, self.dataDir, "tcp:7100")
        self.assertIn("no durable shipper", str(e.exception))

    def test_serves(self) -> None:
        """
        A started node creates its data directory, listens, and answers calls
        in users' stores; L{FractalNode.stats} counts them.
        """
        node = self.makeNode()
        node.startService()
        self.addCleanup(node.stopService)
        self.assertTrue(self.dataDir.isdir())
        client, pump = self.connect(node)
        calls = [callRemote(client, Bump, user=user) for user in ["a", "a", "b"]]
        pump.flush()
        self.assertEqual([self.successResultOf(d)["value"] for d in calls], [1, 2, 1])
        stats = node.stats()
        self.assertEqual(
            {k: stats[k] for k in ["node", "application", "openStores", "callsServed", "callsFailed", "inFlight", "connections"]},
            {
                "node": "n1",
                "application": "counter",
                "openStores": 2,
                "callsServed": 3,
                "callsFailed": 0,
                "inFlight": 0,
                "connections": 1,
            },
        )

    def test_gracefulStop(self) -> None:
        """
        Stopping a node stops listening, refuses new calls with
        L{NodeStopping}, waits for the calls in flight, then closes every
        store, then the connections, then stops its other services, and only
        then fires.
        """
        node = self.makeNode()
        log: list[str] = []
        _Recorder(node, log).setServiceParent(node)
        node.startService()
        client, pump = self.connect(node)
        slow = callRemote(client, Slow, user="a")
        bumped = callRemote(client, Bump, user="b")
        pump.flush()
        self.successResultOf(bumped)
        self.assertNoResult(slow)

        self.assertFalse(node.stats()["stopping"])
        stopped = node.stopService()
        self.assertTrue(node.stats()["stopping"])
        self.assertFalse(node._listener.running)
        refused = callRemote(client, Bump, user="c")
        pump.flush()
        self.failureResultOf(refused, NodeStopping)
        self.assertNoResult(stopped)
        self.assertEqual(sorted(node.pool.openKeys()), ["a", "b"])
        self.assertEqual(log, [])

        NodeTestCounter.pending.pop().callback({"value": 42})
        pump.flush()
        self.assertEqual(self.successResultOf(slow), {"value": 42})
        self.successResultOf(stopped)
        self.assertEqual(node.pool.openKeys(), [])
        self.assertEqual(log, ["other stopped with 0 stores open"])
        self.assertEqual(node.stats()["connections"], 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_drainTimeout(self) -> None:
        """
        A call still running after C{drainTimeout} seconds does not hold up
        the stop: its store is closed anyway, the stop completes, and its late
        result is dropped without error.
        """
        node = self.makeNode(drainTimeout=5)
        node.startService()
        client, pump = self.connect(node)
        slow = callRemote(client, Slow, user="a")
        pump.flush()
        stopped = node.stopService()
        self.reactor.advance(4)
        self.assertNoResult(stopped)
        self.reactor.advance(1)
        self.successResultOf(stopped)
        self.assertEqual(node.pool.openKeys(), [])
        pump.flush()
        self.failureResultOf(slow)
        NodeTestCounter.pending.pop().callback({"value": 1})
        pump.flush()
        self.assertEqual(node.stats()["inFlight"], 0)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_drainTimeoutOption(self) -> None:
        """
        C{twistd fractal --drain-timeout} sets the node's drain timeout.
        """
        from fractal.tap import Options, makeService

        options = Options()
        options.parseOptions(
            [
                "--app",
                "tests.test_node:application",
                "--data",
                self.mktemp(),
                "--durable",
                "none",
                "--drain-timeout",
                "7",
            ]
        )
        node = makeService(options, self.reactor)
        assert isinstance(node, FractalNode)
        self.assertEqual(node.drainTimeout, 7.0)
        self.assertIs(node.application, application)

    def test_makeServiceFreezesStartupHeap(self) -> None:
        """
        Building a node for twistd moves the objects alive after start-up out
        of the cyclic garbage collector's full collections (L{gc.freeze}), so
        those collections scan only what the node makes while serving.
        """
        import gc

        from fractal.tap import Options, makeService

        options = Options()
        options.parseOptions(
            ["--app", "tests.test_node:application", "--data", self.mktemp(), "--durable", "none"]
        )
        makeService(options, self.reactor)
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_makeServiceRegistersOnItsReactor(self) -> None:
        """
        A node built by L{fractal.tap.makeService} with a reactor of its own
        listens and registers its start-up work (pruning stale copies) on
        that reactor, and registers nothing with the global reactor from
        being built to being stopped: a synchronous test that passes its
        reactor leaves nothing behind to run in a later test.
        """
        from twisted.internet import reactor as globalReactor

        from fractal.tap import Options, makeService

        before = _registrations(globalReactor)
        options = Options()
        options.parseOptions(
            ["--app", "tests.test_node:application", "--data", self.mktemp(), "--durable", "none"]
        )
        node = makeService(options, self.reactor)
        assert isinstance(node, FractalNode)
        node.startService()
        self.assertIn(node._pruneStale, [hook[0] for hook in self.reactor.whenRunningHooks])
        listening = [(server[0], server[3]) for server in self.reactor.tcpServers]
        self.assertEqual(listening, [(7100, "127.0.0.1")])
        self.assertEqual(_registrations(globalReactor), before)
        self.successResultOf(node.stopService())
        self.assertEqual(_registrations(globalReactor), before)

    def test_dataSurvivesRestart(self) -> None:
        """
        A node started again on the same data directory finds its users'
        data.
        """
        node = self.makeNode()
        node.startService()
        client, pump = self.connect(node)
        callRemote(client, Bump, user="a")
        pump.flush()
        self.successResultOf(node.stopService())
        self.reactor.tcpServers.clear()
        node = self.makeNode()
        node.startService()
        client, pump = self.connect(node)
        d = callRemote(client, Bump, user="a")
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"value": 2})
        self.successResultOf(node.stopService())

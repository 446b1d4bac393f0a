"""
Durable shipping through a whole node: C{ack="durable"} through the AMP
front door, restore of a missing local copy, graceful stop, fencing.

Real nodes, real stores on disk and real AMP over iosim; the backend is the
in-memory one, and the shipper's blocking work runs synchronously.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.python.filepath import FilePath
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from fractal import app
from fractal.durable._threads import runSynchronously
from fractal.durable.interfaces import StaleEpoch
from fractal.durable.record import decodeRecord
from fractal.durable.shipper import Shipper
from fractal.keys import storeNameForKey
from fractal.node import FractalNode
from fractal.protocol import StoreUnavailable
from fractal.store import Item, integer
from fractal.testing import MemoryDurableBackend


class Add(app.UserCommand):
    """
    Add to the user's counter; acknowledged locally.
    """

    arguments = [(b"amount", amp.Integer())]
    response = [(b"value", amp.Integer())]


class AddDurably(app.UserCommand):
    """
    Add to the user's counter; acknowledged once durable.
    """

    arguments = [(b"amount", amp.Integer())]
    response = [(b"value", amp.Integer())]
    ack = "durable"


class DurableNodeCounter(Item):
    typeName = "test_durable_node_counter"
    value = integer(default=0)

    @Add.responder
    def add(self, amount: int) -> dict[str, Any]:
        self.value += amount
        return {"value": self.value}

    @AddDurably.responder
    def addDurably(self, amount: int) -> dict[str, Any]:
        return self.add(amount)


application = app.Application("durable-counter", powerups=[DurableNodeCounter])


class DurableNodeTests(SynchronousTestCase):
    """
    A node with a shipper.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.backend = MemoryDurableBackend()

    def makeNode(self, dataDir: FilePath[str], interval: float = 1.0) -> FractalNode:
        """
        A node with a shipper on C{self.backend}, started.
        """
        shipper = Shipper(
            self.backend,
            self.reactor,
            runInThread=runSynchronously,
            interval=interval,
            storesDirectory=dataDir.child("stores"),
        )
        self.reactor.tcpServers.clear()
        node = FractalNode(
            self.reactor, application, dataDir, "tcp:7100:interface=127.0.0.1", shipper=shipper
        )
        shipper.serveNode(node)
        node.startService()
        return node

    def connect(self) -> tuple[amp.AMP, iosim.IOPump]:
        [(_, factory, _, _)] = self.reactor.tcpServers
        client, _, pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(None), amp.AMP, clock=self.reactor
        )
        return client, pump

    def test_durableAckWaits(self) -> None:
        """
        A command acknowledged durably is answered only once the backend has
        stored the record with its commit; a locally acknowledged one is
        answered at once even while the backend holds every write.
        """
        node = self.makeNode(FilePath(self.mktemp()), interval=60.0)
        self.addCleanup(node.stopService)
        client, pump = self.connect()
        self.backend.holdAppends = True
        local = client.callRemote(Add, user="alice", amount=1)
        pump.flush()
        self.assertEqual(self.successResultOf(local), {"value": 1})
        durable = client.callRemote(AddDurably, user="alice", amount=2)
        pump.flush()
        self.reactor.advance(0)
        pump.flush()
        self.assertNoResult(durable)
        self.backend.holdAppends = False
        self.backend.releaseAppends()
        pump.flush()
        self.assertEqual(self.successResultOf(durable), {"value": 3})

    def test_groupCommitAcrossUsers(self) -> None:
        """
        Durable calls of many users outstanding at once are acknowledged
        after one ship cycle, one record per user.
        """
        node = self.makeNode(FilePath(self.mktemp()), interval=60.0)
        self.addCleanup(node.stopService)
        client, pump = self.connect()
        users = [f"user{i}" for i in range(20)]
        for user in users:
            client.callRemote(Add, user=user, amount=1)
        pump.flush()
        self.reactor.advance(0)
        before = len(self.backend.appended)
        calls = [client.callRemote(AddDurably, user=user, amount=1) for user in users]
        pump.flush()
        self.reactor.advance(0)
        pump.flush()
        for d in calls:
            self.assertEqual(self.successResultOf(d), {"value": 2})
        self.assertEqual(len(self.backend.appended) - before, len(users))

    def test_restoreOntoFreshDataDirectory(self) -> None:
        """
        Every durably acknowledged write is found by a node started on an
        empty data directory with the same backend: the store is restored
        on first use.
        """
        node = self.makeNode(FilePath(self.mktemp()))
        client, pump = self.connect()
        for amount in (1, 2, 3):
            d = client.callRemote(AddDurably, user="alice", amount=amount)
            pump.flush()
            self.reactor.advance(0)
            pump.flush()
            self.successResultOf(d)
        # The disk is lost: no graceful stop of the old node's stores.
        fresh = FilePath(self.mktemp())
        other = self.makeNode(fresh)
        self.addCleanup(other.stopService)
        client, pump = self.connect()
        d = client.callRemote(Add, user="alice", amount=10)
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"value": 16})
        name = storeNameForKey("alice")
        self.assertTrue(fresh.child("stores").child(name[:2]).child(name).child("db.sqlite").exists())
        self.successResultOf(node.stopService())

    def test_restoreIsReported(self) -> None:
        """
        A store restored because its local copy is missing is reported by a
        structured event giving the restored point: the record's sequence
        number and when the image it holds was taken, which every write
        acknowledged before that time is in (and the text says so).
        """
        node = self.makeNode(FilePath(self.mktemp()))
        client, pump = self.connect()
        for amount in (1, 2):
            d = client.callRemote(AddDurably, user="alice", amount=amount)
            pump.flush()
            self.reactor.advance(0)
            pump.flush()
            self.successResultOf(d)
        name = storeNameForKey("alice")
        head = self.successResultOf(self.backend.head(name))
        assert head is not None
        shipped = decodeRecord(self.successResultOf(self.backend.read(name, head.seq)))
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        other = self.makeNode(FilePath(self.mktemp()))
        self.addCleanup(other.stopService)
        client, pump = self.connect()
        d = client.callRemote(Add, user="alice", amount=10)
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"value": 13})
        [event] = [e for e in events if e.get("store") == name and "seq" in e]
        self.assertEqual(event["key"], "alice")
        self.assertEqual(event["seq"], head.seq)
        self.assertEqual(event["takenAt"], shipped.takenAt)
        text = formatEvent(event)
        self.assertIn(f"to record {head.seq}", text)
        self.assertIn(f"takenAt={shipped.takenAt:.6f}", text)
        self.assertIn("not shipped and is lost", text)
        self.successResultOf(node.stopService())

    def test_gracefulStopShipsEverything(self) -> None:
        """
        Stopping a node ships every store changed since its last ship, even
        with a long ship interval.
        """
        node = self.makeNode(FilePath(self.mktemp()), interval=3600.0)
        client, pump = self.connect()
        for user in ["a", "b", "c"]:
            client.callRemote(Add, user=user, amount=5)
        pump.flush()
        self.successResultOf(node.stopService())
        other = self.makeNode(FilePath(self.mktemp()))
        self.addCleanup(other.stopService)
        client, pump = self.connect()
        calls = [client.callRemote(Add, user=user, amount=1) for user in ["a", "b", "c"]]
        pump.flush()
        self.assertEqual([self.successResultOf(d)["value"] for d in calls], [6, 6, 6])

    def test_staleEpochRefusesDurableAck(self) -> None:
        """
        When the backend has been fenced at a newer epoch, a durable call is
        not acknowledged as durable: it fails with a clear error.
        """
        node = self.makeNode(FilePath(self.mktemp()))
        self.addCleanup(node.stopService)
        client, pump = self.connect()
        d = client.callRemote(Add, user="alice", amount=1)
        pump.flush()
        self.successResultOf(d)
        self.successResultOf(self.backend.fence(storeNameForKey("alice"), 99))
        results: list[Any] = []
        # AMP hands an error nobody handles yet to its unhandledError, so
        # collect the outcome before it arrives.
        client.callRemote(AddDurably, user="alice", amount=1).addBoth(results.append)
        pump.flush()
        self.reactor.advance(0)
        pump.flush()
        [failure] = results
        self.assertTrue(failure.check(StoreUnavailable))
        self.assertIn("could not be stored durably", str(failure.value))
        self.assertTrue(node.shipper.lag().stores[0].fenced)  # type: ignore[union-attr]
        self.flushLoggedErrors(StaleEpoch)


class TapDurableOptionsTests(SynchronousTestCase):
    """
    The C{twistd fractal} options of durable shipping.
    """

    def makeNode(self, *arguments: str) -> Any:
        from fractal.tap import Options, makeService

        options = Options()
        options.parseOptions(["--app", "tests.test_durable_node:application", *arguments])
        return makeService(options)

    def test_shipsByDefault(self) -> None:
        """
        By default a node ships to C{DATA/durable} every second, and the
        shipper is one of the node's services.
        """
        data = FilePath(self.mktemp())
        node = self.makeNode("--data", data.path)
        shipper = node.shipper
        self.assertIsInstance(shipper, Shipper)
        self.assertEqual(shipper.backend.root, data.child("durable"))
        self.assertEqual(shipper.interval, 1.0)
        self.assertIs(shipper.parent, node)

    def test_options(self) -> None:
        """
        C{--durable DIR} and C{--ship-interval} choose the directory and the
        interval; C{--durable none} ships nothing, which an application that
        acknowledges durably refuses.
        """
        elsewhere = FilePath(self.mktemp())
        node = self.makeNode("--durable", elsewhere.path, "--ship-interval", "0.25")
        self.assertEqual(node.shipper.backend.root, elsewhere)
        self.assertEqual(node.shipper.interval, 0.25)
        with self.assertRaises(ValueError) as e:
            self.makeNode("--durable", "none")
        self.assertIn("no durable shipper", str(e.exception))

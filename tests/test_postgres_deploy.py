"""
Tests for L{fractal.postgres.deploy}: whole nodes (real stores on disk, real
AMP over iosim) whose topology and durable backend are one real PostgreSQL
database, every query run synchronously and time on each node's clock.
"""

from __future__ import annotations

from typing import Any

from twisted._threads import AlreadyQuit
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.python.filepath import FilePath
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from fractal.durable._threads import runSynchronously
from fractal.durable.shipper import Shipper
from fractal.keys import slotForKey
from fractal.node import FractalNode
from fractal.postgres.deploy import HandoffNotDrained, openCluster, servePostgres
from fractal.postgres.schema import SchemaError
from fractal.routing.interfaces import NodeAddress
from tests._postgres import makeDatabase, postgresDSN
from tests.test_durable_node import Add, AddDurably, DurableNodeCounter, application

SLOTS = 16
LEASE = 10.0


class _Node:
    def __init__(
        self, test: SynchronousTestCase, schema: str, name: str, **serve: Any
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.dataDir = FilePath(test.mktemp())
        port = 7300 + int(name[1:])
        self.cluster = openCluster(
            self.reactor,
            postgresDSN(),
            NodeAddress(name, f"tcp:host=127.0.0.1:port={port}"),
            schema=schema,
            slots=SLOTS,
            lease=LEASE,
            runInThread=runSynchronously,
        )
        self.shipper = Shipper(
            self.cluster.backend,
            self.reactor,
            runInThread=runSynchronously,
            storesDirectory=self.dataDir.child("stores"),
            epochForKey=self.cluster.topology.epochForKey,
        )
        self.node = FractalNode(
            self.reactor,
            application,
            self.dataDir,
            f"tcp:{port}:interface=127.0.0.1",
            nodeId=name,
            topology=self.cluster.topology,
            shipper=self.shipper,
            runInThread=runSynchronously,
            **{name: serve.pop(name) for name in ("staleKeep", "staleMax", "wallClock")
               if name in serve},
        )
        servePostgres(self.node, self.cluster, self.shipper, **serve)
        self.node.startService()
        self._test = test
        test.addCleanup(self.cluster.database.close)
        test.addCleanup(self.cluster.backend.database.close)
        test.addCleanup(self.stop)

    def stop(self) -> None:
        if self.node.running:
            self._test.successResultOf(self.node.stopService())

    def call(self, command: type[amp.Command], **kw: Any) -> Any:
        [(_, factory, _, _)] = self.reactor.tcpServers
        client, _, pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(None), amp.AMP, clock=self.reactor
        )
        d = client.callRemote(command, **kw)
        for _ in range(5):
            pump.flush()
            self.reactor.advance(0)
        return self._test.successResultOf(d)

    def owner(self, key: str) -> str:
        return self.cluster.topology.currentMap().ownerOfKey(key).node


def _setCounter(lease: Any, value: int) -> None:
    """
    Commit C{value} as the counter of the store C{lease} holds, as a call's
    transaction would.
    """
    counter = lease.store.findFirst(DurableNodeCounter)
    lease.store.transact(lambda: setattr(counter, "value", value))


def _advance(seconds: float, *nodes: _Node) -> None:
    done = 0.0
    while done < seconds:
        for n in nodes:
            n.reactor.advance(1.0)
        done += 1.0


class PostgresNodeTests(SynchronousTestCase):
    """
    Nodes on PostgreSQL hand stores to each other through the database.
    """

    def test_requiresSchema(self) -> None:
        """
        A node refuses to start on a database whose schema was never
        initialised, naming C{fractal db init}.
        """
        database = makeDatabase(self, init=False)
        error = self.assertRaises(
            SchemaError,
            openCluster,
            MemoryReactorClock(),
            postgresDSN(),
            NodeAddress("n1", "tcp:host=127.0.0.1:port=1"),
            schema=database.schema,
            runInThread=runSynchronously,
        )
        self.assertIn("fractal db init", str(error))

    def test_handoffAndReturn(self) -> None:
        """
        Writes made on n1 (acknowledged locally or durably) are served by n2
        after the slots move to it when it joins, restored from PostgreSQL;
        when n2 stops gracefully the slots come back to n1, which sets its
        old local copies aside and serves n2's writes, not its stale copy.
        """
        database = makeDatabase(self)
        n1 = _Node(self, database.schema, "n1")
        users = [f"user{i}" for i in range(12)]
        for user in users:
            self.assertEqual(n1.call(Add, user=user, amount=5), {"value": 5})
        self.assertEqual(n1.call(AddDurably, user=users[0], amount=1), {"value": 6})
        n2 = _Node(self, database.schema, "n2")
        _advance(LEASE * 3, n1, n2)
        moved = [u for u in users if n1.owner(u) == "n2"]
        self.assertTrue(moved)
        self.assertEqual([n2.owner(u) for u in moved], ["n2"] * len(moved))
        for user in moved:
            expected = 7 if user == users[0] else 6
            self.assertEqual(n2.call(Add, user=user, amount=1), {"value": expected})
        for user in users:
            if user not in moved:
                self.assertEqual(n1.call(Add, user=user, amount=0)["value"], 6 if user == users[0] else 5)
        n2.stop()
        n1.reactor.advance(0)
        _advance(n1.cluster.topology.heartbeat, n1)
        self.assertEqual({n1.owner(u) for u in users}, {"n1"})
        stale = n1.dataDir.child("stale")
        self.assertTrue(stale.isdir())
        for user in moved:
            expected = 8 if user == users[0] else 7
            self.assertEqual(n1.call(Add, user=user, amount=1), {"value": expected})


    def test_staleOpenStoreNeverShipped(self) -> None:
        """
        A store open on n1 after its slot moved to n2 (opened and written
        there after the handoff, as a node that lost its lease could) is
        stale: when the slot comes back, it is closed without being shipped
        over n2's newer records, and n1 serves n2's writes.
        """
        database = makeDatabase(self)
        n1 = _Node(self, database.schema, "n1")
        users = [f"user{i}" for i in range(12)]
        for user in users:
            n1.call(Add, user=user, amount=5)
        n2 = _Node(self, database.schema, "n2")
        _advance(LEASE * 3, n1, n2)
        moved = [u for u in users if n1.owner(u) == "n2"]
        leases = [self.successResultOf(n1.node.pool.acquire(user)) for user in users]
        for user, lease in zip(users, leases):
            assert lease is not None
            if user in moved:
                # A late commit on the old owner, after its final ship.
                counter = lease.store.findFirst(DurableNodeCounter)
                lease.store.transact(lambda: setattr(counter, "value", 999))
            lease.release()
        self.assertTrue(moved)
        self.assertTrue(set(moved) <= set(n1.node.pool.openKeys()))
        for user in moved:
            self.assertEqual(n2.call(Add, user=user, amount=100), {"value": 105})
        n2.stop()
        n1.reactor.advance(0)
        _advance(n1.cluster.topology.heartbeat, n1)
        self.assertEqual({n1.owner(u) for u in users}, {"n1"})
        for user in moved:
            self.assertEqual(n1.call(Add, user=user, amount=1), {"value": 106})
        self.flushLoggedErrors()


    def test_handoffWaitsForCallsInFlight(self) -> None:
        """
        A slot being handed off moves only after the calls running on its
        stores have finished: a call that holds its store when the handoff
        starts and commits (acknowledged locally) afterwards keeps the slot
        from moving until it is done, and its commit is in what the new
        owner serves.  (Shipping first and letting the call commit after
        the final ship would lose that commit.)
        """
        database = makeDatabase(self)
        n1 = _Node(self, database.schema, "n1")
        users = [f"user{i}" for i in range(12)]
        for user in users:
            n1.call(Add, user=user, amount=5)
        leases = {user: self.successResultOf(n1.node.pool.acquire(user)) for user in users}
        n2 = _Node(self, database.schema, "n2")
        _advance(LEASE, n1, n2)
        handedOff = [u for u in users if n1.owner(u) == "n2"]
        self.assertTrue(handedOff)
        n2Slots = n2.cluster.topology.ownedSlots()
        # n1 routes their calls to n2 already, but the slots have not moved.
        self.assertFalse({slotForKey(u, SLOTS) for u in handedOff} & n2Slots)
        for user, lease in leases.items():
            if user in handedOff:
                # The call commits after the handoff began.
                _setCounter(lease, 50)
            lease.release()
        _advance(LEASE, n1, n2)
        self.assertEqual({n2.owner(u) for u in handedOff}, {"n2"})
        for user in handedOff:
            self.assertEqual(n2.call(Add, user=user, amount=1), {"value": 51})

    def test_handoffGivesUpOnStuckCalls(self) -> None:
        """
        A call that holds a store longer than C{handoffDrain} makes the
        handoff of the slots fail, without moving them: n1 serves them
        again, and hands them off at a later round once the call is done,
        with its commit.
        """
        database = makeDatabase(self)
        n1 = _Node(self, database.schema, "n1")
        users = [f"user{i}" for i in range(12)]
        for user in users:
            n1.call(Add, user=user, amount=5)
        leases = {user: self.successResultOf(n1.node.pool.acquire(user)) for user in users}
        n2 = _Node(self, database.schema, "n2")
        _advance(LEASE * 3, n1, n2)
        self.assertTrue(self.flushLoggedErrors(HandoffNotDrained))
        stuck = [u for u in users if slotForKey(u, SLOTS) in n1.cluster.topology.ownedSlots()
                 and n2.cluster.topology.currentMap().ownerOfKey(u).node != "n2"]
        self.assertEqual(stuck, users)
        for lease in leases.values():
            _setCounter(lease, 60)
            lease.release()
        _advance(LEASE * 3, n1, n2)
        moved = [u for u in users if n2.owner(u) == "n2"]
        self.assertTrue(moved)
        self.assertEqual([n1.owner(u) for u in moved], ["n2"] * len(moved))
        for user in moved:
            self.assertEqual(n2.call(Add, user=user, amount=1), {"value": 61})

    def test_heldStaleStoreWaitedFor(self) -> None:
        """
        A stale store still held by a call when its slot comes back keeps
        the slot from being served until the call lets go; then it is closed
        and set aside, and the user is served from the current chain.
        """
        database = makeDatabase(self)
        n1 = _Node(self, database.schema, "n1")
        users = [f"user{i}" for i in range(12)]
        for user in users:
            n1.call(Add, user=user, amount=5)
        n2 = _Node(self, database.schema, "n2")
        _advance(LEASE * 3, n1, n2)
        moved = [u for u in users if n1.owner(u) == "n2"]
        leases = {user: self.successResultOf(n1.node.pool.acquire(user)) for user in users}
        self.assertTrue(moved)
        for user, lease in leases.items():
            if user not in moved:
                lease.release()  # type: ignore[union-attr]
        for user in moved:
            self.assertEqual(n2.call(Add, user=user, amount=100), {"value": 105})
        n2.stop()
        _advance(n1.cluster.topology.heartbeat, n1)
        self.assertEqual([n1.owner(u) for u in moved], ["n2"] * len(moved))
        for user in moved:
            leases[user].release()  # type: ignore[union-attr]
        n1.reactor.advance(0.1)
        self.assertEqual({n1.owner(u) for u in users}, {"n1"})
        for user in moved:
            self.assertEqual(n1.call(Add, user=user, amount=1), {"value": 106})
        self.flushLoggedErrors()


class StalePruningTests(SynchronousTestCase):
    """
    A node on PostgreSQL keeps its set-aside stale stores for a bounded
    time and number.
    """

    def test_prunedAtStartAndAfterSetAside(self) -> None:
        """
        When the reactor starts, stale stores older than C{staleKeep} are
        deleted; after the node sets aside the stores of slots it gained
        back, only the newest C{staleMax} stale stores remain.
        """
        database = makeDatabase(self)
        clock = [10_000.0]
        n1 = _Node(self, database.schema, "n1", staleKeep=3600.0, staleMax=2,
                   wallClock=lambda: clock[0])
        stale = n1.dataDir.child("stale")
        for name in ["old-100.0", "recent-9000.0"]:
            stale.child(name).makedirs()
        n1.reactor.run()
        self.assertEqual([c.basename() for c in stale.children()], ["recent-9000.0"])
        users = [f"user{i}" for i in range(24)]
        for user in users:
            n1.call(Add, user=user, amount=5)
        n2 = _Node(self, database.schema, "n2")
        _advance(LEASE * 3, n1, n2)
        moved = [u for u in users if n1.owner(u) == "n2"]
        self.assertGreater(len(moved), 2)
        clock[0] = 10_001.0
        n2.stop()
        n1.reactor.advance(0)
        _advance(n1.cluster.topology.heartbeat, n1)
        self.assertEqual({n1.owner(u) for u in users}, {"n1"})
        left = sorted(c.basename() for c in stale.children())
        self.assertEqual(len(left), 2)
        self.assertNotIn("recent-9000.0", left)
        self.assertTrue(all(name.endswith("-10001.000000") for name in left))


class OwnThreadsTests(SynchronousTestCase):
    """
    The thread pools L{openCluster} makes when given no runner follow the
    reactor's start-up and shutdown.
    """

    def test_shutdownBeforeRunning(self) -> None:
        """
        A reactor that shuts down before it ever ran stops the cluster's
        thread pools and withdraws their pending start: a start-up after it
        (trial's worker fires C{shutdown} on its global reactor after each
        test, and start-up again at the next test that runs the reactor) does
        not try to start a stopped pool.
        """
        reactor = SelectReactor()
        self.addCleanup(reactor.waker.connectionLost, None)
        database = makeDatabase(self)
        cluster = openCluster(
            reactor,
            postgresDSN(),
            NodeAddress("n1", "tcp:host=127.0.0.1:port=7301"),
            schema=database.schema,
            slots=SLOTS,
            lease=LEASE,
        )
        self.addCleanup(cluster.database.close)
        self.addCleanup(cluster.backend.database.close)
        reactor.fireSystemEvent("shutdown")
        reactor.fireSystemEvent("startup")
        self.assertEqual(self.flushLoggedErrors(AlreadyQuit), [])

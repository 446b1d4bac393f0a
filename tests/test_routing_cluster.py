"""
Routing decisions of a cluster, tested deterministically on N real nodes
over a simulated network with one clock (L{fractal.testing.SimulatedCluster}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.protocols import amp
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from examples.mailbox import Deliver, Stats, application
from fractal.app import Application, UserCommand
from fractal.keys import storeNameForKey
from fractal.protocol import GetShardMap, Health, NotOwner, OwnerUnavailable
from fractal.routing.harness import SimulatedCluster
from fractal.routing.interfaces import ShardMap, SlotOwner
from fractal.routing.smart import DEFAULT_REFRESH_INTERVAL, ClusterClient
from fractal.routing.topology import reassign
from fractal.server import ServerLimits
from fractal.store import Item, integer


def deliver(client: Any, user: str, subject: str = "hi") -> Any:
    return client.callRemote(Deliver, user=user, sender="bob", subject=subject, body="text")


class ClusterRoutingTests(SynchronousTestCase):
    """
    Calls sent to any node are answered by the owner of their user.
    """

    def setUp(self) -> None:
        self.directory = FilePath(self.mktemp())
        self.cluster = SimulatedCluster(application, self.directory, nodes=3, slots=64)
        self.cluster.start()
        self.addCleanup(self.stopCluster)
        self.users = [f"user{i}@example.com" for i in range(30)]

    def stopCluster(self) -> None:
        self.cluster.restore("client")
        for node in self.cluster.nodes:
            self.cluster.restore(node)
        self.cluster.stop()
        self.assertEqual(self.cluster.reactor.getDelayedCalls(), [])

    def usersOf(self, node: str) -> list[str]:
        return [u for u in self.users if self.cluster.ownerOf(u) == node]

    def test_eachUserLandsOnItsOwner(self) -> None:
        """
        Calls sent round-robin to all nodes each run on the owner: every
        user's store exists on exactly one node's disk, and every node reads
        back the same counts.
        """
        clients = [self.cluster.client(node) for node in ["n1", "n2", "n3"]]
        calls = [deliver(clients[i % 3], user) for i, user in enumerate(self.users)]
        self.cluster.flush()
        for d in calls:
            self.assertIn("messageID", self.successResultOf(d))
        self.assertTrue(all(self.usersOf(n) for n in ["n1", "n2", "n3"]))
        for user in self.users:
            holders = [
                node
                for node in self.cluster.nodes
                if _holds(self.directory.child(node), storeNameForKey(user))
            ]
            self.assertEqual(holders, [self.cluster.ownerOf(user)], user)
        for client in clients:
            stats = [client.callRemote(Stats, user=user) for user in self.users]
            self.cluster.flush()
            for d in stats:
                self.assertEqual(self.successResultOf(d), {"total": 1, "unread": 1})

    def test_forwardedCallIsNotForwardedAgain(self) -> None:
        """
        A call arriving on a peer listener for a user the node does not own
        is answered L{NotOwner} naming the owner, never forwarded again.
        """
        n3user = self.usersOf("n3")[0]
        n2user = self.usersOf("n2")[0]
        peer = self.cluster.network.endpoint("n1", str(self.cluster.addresses["n2"].peer))
        proto = self.successResultOf(peer.connect(Factory.forProtocol(amp.AMP)))
        self.cluster.flush()
        # Take the raw AMP answers at once: AMP drops the connection for an
        # error nobody handles by the time it arrives.
        refused: Deferred[Any] = Deferred()
        accepted: Deferred[Any] = Deferred()
        deliver(proto, n3user).chainDeferred(refused)
        deliver(proto, n2user).chainDeferred(accepted)
        self.cluster.flush()
        failure = self.failureResultOf(refused, NotOwner)
        self.assertEqual(failure.value.args[0], "n3")
        self.assertIn("messageID", self.successResultOf(accepted))
        self.assertFalse(_holds(self.directory.child("n2"), storeNameForKey(n3user)))
        self.assertFalse(_holds(self.directory.child("n3"), storeNameForKey(n3user)))
        proto.transport.loseConnection()
        self.cluster.flush()

    def test_deadOwnerFailsFast(self) -> None:
        """
        When an owner dies, calls for its users fail at once with
        L{OwnerUnavailable}, while calls for the other users carry on.
        """
        client = self.cluster.client("n1")
        self.cluster.kill("n2")
        dead = [deliver(client, u) for u in self.usersOf("n2")]
        alive = [deliver(client, u) for u in self.usersOf("n1") + self.usersOf("n3")]
        self.cluster.flush()
        for d in dead:
            failure = self.failureResultOf(d, OwnerUnavailable)
            self.assertIn("'n2'", failure.getErrorMessage())
        for d in alive:
            self.assertIn("messageID", self.successResultOf(d))

    def test_hungOwnerTimesOut(self) -> None:
        """
        An owner that stops answering makes its users' calls fail with
        L{OwnerUnavailable} after the peer call timeout, never hang; other
        users are served meanwhile.
        """
        client = self.cluster.client("n1")
        self.cluster.hold("n2")
        hung = deliver(client, self.usersOf("n2")[0])
        other = deliver(client, self.usersOf("n3")[0])
        self.cluster.flush()
        self.assertIn("messageID", self.successResultOf(other))
        self.cluster.advance(4.9)
        self.assertNoResult(hung)
        self.cluster.advance(0.1)
        self.failureResultOf(hung, OwnerUnavailable)

    def test_ownerComesBack(self) -> None:
        """
        Once a dead owner is reachable again, its users are served after the
        peer link's retry delay.
        """
        client = self.cluster.client("n1")
        user = self.usersOf("n2")[0]
        self.cluster.kill("n2")
        self.cluster.advance(3.0)
        self.cluster.restore("n2")
        self.cluster.advance(self.cluster.retryDelay)
        d = deliver(client, user)
        self.cluster.flush()
        self.assertIn("messageID", self.successResultOf(d))

    def test_shardMapFromAnyNode(self) -> None:
        """
        Every node answers L{GetShardMap} with the same map.
        """
        maps = []
        for node in ["n1", "n2", "n3"]:
            d = self.cluster.client(node).callRemote(GetShardMap)
            self.cluster.flush()
            maps.append(self.successResultOf(d)["map"])
        self.assertEqual(maps[0], maps[1])
        self.assertEqual(maps[0], maps[2])
        self.assertEqual(maps[0], self.cluster.nodes["n1"].topology.currentMap())


    def test_health(self) -> None:
        """
        L{Health} reports the node, its map, its share of the slots and which
        peer links are up; a dead peer shows as down.
        """
        client = self.cluster.client("n1")
        d = client.callRemote(Health)
        self.cluster.flush()
        shardMap = self.cluster.nodes["n1"].topology.currentMap()
        self.assertEqual(
            self.successResultOf(d),
            {
                "node": "n1",
                "mapVersion": shardMap.version,
                "slotsOwned": len(shardMap.slotsOf("n1")),
                "peersUp": ["n2", "n3"],
                "peersDown": [],
            },
        )
        self.cluster.kill("n3")
        d = client.callRemote(Health)
        self.cluster.flush()
        result = self.successResultOf(d)
        self.assertEqual((result["peersUp"], result["peersDown"]), (["n2"], ["n3"]))


def _holds(nodeDirectory: FilePath[str], storeName: str) -> bool:
    """
    Whether a store directory or file named C{storeName} exists anywhere
    under C{nodeDirectory}.
    """
    if not nodeDirectory.exists():
        return False
    return any(storeName in path.basename() for path in nodeDirectory.walk())


class HarnessTests(SynchronousTestCase):
    """
    Tests for the harness itself, as exported by L{fractal.testing}.
    """

    def test_exported(self) -> None:
        """
        L{fractal.testing} exports the harness and the simulated network.
        """
        from fractal import testing

        self.assertIs(testing.SimulatedCluster, SimulatedCluster)
        self.assertIn("SimulatedCluster", testing.__all__)
        self.assertIn("SimulatedNetwork", testing.__all__)

    def test_delayedLink(self) -> None:
        """
        Delaying the links of an owner delays its users' forwarded answers
        by that much on the shared clock, and no more.
        """
        cluster = SimulatedCluster(application, FilePath(self.mktemp()), nodes=2, slots=16)
        cluster.start()
        user = next(
            u for u in (f"u{i}" for i in range(100)) if cluster.ownerOf(u) == "n2"
        )
        client = cluster.client("n1")
        cluster.delay("n1", "n2", 0.5)
        d = deliver(client, user)
        cluster.flush()
        self.assertNoResult(d)
        cluster.advance(0.5)
        self.assertNoResult(d)
        cluster.advance(0.5)
        self.assertIn("messageID", self.successResultOf(d))
        cluster.restore("n1", "n2")
        cluster.stop()
        self.assertEqual(cluster.reactor.getDelayedCalls(), [])


class MapChangeTests(SynchronousTestCase):
    """
    Routing follows the shard map as it changes, and a node with a stale map
    is corrected rather than obeyed.
    """

    def setUp(self) -> None:
        self.directory = FilePath(self.mktemp())
        self.cluster = SimulatedCluster(
            application, self.directory, nodes=3, slots=64, manual=True
        )
        self.cluster.start()
        self.addCleanup(self.stopCluster)
        self.user = next(
            u for u in (f"user{i}" for i in range(200)) if self.cluster.ownerOf(u) == "n2"
        )
        current = self.cluster.nodes["n1"].topology.currentMap()
        self.moved = reassign(current, [self.cluster.slotOf(self.user)], "n3")

    def stopCluster(self) -> None:
        self.cluster.stop()
        self.assertEqual(self.cluster.reactor.getDelayedCalls(), [])

    def test_callsFollowTheNewOwner(self) -> None:
        """
        Once every node has the new map, calls for a moved user run on its
        new owner, whichever node they are sent to.
        """
        self.cluster.setMap(self.moved)
        for node in ["n1", "n2", "n3"]:
            d = deliver(self.cluster.client(node), self.user)
            self.cluster.flush()
            self.assertIn("messageID", self.successResultOf(d))
        name = storeNameForKey(self.user)
        self.assertTrue(_holds(self.directory.child("n3"), name))
        self.assertFalse(_holds(self.directory.child("n2"), name))
        d = self.cluster.client("n2").callRemote(Stats, user=self.user)
        self.cluster.flush()
        self.assertEqual(self.successResultOf(d)["total"], 3)

    def test_staleForwarderCorrected(self) -> None:
        """
        A node still on the old map forwards to the old owner, which knows
        better: it does not forward the call a second time but answers
        L{NotOwner} naming the new owner, and the forwarding node routes the
        call there itself; it runs once, on the new owner.
        """
        self.cluster.setMap(self.moved, nodes=["n2", "n3"])
        d = deliver(self.cluster.client("n1"), self.user)
        self.cluster.flush()
        self.assertNoResult(d)
        self.cluster.advance(0.05)
        self.assertIn("messageID", self.successResultOf(d))
        self.assertEqual(self.cluster.nodes["n1"].server.callsRerouted, 1)
        self.assertTrue(_holds(self.directory.child("n3"), storeNameForKey(self.user)))
        for node in ["n1", "n2"]:
            self.assertFalse(_holds(self.directory.child(node), storeNameForKey(self.user)))
        # The old owner answered NotOwner itself (it forwards nothing).
        self.assertEqual(self.cluster.nodes["n2"].server.callsServed, 0)

    def test_smartClientOnStaleMap(self) -> None:
        """
        A smart client whose map is older than the nodes' still gets its
        call answered, by the new owner.
        """
        client = self.cluster.client("n1", smart=True)
        self.cluster.setMap(self.moved)
        assert isinstance(client, ClusterClient)
        self.assertEqual(client.shardMap.version, self.moved.version - 1)  # type: ignore[union-attr]
        d = deliver(client, self.user)
        self.cluster.flush()
        self.assertIn("messageID", self.successResultOf(d))
        self.assertTrue(_holds(self.directory.child("n3"), storeNameForKey(self.user)))

    def test_smartClientRefreshesPeriodically(self) -> None:
        """
        A smart client fetches the map again every C{refreshInterval}
        seconds, so it learns of a move even when its calls still succeed.
        """
        client = self.cluster.client("n1", smart=True)
        assert isinstance(client, ClusterClient)
        self.cluster.setMap(self.moved)
        self.assertNotEqual(client.shardMap, self.moved)
        self.cluster.advance(DEFAULT_REFRESH_INTERVAL)
        self.assertEqual(client.shardMap, self.moved)

    def test_smartClientDropsDepartedNodes(self) -> None:
        """
        When a node leaves the map, the smart client moves its calls to the
        new owners and stops connecting to it.
        """
        client = self.cluster.client("n1", smart=True)
        assert isinstance(client, ClusterClient)
        n3user = next(u for u in (f"user{i}" for i in range(200)) if self.cluster.ownerOf(u) == "n3")
        d = deliver(client, n3user)
        self.cluster.flush()
        self.successResultOf(d)
        self.assertIn("n3", client._owners)
        current = self.cluster.nodes["n1"].topology.currentMap()
        moved = reassign(current, current.slotsOf("n3"), "n2")
        nodes = {n: a for n, a in moved.nodes.items() if n != "n3"}
        self.cluster.setMap(ShardMap(moved.owners, nodes, moved.version))
        self.cluster.advance(DEFAULT_REFRESH_INTERVAL)
        self.assertNotIn("n3", client._owners)
        d = client.callRemote(Stats, user=n3user)
        self.cluster.flush()
        self.assertEqual(self.successResultOf(d)["total"], 0)

    def test_smartClientRefreshesOnNotOwner(self) -> None:
        """
        A smart client told L{NotOwner} (here by a node that forwards
        nothing) fetches the new map and sends the call to the new owner.
        """
        client = self.cluster.client("n1", smart=True)
        self.cluster.setMap(self.moved)
        self.cluster.nodes["n2"].server.forward = None
        d = deliver(client, self.user)
        self.cluster.flush()
        self.assertIn("messageID", self.successResultOf(d))
        assert isinstance(client, ClusterClient)
        self.assertEqual(client.shardMap, self.moved)


_slowClock: list[IReactorTime] = []


class Slow(UserCommand):
    """
    Answer one second later (on the harness's clock).
    """

    arguments: list[Any] = []
    response = [(b"done", amp.Integer())]


class Slowpoke(Item):
    """
    A powerup whose responder returns a Deferred, so its calls stay
    outstanding for a while.
    """

    typeName = "tests_routing_slowpoke"
    schemaVersion = 1

    calls = integer(default=0, allowNone=False)

    @Slow.responder
    def slow(self) -> Deferred[dict[str, int]]:
        self.calls += 1
        return deferLater(_slowClock[0], 1.0, lambda: {"done": 1})


slowApplication = Application("slow", powerups=[Slowpoke], commands=[Slow])


class PeerLimitTests(SynchronousTestCase):
    """
    One peer link carries the forwarded calls of many clients.
    """

    def test_linkStaysWithinPeerLimit(self) -> None:
        """
        More forwarded calls than one connection may have outstanding on the
        owner all succeed: the link holds the excess instead of having it
        refused as C{Overloaded}.
        """
        cluster = SimulatedCluster(
            slowApplication,
            FilePath(self.mktemp()),
            nodes=2,
            slots=16,
            limits=ServerLimits(maxOutstanding=4),
        )
        _slowClock[:] = [cluster.reactor]
        cluster.start()
        users = [u for u in (f"u{i}" for i in range(200)) if cluster.ownerOf(u) == "n2"][:12]
        clients = [cluster.client("n1") for _ in range(3)]
        calls = [clients[i % 3].callRemote(Slow, user=user) for i, user in enumerate(users)]
        cluster.flush()
        cluster.advance(3.0)
        for d in calls:
            self.assertEqual(self.successResultOf(d), {"done": 1})
        cluster.stop()
        self.assertEqual(cluster.reactor.getDelayedCalls(), [])


class SmartClientTests(SynchronousTestCase):
    """
    Tests for L{ClusterClient} against real nodes.
    """

    def setUp(self) -> None:
        self.directory = FilePath(self.mktemp())
        self.cluster = SimulatedCluster(application, self.directory, nodes=3, slots=64)
        self.cluster.start()
        self.addCleanup(self.stopCluster)
        self.users = [f"user{i}@example.com" for i in range(30)]

    def stopCluster(self) -> None:
        self.cluster.restore("client")
        self.cluster.stop()
        self.assertEqual(self.cluster.reactor.getDelayedCalls(), [])

    def test_importableFromClient(self) -> None:
        """
        The smart client is importable from L{fractal.client} too.
        """
        from fractal import client

        self.assertIs(client.ClusterClient, ClusterClient)
        self.assertIn("connectCluster", client.__all__)

    def test_learnsMap(self) -> None:
        """
        The client fetches the shard map from its seed node.
        """
        client = self.cluster.client("n2", smart=True)
        assert isinstance(client, ClusterClient)
        self.assertEqual(client.shardMap, self.cluster.nodes["n1"].topology.currentMap())

    def test_callsOwnersDirectly(self) -> None:
        """
        With the map known, each call goes straight to its owner: with every
        link between nodes stalled, all calls are still answered.
        """
        client = self.cluster.client("n1", smart=True)
        for a, b in [("n1", "n2"), ("n1", "n3"), ("n2", "n3")]:
            self.cluster.hold(a, b)
        calls = [deliver(client, user) for user in self.users]
        self.cluster.flush()
        for d in calls:
            self.assertIn("messageID", self.successResultOf(d))
        for a, b in [("n1", "n2"), ("n1", "n3"), ("n2", "n3")]:
            self.cluster.restore(a, b)

    def test_notOwnerRefreshesAndRetries(self) -> None:
        """
        A call sent on a stale map to a node that answers L{NotOwner} makes
        the client fetch the map again and send the call to the real owner.
        """
        client = self.cluster.client("n1", smart=True)
        assert isinstance(client, ClusterClient)
        real = client.shardMap
        assert real is not None
        client.shardMap = ShardMap(
            owners=(SlotOwner("n2", 1),) * real.slots, nodes=real.nodes, version=0
        )
        # n2 forwards nothing, so it answers NotOwner for other nodes' users.
        self.cluster.nodes["n2"].server.forward = None
        user = next(u for u in self.users if self.cluster.ownerOf(u) == "n3")
        d = deliver(client, user)
        self.cluster.flush()
        self.assertIn("messageID", self.successResultOf(d))
        self.assertEqual(client.shardMap, real)
        stats = client.callRemote(Stats, user=user)
        self.cluster.flush()
        self.assertEqual(self.successResultOf(stats)["total"], 1)

    def test_seedDown(self) -> None:
        """
        Given several seed nodes, the client learns the map from the first
        that answers, and serves every user whose owner is alive.
        """
        self.cluster.kill("n1")
        client = self.cluster.client(["n1", "n2"], smart=True)
        assert isinstance(client, ClusterClient)
        self.assertEqual(client.shardMap, self.cluster.nodes["n2"].topology.currentMap())
        users = [u for u in self.users if self.cluster.ownerOf(u) != "n1"]
        calls = [deliver(client, u) for u in users]
        self.cluster.flush()
        for d in calls:
            self.assertIn("messageID", self.successResultOf(d))
        self.cluster.restore("n1")

    def test_fallsBackToAnyNode(self) -> None:
        """
        When the client cannot reach a user's owner, the call goes, after
        C{fallbackAfter}, to another node, which forwards it.
        """
        client = self.cluster.client("n1", smart=True)
        user = next(u for u in self.users if self.cluster.ownerOf(u) == "n2")
        self.cluster.cut("client", "n2")
        d = deliver(client, user)
        self.cluster.flush()
        self.assertNoResult(d)
        self.cluster.advance(1.0)
        self.assertIn("messageID", self.successResultOf(d))

"""
Tests for routing a call again while its slot changes hands
(L{fractal.server.NodeProtocol._reroute}): a call that reaches an owner that
does not run it (it stopped accepting the slot, or is stopping, or no longer
owns it) is routed again by the node that forwarded it, once that node's map
changes, within L{fractal.server.RerouteLimits}; the client sees the answer,
not the refusal.  Deterministic: real nodes over a simulated network with one
clock (L{fractal.testing.SimulatedCluster}).
"""

from __future__ import annotations

from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from examples.mailbox import Deliver, Stats, application
from fractal.durable._threads import runSynchronously
from fractal.durable.shipper import Shipper
from fractal.keys import slotForKey, storeNameForKey
from fractal.pool import StorePool
from fractal.protocol import NotOwner, OwnerUnavailable
from fractal.routing.interfaces import ShardMap, SlotOwner
from fractal.routing.topology import ManualTopology, reassign
from fractal.server import FractalServer, RerouteLimits
from fractal.testing import MemoryDurableBackend, SimulatedCluster
from tests.test_server import AddNote, ServerTestNotebook, _twoNodes, callRemote
from tests.test_server import application as notesApplication


def deliver(client: Any, user: str) -> Any:
    return client.callRemote(Deliver, user=user, sender="bob", subject="hi", body="text")


def _holds(dataDir: FilePath[str], name: str) -> bool:
    return dataDir.child("stores").child(name[:2]).child(name).child("db.sqlite").exists()


class RerouteTests(SynchronousTestCase):
    """
    A slot of n2 moves to n3 while n1 forwards calls for it.
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
        self.before = self.cluster.nodes["n1"].topology.currentMap()
        slot = self.cluster.slotOf(self.user)
        self.moved = evolve(reassign(self.before, [slot], "n3"), version=self.before.version + 2)
        # What the old owner shows while it hands the slot off: the target
        # as the owner, at the current epoch (calls go there; the slot has
        # not moved yet, so the target refuses them).
        owners = list(self.before.owners)
        owners[slot] = type(owners[slot])("n3", owners[slot].epoch)
        self.handingOff = ShardMap(
            owners=tuple(owners), nodes=self.before.nodes, version=self.before.version + 1
        )

    def outcome(self, d: Any) -> list[Any]:
        """
        Collect the outcome of call C{d} (AMP drops the connection on an
        error nobody handles when it arrives).
        """
        results: list[Any] = []
        d.addBoth(results.append)
        return results

    def stopCluster(self) -> None:
        self.cluster.stop()
        self.assertEqual(self.cluster.reactor.getDelayedCalls(), [])

    def total(self, node: str) -> int:
        d = self.cluster.client(node).callRemote(Stats, user=self.user)
        self.cluster.flush()
        result: int = self.successResultOf(d)["total"]
        return result

    def test_retriedAcrossHandoff(self) -> None:
        """
        While the old owner (n2) has stopped accepting the slot and the new
        owner (n3) does not own it yet, a call sent to n1 is refused by both
        (L{NotOwner}) without running; n1 keeps it, and once the handoff is
        done and n1's map changes, routes it to n3, where it runs once.  The
        client gets the answer, no error.
        """
        self.cluster.setMap(self.handingOff, nodes=["n2"])
        d = deliver(self.cluster.client("n1"), self.user)
        self.cluster.flush()
        for _ in range(4):
            self.cluster.advance(0.1)
        self.assertNoResult(d)
        rerouted = self.cluster.nodes["n1"].server.callsRerouted
        self.assertGreater(rerouted, 1)
        self.cluster.setMap(self.moved)
        self.cluster.advance(0)
        self.assertIn("messageID", self.successResultOf(d))
        name = storeNameForKey(self.user)
        self.assertTrue(_holds(self.directory.child("n3"), name))
        self.assertFalse(_holds(self.directory.child("n2"), name))
        self.assertEqual(self.total("n3"), 1)

    def test_stoppingOwnerRetried(self) -> None:
        """
        An owner that stopped accepting calls because it is stopping answers
        L{fractal.protocol.NodeStopping}; the forwarding node routes the call
        again, to the new owner once the map says so.
        """
        self.cluster.nodes["n2"].server.stopAccepting()
        d = deliver(self.cluster.client("n1"), self.user)
        self.cluster.flush()
        self.cluster.advance(0.2)
        self.assertNoResult(d)
        self.cluster.setMap(self.moved)
        self.cluster.advance(0)
        self.assertIn("messageID", self.successResultOf(d))
        self.assertEqual(self.total("n3"), 1)
        self.cluster.nodes["n2"].server._stopping = False

    def test_localOwnerAfterMove(self) -> None:
        """
        When the slot moves to the forwarding node itself, the call it was
        routing again runs there.
        """
        toN1 = evolve(
            reassign(self.before, [self.cluster.slotOf(self.user)], "n1"),
            version=self.before.version + 2,
        )
        self.cluster.setMap(toN1, nodes=["n2"])
        d = deliver(self.cluster.client("n1"), self.user)
        self.cluster.flush()
        self.assertNoResult(d)
        self.cluster.setMap(toN1, nodes=["n1", "n3"])
        self.cluster.advance(0)
        self.assertIn("messageID", self.successResultOf(d))
        self.assertTrue(_holds(self.directory.child("n1"), storeNameForKey(self.user)))
        self.assertEqual(self.total("n1"), 1)

    def test_boundedThenClearError(self) -> None:
        """
        A slot that stays in the middle of a handoff gets a call routed again
        at most L{RerouteLimits.attempts} times within
        L{RerouteLimits.within} seconds; then the client is answered
        L{OwnerUnavailable} saying that the slot is changing hands and the
        call did not run.  It ran nowhere.
        """
        limits = RerouteLimits()
        self.cluster.setMap(self.handingOff, nodes=["n2"])
        results = self.outcome(deliver(self.cluster.client("n1"), self.user))
        self.cluster.flush()
        self.cluster.advance(limits.within - 0.1)
        self.assertEqual(results, [])
        self.cluster.advance(0.2)
        [failure] = results
        assert isinstance(failure, Failure)
        self.assertTrue(failure.check(OwnerUnavailable))
        message = failure.getErrorMessage()
        self.assertIn("changing hands", message)
        self.assertIn("did not run", message)
        self.assertLessEqual(self.cluster.nodes["n1"].server.callsRerouted, limits.attempts)
        for node in ["n1", "n2", "n3"]:
            self.assertFalse(_holds(self.directory.child(node), storeNameForKey(self.user)))

    def test_attemptsBounded(self) -> None:
        """
        With few attempts allowed, the call is answered after that many,
        before the time limit.
        """
        server = self.cluster.nodes["n1"].server
        server.reroute = RerouteLimits(attempts=2, within=60.0, delay=0.5, maxDelay=0.5)
        self.cluster.setMap(self.handingOff, nodes=["n2"])
        results = self.outcome(deliver(self.cluster.client("n1"), self.user))
        self.cluster.flush()
        self.cluster.advance(0.5)
        self.assertEqual(results, [])
        self.cluster.advance(0.5)
        [failure] = results
        assert isinstance(failure, Failure)
        self.assertTrue(failure.check(OwnerUnavailable))
        self.assertIn("3 attempts", failure.getErrorMessage())
        self.assertEqual(server.callsRerouted, 2)

    def test_peerConnectionsDoNotReroute(self) -> None:
        """
        A node answers calls that reached it over its peer listener (already
        forwarded once) with L{fractal.protocol.NotOwner}, at once, rather
        than holding them: the node that forwarded them routes again.
        """
        self.cluster.setMap(self.handingOff, nodes=["n2"])
        deliver(self.cluster.client("n1"), self.user)
        self.cluster.flush()
        self.assertEqual(self.cluster.nodes["n2"].server.callsRerouted, 0)
        self.assertEqual(self.cluster.nodes["n2"].server.inFlight, 0)
        self.assertEqual(self.cluster.nodes["n3"].server.inFlight, 0)
        self.cluster.setMap(self.moved)
        self.cluster.advance(0)


class SlotLeftWhileOpeningTests(SynchronousTestCase):
    """
    A call whose store is still being opened when its slot leaves the node
    (the slot is handed off meanwhile, its stores closed and shipped) does
    not run here: it is routed to the new owner.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.queued: list[tuple[Any, Deferred[Any]]] = []
        self.backend = MemoryDurableBackend()
        dataDir = FilePath(self.mktemp())
        self.shipper = Shipper(
            self.backend, self.clock, runInThread=self.later,
            storesDirectory=dataDir.child("stores"),
        )
        self.pool = StorePool(
            self.clock, dataDir, prepare=notesApplication.installOn, shipper=self.shipper
        )
        static = _twoNodes().currentMap()
        self.topology = ManualTopology("n1", static)
        self.key = next(
            k for k in (f"user{i}" for i in range(1000)) if static.ownerOfKey(k).node == "n1"
        )
        self.forwarded: list[tuple[amp.AmpBox, SlotOwner]] = []
        self.server = FractalServer(
            notesApplication, self.pool, self.topology, forward=self.forward, clock=self.clock
        )

    def later(self, f: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queued.append((f, d))
        return d

    def runQueued(self) -> None:
        while self.queued:
            f, d = self.queued.pop(0)
            d.callback(f())

    def forward(self, box: amp.AmpBox, owner: SlotOwner, key: str) -> Deferred[amp.AmpBox]:
        self.forwarded.append((box, owner))
        answer = amp.AmpBox(noteID=b"99")
        answer[b"_answer"] = box[b"_ask"]
        return succeed(answer)

    def callWhileOpening(self) -> tuple[Deferred[Any], iosim.IOPump]:
        """
        Call C{AddNote} for the user, whose store must be restored from
        durable storage (so opening it waits), and give the user's slot to n2
        while it opens.

        @return: the call and the pump of its connection.
        """
        lease = self.successResultOf(self.pool.acquire(self.key))
        lease.release()
        slot = slotForKey(self.key, self.topology.currentMap().slots)
        self.pool.closeStoresOf([slot], self.topology.currentMap().slots)
        self.runQueued()
        self.pool.pathForKey(self.key).remove()
        client, _, pump = iosim.connectedServerAndClient(
            lambda: self.server.buildProtocol(None), amp.AMP, clock=self.clock
        )
        call = callRemote(client, AddNote, user=self.key, body="hi")
        pump.flush()
        self.assertNoResult(call)
        self.assertTrue(self.queued)
        self.topology.setMap(reassign(self.topology.currentMap(), [slot], "n2"))
        self.runQueued()
        pump.flush()
        return call, pump

    def test_routedToNewOwner(self) -> None:
        """
        The store is restored from durable storage (so opening it waits);
        the map gives the slot to n2 meanwhile; once the store is open the
        call is not run here but forwarded to n2, and its answer relayed.
        """
        call, pump = self.callWhileOpening()
        self.assertEqual(self.forwarded, [])
        self.clock.advance(RerouteLimits().delay)
        pump.flush()
        self.assertEqual(self.successResultOf(call), {"noteID": 99})
        [(box, owner)] = self.forwarded
        self.assertEqual((owner.node, box[b"body"]), ("n2", b"hi"))
        store = self.successResultOf(self.pool.openStore(self.key))
        self.assertEqual(store.findUnique(ServerTestNotebook).added, 0)
        self.runQueued()
        self.pool.close()
        self.runQueued()


    def test_noForwarderAnsweredAtOnce(self) -> None:
        """
        A node that forwards nothing (no peers) does not route the call
        again, clock or not: it answers it at once with L{NotOwner}, without
        running it, and leaves no timer behind.
        """
        self.server.forward = None
        call, _ = self.callWhileOpening()
        self.failureResultOf(call, NotOwner)
        self.assertEqual(self.server.callsRerouted, 0)
        store = self.successResultOf(self.pool.openStore(self.key))
        self.assertEqual(store.findUnique(ServerTestNotebook).added, 0)
        self.runQueued()
        self.pool.close()
        self.runQueued()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FencedMidCallTests(SynchronousTestCase):
    """
    A durable call whose write is refused for a stale epoch (another node
    took the slot during the call) acknowledges nothing: it is routed to
    the new owner once the map says so.
    """

    def test_fencedDurableCallRoutedAgain(self) -> None:
        """
        The store's chain is fenced at a newer epoch; a durable call that
        commits here is not acknowledged, and once the map gives the slot to
        n2 the call is forwarded there and n2's answer relayed; a client
        connected over the peer listener is answered L{OwnerUnavailable}
        instead, for the node that forwarded it to route again.
        """
        from tests.test_durable_node import AddDurably
        from tests.test_durable_node import application as counterApplication

        clock = Clock()
        backend = MemoryDurableBackend()
        dataDir = FilePath(self.mktemp())
        shipper = Shipper(
            backend, clock, runInThread=runSynchronously,
            storesDirectory=dataDir.child("stores"),
        )
        pool = StorePool(clock, dataDir, prepare=counterApplication.installOn, shipper=shipper)
        self.addCleanup(pool.close)
        static = _twoNodes().currentMap()
        topology = ManualTopology("n1", static)
        key = next(
            k for k in (f"user{i}" for i in range(1000)) if static.ownerOfKey(k).node == "n1"
        )
        forwarded: list[SlotOwner] = []

        def forward(box: amp.AmpBox, owner: SlotOwner, key: str) -> Deferred[amp.AmpBox]:
            forwarded.append(owner)
            answer = amp.AmpBox(value=b"42")
            answer[b"_answer"] = box[b"_ask"]
            return succeed(answer)

        server = FractalServer(
            counterApplication, pool, topology, shipper, forward=forward, clock=clock
        )
        client, _, pump = iosim.connectedServerAndClient(
            lambda: server.buildProtocol(None), amp.AMP, clock=clock
        )
        first = callRemote(client, AddDurably, user=key, amount=1)
        pump.flush()
        self.assertEqual(self.successResultOf(first), {"value": 1})
        self.successResultOf(backend.fence(storeNameForKey(key), 99))
        fenced = callRemote(client, AddDurably, user=key, amount=1)
        pump.flush()
        clock.advance(0)
        pump.flush()
        self.assertNoResult(fenced)
        self.assertEqual(forwarded, [])
        slot = slotForKey(key, static.slots)
        topology.setMap(reassign(topology.currentMap(), [slot], "n2"))
        clock.advance(0)
        pump.flush()
        self.assertEqual(self.successResultOf(fenced), {"value": 42})
        self.assertEqual([owner.node for owner in forwarded], ["n2"])

        # Forwarded to this node (peer listener): answered, not held.
        topology.setMap(reassign(topology.currentMap(), [slot], "n1"))
        peer, _, peerPump = iosim.connectedServerAndClient(
            lambda: server.peerFactory().buildProtocol(None), amp.AMP, clock=clock
        )
        results: list[Any] = []
        callRemote(peer, AddDurably, user=key, amount=1).addBoth(results.append)
        peerPump.flush()
        clock.advance(0)
        peerPump.flush()
        [failure] = results
        assert isinstance(failure, Failure)
        self.assertTrue(failure.check(OwnerUnavailable))
        self.assertIn("nothing was acknowledged", failure.getErrorMessage())
        self.flushLoggedErrors()


class StoppingNodeConnectionsTests(SynchronousTestCase):
    """
    A stopping node closes its clients' connections before its peers'.
    """

    def test_peersClosedLast(self) -> None:
        """
        L{FractalServer.disconnectAll} with C{peers=False} closes the client
        listener's connections and keeps the peer listener's, so calls that
        peers forward while the node hands its slots off are answered
        L{fractal.protocol.NodeStopping} (and routed again) instead of being
        lost with the connection; without it, it closes them all.
        """
        clock = Clock()
        pool = StorePool(clock, FilePath(self.mktemp()), prepare=notesApplication.installOn)
        server = FractalServer(notesApplication, pool, ManualTopology("n1", _twoNodes().currentMap()))
        client = server.factory().buildProtocol(None)
        peer = server.peerFactory().buildProtocol(None)
        transports = [StringTransport(), StringTransport()]
        client.makeConnection(transports[0])
        peer.makeConnection(transports[1])
        server.stopAccepting()
        server.disconnectAll(peers=False)
        self.assertEqual([t.disconnecting for t in transports], [True, False])
        server.disconnectAll()
        self.assertEqual([t.disconnecting for t in transports], [True, True])

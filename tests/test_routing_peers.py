"""
Tests for L{fractal.routing.peers}: forwarding raw boxes over peer links,
over a L{SimulatedNetwork} with one clock.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from fractal.protocol import CallNotSent, NodeStopping, OwnerUnavailable, PeerStopped
from fractal.routing.interfaces import NodeAddress, ShardMap
from fractal.routing.peers import PeerLink, PeerLinks
from fractal.routing.simulation import SimulatedNetwork
from fractal.routing.topology import ManualTopology, StaticTopology, reassign


class Refused(Exception):
    pass


class Echo(amp.Command):
    arguments = [(b"user", amp.Unicode()), (b"text", amp.Unicode())]
    response = [(b"text", amp.Unicode()), (b"node", amp.Unicode())]
    errors = {Refused: b"REFUSED", NodeStopping: b"NODE_STOPPING"}


class _EchoServer(amp.AMP):
    def __init__(self, node: str, seen: list[amp.AmpBox]) -> None:
        amp.AMP.__init__(self)
        self.node = node
        self.seen = seen

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        self.seen.append(amp.AmpBox(box))
        amp.AMP.ampBoxReceived(self, box)

    @Echo.responder
    def echo(self, user: str, text: str) -> dict[str, str]:
        if text == "refuse":
            raise Refused("no")
        if text == "stopping":
            raise NodeStopping("the node is stopping; call again")
        return {"text": text.upper(), "node": self.node}


def callBox(tag: bytes, text: str = "hi", user: str = "alice") -> amp.AmpBox:
    """
    The box a client sends for L{Echo}.
    """
    box = Echo.makeArguments({"user": user, "text": text}, None)
    box[b"_command"] = b"Echo"
    box[b"_ask"] = tag
    return box


class PeerLinkTests(SynchronousTestCase):
    """
    Tests for L{PeerLink}.
    """

    def setUp(self) -> None:
        self.network = SimulatedNetwork()
        self.clock = self.network.clock
        self.seen: list[amp.AmpBox] = []
        self.stopListening = self.network.listen(
            "n2", "n2/peer", Factory.forProtocol(lambda: _EchoServer("n2", self.seen))
        )
        self.link = PeerLink(
            self.clock,
            "n2",
            self.network.endpoint("n1", "n2/peer"),
            callTimeout=5,
            connectTimeout=2,
            retryPolicy=lambda attempt: 1.0,
        )

    def start(self) -> None:
        self.link.service.startService()
        self.network.flush()
        self.addCleanup(self.stop)

    def stop(self) -> None:
        self.link.stop()
        self.link.service.stopService()
        self.network.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_relaysAnswerUnchanged(self) -> None:
        """
        The box reaches the owner with only its C{_ask} tag swapped, and the
        answer box comes back unchanged but for the caller's own tag.
        """
        self.start()
        d = self.link.forward(callBox(b"77"))
        self.network.flush()
        answer = self.successResultOf(d)
        self.assertEqual(answer, {b"_answer": b"77", b"text": b"HI", b"node": b"n2"})
        [received] = self.seen
        self.assertEqual(
            {k: v for k, v in received.items() if k != b"_ask"},
            {k: v for k, v in callBox(b"77").items() if k != b"_ask"},
        )

    def test_relaysErrorUnchanged(self) -> None:
        """
        An error box from the owner is relayed as it came, with the caller's
        tag.
        """
        self.start()
        d = self.link.forward(callBox(b"9", text="refuse"))
        self.network.flush()
        answer = self.successResultOf(d)
        self.assertEqual(answer[b"_error"], b"9")
        self.assertEqual(answer[b"_error_code"], b"REFUSED")

    def test_manyOutstanding(self) -> None:
        """
        Many calls may be outstanding on one link at once; each gets its own
        answer, even when callers reuse the same tag.
        """
        self.start()
        ds = [self.link.forward(callBox(b"1", text=f"t{i}")) for i in range(20)]
        self.network.flush()
        self.assertEqual(
            [self.successResultOf(d)[b"text"] for d in ds],
            [f"T{i}".encode() for i in range(20)],
        )

    def test_boundedInFlight(self) -> None:
        """
        At most C{maxInFlight} calls are in flight on a link; the others
        wait, in order, and go as answers come back.
        """
        link = PeerLink(
            self.clock,
            "n2",
            self.network.endpoint("n1", "n2/peer"),
            callTimeout=5,
            maxInFlight=2,
            retryPolicy=lambda attempt: 1.0,
        )
        link.service.startService()
        self.network.flush()
        self.network.hold("n2")
        ds = [link.forward(callBox(b"1", text=f"t{i}")) for i in range(5)]
        self.network.restore("n2")
        self.assertEqual(
            [self.successResultOf(d)[b"text"] for d in ds], [b"T0", b"T1", b"T2", b"T3", b"T4"]
        )
        self.assertEqual(len(self.seen), 5)
        self.network.hold("n2")
        ds = [link.forward(callBox(b"1")) for i in range(3)]
        self.network.advance(5)
        for d in ds:
            self.failureResultOf(d, OwnerUnavailable)
        self.network.restore("n2")
        link.stop()
        link.service.stopService()
        self.network.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_noAnswerWanted(self) -> None:
        """
        A box with no C{_ask} is sent and nothing is waited for.
        """
        self.start()
        box = callBox(b"1")
        del box[b"_ask"]
        self.assertIsNone(self.successResultOf(self.link.forward(box)))
        self.network.flush()
        self.assertEqual(len(self.seen), 1)

    def test_ownerNotStartedYet(self) -> None:
        """
        A peer that has never been reachable may simply not have started:
        a call waits for the connect timeout at most, then fails with
        L{OwnerUnavailable}; once the peer listens, calls go through after
        the retry delay.
        """
        self.stopListening()
        self.start()
        d = self.link.forward(callBox(b"1"))
        self.network.advance(1.9)
        self.assertNoResult(d)
        self.network.advance(0.1)
        failure = self.failureResultOf(d, OwnerUnavailable)
        self.assertIn("'n2'", str(failure.value))
        self.assertIn("not connected within 2 s", str(failure.value))
        d = self.link.forward(callBox(b"2"))
        self.network.listen(
            "n2", "n2/peer", Factory.forProtocol(lambda: _EchoServer("n2", self.seen))
        )
        self.network.advance(1.0)
        self.assertTrue(self.link.connected)
        self.assertEqual(self.successResultOf(d)[b"_answer"], b"2")

    def test_ownerDied(self) -> None:
        """
        Once a peer that was up cannot be reached, calls fail at once with
        L{OwnerUnavailable} saying why, until the link comes back.
        """
        self.start()
        self.network.cut("n2")
        self.network.advance(1.0)
        failure = self.failureResultOf(self.link.forward(callBox(b"1")), OwnerUnavailable)
        self.assertIn("cannot connect", str(failure.value))
        # It was never sent: the forwarding node may route it again.
        self.assertIsInstance(failure.value, CallNotSent)
        self.network.restore("n2")
        self.network.advance(1.0)
        d = self.link.forward(callBox(b"2"))
        self.network.flush()
        self.assertEqual(self.successResultOf(d)[b"_answer"], b"2")

    def test_waitsForConnection(self) -> None:
        """
        A call made while the link is still connecting waits for the
        connection, then goes through.
        """
        d = self.link.forward(callBox(b"3"))
        self.assertNoResult(d)
        self.start()
        self.assertEqual(self.successResultOf(d)[b"_answer"], b"3")

    def test_connectTimeout(self) -> None:
        """
        A call waiting for a connection that does not come fails with
        L{OwnerUnavailable} after the connect timeout.
        """
        d = self.link.forward(callBox(b"3"))
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, OwnerUnavailable)
        self.assertIn("not connected within 2 s", str(failure.value))
        self.assertIsInstance(failure.value, CallNotSent)

    def test_hungOwner(self) -> None:
        """
        An owner that stops answering (a stopped process) makes its calls
        fail with L{OwnerUnavailable} after the call timeout; a late answer
        is dropped.
        """
        self.start()
        self.network.hold("n2")
        d = self.link.forward(callBox(b"5"))
        self.network.advance(4.9)
        self.assertNoResult(d)
        self.network.advance(0.1)
        failure = self.failureResultOf(d, OwnerUnavailable)
        self.assertIn("no answer within 5 s", str(failure.value))
        # It was sent, and may have run: not to be sent again.
        self.assertNotIsInstance(failure.value, CallNotSent)
        self.network.restore("n2")
        self.assertEqual(len(self.seen), 1)
        d = self.link.forward(callBox(b"6"))
        self.network.flush()
        self.assertEqual(self.successResultOf(d)[b"_answer"], b"6")

    def test_connectionLost(self) -> None:
        """
        Calls in flight when the connection drops fail at once with
        L{OwnerUnavailable}; the link reconnects after its retry delay.
        """
        self.start()
        self.network.hold("n2")
        d = self.link.forward(callBox(b"5"))
        self.network.cut("n2")
        failure = self.failureResultOf(d, OwnerUnavailable)
        self.assertIn("connection lost", str(failure.value))
        self.assertNotIsInstance(failure.value, CallNotSent)
        self.failureResultOf(self.link.forward(callBox(b"6")), CallNotSent)
        self.network.restore("n2")
        self.network.advance(1.0)
        d = self.link.forward(callBox(b"7"))
        self.network.flush()
        self.assertEqual(self.successResultOf(d)[b"_answer"], b"7")


    def test_peerStopping(self) -> None:
        """
        Once the peer has answered a call L{NodeStopping}, the calls it
        leaves unanswered when it closes the connection, and those made
        until the link is up again, fail with L{PeerStopped} (a
        L{CallNotSent}: a node stopping gracefully answers every call it
        accepted before it closes); after it reconnects, calls go through.
        """
        self.start()
        stopping = self.link.forward(callBox(b"1", "stopping"))
        self.network.flush()
        refused = self.successResultOf(stopping)
        self.assertEqual(refused[b"_error_code"], b"NODE_STOPPING")
        self.network.hold("n2")
        unanswered = self.link.forward(callBox(b"2"))
        self.network.cut("n2")
        self.assertIsInstance(self.failureResultOf(unanswered, OwnerUnavailable).value, PeerStopped)
        self.failureResultOf(self.link.forward(callBox(b"3")), PeerStopped)
        self.network.advance(1.0)
        self.failureResultOf(self.link.forward(callBox(b"4")), PeerStopped)
        self.network.restore("n2")
        self.network.advance(1.0)
        d = self.link.forward(callBox(b"5"))
        self.network.flush()
        self.assertEqual(self.successResultOf(d)[b"_answer"], b"5")
        self.network.hold("n2")
        lost = self.link.forward(callBox(b"6"))
        self.network.cut("n2")
        failure = self.failureResultOf(lost, OwnerUnavailable)
        self.assertNotIsInstance(failure.value, CallNotSent)


class PeerLinksTests(SynchronousTestCase):
    """
    Tests for L{PeerLinks}.
    """

    def setUp(self) -> None:
        self.network = SimulatedNetwork()
        nodes = [NodeAddress(n, f"{n}/client", f"{n}/peer") for n in ["n1", "n2", "n3"]]
        self.topology = StaticTopology("n1", nodes, slots=16)
        self.seen: dict[str, list[amp.AmpBox]] = {"n2": [], "n3": []}
        for node in ["n2", "n3"]:
            self.network.listen(
                node,
                f"{node}/peer",
                Factory.forProtocol(lambda node=node: _EchoServer(node, self.seen[node])),
            )
        self.links = PeerLinks(
            self.network.clock,
            self.topology,
            lambda address: self.network.endpoint("n1", str(address.peer)),
            callTimeout=5,
            retryPolicy=lambda attempt: 1.0,
        )
        self.links.startService()
        self.network.flush()

    def tearDown(self) -> None:
        self.links.stopService()
        self.network.flush()
        self.assertEqual(self.network.clock.getDelayedCalls(), [])

    def test_linksToEveryOtherNode(self) -> None:
        """
        There is a link to every node but the local one.
        """
        self.assertIsNone(self.links.link("n1"))
        self.assertTrue(self.links.link("n2").connected)  # type: ignore[union-attr]
        self.assertTrue(self.links.link("n3").connected)  # type: ignore[union-attr]

    def test_forwardToOwner(self) -> None:
        """
        L{PeerLinks.forward} sends the box to the named node.
        """
        d2 = self.links.forward("n2", callBox(b"1"))
        d3 = self.links.forward("n3", callBox(b"1"))
        self.network.flush()
        self.assertEqual(self.successResultOf(d2)[b"node"], b"n2")
        self.assertEqual(self.successResultOf(d3)[b"node"], b"n3")

    def test_unknownNode(self) -> None:
        """
        Forwarding to a node with no link fails with L{OwnerUnavailable}.
        """
        self.failureResultOf(self.links.forward("n9", callBox(b"1")), CallNotSent)

    def test_oneDeadOwnerDoesNotStopOthers(self) -> None:
        """
        While one owner is dead, calls for it fail fast and calls for the
        other owner carry on.
        """
        self.network.cut("n2")
        self.failureResultOf(self.links.forward("n2", callBox(b"1")), OwnerUnavailable)
        d = self.links.forward("n3", callBox(b"2"))
        self.network.flush()
        self.assertEqual(self.successResultOf(d)[b"node"], b"n3")

    def test_stopFailsWaitingCalls(self) -> None:
        """
        Stopping the links fails the calls still waiting with
        L{OwnerUnavailable} and leaves no timer behind.
        """
        self.network.hold("n2")
        d = self.links.forward("n2", callBox(b"1"))
        self.links.stopService()
        self.failureResultOf(d, OwnerUnavailable)
        self.links.startService()
        self.network.restore("n2")


class PeerLinksMapChangeTests(SynchronousTestCase):
    """
    L{PeerLinks} follows a changing topology: links to new members, none to
    departed ones.
    """

    def setUp(self) -> None:
        self.network = SimulatedNetwork()
        self.addresses = {
            n: NodeAddress(n, f"{n}/client", f"{n}/peer") for n in ["n1", "n2", "n3", "n4"]
        }
        self.topology = ManualTopology.fromNodes(
            "n1", [self.addresses[n] for n in ["n1", "n2", "n3"]], slots=16
        )
        for node in ["n2", "n3", "n4"]:
            self.network.listen(
                node, f"{node}/peer", Factory.forProtocol(lambda node=node: _EchoServer(node, []))
            )
        self.links = PeerLinks(
            self.network.clock,
            self.topology,
            lambda address: self.network.endpoint("n1", str(address.peer)),
            retryPolicy=lambda attempt: 1.0,
        )
        self.links.startService()
        self.network.flush()

    def tearDown(self) -> None:
        self.links.stopService()
        self.network.flush()
        self.assertEqual(self.network.clock.getDelayedCalls(), [])

    def test_newMember(self) -> None:
        """
        A node that joins the map gets a link, which connects at once.
        """
        self.assertIsNone(self.links.link("n4"))
        current = self.topology.currentMap()
        self.topology.setMap(reassign(current, [0, 1], "n4", self.addresses["n4"]))
        self.network.flush()
        self.assertTrue(self.links.link("n4").connected)  # type: ignore[union-attr]
        d = self.links.forward("n4", callBox(b"1"))
        self.network.flush()
        self.assertEqual(self.successResultOf(d)[b"node"], b"n4")

    def test_departedMember(self) -> None:
        """
        A node that leaves the map loses its link: calls waiting on it fail
        with L{OwnerUnavailable}, and later calls find no link.
        """
        self.network.hold("n3")
        waiting = self.links.forward("n3", callBox(b"1"))
        current = self.topology.currentMap()
        moved = reassign(current, current.slotsOf("n3"), "n2")
        nodes = {n: a for n, a in moved.nodes.items() if n != "n3"}
        self.topology.setMap(ShardMap(moved.owners, nodes, moved.version + 1))
        self.failureResultOf(waiting, OwnerUnavailable)
        self.assertIsNone(self.links.link("n3"))
        self.failureResultOf(self.links.forward("n3", callBox(b"2")), OwnerUnavailable)
        self.network.restore("n3")

"""
Peer links over real loopback sockets (L{fractal.routing.peers}): with
mutual TLS (L{fractal.certs}) the link is up only once both sides know who
the other is; with plain TCP as soon as it connects.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _globalReactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.protocols import amp
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from fractal.certs import (
    NodeCredentials,
    createAuthority,
    createNodeCertificate,
    loadCredentials,
    peerServerFactory,
)
from fractal.protocol import OwnerUnavailable
from fractal.routing.interfaces import NodeAddress
from fractal.routing.peers import PeerLink, peerEndpointFactory
from tests.test_routing_peers import _EchoServer, callBox


class PeerLinkTLSTests(TestCase):
    """
    L{PeerLink} over mutual TLS.
    """

    def setUp(self) -> Any:
        directory = FilePath(self.mktemp())
        createAuthority(directory)
        for node in ["n1", "n2", "n3"]:
            createNodeCertificate(directory, node)
        self.creds: dict[str, NodeCredentials] = {
            n: loadCredentials(directory, n) for n in ["n1", "n2", "n3"]
        }
        self.seen: list[amp.AmpBox] = []
        factory = peerServerFactory(
            self.creds["n2"],
            {"n1", "n2", "n3"},
            Factory.forProtocol(lambda: _EchoServer("n2", self.seen)),
        )
        d = TCP4ServerEndpoint(_globalReactor, 0, interface="127.0.0.1").listen(factory)

        def listening(port: Any) -> None:
            self.port = port
            self.addCleanup(port.stopListening)

        return d.addCallback(listening)

    def link(self, localNode: str, expected: str) -> PeerLink:
        endpointFor = peerEndpointFactory(_globalReactor, self.creds[localNode])
        address = NodeAddress(
            expected, "unused", f"tcp:host=127.0.0.1:port={self.port.getHost().port}"
        )
        link = PeerLink(
            _globalReactor,
            expected,
            endpointFor(address),
            callTimeout=5,
            connectTimeout=1.5,
            retryPolicy=lambda attempt: 0.2,
        )
        link.service.startService()

        def stop() -> Any:
            link.stop()
            return link.service.stopService()

        self.addCleanup(stop)
        return link

    @defer.inlineCallbacks
    def test_forwardOverTLS(self) -> Any:
        """
        A member forwards a call to the peer it expects and gets the answer.
        """
        link = self.link("n1", "n2")
        answer = yield link.forward(callBox(b"4"))
        self.assertEqual(answer[b"_answer"], b"4")
        self.assertTrue(link.connected)

    @defer.inlineCallbacks
    def test_wrongPeerNeverUp(self) -> Any:
        """
        A link to a server whose certificate names another node is never
        up; calls fail with L{OwnerUnavailable} saying why, and nothing runs
        on that server.
        """
        link = self.link("n1", "n3")
        failure = yield self.assertFailure(link.forward(callBox(b"1")), OwnerUnavailable)
        self.assertIn("not connected within 1.5 s", str(failure))
        self.assertIn("last attempt", str(failure))
        self.assertFalse(link.connected)
        self.assertEqual(self.seen, [])
        yield deferLater(_globalReactor, 0, lambda: None)


class PeerLinkPlainTCPTests(TestCase):
    """
    L{PeerLink} over plain TCP on loopback.
    """

    @defer.inlineCallbacks
    def test_forwardOverTCP(self) -> Any:
        """
        Without TLS, the link is up as soon as TCP connects, and forwards.
        """
        seen: list[amp.AmpBox] = []
        port = yield TCP4ServerEndpoint(_globalReactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: _EchoServer("n2", seen))
        )
        self.addCleanup(port.stopListening)
        endpointFor = peerEndpointFactory(_globalReactor)
        link = PeerLink(
            _globalReactor,
            "n2",
            endpointFor(NodeAddress("n2", "unused", f"tcp:host=127.0.0.1:port={port.getHost().port}")),
            retryPolicy=lambda attempt: 0.2,
        )
        link.service.startService()

        def stop() -> Any:
            link.stop()
            return link.service.stopService()

        self.addCleanup(stop)
        answer = yield link.forward(callBox(b"9"))
        self.assertEqual(answer[b"_answer"], b"9")
        self.assertTrue(link.connected)

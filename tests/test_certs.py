"""
Tests for L{fractal.certs}: the cluster CA, node certificates, the
C{fractal certs} command and mutual TLS between nodes over real loopback
sockets.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer
from twisted.internet import reactor as _globalReactor
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.ssl import optionsForClientTLS
from twisted.protocols import amp
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from fractal._cli import main
from fractal.certs import (
    CertificateError,
    CertsOptions,
    InsecurePeers,
    NodeCredentials,
    checkPeerTransport,
    clientServerFactory,
    clientTLSCreator,
    createAuthority,
    createNodeCertificate,
    endpointHost,
    loadCredentials,
    peerClientCreator,
    peerServerFactory,
)


def makeCluster(directory: FilePath[str], *nodeIds: str) -> dict[str, NodeCredentials]:
    """
    Create a CA and node certificates in C{directory} and load them.
    """
    createAuthority(directory)
    for nodeId in nodeIds:
        createNodeCertificate(directory, nodeId)
    return {nodeId: loadCredentials(directory, nodeId) for nodeId in nodeIds}


class CertificateFilesTests(SynchronousTestCase):
    """
    Tests for the files L{createAuthority}, L{createNodeCertificate} and
    C{fractal certs} write.
    """

    def test_command(self) -> None:
        """
        C{fractal certs --dir D n1 n2} writes a CA and one certificate per
        node, private keys with mode 0600, each certificate naming its node
        in the subject CN and a DNS SAN, issued by the CA.
        """
        directory = FilePath(self.mktemp())
        self.assertEqual(main(["certs", "--dir", directory.path, "n1", "n2"]), 0)
        ca = x509.load_pem_x509_certificate(directory.child("ca.crt").getContent())
        for name in ["ca", "n1", "n2"]:
            mode = stat.S_IMODE(os.stat(directory.child(name + ".key").path).st_mode)
            self.assertEqual(mode, 0o600, name)
        for nodeId in ["n1", "n2"]:
            cert = x509.load_pem_x509_certificate(directory.child(nodeId + ".crt").getContent())
            self.assertEqual(
                cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, nodeId
            )
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            self.assertEqual(san.value.get_values_for_type(x509.DNSName), [nodeId])
            self.assertEqual(cert.issuer, ca.subject)
            cert.verify_directly_issued_by(ca)
        # A second run adds a node with the same CA.
        self.assertEqual(main(["certs", "--dir", directory.path, "n3"]), 0)
        self.assertEqual(
            directory.child("ca.crt").getContent(), ca.public_bytes(serialization.Encoding.PEM)
        )
        self.assertEqual(loadCredentials(directory, "n3").nodeId, "n3")

    def test_noOverwrite(self) -> None:
        """
        Existing keys are never overwritten: the command fails and the old
        key is still there.
        """
        directory = FilePath(self.mktemp())
        makeCluster(directory, "n1")
        before = directory.child("n1.key").getContent()
        options = CertsOptions()
        options.parseOptions(["--dir", directory.path, "n1"])
        self.assertEqual(options.run(out=lambda line: None), 1)
        self.assertEqual(directory.child("n1.key").getContent(), before)
        self.assertRaises(CertificateError, createAuthority, directory)

    def test_badNodeIds(self) -> None:
        """
        Node ids that could escape the directory, repeated ids, or none at
        all are usage errors.
        """
        for argv in [["../x"], ["a/b"], [""], ["n1", "n1"], []]:
            self.assertRaises(usage.UsageError, CertsOptions().parseOptions, argv)

    def test_loadErrors(self) -> None:
        """
        Loading missing credentials, or a certificate that names another
        node, is a L{CertificateError} naming the file.
        """
        directory = FilePath(self.mktemp())
        makeCluster(directory, "n1")
        self.assertRaises(CertificateError, loadCredentials, directory, "n2")
        directory.child("n2.crt").setContent(directory.child("n1.crt").getContent())
        directory.child("n2.key").setContent(directory.child("n1.key").getContent())
        error = self.assertRaises(CertificateError, loadCredentials, directory, "n2")
        self.assertIn("names node 'n1'", str(error))
        self.assertRaises(CertificateError, createNodeCertificate, FilePath(self.mktemp()), "n1")


class PeerTransportPolicyTests(SynchronousTestCase):
    """
    Tests for L{checkPeerTransport} and L{endpointHost}.
    """

    def test_endpointHost(self) -> None:
        """
        The host of client and server descriptions is found, including
        escaped IPv6 addresses and an absent interface (all interfaces).
        """
        self.assertEqual(endpointHost("tcp:host=127.0.0.1:port=1", False), "127.0.0.1")
        self.assertEqual(endpointHost("tcp:7100:interface=127.0.0.1", True), "127.0.0.1")
        self.assertEqual(endpointHost("tcp:7100", True), "")
        self.assertEqual(endpointHost(r"tcp6:host=\:\:1:port=1", False), "::1")
        self.assertEqual(endpointHost("unix:/tmp/x", True), "localhost")
        self.assertIsNone(endpointHost("ssl:host=h:port=1", False))

    def test_loopbackAllowed(self) -> None:
        """
        Plain TCP is allowed when every peer address is loopback.
        """
        checkPeerTransport(
            [("tcp:7200:interface=127.0.0.1", True), ("tcp:host=localhost:port=7201", False)],
            None,
        )

    def test_elsewhereRefused(self) -> None:
        """
        Plain TCP to or on a non-loopback address, or on all interfaces, is
        refused unless TLS credentials or the insecure flag are given.
        """
        for description, server in [
            ("tcp:host=10.0.0.2:port=7200", False),
            ("tcp:7200", True),
            ("tcp:7200:interface=0.0.0.0", True),
        ]:
            peers = [("tcp:host=127.0.0.1:port=1", False), (description, server)]
            error = self.assertRaises(InsecurePeers, checkPeerTransport, peers, None)
            self.assertIn(description, str(error))
            checkPeerTransport(peers, None, insecure=True)
        directory = FilePath(self.mktemp())
        credentials = makeCluster(directory, "n1")["n1"]
        checkPeerTransport([("tcp:7200", True)], credentials)


REJECTED = (ConnectionClosed, SSL.Error)
"""
How a rejected TLS connection shows on the client: a TLS alert or a closed
connection.
"""


class Ping(amp.Command):
    arguments = [(b"n", amp.Integer())]
    response = [(b"n", amp.Integer())]


class _Counting(amp.AMP):
    calls: list[int]

    @Ping.responder
    def ping(self, n: int) -> dict[str, int]:
        self.calls.append(n)
        return {"n": n + 1}


class MutualTLSTests(TestCase):
    """
    Peer connections over real TLS on loopback: only a member node with a
    certificate from the cluster CA gets a command run.
    """

    def setUp(self) -> None:
        self.reactor = _globalReactor
        self.directory = FilePath(self.mktemp())
        self.creds = makeCluster(self.directory, "n1", "n2", "outsider")
        self.calls: list[int] = []

        def build() -> amp.AMP:
            proto = _Counting()
            proto.calls = self.calls
            return proto

        factory = peerServerFactory(self.creds["n1"], {"n1", "n2"}, Factory.forProtocol(build))
        endpoint = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        d = endpoint.listen(factory)

        def listening(port: IListeningPort) -> None:
            self.port = port
            self.addCleanup(port.stopListening)

        return d.addCallback(listening)  # type: ignore[no-any-return]

    @defer.inlineCallbacks
    def call(self, creator: object) -> object:
        """
        Connect with TLS settings C{creator}, call L{Ping}, and close.
        """
        endpoint = wrapClientTLS(
            creator,  # type: ignore[arg-type]
            TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port.getHost().port),
        )
        proto = yield connectProtocol(endpoint, amp.AMP())
        lost = defer.Deferred()
        original = proto.connectionLost

        def connectionLost(reason: object) -> None:
            original(reason)
            lost.callback(None)

        proto.connectionLost = connectionLost
        try:
            result = yield proto.callRemote(Ping, n=1)
        finally:
            proto.transport.loseConnection()
            yield lost
        return result

    @defer.inlineCallbacks
    def test_memberAccepted(self) -> None:
        """
        A member node with a certificate from the cluster CA, connecting to
        the node it expects, gets its command run.
        """
        result = yield self.call(peerClientCreator(self.creds["n2"], "n1"))
        self.assertEqual(result, {"n": 2})
        self.assertEqual(self.calls, [1])

    @defer.inlineCallbacks
    def test_otherAuthorityRejected(self) -> None:
        """
        A peer whose certificate comes from another CA (even with a member's
        node id) is rejected before any command runs.
        """
        stranger = makeCluster(FilePath(self.mktemp()), "n2")["n2"]
        creator = optionsForClientTLS(
            "n1", trustRoot=self.creds["n2"].authority, clientCertificate=stranger.certificate
        )
        yield self.assertFailure(self.call(creator), *REJECTED)
        self.assertEqual(self.calls, [])

    @defer.inlineCallbacks
    def test_noCertificateRejected(self) -> None:
        """
        A peer that presents no certificate is rejected before any command
        runs.
        """
        creator = optionsForClientTLS("n1", trustRoot=self.creds["n2"].authority)
        yield self.assertFailure(self.call(creator), *REJECTED)
        self.assertEqual(self.calls, [])

    @defer.inlineCallbacks
    def test_nonMemberRejected(self) -> None:
        """
        A certificate from the cluster CA for a node that is not a member is
        rejected before any command runs.
        """
        creator = peerClientCreator(self.creds["outsider"], "n1")
        yield self.assertFailure(self.call(creator), *REJECTED)
        self.assertEqual(self.calls, [])

    @defer.inlineCallbacks
    def test_wrongServerRejected(self) -> None:
        """
        A node connecting to a peer checks the node id in the server's
        certificate: expecting n2 but reaching n1 fails, and nothing runs.
        """
        yield self.assertFailure(
            self.call(peerClientCreator(self.creds["n1"], "n2")), VerificationError
        )
        self.assertEqual(self.calls, [])


class ClientTLSTests(TestCase):
    """
    Client-facing TLS with the same certificates: the client checks the
    node id, no client certificate is needed.
    """

    @defer.inlineCallbacks
    def test_clientTLS(self) -> Any:
        """
        A client trusting the cluster CA reaches a node listening with
        L{clientServerFactory} when it expects that node's id, and refuses
        a node with another id.
        """
        creds = makeCluster(FilePath(self.mktemp()), "n1")["n1"]
        calls: list[int] = []

        def build() -> amp.AMP:
            proto = _Counting()
            proto.calls = calls
            return proto

        factory = clientServerFactory(creds.certificate, Factory.forProtocol(build))
        port = yield TCP4ServerEndpoint(_globalReactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)

        @defer.inlineCallbacks
        def call(nodeId: str) -> Any:
            endpoint = wrapClientTLS(
                clientTLSCreator(creds.authority, nodeId),
                TCP4ClientEndpoint(_globalReactor, "127.0.0.1", port.getHost().port),
            )
            proto = yield connectProtocol(endpoint, amp.AMP())
            lost: defer.Deferred[None] = defer.Deferred()
            original = proto.connectionLost

            def connectionLost(reason: object) -> None:
                original(reason)
                lost.callback(None)

            proto.connectionLost = connectionLost
            try:
                result = yield proto.callRemote(Ping, n=5)
            finally:
                proto.transport.loseConnection()
                yield lost
            return result

        result = yield call("n1")
        self.assertEqual(result, {"n": 6})
        yield self.assertFailure(call("n2"), VerificationError)
        self.assertEqual(calls, [5])

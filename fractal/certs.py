# -*- test-case-name: tests.test_certs -*-
"""
Certificates for a cluster: a cluster certificate authority, one certificate
per node, and the TLS settings built from them.

Nodes talk to each other over mutual TLS.  Each node holds a certificate,
signed by the cluster's own CA, naming its node id (the subject common name
and a DNS subject alternative name).  A peer listener accepts only
connections whose client certificate was issued by the cluster CA for a
member node, and a node connecting to a peer checks that the server's
certificate names the node it meant to reach.  Plain TCP between nodes is
refused unless every peer address is on the loopback interface, or the
operator asks for it explicitly (L{checkPeerTransport}).

The files of a certificate directory, all PEM::

    ca.crt  ca.key          the cluster CA (keep ca.key off the nodes)
    <node>.crt  <node>.key  one node's certificate and private key

Private keys are written with mode 0600.  C{fractal certs} (L{CertsOptions})
creates them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from typing import Callable, Container, Iterable

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.filepath import FilePath
from zope.interface import implementer

from fractal._manholeconfig import _splitDescription
from fractal.routing.topology import TopologyError, checkNodeId

__all__ = [
    "CertificateError",
    "InsecurePeers",
    "NodeCredentials",
    "createAuthority",
    "createNodeCertificate",
    "loadCredentials",
    "nodeIdOf",
    "peerServerFactory",
    "peerClientCreator",
    "clientServerFactory",
    "clientTLSCreator",
    "anyNodeTLSOptions",
    "checkPeerTransport",
    "endpointHost",
    "CertsOptions",
]

_CA_NAME = "ca"


class CertificateError(Exception):
    """
    Certificates cannot be created or loaded; the message names the file.
    """


class InsecurePeers(Exception):
    """
    Peer links would run over plain TCP on an address that is not loopback,
    and the operator did not ask for that.
    """


def _writePrivate(path: FilePath[str], data: bytes) -> None:
    """
    Write C{data} to a new file readable only by its owner.

    @raise CertificateError: if the file exists already.
    """
    try:
        fd = os.open(path.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CertificateError(f"{path.path} exists already; not overwriting it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _writePublic(path: FilePath[str], data: bytes) -> None:
    if path.exists():
        raise CertificateError(f"{path.path} exists already; not overwriting it")
    path.setContent(data)


def _newKey() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _keyPEM(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def createAuthority(
    directory: FilePath[str], name: str = "fractal cluster CA", days: int = 3650
) -> None:
    """
    Create a cluster CA: C{ca.crt} and C{ca.key} in C{directory}.

    @param directory: where to write; created if missing.
    @param name: the CA's common name.
    @param days: how long the CA certificate is valid.
    @raise CertificateError: if the files exist already.
    """
    directory.makedirs(ignoreExistingDirectory=True)
    key = _newKey()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _writePrivate(directory.child(_CA_NAME + ".key"), _keyPEM(key))
    _writePublic(
        directory.child(_CA_NAME + ".crt"), certificate.public_bytes(serialization.Encoding.PEM)
    )


def _loadAuthority(
    directory: FilePath[str],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    certPath = directory.child(_CA_NAME + ".crt")
    keyPath = directory.child(_CA_NAME + ".key")
    try:
        certificate = x509.load_pem_x509_certificate(certPath.getContent())
        key = serialization.load_pem_private_key(keyPath.getContent(), None)
    except (OSError, ValueError) as e:
        raise CertificateError(f"cannot load the cluster CA from {directory.path}: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{keyPath.path} is not an EC private key")
    return certificate, key


def createNodeCertificate(directory: FilePath[str], nodeId: str, days: int = 825) -> None:
    """
    Create C{<nodeId>.crt} and C{<nodeId>.key} in C{directory}, signed by the
    CA there.

    @param directory: a directory holding C{ca.crt} and C{ca.key}.
    @param nodeId: the node's id (see L{fractal.routing.topology.checkNodeId}).
    @param days: how long the certificate is valid.
    @raise CertificateError: if the CA cannot be loaded or the files exist.
    @raise fractal.routing.topology.TopologyError: if C{nodeId} is malformed.
    """
    checkNodeId(nodeId)
    caCertificate, caKey = _loadAuthority(directory)
    key = _newKey()
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, nodeId)]))
        .issuer_name(caCertificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(nodeId)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(caKey, hashes.SHA256())
    )
    _writePrivate(directory.child(nodeId + ".key"), _keyPEM(key))
    _writePublic(
        directory.child(nodeId + ".crt"), certificate.public_bytes(serialization.Encoding.PEM)
    )


@frozen
class NodeCredentials:
    """
    What one node needs for TLS with its peers.

    @ivar nodeId: the node's id.
    @ivar authority: the cluster CA certificate.
    @ivar certificate: the node's certificate with its private key.
    """

    nodeId: str
    authority: ssl.Certificate
    certificate: ssl.PrivateCertificate


def loadCredentials(directory: FilePath[str], nodeId: str) -> NodeCredentials:
    """
    Load C{ca.crt}, C{<nodeId>.crt} and C{<nodeId>.key} from C{directory}.

    @raise CertificateError: if a file is missing or unreadable, or the
        certificate does not name C{nodeId}.
    @raise fractal.routing.topology.TopologyError: if C{nodeId} is malformed.
    """
    checkNodeId(nodeId)
    try:
        authority = ssl.Certificate.loadPEM(directory.child(_CA_NAME + ".crt").getContent())
        certificate = ssl.PrivateCertificate.loadPEM(  # type: ignore[no-untyped-call]
            directory.child(nodeId + ".crt").getContent()
            + directory.child(nodeId + ".key").getContent()
        )
    except Exception as e:
        raise CertificateError(
            f"cannot load the certificates of node {nodeId!r} from {directory.path}: {e}"
        ) from None
    named = nodeIdOf(certificate)
    if named != nodeId:
        raise CertificateError(
            f"{directory.child(nodeId + '.crt').path} names node {named!r}, not {nodeId!r}"
        )
    return NodeCredentials(nodeId, authority, certificate)


def nodeIdOf(certificate: ssl.Certificate | object) -> str | None:
    """
    The node id a certificate names (its subject common name).

    @param certificate: a L{ssl.Certificate}, a pyOpenSSL C{X509}, or
        anything else (giving L{None}).
    @return: the node id, or L{None} if there is no usable one.
    """
    if isinstance(certificate, ssl.Certificate):
        certificate = certificate.original
    toCryptography = getattr(certificate, "to_cryptography", None)
    if toCryptography is None:
        return None
    names = toCryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        return None
    return names[0].value


@implementer(IHandshakeListener)
class _IdentityCheckingProtocol(ProtocolWrapper):
    """
    Passes bytes to the wrapped protocol only once the TLS handshake has
    finished with a peer certificate naming an allowed node.
    """

    log = Logger()
    factory: _IdentityCheckingFactory
    _verified = False

    def handshakeCompleted(self) -> None:
        peer = self.transport.getPeerCertificate()  # type: ignore[union-attr]
        nodeId = nodeIdOf(peer)
        if nodeId is None or nodeId not in self.factory.allowed:
            self.log.warn(
                "refusing peer {address}: certificate names node {nodeId!r}, "
                "not a member of the cluster",
                address=self.transport.getPeer(),  # type: ignore[union-attr]
                nodeId=nodeId,
            )
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._verified = True
        self.peerNodeId = nodeId
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def dataReceived(self, data: bytes) -> None:
        if self._verified:
            ProtocolWrapper.dataReceived(self, data)  # type: ignore[no-untyped-call]


class _IdentityCheckingFactory(WrappingFactory):
    protocol = _IdentityCheckingProtocol

    def __init__(self, wrappedFactory: IProtocolFactory, allowed: Container[str]) -> None:
        WrappingFactory.__init__(self, wrappedFactory)  # type: ignore[no-untyped-call,arg-type]
        self.allowed = allowed


def peerServerFactory(
    credentials: NodeCredentials, allowed: Container[str], factory: IProtocolFactory
) -> IProtocolFactory:
    """
    Wrap the factory of a peer listener in mutual TLS: a client must present
    a certificate from the cluster CA naming one of C{allowed}; otherwise the
    connection is closed before the wrapped protocol sees a byte.

    @param credentials: this node's credentials.
    @param allowed: the node ids that may connect.
    @param factory: the factory of the peer protocol.
    @return: a factory to listen with on any stream server endpoint.
    """
    options = ssl.CertificateOptions(
        privateKey=credentials.certificate.privateKey.original,
        certificate=credentials.certificate.original,
        verify=True,
        requireCertificate=True,
        caCerts=[credentials.authority.original],
    )
    return TLSMemoryBIOFactory(options, False, _IdentityCheckingFactory(factory, allowed))


def peerClientCreator(
    credentials: NodeCredentials, peerNodeId: str
) -> IOpenSSLClientConnectionCreator:
    """
    TLS settings for connecting to peer C{peerNodeId}: present this node's
    certificate, and accept only a server certificate from the cluster CA
    that names C{peerNodeId}.

    Use it with L{twisted.internet.endpoints.wrapClientTLS}.
    """
    creator: IOpenSSLClientConnectionCreator = ssl.optionsForClientTLS(
        peerNodeId, trustRoot=credentials.authority, clientCertificate=credentials.certificate
    )
    return creator


def clientServerFactory(
    certificate: ssl.PrivateCertificate, factory: IProtocolFactory
) -> IProtocolFactory:
    """
    Wrap the factory of a client-facing listener in (one-way) TLS with this
    node's certificate.
    """
    options = ssl.CertificateOptions(
        privateKey=certificate.privateKey.original, certificate=certificate.original
    )
    return TLSMemoryBIOFactory(options, False, factory)


def clientTLSCreator(authority: ssl.Certificate, nodeId: str) -> IOpenSSLClientConnectionCreator:
    """
    TLS settings for a client calling node C{nodeId}: trust only the cluster
    CA and check the node id in the server's certificate.
    """
    creator: IOpenSSLClientConnectionCreator = ssl.optionsForClientTLS(nodeId, trustRoot=authority)
    return creator


def anyNodeTLSOptions(authority: ssl.Certificate) -> ssl.CertificateOptions:
    """
    TLS settings for a client that may reach any node of the cluster, such
    as the first connection of a smart client (which does not know yet which
    node it reaches): trust only the cluster CA, whichever node id its
    certificate names.  Once a client knows which node it means to reach,
    use L{clientTLSCreator}, which checks the id too.

    Use it with L{twisted.internet.endpoints.wrapClientTLS}.
    """
    return ssl.CertificateOptions(
        verify=True, requireCertificate=True, caCerts=[authority.original]
    )


def endpointHost(description: str, server: bool) -> str | None:
    """
    The host a C{tcp} endpoint description names, C{"localhost"} for a
    C{unix} one, or L{None} for any other kind.

    @param description: a Twisted endpoint description.
    @param server: whether it is a server description (C{tcp:PORT:interface=H};
        no interface means every interface, given as C{""}) or a client one
        (C{tcp:host=H:port=P}).
    """
    args, kwargs = _splitDescription(description)
    kind = args[0] if args else ""
    if kind == "unix":
        return "localhost"
    if kind not in ("tcp", "tcp6"):
        return None
    if server:
        return kwargs.get("interface", args[2] if len(args) > 2 else "")
    return kwargs.get("host", args[1] if len(args) > 1 else "")


def _isLoopback(host: str | None) -> bool:
    if host is None or not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def checkPeerTransport(
    peerDescriptions: Iterable[tuple[str, bool]],
    credentials: NodeCredentials | None,
    insecure: bool = False,
) -> None:
    """
    Refuse plain TCP between nodes on any address that is not loopback.

    @param peerDescriptions: every peer endpoint description, each with
        whether it is a server (listening) description.
    @param credentials: the node's TLS credentials, or L{None} for plain TCP.
    @param insecure: the operator's explicit permission for plain TCP
        anywhere.
    @raise InsecurePeers: if C{credentials} is L{None}, C{insecure} is false
        and some address is not loopback.
    """
    if credentials is not None or insecure:
        return
    for description, server in peerDescriptions:
        host = endpointHost(description, server)
        if not _isLoopback(host):
            raise InsecurePeers(
                f"peer endpoint {description!r} is not on loopback; peers need TLS "
                "(--certs DIR, see 'fractal certs') or an explicit --insecure-peers"
            )


class CertsOptions(usage.Options):
    """
    C{fractal certs}: create a cluster CA (when there is none yet) and a
    certificate for each node named.
    """

    synopsis = "[--dir DIR] NODE_ID [NODE_ID ...]"
    longdesc = (
        "Create the cluster CA (ca.crt, ca.key) in DIR if it is not there, then a "
        "certificate and key (<id>.crt, <id>.key) for each node id.  Private keys "
        "are written with mode 0600.  Copy ca.crt and a node's own pair to that node."
    )
    optParameters = [
        ["dir", "d", "fractal-certs", "The certificate directory."],
        ["days", None, 825, "How many days node certificates are valid.", int],
    ]

    def parseArgs(self, *nodeIds: str) -> None:
        if not nodeIds:
            raise usage.UsageError("name at least one node id")
        for nodeId in nodeIds:
            try:
                checkNodeId(nodeId)
            except TopologyError as e:
                raise usage.UsageError(str(e)) from None
        if len(set(nodeIds)) != len(nodeIds):
            raise usage.UsageError("a node id is named twice")
        self["nodes"] = list(nodeIds)

    def run(self, out: Callable[[str], object] = print) -> int:
        """
        Create the files.

        @param out: where to report what was written.
        @return: the exit status.
        """
        directory = FilePath(self["dir"])
        try:
            if not directory.child(_CA_NAME + ".crt").exists():
                createAuthority(directory)
                out(f"created cluster CA {directory.child(_CA_NAME + '.crt').path}")
            for nodeId in self["nodes"]:
                createNodeCertificate(directory, nodeId, days=self["days"])
                out(f"created {directory.child(nodeId + '.crt').path} and its key")
        except CertificateError as e:
            print(f"fractal certs: {e}", file=sys.stderr)
            return 1
        return 0

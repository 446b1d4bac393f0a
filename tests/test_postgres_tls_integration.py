"""
Integration test of a late joiner in a cluster that runs itself on
PostgreSQL with mutual TLS between nodes: real C{twistd -n fractal --postgres
--certs} node processes on loopback, a real database (see L{tests._postgres}).
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionClosed
from twisted.internet.ssl import optionsForClientTLS
from twisted.protocols import amp
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from fractal.certs import createAuthority, createNodeCertificate, loadCredentials
from fractal.keys import DEFAULT_SLOTS, slotForKey
from tests import test_postgres_integration as _integration
from tests._ports import freePort
from tests._postgres import makeDatabase
from tests.test_durable_node import Add
from tests.test_integration_node import NodeProcess
from tests.test_postgres_integration import _deferred, _Load, _reactor


class PostgresTLSJoinTests(TestCase):
    """
    Two nodes with certificates of the cluster's CA, then a third.
    """

    timeout = 600

    def setUp(self) -> None:
        self.database = makeDatabase(self)
        self.nodes: dict[str, NodeProcess] = {}
        self.load = _Load(self)
        self.users = [f"user{i}@example.com" for i in range(40)]
        self.certs = FilePath(self.mktemp())
        createAuthority(self.certs)
        for name in ["n1", "n2", "n3"]:
            createNodeCertificate(self.certs, name)
        self.peerPorts: dict[str, int] = {}

    # The helpers that read the slot table are the PostgreSQL integration
    # tests' own.
    settled = _integration.PostgresClusterIntegrationTests.settled
    owners = _integration.PostgresClusterIntegrationTests.owners

    async def startNode(self, name: str) -> NodeProcess:
        self.peerPorts[name] = freePort()
        return await _integration.PostgresClusterIntegrationTests.startNode(
            self,  # type: ignore[arg-type]
            name,
            "--certs",
            self.certs.path,
            peerPort=self.peerPorts[name],
        )

    async def rejected(self, creator: Any, port: int, user: str) -> None:
        """
        A TLS connection to the peer listener on C{port} with C{creator}
        is closed before a call on it runs.
        """
        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(_reactor(), "127.0.0.1", port))
        proto = await connectProtocol(endpoint, amp.AMP())
        lost: Deferred[None] = Deferred()
        original = proto.connectionLost

        def connectionLost(reason: Any) -> None:
            original(reason)
            lost.callback(None)

        proto.connectionLost = connectionLost  # type: ignore[method-assign]
        call: Deferred[Any] = Deferred()
        proto.callRemote(Add, user=user, amount=1000).chainDeferred(call)
        try:
            await self.assertFailure(call, ConnectionClosed, SSL.Error)
        finally:
            proto.transport.loseConnection()
            await lost

    def test_lateJoinerOverMutualTLS(self) -> Deferred[None]:
        """
        A node that joins a running cluster on PostgreSQL with mutual TLS
        has its peer connections accepted: it takes its share of the slots
        and serves them, and every user reads the same through every node
        (so calls are forwarded both to it and from it, over TLS).  A peer
        presenting the joiner's node id with a certificate from another CA
        is refused before anything runs.
        """
        return _deferred(self._lateJoiner())

    async def _lateJoiner(self) -> None:
        for name in ["n1", "n2"]:
            await self.startNode(name)
        await self.settled({"n1", "n2"})
        await self.load.writeAll(self.users)

        await self.startNode("n3")
        await self.settled({"n1", "n2", "n3"})
        counts, _ = self.owners()
        self.assertGreater(counts["n3"], DEFAULT_SLOTS // 6)
        await self.load.writeAll(self.users)
        # Through each node, each user: n1 and n2 forward to n3 and n3
        # forwards to them; every value agrees with what was acknowledged.
        await self.load.checkAll(self.users)
        owners = {
            u: self.database.transactBlocking(
                lambda c, s=slotForKey(u, DEFAULT_SLOTS): _ownerOf(c, s)
            )
            for u in self.users
        }
        self.assertIn("n3", set(owners.values()))
        for name, process in self.nodes.items():
            self.assertNotIn("Traceback", process.describe(), name)

        # A stranger claiming to be n3, with a certificate of another CA.
        stranger = FilePath(self.mktemp())
        createAuthority(stranger)
        createNodeCertificate(stranger, "n3")
        foreign = loadCredentials(stranger, "n3")
        ca = loadCredentials(self.certs, "n1").authority
        victim = next(u for u, owner in owners.items() if owner == "n1")
        before = await self.load._readVia("n2", victim)
        await self.rejected(
            optionsForClientTLS("n1", trustRoot=ca, clientCertificate=foreign.certificate),
            self.peerPorts["n1"],
            victim,
        )
        self.assertEqual(await self.load._readVia("n2", victim), before)


def _ownerOf(cursor: Any, slot: int) -> str:
    cursor.execute("SELECT node FROM slot_owners WHERE slot = %s", (slot,))
    row = cursor.fetchone()
    return str(row[0])

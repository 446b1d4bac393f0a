"""
Integration test of a cluster: three real C{twistd -n fractal} node
processes started from one shared config file, talking mutual TLS to each
other over loopback, driven over TCP by L{fractal.client} and the smart
client.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionClosed, ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from examples.mailbox import Deliver, Stats
from fractal.certs import createAuthority, createNodeCertificate, loadCredentials
from fractal.client import FractalClient, connect
from fractal.keys import storeNameForKey
from fractal.protocol import OwnerUnavailable
from fractal.routing.interfaces import NodeAddress
from fractal.routing.smart import connectCluster
from fractal.routing.topology import StaticTopology
from tests._ports import freePorts

ROOT = FilePath(__file__).parent().parent()
NODES = ["n1", "n2", "n3"]
USERS = [f"user{i}@example.com" for i in range(300)]


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _twistd() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(script, os.X_OK):
        return [sys.executable, script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class _Process(ProcessProtocol):
    def __init__(self) -> None:
        self.output: list[bytes] = []
        self.ended: Deferred[None] = Deferred()
        self.running = True

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        if not reason.check(ProcessDone, ProcessTerminated):
            self.output.append(str(reason).encode())
        self.ended.callback(None)


def _names(directory: FilePath[str]) -> set[str]:
    """
    The names of everything under C{directory}.
    """
    names: set[str] = set()
    for _, dirs, files in os.walk(directory.path):
        names.update(dirs)
        names.update(files)
    return names


class ClusterIntegrationTests(TestCase):
    """
    Three node processes behave as one service.
    """

    timeout = 180

    def setUp(self) -> None:
        self.base = FilePath(self.mktemp())
        self.base.makedirs()
        self.certs = self.base.child("certs")
        createAuthority(self.certs)
        for node in NODES:
            createNodeCertificate(self.certs, node)
        ports = freePorts(2 * len(NODES))
        self.clientPorts = dict(zip(NODES, ports[: len(NODES)]))
        self.peerPorts = dict(zip(NODES, ports[len(NODES) :]))
        lines = [
            'app = "examples.mailbox:application"',
            f'certs = "{self.certs.path}"',
            'durable = "none"',
            # Generous, for loaded test machines; a killed node's users must
            # still fail well within the client's shorter timeout below.
            "peer-timeout = 20",
        ]
        for node in NODES:
            lines += [
                "[[node]]",
                f'id = "{node}"',
                f'listen = "tcp:{self.clientPorts[node]}:interface=127.0.0.1"',
                f'peer = "tcp:host=127.0.0.1:port={self.peerPorts[node]}"',
                f'data = "{self.base.child(node).path}"',
            ]
        self.config = self.base.child("cluster.toml")
        self.config.setContent("\n".join(lines).encode() + b"\n")
        self.topology = StaticTopology(
            "n1",
            [
                NodeAddress(
                    n,
                    f"tcp:host=127.0.0.1:port={self.clientPorts[n]}",
                    f"tcp:host=127.0.0.1:port={self.peerPorts[n]}",
                )
                for n in NODES
            ],
        )
        self.processes: dict[str, _Process] = {}
        self.clients: list[FractalClient] = []

    def tearDown(self) -> Deferred[Any]:
        async def stop() -> None:
            for client in self.clients:
                await client.disconnect()
            for process in self.processes.values():
                if process.running:
                    process.transport.signalProcess("TERM")  # type: ignore[union-attr]
            for process in self.processes.values():
                if process.running:
                    await process.ended

        return ensureDeferred(stop())

    def describe(self) -> str:
        text = ""
        for node, process in self.processes.items():
            text += f"--- {node} output\n" + b"".join(process.output).decode("utf-8", "replace")
            log = self.base.child(f"{node}.log")
            if log.exists():
                text += f"--- {node} log\n" + log.getContent().decode("utf-8", "replace")[-3000:]
        return text

    async def startNodes(self) -> None:
        reactor = _reactor()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [ROOT.path] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        for node in NODES:
            process = _Process()
            argv = _twistd() + [
                "-n",
                "--pidfile=",
                "--logfile",
                self.base.child(f"{node}.log").path,
                "fractal",
                "--config",
                self.config.path,
                "--node",
                node,
            ]
            reactor.spawnProcess(process, argv[0], argv, env=env, path=ROOT.path)
            self.processes[node] = process
        for node in NODES:
            for port in (self.clientPorts[node], self.peerPorts[node]):
                for _ in range(600):
                    if not self.processes[node].running:
                        self.fail(f"node {node} exited:\n{self.describe()}")
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                            break
                    except OSError:
                        await deferLater(reactor, 0.05, lambda: None)
                else:
                    self.fail(f"node {node} did not listen on {port}:\n{self.describe()}")

    async def whenLinked(self, clients: dict[str, FractalClient]) -> None:
        """
        Wait until every node reaches every other: a call for a user of each
        node through each node succeeds.  Nodes start in any order, so a
        node's first calls may find a peer link still connecting.
        """
        probes = {self.owner(u): u for u in (f"probe{i}" for i in range(100))}
        self.assertEqual(sorted(probes), NODES)
        for _ in range(100):
            try:
                await gatherResults(
                    [c.callRemote(Stats, user=u) for c in clients.values() for u in probes.values()],
                    consumeErrors=True,
                )
                return
            except Exception:
                await deferLater(_reactor(), 0.1, lambda: None)
        self.fail(f"the nodes did not link up:\n{self.describe()}")

    def client(self, node: str, timeout: float = 10.0) -> FractalClient:
        client = connect(
            _reactor(), f"tcp:host=127.0.0.1:port={self.clientPorts[node]}", timeout=timeout
        )
        self.clients.append(client)
        return client

    def owner(self, user: str) -> str:
        return self.topology.currentMap().ownerOfKey(user).node

    async def rejectedPeer(self, creator: Any, user: str) -> None:
        """
        Connect to n2's peer listener with TLS settings C{creator} and try a
        call; it must fail with the connection.
        """
        endpoint = wrapClientTLS(
            creator, TCP4ClientEndpoint(_reactor(), "127.0.0.1", self.peerPorts["n2"])
        )
        proto = await connectProtocol(endpoint, amp.AMP())
        lost: Deferred[None] = Deferred()
        original = proto.connectionLost

        def connectionLost(reason: Any) -> None:
            original(reason)
            lost.callback(None)

        proto.connectionLost = connectionLost  # type: ignore[method-assign]
        call: Deferred[Any] = Deferred()
        proto.callRemote(
            Deliver, user=user, sender="mallory", subject="s", body="b"
        ).chainDeferred(call)
        try:
            await self.assertFailure(call, ConnectionClosed, SSL.Error)
        finally:
            proto.transport.loseConnection()
            await lost

    def test_cluster(self) -> Deferred[None]:
        """
        Mailbox calls for 300 users sent round-robin to all three nodes each
        land on the owner (each user's store exists on exactly one node's
        disk, the owner's) and read back through every node and through the
        smart client; peers with a certificate from another CA, or none, are
        refused before any command runs; killing one node makes its users
        fail fast with L{OwnerUnavailable} while the others keep working.
        """

        async def run() -> None:
            await self.startNodes()
            clients = {node: self.client(node) for node in NODES}
            await self.whenLinked(clients)
            # Round-robin over the nodes, 30 calls in flight at a time (each
            # creates a store, which a loaded machine does slowly).
            for start in range(0, len(USERS), 30):
                await gatherResults(
                    [
                        ensureDeferred(_deliver(clients[NODES[i % 3]], USERS[i]))
                        for i in range(start, min(start + 30, len(USERS)))
                    ]
                )
            onDisk = {n: _names(self.base.child(n)) for n in NODES}
            for user in USERS:
                holders = [n for n in NODES if storeNameForKey(user) in onDisk[n]]
                self.assertEqual(holders, [self.owner(user)], user)
            for node in NODES:
                for start in range(0, len(USERS), 60):
                    batch = USERS[start : start + 60]
                    stats = await gatherResults(
                        [clients[node].callRemote(Stats, user=user) for user in batch]
                    )
                    self.assertEqual(stats, [{"total": 1, "unread": 1}] * len(batch))

            smart = connectCluster(
                _reactor(), f"tcp:host=127.0.0.1:port={self.clientPorts['n2']}"
            )
            self.clients.append(smart)
            stats = await gatherResults([smart.callRemote(Stats, user=u) for u in USERS[:60]])
            self.assertEqual(stats, [{"total": 1, "unread": 1}] * 60)
            self.assertEqual(smart.shardMap, self.topology.currentMap())

            # Strangers on the peer port: nothing runs, no store appears.
            stranger = self.base.child("stranger")
            createAuthority(stranger)
            createNodeCertificate(stranger, "n1")
            foreign = loadCredentials(stranger, "n1")
            ca = loadCredentials(self.certs, "n1").authority
            newUser = next(u for u in (f"new{i}" for i in range(1000)) if self.owner(u) == "n2")
            await self.rejectedPeer(
                optionsForClientTLS("n2", trustRoot=ca, clientCertificate=foreign.certificate),
                newUser,
            )
            await self.rejectedPeer(optionsForClientTLS("n2", trustRoot=ca), newUser)
            self.assertFalse(
                any(storeNameForKey(newUser) in _names(self.base.child(n)) for n in NODES)
            )

            # Kill n3: its users fail fast, the others carry on.
            self.processes["n3"].transport.signalProcess(signal.SIGKILL)  # type: ignore[union-attr]
            await self.processes["n3"].ended
            await deferLater(_reactor(), 0.2, lambda: None)
            # A client timeout shorter than the peer call timeout (20 s): an
            # answer of OwnerUnavailable, not CallTimeout, shows the node
            # failed the call at once rather than waiting it out.
            quick = self.client("n1", timeout=4.0)
            dead = [u for u in USERS if self.owner(u) == "n3"][:20]
            alive = [u for u in USERS if self.owner(u) != "n3"][:40]
            for user in dead:
                await self.assertFailure(quick.callRemote(Stats, user=user), OwnerUnavailable)
            stats = await gatherResults([quick.callRemote(Stats, user=u) for u in alive])
            self.assertEqual(stats, [{"total": 1, "unread": 1}] * len(alive))
            # The smart client, unable to reach n3, hands its calls to a live
            # node, which answers OwnerUnavailable; the others are served.
            for user in dead[:3]:
                await self.assertFailure(smart.callRemote(Stats, user=user), OwnerUnavailable)
            stats = await gatherResults([smart.callRemote(Stats, user=u) for u in alive])
            self.assertEqual(stats, [{"total": 1, "unread": 1}] * len(alive))

        return ensureDeferred(run())


async def _deliver(client: FractalClient, user: str) -> Any:
    return await client.callRemote(
        Deliver, user=user, sender="bob@example.com", subject="hello", body="text"
    )

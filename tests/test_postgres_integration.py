"""
Integration tests of a cluster that runs itself on PostgreSQL: real
C{twistd -n fractal --postgres} node processes on loopback, a real database
(see L{tests._postgres}), real AMP clients under an C{ack="durable"} load.

Every write a client saw acknowledged is counted per user; the counter the
cluster holds for that user must never be below it.  A call that fails
(forwarded to a dead owner, refused while a slot moves) is retried, on
another node, until a deadline.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Coroutine, TypeVar

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from fractal.client import FractalClient, connect
from fractal.keys import DEFAULT_SLOTS, slotForKey, storeNameForKey
from fractal.routing.rendezvous import rendezvousOwners
from tests._ports import freePort
from tests._postgres import makeDatabase, postgresDSN
from tests.test_durable_node import Add, AddDurably
from tests.test_integration_node import NodeProcess

T = TypeVar("T")

APP = "tests.test_durable_node:application"
LEASE = 3.0
USERS = 60
RETRY_SECONDS = 30.0
SETTLE_SECONDS = 180.0
"""
The most seconds the slots may take to settle after a membership change: on
a loaded 2-core machine, rebalancing onto a fourth node was seen to take 50s.
"""
WAIT_SECONDS = 60.0
"""
The most seconds for a client to connect, or for a paused node to register
again once it runs.
"""


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _deferred(coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
    return Deferred.fromCoroutine(coroutine)


async def _sleep(seconds: float) -> None:
    await deferLater(_reactor(), seconds, lambda: None)


class _Load:
    """
    Clients of the live nodes, and what each user was acknowledged.
    """

    def __init__(self, test: TestCase) -> None:
        self.test = test
        self.clients: dict[str, FractalClient] = {}
        self.acked: dict[str, int] = {}
        self.retried = 0
        self.errors: list[str] = []
        self.calls = 0
        self.turn = 0

    async def add(self, name: str, node: NodeProcess) -> None:
        client = connect(
            _reactor(), f"tcp:host=127.0.0.1:port={node.port}", timeout=3.0,
            retryPolicy=lambda n: 0.1,
        )
        self.test.addCleanup(client.disconnect)
        await client.whenConnected(timeout=WAIT_SECONDS)
        self.clients[name] = client

    def drop(self, name: str) -> None:
        self.clients.pop(name, None)

    async def call(self, command: Any, user: str, amount: int) -> int:
        """
        Call until it succeeds (on the next node after each failure), up to
        L{RETRY_SECONDS}.
        """
        deadline = time.monotonic() + RETRY_SECONDS
        attempt = 0
        while True:
            names = sorted(self.clients)
            self.turn += 1
            name = names[(self.turn + attempt) % len(names)]
            client = self.clients[name]
            try:
                result = await client.callRemote(command, user=user, amount=amount)
            except Exception as e:
                attempt += 1
                self.retried += 1
                self.errors.append(f"{type(e).__name__} via {name}: {e}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{user}: no success in {RETRY_SECONDS}s: {e!r}")
                await _sleep(0.05)
                continue
            self.calls += 1
            if command is AddDurably:
                self.acked[user] = self.acked.get(user, 0) + amount
            value: int = result["value"]
            return value

    async def writeAll(self, users: list[str], parallel: int = 10) -> None:
        for start in range(0, len(users), parallel):
            await gatherResults(
                [_deferred(self.call(AddDurably, u, 1)) for u in users[start : start + parallel]]
            )

    async def checkAll(self, users: list[str]) -> None:
        """
        Every user's counter holds at least what was acknowledged, and reads
        the same through every node.
        """
        for user in users:
            values = set()
            for name in sorted(self.clients):
                result = await self._readVia(name, user)
                values.add(result)
            self.test.assertEqual(len(values), 1, f"{user} reads differently: {values}")
            [value] = values
            self.test.assertGreaterEqual(value, self.acked.get(user, 0), f"{user} lost writes")

    async def _readVia(self, name: str, user: str) -> int:
        deadline = time.monotonic() + RETRY_SECONDS
        while True:
            try:
                result = await self.clients[name].callRemote(Add, user=user, amount=0)
                value: int = result["value"]
                return value
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await _sleep(0.05)


class PostgresClusterIntegrationTests(TestCase):
    """
    Three (then four) node processes sharing one PostgreSQL database.
    """

    timeout = 600

    def setUp(self) -> None:
        self.database = makeDatabase(self)
        self.nodes: dict[str, NodeProcess] = {}
        self.load = _Load(self)
        self.users = [f"user{i}@example.com" for i in range(USERS)]

    async def startNode(self, name: str, *extra: str, peerPort: int = 0) -> NodeProcess:
        """
        Start node C{name} on this test's schema, stopped (and woken, if
        paused) at cleanup, and give it a client in L{load}.

        @param extra: more command-line arguments.
        @param peerPort: the peer listener's port; a free one if 0.
        """
        process = NodeProcess(
            FilePath(self.mktemp()),
            APP,
            "--node", name,
            "--postgres", postgresDSN(),
            "--postgres-schema", self.database.schema,
            "--peer-listen", f"tcp:{peerPort or freePort()}:interface=127.0.0.1",
            "--lease", str(LEASE),
            "--ship-interval", "0.2",
            *extra,
        )

        def cleanup() -> Deferred[Any]:
            if process.protocol is not None and process.protocol.running:
                os.kill(process.pid, signal.SIGCONT)
            return _deferred(process.stop())

        self.addCleanup(cleanup)
        await process.start()
        self.nodes[name] = process
        await self.load.add(name, process)
        return process

    def owners(self) -> tuple[dict[str, int], int]:
        """
        How many slots each node owns, and how many handoffs are under way.
        """

        def read(cursor: Any) -> tuple[dict[str, int], int]:
            cursor.execute("SELECT node, count(*) FROM slot_owners GROUP BY node")
            counts = {row[0]: int(row[1]) for row in cursor.fetchall()}
            cursor.execute("SELECT count(*) FROM slot_owners WHERE target IS NOT NULL")
            row = cursor.fetchone()
            return counts, int(row[0])

        result: tuple[dict[str, int], int] = self.database.transactBlocking(read)
        return result

    async def settled(self, members: set[str], seconds: float = SETTLE_SECONDS) -> float:
        """
        Wait until the slots are spread over exactly C{members} as rendezvous
        hashing says, with no handoff under way.

        @return: the seconds waited.
        """
        desired = list(rendezvousOwners(members, DEFAULT_SLOTS))

        def read(cursor: Any) -> tuple[list[str], int]:
            cursor.execute("SELECT node FROM slot_owners ORDER BY slot")
            nodes = [row[0] for row in cursor.fetchall()]
            cursor.execute("SELECT count(*) FROM slot_owners WHERE target IS NOT NULL")
            return nodes, int(cursor.fetchone()[0])

        started = time.monotonic()
        while True:
            nodes, moving = self.database.transactBlocking(read)
            if nodes == desired and moving == 0:
                return time.monotonic() - started
            if time.monotonic() - started > seconds:
                counts, _ = self.owners()
                raise AssertionError(f"not settled on {members}: {counts}, {moving} moving")
            await _sleep(0.1)

    def slotOwners(self) -> list[str]:
        def read(cursor: Any) -> list[str]:
            cursor.execute("SELECT node FROM slot_owners ORDER BY slot")
            return [row[0] for row in cursor.fetchall()]

        result: list[str] = self.database.transactBlocking(read)
        return result

    def epochsOf(self, store: str) -> list[int]:
        """
        The epochs of C{store}'s durable records, in sequence order.
        """

        def read(cursor: Any) -> list[int]:
            cursor.execute("SELECT epoch FROM records WHERE store = %s ORDER BY seq", (store,))
            return [int(row[0]) for row in cursor.fetchall()]

        result: list[int] = self.database.transactBlocking(read)
        return result

    def incarnation(self, name: str) -> int:
        def read(cursor: Any) -> int:
            cursor.execute("SELECT incarnation FROM nodes WHERE node = %s", (name,))
            return int(cursor.fetchone()[0])

        result: int = self.database.transactBlocking(read)
        return result

    def test_killAndPause(self) -> Deferred[None]:
        """
        (a) SIGKILL one of three nodes under load: its users are served by
        the others once its lease has run out and every acknowledged write
        is present.  (b) SIGSTOP another past its lease, then SIGCONT: it
        comes back as a new incarnation, serves nothing stale, and no
        acknowledged write is lost.
        """
        return _deferred(self._killAndPause())

    async def _killAndPause(self) -> None:
        for name in ["n1", "n2", "n3"]:
            await self.startNode(name)
        await self.settled({"n1", "n2", "n3"})
        await self.load.writeAll(self.users)
        await self.load.checkAll(self.users)

        # (a) SIGKILL n3.
        self.nodes["n3"].kill()
        self.load.drop("n3")
        killedAt = time.monotonic()
        await self.load.writeAll(self.users)
        recovered = time.monotonic() - killedAt
        await self.settled({"n1", "n2"})
        await self.load.checkAll(self.users)
        self.assertLess(recovered, LEASE + RETRY_SECONDS)
        print(f"\n(a) every user written again {recovered:.1f}s after SIGKILL "
              f"(lease {LEASE}s); {self.load.retried} retries so far")

        # (b) SIGSTOP n2 past its lease, writing through n1 meanwhile.
        n2 = self.nodes["n2"]
        owners = self.slotOwners()
        probes = [u for u in self.users if owners[slotForKey(u, DEFAULT_SLOTS)] == "n2"][:5]
        self.assertTrue(probes)
        late = connect(
            _reactor(), f"tcp:host=127.0.0.1:port={n2.port}", timeout=60.0,
            retryPolicy=lambda n: 0.1,
        )
        self.addCleanup(late.disconnect)
        await late.whenConnected(timeout=WAIT_SECONDS)
        os.kill(n2.pid, signal.SIGSTOP)
        self.load.drop("n2")
        try:
            await self.load.writeAll(self.users)
            await self.settled({"n1"})
            # Calls that reach n2 while it is stopped: it reads them only
            # when it wakes, with its old local copies still on disk.
            before = {u: await self.load._readVia("n1", u) for u in probes}
            lateCalls = [
                late.callRemote(AddDurably, user=u, amount=1).addErrback(lambda f: f)
                for u in probes
            ]
        finally:
            os.kill(n2.pid, signal.SIGCONT)
        outcomes = await gatherResults(lateCalls)
        served = sum(1 for r in outcomes if isinstance(r, dict))
        print(f"\n(b) {len(probes)} calls sent to n2 while stopped: {served} served by the "
              f"new owner, {len(probes) - served} refused")
        for user, result in zip(probes, outcomes):
            if isinstance(result, dict):
                # Served from the current copy (forwarded to the new owner),
                # never from n2's stale one, which holds less than the value
                # read through n1 just before.
                self.assertGreater(result["value"], before[user])
                self.load.acked[user] += 1
        deadline = time.monotonic() + WAIT_SECONDS
        while self.incarnation("n2") < 2:
            self.assertLess(time.monotonic(), deadline, "n2 never registered again")
            await _sleep(0.1)
        await self.load.add("n2", n2)
        await self.settled({"n1", "n2"})
        await self.load.writeAll(self.users)
        await self.load.checkAll(self.users)
        # No late write of the paused n2 at its old epoch landed after the
        # new owner's: along each moved store's chain the epochs never go
        # down (the backend refuses a write below the store's fence).
        for user in probes:
            epochs = self.epochsOf(storeNameForKey(user))
            self.assertEqual(epochs, sorted(epochs), user)

    def test_joinAndLeave(self) -> Deferred[None]:
        """
        (c) A fourth node joining under load takes its share of the slots;
        clients see at most retries and nothing is lost.  (d) A node stopped
        gracefully hands its slots off and exits cleanly; nothing is lost.
        """
        return _deferred(self._joinAndLeave())

    async def _joinAndLeave(self) -> None:
        for name in ["n1", "n2", "n3"]:
            await self.startNode(name)
        await self.settled({"n1", "n2", "n3"})
        await self.load.writeAll(self.users)

        running = True

        async def keepWriting() -> None:
            while running:
                await self.load.writeAll(self.users)

        # (c) n4 joins under load.
        writer = _deferred(keepWriting())
        await self.startNode("n4")
        seconds = await self.settled({"n1", "n2", "n3", "n4"})
        running = False
        await writer
        await self.load.checkAll(self.users)
        counts, _ = self.owners()
        self.assertGreater(counts["n4"], DEFAULT_SLOTS // 8)
        print(f"\n(c) rebalanced onto n4 in {seconds:.1f}s; {self.load.calls} calls, "
              f"{self.load.retried} retries: {self.load.errors}")
        # At most retries: whatever a client saw while slots moved is one of
        # the retryable refusals (the call did not run), never another error.
        self.assertEqual(
            [e for e in self.load.errors
             if not e.startswith(("NotOwner", "NodeStopping", "OwnerUnavailable"))],
            [],
        )

        # (d) n2 stops gracefully under load.
        errorsBefore = len(self.load.errors)
        running = True
        writer = _deferred(keepWriting())
        n2 = self.nodes["n2"]
        self.load.drop("n2")
        await _deferred(n2.stop())
        assert n2.protocol is not None
        self.assertIn("Node n2 stopped", n2.describe())
        await self.settled({"n1", "n3", "n4"})
        running = False
        await writer
        await self.load.checkAll(self.users)
        self.assertNotIn("Traceback", n2.describe())
        # The other nodes route the calls for n2's slots again while they
        # move: their clients see no error of the handoff.  (Calls a client
        # had sent to n2 itself are answered NodeStopping: call again.)
        errors = self.load.errors[errorsBefore:]
        print(f"\n(d) n2 stopped gracefully; client errors meanwhile: {errors}")
        self.assertEqual(
            [e for e in errors
             if e.startswith(("NotOwner", "NodeStopping", "OwnerUnavailable"))
             and " via n2: " not in e],
            [],
        )

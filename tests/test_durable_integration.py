"""
Integration test of durable shipping: a real C{twistd -n fractal} node
process, killed with SIGKILL under an C{ack="durable"} load, loses no
acknowledged write once its users are restored onto a fresh data directory;
under an C{ack="local"} load, losing its disk as well loses only the commits
after the restored points it reports; and a node fenced out of a store by
another writer stops serving that store's slot.
"""

from __future__ import annotations

import os
import re
import signal
import time
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from examples.mailbox import Deliver, Inbox
from fractal.durable._threads import runSynchronously
from fractal.durable.filesystem import FilesystemBackend
from fractal.durable.interfaces import RecordInfo
from fractal.keys import slotForKey, storeNameForKey
from fractal.protocol import OwnerUnavailable
from tests.test_integration_node import NodeProcess

DURABLE_MAILBOX = "tests._durableapp:application"
USERS = 50
WORKERS = 10
RESUME_SECONDS = 90.0
"""
The most seconds a restarted node may take to ship the stores it resumed.
"""
MAX_CALLS = USERS * 40
"""
At most 40 messages per user, so one C{Inbox} call (limit 50) lists them all.
"""


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class SigkillTests(TestCase):
    """
    A node killed outright.
    """

    timeout = 300

    def node(self, *extra: str) -> NodeProcess:
        process = NodeProcess(FilePath(self.mktemp()), DURABLE_MAILBOX, *extra)
        self.addCleanup(lambda: Deferred.fromCoroutine(process.stop()))
        return process

    async def connect(self, node: NodeProcess) -> amp.AMP:
        return await _connect(self, node)

    async def load(self, node: NodeProcess, acknowledged: dict[str, set[str]]) -> None:
        """
        Deliver mail to L{USERS} users from L{WORKERS} concurrent callers,
        recording each acknowledged message, and SIGKILL the node once 300
        are acknowledged.
        """
        reactor = _reactor()
        client = await self.connect(node)
        counter = iter(range(MAX_CALLS))
        killed = False

        async def worker() -> None:
            for n in counter:
                if killed:
                    return
                user = f"user{n % USERS}"
                subject = f"message {n}"
                try:
                    await client.callRemote(
                        Deliver, user=user, sender="load@example.com", subject=subject, body="b"
                    )
                except Exception:
                    return
                acknowledged.setdefault(user, set()).add(subject)

        load = gatherResults([Deferred.fromCoroutine(worker()) for _ in range(WORKERS)])
        while sum(map(len, acknowledged.values())) < 300 and node.protocol.running:  # type: ignore[union-attr]
            await _sleep(reactor, 0.05)
        os.kill(node.pid, signal.SIGKILL)
        killed = True
        await load
        await node.protocol.ended  # type: ignore[union-attr]
        self.assertEqual(node.protocol.signal, signal.SIGKILL)  # type: ignore[union-attr]
        self.assertGreaterEqual(sum(map(len, acknowledged.values())), 300)

    async def assertAllPresent(self, node: NodeProcess, acknowledged: dict[str, set[str]]) -> None:
        """
        Every acknowledged message is in its user's inbox on C{node}.
        """
        client = await self.connect(node)
        for user, subjects in acknowledged.items():
            answer = await client.callRemote(Inbox, user=user, limit=50, unreadOnly=False)
            found = {message["subject"] for message in answer["messages"]}
            self.assertEqual(subjects - found, set(), f"{user} lost acknowledged messages")

    async def test_localAckSurvivesSigkillOnSameDisk(self) -> None:
        """
        With C{ack="local"}, a node killed with SIGKILL loses nothing on its
        own disk; a node started again on that disk ships, without being
        called, what the killed one had not shipped, so that restoring onto a
        fresh data directory (after that node too is killed) finds every
        acknowledged message.
        """
        base = FilePath(self.mktemp())
        first = await _mailboxNode(self, "--ship-interval", "0.2", data=base)
        acknowledged: dict[str, set[str]] = {}
        await self.load(first, acknowledged)

        again = await _mailboxNode(self, "--ship-interval", "0.2", data=base)
        # The stores to resume are found by a scan at start-up, and the node
        # logs when it has shipped them all; wait for that (however loaded
        # the machine), within a generous bound.
        reactor = _reactor()
        deadline = reactor.seconds() + RESUME_SECONDS
        while True:
            log = again.log.getContent().decode("utf-8", "replace") if again.log.exists() else ""
            done = re.search(r"Shipped (\d+) of the (\d+) stores resumed", log)
            if done is not None or reactor.seconds() > deadline:
                break
            await _sleep(reactor, 0.1)
        os.kill(again.pid, signal.SIGKILL)
        await again.protocol.ended  # type: ignore[union-attr]
        self.assertIn("Resuming shipping of", again.log.getContent().decode("utf-8", "replace"))
        self.assertIsNotNone(
            done, f"resumed stores not shipped in {RESUME_SECONDS}s:\n{again.describe()}"
        )
        assert done is not None
        self.assertEqual(done.group(1), done.group(2), again.describe())

        fresh = self.node("--durable", again.data.child("durable").path)
        await fresh.start()
        await self.assertAllPresent(fresh, acknowledged)

        third = NodeProcess(base, "examples.mailbox:application")
        self.addCleanup(lambda: Deferred.fromCoroutine(third.stop()))
        await third.start()
        await self.assertAllPresent(third, acknowledged)

    async def test_acknowledgedSurvivesSigkill(self) -> None:
        """
        Every call a client saw acknowledged with C{ack="durable"} before the
        node was killed with SIGKILL is present after the users are restored
        from the durable directory onto a fresh data directory.
        """
        first = self.node()
        await first.start()
        acknowledged: dict[str, set[str]] = {}
        await self.load(first, acknowledged)
        second = self.node("--durable", first.data.child("durable").path)
        await second.start()
        await self.assertAllPresent(second, acknowledged)


SHIP_INTERVAL = 1.0
"""
The ship interval of the nodes of L{DiskLossTests} and L{FencingTests}.
"""
WAIT_SECONDS = 120.0
"""
The most seconds a test waits for a node to ship or to notice a fence,
however loaded the machine.
"""
PACE = 0.05
"""
Seconds each caller of L{DiskLossTests} waits between its calls.
"""
_RESTORED = re.compile(
    r"Restored store ([0-9a-f]{64}) \(key '([^']+)'\) from its durable copy, to record "
    r"(\d+) .*?takenAt=([0-9.]+)"
)


async def _mailboxNode(
    test: TestCase, *arguments: str, data: FilePath[str] | None = None
) -> NodeProcess:
    """
    Start a mailbox node with C{arguments} on C{data} (a new directory if
    L{None}), stopped when C{test} ends.
    """
    node = NodeProcess(
        data if data is not None else FilePath(test.mktemp()),
        "examples.mailbox:application",
        *arguments,
    )
    test.addCleanup(lambda: Deferred.fromCoroutine(node.stop()))
    await node.start()
    return node


async def _connect(test: TestCase, node: NodeProcess) -> amp.AMP:
    """
    An AMP connection to C{node}, closed when C{test} ends.
    """
    endpoint = TCP4ClientEndpoint(_reactor(), "127.0.0.1", node.port, timeout=5)
    protocol: amp.AMP = await connectProtocol(endpoint, amp.AMP())
    test.addCleanup(protocol.transport.loseConnection)
    return protocol


def _head(backend: FilesystemBackend, store: str) -> RecordInfo | None:
    """
    The newest record of C{store} in C{backend}, read synchronously.
    """
    result: list[Any] = []
    backend.head(store).addBoth(result.append)
    [head] = result
    if isinstance(head, Failure):
        head.raiseException()
    assert head is None or isinstance(head, RecordInfo)
    return head


class DiskLossTests(TestCase):
    """
    A node acknowledging locally loses its disk.
    """

    timeout = 400

    async def test_localAckDiskLossBoundedAndReported(self) -> None:
        """
        A node shipping every L{SHIP_INTERVAL} seconds to a durable directory
        of its own, under an C{ack="local"} load, is killed with SIGKILL and
        its data directory deleted.  A node started on a fresh data directory
        against the same durable directory restores each user on first use
        and logs the point it restored (record and the time its image was
        taken).  Every message acknowledged more than the ship interval plus
        the reported lag beyond it before the kill is there; every message
        missing was acknowledged after the image its store was restored from
        was taken (the unshipped window); and each report names the record
        the backend holds as the store's newest.
        """
        reactor = _reactor()
        durable = FilePath(self.mktemp())
        backend = FilesystemBackend(durable, runInThread=runSynchronously)
        self.addCleanup(backend.close)
        first = await _mailboxNode(
            self, "--ship-interval", str(SHIP_INTERVAL), "--durable", durable.path
        )
        client = await _connect(self, first)
        users = [f"user{n}" for n in range(USERS)]
        acknowledged: dict[str, dict[str, float]] = {user: {} for user in users}
        sent: set[str] = set()
        counter = iter(range(MAX_CALLS))
        stop = False

        async def worker() -> None:
            for n in counter:
                if stop:
                    return
                user = users[n % USERS]
                subject = f"message {n}"
                sent.add(subject)
                try:
                    await client.callRemote(
                        Deliver, user=user, sender="load@example.com", subject=subject, body="b"
                    )
                except Exception:
                    return
                acknowledged[user][subject] = time.time()
                # Paced, so that the calls last through several ship cycles.
                await _sleep(reactor, PACE)

        load = gatherResults([Deferred.fromCoroutine(worker()) for _ in range(WORKERS)])
        # Load until every user's store has been shipped at least once, and
        # then for three more ship intervals and at least 100 more messages,
        # so that there is both a shipped past and (very likely) an
        # unshipped window.
        deadline = reactor.seconds() + WAIT_SECONDS
        stores = {user: storeNameForKey(user) for user in users}
        while (
            reactor.seconds() < deadline
            and first.protocol.running  # type: ignore[union-attr]
            and not load.called
        ):
            if all(_head(backend, stores[user]) is not None for user in users):
                break
            await _sleep(reactor, 0.1)
        shippedAt = sum(map(len, acknowledged.values()))
        await _sleep(reactor, 3 * SHIP_INTERVAL)
        while (
            sum(map(len, acknowledged.values())) < shippedAt + 100
            and first.protocol.running  # type: ignore[union-attr]
            and reactor.seconds() < deadline
            and not load.called
        ):
            await _sleep(reactor, 0.02)
        killedAt = time.time()
        os.kill(first.pid, signal.SIGKILL)
        stop = True
        await load
        await first.protocol.ended  # type: ignore[union-attr]
        self.assertEqual(first.protocol.signal, signal.SIGKILL)  # type: ignore[union-attr]
        heads = {user: _head(backend, stores[user]) for user in users}
        self.assertEqual(
            [user for user, head in heads.items() if head is None],
            [],
            f"stores never shipped in {WAIT_SECONDS}s:\n{first.describe()}",
        )
        first.data.remove()

        second = await _mailboxNode(self, "--durable", durable.path)
        client = await _connect(self, second)
        found: dict[str, set[str]] = {}
        for user in users:
            answer = await client.callRemote(Inbox, user=user, limit=50, unreadOnly=False)
            found[user] = {message["subject"] for message in answer["messages"]}
        log = second.log.getContent().decode("utf-8", "replace")
        reports = {
            match.group(2): (match.group(1), int(match.group(3)), float(match.group(4)))
            for match in _RESTORED.finditer(log)
        }
        self.assertEqual(sorted(reports), sorted(users), "restores not reported:\n" + log[-4000:])
        lost = 0
        for user in users:
            store, seq, takenAt = reports[user]
            head = heads[user]
            assert head is not None
            self.assertEqual((store, seq), (stores[user], head.seq))
            self.assertLessEqual(takenAt, killedAt)
            reportedLag = killedAt - takenAt
            margin = max(0.0, reportedLag - SHIP_INTERVAL)
            acks = acknowledged[user]
            missing = set(acks) - found[user]
            lost += len(missing)
            self.assertEqual(found[user] - sent, set())
            old = {s for s, at in acks.items() if at < killedAt - (SHIP_INTERVAL + margin)}
            self.assertEqual(
                old & missing, set(), f"{user} lost messages acknowledged before its restored point"
            )
            self.assertEqual(
                {s for s in missing if acks[s] <= takenAt},
                set(),
                f"{user} lost messages outside its unshipped window",
            )
        # The restored points are not vacuous: most acknowledged messages
        # were in an image shipped before the kill.
        self.assertLess(lost, sum(map(len, acknowledged.values())))


class FencingTests(TestCase):
    """
    A node fenced out of a store by another writer.
    """

    timeout = 300

    async def test_fencedNodeStopsServingSlot(self) -> None:
        """
        Once another writer has fenced alice's store at epoch 2 in the node's
        durable directory, the node's next ship of the store is refused, and
        from then on the node refuses the calls of alice's slot with
        L{OwnerUnavailable} (saying which slot), logs that it stopped serving
        the slot, ships nothing more of the store, and serves other slots
        on.
        """
        reactor = _reactor()
        durable = FilePath(self.mktemp())
        backend = FilesystemBackend(durable, runInThread=runSynchronously)
        self.addCleanup(backend.close)
        node = await _mailboxNode(
            self, "--ship-interval", str(SHIP_INTERVAL), "--durable", durable.path
        )
        client = await _connect(self, node)
        alice = storeNameForKey("alice")
        slot = slotForKey("alice")
        other = next(f"bob{n}" for n in range(100) if slotForKey(f"bob{n}") != slot)

        async def deliver(user: str, subject: str) -> Any:
            return await client.callRemote(
                Deliver, user=user, sender="s@example.com", subject=subject, body="b"
            )

        await deliver("alice", "before")
        deadline = reactor.seconds() + WAIT_SECONDS
        while _head(backend, alice) is None and reactor.seconds() < deadline:
            await _sleep(reactor, 0.1)
        head = _head(backend, alice)
        self.assertIsNotNone(head, node.describe())
        assert head is not None
        self.assertEqual(head.epoch, 1)
        fenced: list[Any] = []
        backend.fence(alice, 2).addBoth(fenced.append)
        self.assertEqual(fenced, [None])

        await deliver("alice", "after the fence")
        refused: OwnerUnavailable | None = None
        n = 0
        while reactor.seconds() < deadline:
            try:
                await deliver("alice", f"poll {n}")
            except OwnerUnavailable as e:
                refused = e
                break
            n += 1
            await _sleep(reactor, 0.1)
        self.assertIsNotNone(refused, f"not fenced in {WAIT_SECONDS}s:\n{node.describe()}")
        self.assertIn(f"no longer serves slot {slot}", str(refused))
        self.assertIn("epoch 2", str(refused))
        with self.assertRaises(OwnerUnavailable):
            await client.callRemote(Inbox, user="alice", limit=50, unreadOnly=False)
        self.assertIn("messageID", await deliver(other, "elsewhere"))
        log = node.log.getContent().decode("utf-8", "replace")
        self.assertIn(f"Stopped serving slot {slot}: store {alice} was fenced at epoch 2", log)
        newest = _head(backend, alice)
        assert newest is not None
        self.assertEqual((newest.seq, newest.epoch), (head.seq, 1))


async def _sleep(reactor: Any, seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)

"""
Integration test of durable shipping: a real C{twistd -n fractal} node
process, killed with SIGKILL under an C{ack="durable"} load, loses no
acknowledged write once its users are restored onto a fresh data directory.
"""

from __future__ import annotations

import os
import re
import signal
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.protocols import amp
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from examples.mailbox import Deliver, Inbox
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
        endpoint = TCP4ClientEndpoint(_reactor(), "127.0.0.1", node.port, timeout=5)
        protocol: amp.AMP = await connectProtocol(endpoint, amp.AMP())
        self.addCleanup(protocol.transport.loseConnection)
        return protocol

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
        first = NodeProcess(base, "examples.mailbox:application", "--ship-interval", "0.2")
        self.addCleanup(lambda: Deferred.fromCoroutine(first.stop()))
        await first.start()
        acknowledged: dict[str, set[str]] = {}
        await self.load(first, acknowledged)

        again = NodeProcess(base, "examples.mailbox:application", "--ship-interval", "0.2")
        self.addCleanup(lambda: Deferred.fromCoroutine(again.stop()))
        await again.start()
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


async def _sleep(reactor: Any, seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)

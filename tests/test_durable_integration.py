"""
Integration test of durable shipping: a real C{twistd -n fractal} node
process, killed with SIGKILL under an C{ack="durable"} load, loses no
acknowledged write once its users are restored onto a fresh data directory.
"""

from __future__ import annotations

import os
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

    timeout = 120

    def node(self, *extra: str) -> NodeProcess:
        process = NodeProcess(FilePath(self.mktemp()), DURABLE_MAILBOX, *extra)
        self.addCleanup(lambda: Deferred.fromCoroutine(process.stop()))
        return process

    async def connect(self, node: NodeProcess) -> amp.AMP:
        endpoint = TCP4ClientEndpoint(_reactor(), "127.0.0.1", node.port, timeout=5)
        protocol: amp.AMP = await connectProtocol(endpoint, amp.AMP())
        self.addCleanup(protocol.transport.loseConnection)
        return protocol

    async def test_acknowledgedSurvivesSigkill(self) -> None:
        """
        Every call a client saw acknowledged with C{ack="durable"} before the
        node was killed with SIGKILL is present after the users are restored
        from the durable directory onto a fresh data directory.
        """
        reactor = _reactor()
        first = self.node()
        await first.start()
        client = await self.connect(first)
        acknowledged: dict[str, set[str]] = {f"user{i}": set() for i in range(USERS)}
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
                acknowledged[user].add(subject)

        def kill() -> None:
            nonlocal killed
            os.kill(first.pid, signal.SIGKILL)
            killed = True

        load = gatherResults([Deferred.fromCoroutine(worker()) for _ in range(WORKERS)])
        # Kill under load, once a good number of calls were acknowledged.
        while sum(map(len, acknowledged.values())) < 300 and first.protocol.running:  # type: ignore[union-attr]
            await Deferred.fromCoroutine(_sleep(reactor, 0.05))
        kill()
        await load
        await first.protocol.ended  # type: ignore[union-attr]
        self.assertEqual(first.protocol.signal, signal.SIGKILL)  # type: ignore[union-attr]
        total = sum(map(len, acknowledged.values()))
        self.assertGreaterEqual(total, 300)

        second = self.node("--durable", first.data.child("durable").path)
        await second.start()
        client = await self.connect(second)
        for user, subjects in acknowledged.items():
            answer = await client.callRemote(Inbox, user=user, limit=50, unreadOnly=False)
            found = {message["subject"] for message in answer["messages"]}
            self.assertEqual(subjects - found, set(), f"{user} lost acknowledged messages")


async def _sleep(reactor: Any, seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)

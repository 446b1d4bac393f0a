# -*- test-case-name: tests.test_integration_node -*-
"""
Integration tests: a real C{twistd -n fractal} node process on a loopback
port, driven over TCP by L{fractal.client}.

Each test starts its own node in a fresh directory and always stops it in
cleanup (SIGTERM, then SIGKILL if it lingers).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase

from examples.mailbox import (
    MAX_HEADER_BYTES,
    Deliver,
    Inbox,
    InvalidMessage,
    MarkRead,
    NoSuchMessage,
    Stats,
)
from fractal.client import FractalClient, connect
from fractal.keys import InvalidUserKey, storeNameForKey
from fractal.protocol import CallFailed, Overloaded
from tests._ports import freePort

ROOT = FilePath(__file__).parent().parent()
MAILBOX = "examples.mailbox:application"
FRAGILE = "tests._integrationapp:application"
STARTUP_SECONDS = 60.0
STOP_SECONDS = 20.0
HEX64 = re.compile(r"[0-9a-f]{64}")

T = TypeVar("T")


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _deferred(coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
    return Deferred.fromCoroutine(coroutine)


def _twistdCommand() -> list[str]:
    """
    The C{twistd} console script of this Python, as an operator runs it (the
    current directory is then not on C{sys.path}); or, if it is missing, the
    same entry point through C{-c}.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(script, os.X_OK):
        return [sys.executable, script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class _NodeProcessProtocol(ProcessProtocol):
    def __init__(self) -> None:
        self.output: list[bytes] = []
        self.ended: Deferred[int | None] = Deferred()
        self.exitCode: int | None = None
        self.signal: int | None = None
        self.running = True

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        value = reason.value
        if isinstance(value, (ProcessDone, ProcessTerminated)):
            self.exitCode = value.exitCode
            self.signal = value.signal
        self.ended.callback(self.exitCode)


def _storesIn(files: list[str]) -> set[str]:
    """
    The names of the user stores among paths relative to a data directory.
    """
    names = set()
    for path in files:
        parts = path.split(os.sep)
        if len(parts) > 3 and parts[1] == "stores" and HEX64.fullmatch(parts[3]):
            names.add(parts[3])
    return names


def _waitStopped(pid: int, seconds: float = 10.0) -> None:
    """
    Wait until every thread of process C{pid}, sent C{SIGSTOP}, is stopped
    (a thread finishes the system call it is in first).

    @raise AssertionError: if some thread is still running after C{seconds}.
    """
    deadline = time.monotonic() + seconds
    taskDir = f"/proc/{pid}/task"
    while True:
        running = []
        for tid in os.listdir(taskDir):
            try:
                with open(os.path.join(taskDir, tid, "stat")) as f:
                    stat = f.read()
            except OSError:
                continue  # the thread has exited
            # The state follows the command name, which is in parentheses.
            state = stat[stat.rindex(")") + 2]
            if state not in "TtZX":
                running.append(tid)
        if not running:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"threads {running} of process {pid} did not stop")
        time.sleep(0.001)


class NodeProcess:
    """
    One C{twistd -n fractal} process.

    @ivar base: the test's directory; the node runs in C{base/work} with its
        data in C{base/work/data}, and writes its log to C{base/node.log}.
    """

    def __init__(self, base: FilePath[str], app: str, *extra: str) -> None:
        self.base = base
        self.work = base.child("work")
        self.data = self.work.child("data")
        self.log = base.child("node.log")
        self.app = app
        self.extra = extra
        self.work.makedirs(ignoreExistingDirectory=True)
        self.protocol: _NodeProcessProtocol | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.protocol is not None and self.protocol.transport is not None
        pid: int = self.protocol.transport.pid
        return pid

    def describe(self) -> str:
        """
        The node's output and log, for failure messages.
        """
        text = b"".join(self.protocol.output if self.protocol else []).decode("utf-8", "replace")
        if self.log.exists():
            text += self.log.getContent().decode("utf-8", "replace")
        return text[-4000:]

    async def start(self) -> None:
        """
        Spawn the node and wait, within L{STARTUP_SECONDS}, until it listens
        on its port.  The port was free when chosen; if another process took
        it meanwhile, try again with another.
        """
        for attempt in range(3):
            if await self._start():
                return
            if "Address already in use" not in self.describe():
                break
        raise AssertionError(f"the node did not start listening:\n{self.describe()}")

    async def _start(self) -> bool:
        reactor = _reactor()
        self.port = freePort()
        argv = _twistdCommand() + [
            "-n",
            "--pidfile=",
            f"--logfile={self.log.path}",
            "fractal",
            "--app",
            self.app,
            "--data",
            "data",
            "--listen",
            f"tcp:{self.port}:interface=127.0.0.1",
            *self.extra,
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [ROOT.path] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        self.protocol = _NodeProcessProtocol()
        reactor.spawnProcess(self.protocol, argv[0], argv, env=env, path=self.work.path)
        listening = f"starting on {self.port}"
        deadline = reactor.seconds() + STARTUP_SECONDS
        while reactor.seconds() < deadline and self.protocol.running:
            # The log line tells that it is this node, not a stranger that
            # took the port, which accepts the connection.
            if listening in self.describe():
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                        return True
                except OSError:
                    pass
            await deferLater(reactor, 0.05, lambda: None)
        if self.protocol.running:
            self.kill()
            await self.protocol.ended
        return False

    async def stop(self) -> bool:
        """
        SIGTERM the node and wait for it to exit; SIGKILL it after
        L{STOP_SECONDS}.

        @return: whether it stopped cleanly: its exit status is 0, or (as
            C{twistd} ends by re-raising the signal that stopped it) it was
            ended by SIGTERM after the node logged that it had stopped.
        """
        protocol = self.protocol
        if protocol is None:
            return False
        if protocol.running:
            protocol.transport.signalProcess("TERM")  # type: ignore[union-attr]
            timer = _reactor().callLater(STOP_SECONDS, self.kill)
            await protocol.ended
            if timer.active():
                timer.cancel()
        if protocol.exitCode == 0:
            return True
        return protocol.signal == signal.SIGTERM and bool(
            re.search(r"Node \S+ stopped", self.describe())
        )

    def kill(self) -> None:
        if self.protocol is not None and self.protocol.running:
            os.kill(self.pid, signal.SIGKILL)

    def openFiles(self) -> list[str]:
        """
        The files in the data directory the node holds open now: one true
        snapshot of its descriptor table, taken with every thread of the node
        stopped.

        Listing C{/proc/<pid>/fd} of a running process is not atomic: while
        the links are read one by one, the node may close a store and open
        another on the same descriptor numbers, so one listing can show the
        old store's last files beside the new one's first, a state the node
        was never in.  Stopping the node (C{SIGSTOP}) for the listing, and
        waiting until each of its threads is seen stopped, rules that out.
        """
        os.kill(self.pid, signal.SIGSTOP)
        try:
            _waitStopped(self.pid)
            paths = []
            fdDir = f"/proc/{self.pid}/fd"
            for fd in os.listdir(fdDir):
                try:
                    target = os.readlink(os.path.join(fdDir, fd))
                except OSError:
                    continue
                if target.startswith(self.data.path + os.sep):
                    paths.append(target[len(self.data.path) :])
        finally:
            os.kill(self.pid, signal.SIGCONT)
        return sorted(paths)

    def openStores(self) -> set[str]:
        """
        The names of the stores whose files the node holds open now.
        """
        return _storesIn(self.openFiles())


class NodeIntegrationTests(TestCase):
    """
    A real node process serving the mailbox.
    """

    timeout = 90

    def node(self, app: str = MAILBOX, *extra: str, base: FilePath[str] | None = None) -> NodeProcess:
        """
        A node process in a fresh directory, stopped at the end of the test.
        """
        process = NodeProcess(base or FilePath(self.mktemp()), app, *extra)

        async def stop() -> None:
            await process.stop()

        def cleanup() -> Deferred[None]:
            return _deferred(stop())

        self.addCleanup(cleanup)
        return process

    async def client(self, node: NodeProcess, timeout: float = 10) -> FractalClient:
        """
        A connected client of C{node}, disconnected at the end of the test.
        """
        client = connect(
            _reactor(),
            f"tcp:host=127.0.0.1:port={node.port}",
            timeout=timeout,
            retryPolicy=lambda n: 0.1,
        )
        self.addCleanup(client.disconnect)
        await client.whenConnected()
        return client

    def filesOutside(self, node: NodeProcess) -> list[str]:
        """
        Every file under the test's directory that is neither in the node's
        data directory nor its log.
        """
        outside = []
        for path in node.base.walk():
            if path.isdir() or path == node.log:
                continue
            if node.data == path or node.data in path.parents():
                continue
            outside.append(path.path)
        return outside

    def test_manyUsersSurviveRestart(self) -> Deferred[None]:
        """
        Mail delivered to 100 users, some of it marked read, is all there
        after the node is stopped with SIGTERM (exiting cleanly) and started
        again on the same data directory.
        """
        return _deferred(self._manyUsersSurviveRestart())

    async def _manyUsersSurviveRestart(self) -> None:
        users = [f"user{n}@example.com" for n in range(100)]
        node = self.node()
        await node.start()
        client = await self.client(node)

        async def fill(user: str) -> list[int]:
            ids = []
            for n in range(3):
                answer = await client.callRemote(
                    Deliver, user=user, sender="bob@example.com", subject=f"s{n}", body=f"b{n}"
                )
                ids.append(answer["messageID"])
            await client.callRemote(MarkRead, user=user, messageID=ids[0])
            return ids

        delivered = await _inBatches(fill, users, 20)
        expected = {}
        for user, ids in zip(users, delivered):
            self.assertEqual(len(set(ids)), 3)
            expected[user] = [
                {"messageID": ids[2], "sender": "bob@example.com", "subject": "s2", "read": False},
                {"messageID": ids[1], "sender": "bob@example.com", "subject": "s1", "read": False},
                {"messageID": ids[0], "sender": "bob@example.com", "subject": "s0", "read": True},
            ]

        async def check(user: str) -> None:
            stats = await client.callRemote(Stats, user=user)
            self.assertEqual(stats, {"total": 3, "unread": 2}, user)
            inbox = await client.callRemote(Inbox, user=user, limit=10, unreadOnly=False)
            self.assertEqual(inbox["messages"], expected[user], user)
            unread = await client.callRemote(Inbox, user=user, limit=10, unreadOnly=True)
            self.assertEqual(unread["messages"], expected[user][:2], user)

        await _inBatches(check, users, 20)
        await client.disconnect()
        self.assertTrue(await node.stop(), node.describe())

        await node.start()
        client = await self.client(node)
        await _inBatches(check, users, 20)
        stores = {path.basename() for path in node.data.walk() if HEX64.fullmatch(path.basename())}
        self.assertEqual(stores, {storeNameForKey(user) for user in users})
        self.assertEqual(self.filesOutside(node), [])

    def test_maxOpenStores(self) -> Deferred[None]:
        """
        With a store limit of 10 (from a configuration file), calls for 100
        users (10 times as many) all succeed, and the node never holds more
        than 10 stores' files open.
        """
        return _deferred(self._maxOpenStores())

    async def _maxOpenStores(self) -> None:
        if not os.path.isdir("/proc/self/fd"):
            raise SkipTest("needs /proc/<pid>/fd to see the node's open files")
        limit = 10
        users = [f"crowd{n}" for n in range(limit * 10)]
        base = FilePath(self.mktemp())
        base.makedirs()
        config = base.child("node.toml")
        config.setContent(
            f'app = "{MAILBOX}"\nmax-open-stores = 1000\n'
            f'[[node]]\nid = "solo"\nmax-open-stores = {limit}\n'.encode()
        )
        node = self.node(MAILBOX, "--config", config.path, base=base)
        await node.start()
        client = await self.client(node)
        expected = {storeNameForKey(user) for user in users}
        seen: set[str] = set()
        samples: list[list[str]] = []

        def sample() -> None:
            files = node.openFiles()
            samples.append(files)
            seen.update(_storesIn(files))

        async def call(user: str) -> None:
            # With more calls in flight than stores may be open, the node
            # may refuse with the retryable Overloaded: retry, as a client
            # should.
            for attempt in range(50):
                try:
                    await client.callRemote(Deliver, user=user, sender="s", subject="t", body="b")
                    break
                except Overloaded:
                    await deferLater(_reactor(), 0.02, lambda: None)
            else:
                self.fail(f"{user}: still overloaded after 50 attempts")
            sample()

        for round in range(2):
            for start in range(0, len(users), 15):
                await _inBatches(call, users[start : start + 15], 15)
                sample()
        for user in users:
            self.assertEqual(
                await client.callRemote(Stats, user=user), {"total": 2, "unread": 2}, user
            )
            sample()
        self.assertIn("Node solo stopping", node.describe() if await node.stop() else "")
        for files in samples:
            self.assertLessEqual(len(_storesIn(files)), limit, "\n".join(files))
        # The sampling saw stores open: it was looking at the right files.
        self.assertGreater(len(seen), limit)
        self.assertEqual(seen - expected, set(), [f for s in samples for f in s])

    def test_badInput(self) -> Deferred[None]:
        """
        Each kind of bad input gets a clear AMP error while the node goes on
        serving the same and other connections, and no file appears outside
        the data directory.
        """
        return _deferred(self._badInput())

    async def _badInput(self) -> None:
        from tests._integrationapp import Explode

        reactor = _reactor()
        node = self.node(FRAGILE)
        await node.start()
        client = await self.client(node)
        bystander = await self.client(node)
        raw = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", node.port, timeout=5), amp.AMP()
        )
        self.addCleanup(raw.transport.loseConnection)

        async def stillServing() -> None:
            for who in (client, bystander):
                answer = await who.callRemote(
                    Deliver, user="bystander", sender="s", subject="ok", body="b"
                )
                self.assertIsInstance(answer["messageID"], int)

        async def refused(
            call: Callable[[], Awaitable[Any]],
            error: type[Exception] | tuple[type[Exception], ...],
            *words: str,
        ) -> None:
            try:
                await call()
            except error as e:
                for word in words:
                    self.assertIn(word, str(e))
            else:
                self.fail(f"{call} succeeded; {error} expected")
            await stillServing()

        def deliverTo(user: str) -> Callable[[], Awaitable[Any]]:
            return lambda: client.callRemote(Deliver, user=user, sender="s", subject="t", body="b")

        await refused(deliverTo(""), InvalidUserKey, "empty")
        await refused(deliverTo("k" * 256), InvalidUserKey, "256 bytes")
        await refused(deliverTo("a\x00b"), InvalidUserKey, "control character")
        await refused(deliverTo("tab\there"), InvalidUserKey, "control character")

        # A hostile-looking key is a valid key: it works, and its store is
        # named by the key's hash inside the data directory.
        hostile = "../../etc/passwd"
        answer = await deliverTo(hostile)()
        self.assertEqual(
            await client.callRemote(Stats, user=hostile), {"total": 1, "unread": 1}
        )
        self.assertIsInstance(answer["messageID"], int)
        self.assertTrue(
            any(path.basename() == storeNameForKey(hostile) for path in node.data.walk())
        )

        # Bytes that are not UTF-8, where the command wants text.
        async def undecodable() -> None:
            await raw.callRemoteString(
                b"Deliver", user=b"\xff\xfe\xfd", sender=b"s", subject=b"t", body=b"b"
            )

        await refused(undecodable, amp.RemoteAmpError)
        try:
            await raw.callRemoteString(
                b"Deliver", user=b"ok", sender=b"\xc3\x28", subject=b"t", body=b"b"
            )
        except amp.RemoteAmpError as e:
            self.assertEqual(e.errorCode, b"INVALID_REQUEST")
            self.assertIn("utf-8", str(e))
        else:
            self.fail("an undecodable argument was accepted")

        # A command the application does not have.
        async def unknown() -> None:
            await raw.callRemoteString(b"DropAllTables", user=b"alice")

        await refused(unknown, amp.UnhandledCommand, "DropAllTables")

        class Unknown(Deliver):
            commandName = b"NoSuchCommand"

        await refused(
            lambda: client.callRemote(Unknown, user="alice", sender="s", subject="t", body="b"),
            amp.UnhandledCommand,
        )
        # AMP's own StartTLS is not exposed either.
        await refused(
            lambda: raw.callRemoteString(b"StartTLS"), (amp.UnhandledCommand, amp.RemoteAmpError)
        )

        # A missing argument.
        try:
            await raw.callRemoteString(b"Deliver", user=b"alice", sender=b"s")
        except amp.RemoteAmpError as e:
            self.assertEqual(e.errorCode, b"INVALID_REQUEST")
            self.assertIn("subject", str(e))
        else:
            self.fail("a call without its arguments was accepted")
        await stillServing()

        # An oversized value: a sender beyond what the mailbox accepts is its
        # declared error; a value beyond AMP's limit is refused by the client
        # before anything is sent.
        await refused(
            lambda: client.callRemote(
                Deliver, user="alice", sender="s" * (MAX_HEADER_BYTES + 1), subject="t", body="b"
            ),
            InvalidMessage,
            "sender",
        )
        await refused(
            lambda: client.callRemote(
                Deliver, user="alice", sender="s", subject="t", body="b" * 70000
            ),
            amp.TooLong,
        )
        await refused(
            lambda: client.callRemote(Inbox, user="alice", limit=10**6, unreadOnly=False),
            InvalidMessage,
            "limit",
        )
        await refused(
            lambda: client.callRemote(MarkRead, user="alice", messageID=10**30), NoSuchMessage
        )
        await refused(
            lambda: client.callRemote(MarkRead, user="alice", messageID=-1), NoSuchMessage
        )

        # A responder that raises: the call fails alone, its change is rolled
        # back, and the same user's next call works.
        await refused(lambda: client.callRemote(Explode, user="alice"), CallFailed)
        self.assertEqual((await client.callRemote(Stats, user="alice"))["total"], 0)

        # A box bigger than the node buffers: its bytes are skipped, not
        # held, and the call is refused; that connection and the others
        # carry on.
        huge = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", node.port, timeout=5), amp.AMP()
        )
        try:
            await huge.callRemoteString(
                b"Deliver", **{f"k{n}": b"v" * 65000 for n in range(20)}
            )
        except amp.RemoteAmpError as e:
            self.assertEqual(e.errorCode, b"INVALID_REQUEST")
        else:
            self.fail("a 1.3 MB box was accepted")
        self.assertEqual(
            (await huge.callRemote(Stats, user="alice"))["total"], 0
        )
        huge.transport.loseConnection()
        await stillServing()

        # Too many keys in one box.
        try:
            await raw.callRemoteString(b"Deliver", **{f"k{n}": b"v" for n in range(200)})
        except amp.RemoteAmpError as e:
            self.assertEqual(e.errorCode, b"INVALID_REQUEST")
        else:
            self.fail("a box with 200 keys was accepted")
        await stillServing()

        self.assertEqual(self.filesOutside(node), [])
        self.assertFalse(node.base.parent().child("etc").exists())
        # No key became a path, even inside the data directory.
        for path in node.data.walk():
            self.assertNotIn("passwd", path.path[len(node.data.path) :])
            self.assertNotIn("bystander", path.path[len(node.data.path) :])


async def _inBatches(
    call: Callable[[str], Awaitable[T]], users: list[str], outstanding: int
) -> list[T]:
    """
    Call C{call} for every user, C{outstanding} at a time, in order.
    """
    results: list[T] = []
    for start in range(0, len(users), outstanding):
        batch = [_deferred(_await(call(user))) for user in users[start : start + outstanding]]
        results.extend(await gatherResults(batch, consumeErrors=True))
    return results


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable

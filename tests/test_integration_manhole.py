# -*- test-case-name: tests.test_integration_manhole -*-
"""
Integration tests of the Manhole: a real C{twistd -n fractal} node with the
Manhole on, a mailbox message delivered with L{fractal.client}, and the
OpenSSH client (C{ssh}, in batch mode, lines fed on its standard input)
reading it back from inside the node.

The node process is run by L{tests.test_integration_node.NodeProcess}, and
always stopped in cleanup; every C{ssh} is killed if it outlives
L{SSH_SECONDS}.
"""

from __future__ import annotations

import os
import shutil
import socket
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase

from examples.mailbox import Deliver
from fractal.client import connect
from fractal.keys import slotForKey
from tests._ports import freePort
from tests.test_integration_node import MAILBOX, STARTUP_SECONDS, NodeProcess

SSH_SECONDS = 30.0
"""
The longest one C{ssh} run may take before it is killed.
"""


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class _SSHProtocol(ProcessProtocol):
    """
    Feeds an C{ssh} process its input and collects its output.
    """

    def __init__(self, stdin: bytes) -> None:
        self.stdin = stdin
        self.stdout = b""
        self.stderr = b""
        self.ended: Deferred[int | None] = Deferred()
        self._waits: list[tuple[bytes, Deferred[None]]] = []

    def waitFor(self, marker: bytes) -> Deferred[None]:
        """
        Fire once C{marker} has appeared on standard output.
        """
        d: Deferred[None] = Deferred()
        self._waits.append((marker, d))
        self._check()
        return d

    def _check(self) -> None:
        waits, self._waits = self._waits, []
        for marker, d in waits:
            if marker in self.stdout:
                d.callback(None)
            else:
                self._waits.append((marker, d))

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.stdout += data
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        code = value.exitCode if isinstance(value, (ProcessDone, ProcessTerminated)) else None
        self.ended.callback(code)


class ManholeIntegrationTests(TestCase):
    """
    An operator's OpenSSH client against a real node's Manhole.
    """

    timeout = 120

    def setUp(self) -> Deferred[None]:
        if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
            raise SkipTest("the OpenSSH client (ssh, ssh-keygen) is not installed")
        self.base = FilePath(self.mktemp())
        self.base.makedirs()
        self.key = self.base.child("operator_key")
        d = getProcessOutputAndValue(
            shutil.which("ssh-keygen") or "ssh-keygen",
            ["-q", "-t", "ed25519", "-N", "", "-C", "operator", "-f", self.key.path],
        )

        def generated(result: tuple[bytes, bytes, int]) -> None:
            out, err, code = result
            self.assertEqual(code, 0, err)
            self.authorizedKeys = self.base.child("authorized_keys")
            self.authorizedKeys.setContent(self.key.siblingExtension(".pub").getContent())
            os.chmod(self.authorizedKeys.path, 0o600)

        return d.addCallback(generated)

    async def _startNode(self, *extra: str) -> NodeProcess:
        """
        Start a mailbox node with its Manhole on a free loopback port, and
        wait until the Manhole accepts connections.
        """
        self.manholePort = freePort()
        node = NodeProcess(
            self.base.child("node"),
            MAILBOX,
            "--manhole",
            f"tcp:{self.manholePort}:interface=127.0.0.1",
            "--manhole-keys",
            self.authorizedKeys.path,
            *extra,
        )

        async def stop() -> None:
            await node.stop()

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        await node.start()
        reactor = _reactor()
        deadline = reactor.seconds() + STARTUP_SECONDS
        while reactor.seconds() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.manholePort), timeout=0.5):
                    return node
            except OSError:
                await deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"the manhole did not start listening:\n{node.describe()}")

    async def _ssh(
        self,
        stdin: bytes,
        *command: str,
        key: FilePath[str] | None = None,
        options: tuple[str, ...] = (),
    ) -> tuple[int | None, str, str]:
        """
        Run the OpenSSH client against the Manhole, as an operator would,
        feeding it C{stdin}; kill it after L{SSH_SECONDS}.

        @return: its exit status, standard output and standard error.
        """
        protocol = self._spawnSSH(stdin, *command, key=key, options=options)
        code = await protocol.ended
        return code, protocol.stdout.decode("utf-8"), protocol.stderr.decode("utf-8")

    def _spawnSSH(
        self,
        stdin: bytes,
        *command: str,
        key: FilePath[str] | None = None,
        options: tuple[str, ...] = (),
    ) -> _SSHProtocol:
        """
        Start the OpenSSH client against the Manhole, feeding it C{stdin};
        it is killed after L{SSH_SECONDS}.
        """
        reactor = _reactor()
        argv = [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(self.manholePort),
            "-i",
            (key or self.key).path,
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            *options,
            "admin@127.0.0.1",
            *command,
        ]
        protocol = _SSHProtocol(stdin)
        process = reactor.spawnProcess(
            protocol, shutil.which("ssh"), argv, env=dict(os.environ)
        )

        def kill() -> None:
            try:
                process.signalProcess("KILL")
            except Exception:
                pass

        timer = reactor.callLater(SSH_SECONDS, kill)

        def ended(code: int | None) -> int | None:
            if timer.active():
                timer.cancel()
            return code

        protocol.ended.addBoth(ended)
        return protocol

    def test_readDeliveredMessage(self) -> Deferred[None]:
        """
        A message delivered through the node's AMP front door is found by an
        operator in the Manhole: where the user lives, their store, the
        message in it, and the node's counters.
        """

        async def run() -> None:
            node = await self._startNode()
            client = connect(_reactor(), f"tcp:host=127.0.0.1:port={node.port}", timeout=10)
            self.addCleanup(client.disconnect)
            await client.whenConnected()
            answer = await client.callRemote(
                Deliver,
                user="alice",
                sender="bob@example.com",
                subject="Lunch?",
                body="Noon at the usual place.",
            )
            lines = b"\n".join(
                [
                    b'where("alice")',
                    b'store("alice")',
                    b"s = _",
                    b"from examples.mailbox import Message",
                    b"[(m.storeID, m.sender, m.subject, m.body) for m in s.query(Message)]",
                    b"stats()",
                ]
            )
            code, out, err = await self._ssh(lines + b"\n")
            self.assertEqual(code, 0, out + err + node.describe())
            self.assertIn("txfractal manhole on node 'n1'", out)
            self.assertIn("  owner    n1\n", out)
            self.assertIn("  local    yes\n", out)
            expected = (answer["messageID"], "bob@example.com", "Lunch?", "Noon at the usual place.")
            self.assertIn(">>> [(m.storeID,", out)
            self.assertIn(repr([expected]), out)
            self.assertIn("  calls served      1\n", out)
            # Helper output fits 80 columns (echoed input and reprs aside).
            helperLines = [
                line for line in out.splitlines() if not line.startswith((">>> ", "<Store", "[("))
            ]
            self.assertTrue(all(len(line) <= 80 for line in helperLines), out)

            # A command instead of a script: no echo, exit status of the line.
            code, out, err = await self._ssh(b"", 'where("alice")["open"]')
            self.assertEqual((code, out), (0, "True\n"), err)
            code, out, err = await self._ssh(b"", 'store("")')
            self.assertEqual(code, 1)
            self.assertIn("InvalidUserKey", out)

            # With a terminal (forced with -tt, as stdin is a pipe here): the
            # colour REPL, its escape sequences, and CR LF line ends.
            code, out, err = await self._ssh(
                b'where("alice")["slot"] + 1000000\r\x04', options=("-tt",)
            )
            self.assertEqual(code, 0, out + err)
            self.assertIn("\x1b[", out)
            self.assertIn(f"{slotForKey('alice') + 1000000}\r\n", out)

            # The session's logins and lines are in the node's log.
            log = node.log.getContent().decode("utf-8", "replace")
            self.assertIn("manhole login: admin from 127.0.0.1", log)
            self.assertIn('entered: where("alice")', log)

        return Deferred.fromCoroutine(run())

    def test_waitingSessionDoesNotHoldNode(self) -> Deferred[None]:
        """
        While an operator's session waits on a Deferred, the node goes on
        serving its users; the session shows the result when it fires (here
        fired from a second session) and runs its next line.
        """

        async def run() -> None:
            node = await self._startNode()
            waiting = self._spawnSSH(
                b"from twisted.internet import defer\n"
                b"node.gate = defer.Deferred()\n"
                b"node.gate\n"
                b"'next line ran after ' + _\n"
            )
            await waiting.waitFor(b"<Deferred #0>")
            client = connect(_reactor(), f"tcp:host=127.0.0.1:port={node.port}", timeout=10)
            self.addCleanup(client.disconnect)
            await client.whenConnected()
            answer = await client.callRemote(
                Deliver, user="carol", sender="dave@example.com", subject="Hi", body="Still up?"
            )
            self.assertIn("messageID", answer)
            self.assertNotIn(b"called back", waiting.stdout)
            code, out, err = await self._ssh(b"", "node.gate.callback('opened')")
            self.assertEqual(code, 0, out + err)
            self.assertEqual(await waiting.ended, 0)
            self.assertIn(b"Deferred #0 called back: 'opened'\n", waiting.stdout)
            self.assertIn(b"'next line ran after opened'\n", waiting.stdout)

        return Deferred.fromCoroutine(run())

    def test_unknownKeyAndHostKey(self) -> Deferred[None]:
        """
        A key that is not authorized is refused (public keys only); the host
        key is created 0600 in the data directory and the same key is served
        after a restart.
        """

        async def run() -> None:
            node = await self._startNode()
            stranger = self.base.child("stranger_key")
            out, err, status = await getProcessOutputAndValue(
                shutil.which("ssh-keygen") or "ssh-keygen",
                ["-q", "-t", "ed25519", "-N", "", "-f", stranger.path],
            )
            self.assertEqual(status, 0, err)
            code, out, err = await self._ssh(b"1+1\n", key=stranger)
            self.assertEqual(code, 255)
            self.assertIn("Permission denied (publickey)", err)
            self.assertNotIn("2", out)

            hostKey = node.data.child("manhole_host_key")
            self.assertEqual(os.stat(hostKey.path).st_mode & 0o777, 0o600)
            first = hostKey.getContent()
            await node.stop()
            node = await self._startNode()
            self.assertEqual(hostKey.getContent(), first)
            code, out, err = await self._ssh(b"", "1+1")
            self.assertEqual((code, out), (0, "2\n"), err)
            log = node.log.getContent().decode("utf-8", "replace")
            self.assertIn("manhole login refused", log)

        return Deferred.fromCoroutine(run())

    def test_publicInterfaceRefused(self) -> Deferred[None]:
        """
        A node asked to open its Manhole on every interface without
        C{--manhole-allow-remote} does not start, and says why.
        """

        async def run() -> None:
            twistd = shutil.which("twistd")
            if twistd is None:
                raise SkipTest("twistd is not on PATH")
            env = dict(os.environ)
            root = FilePath(__file__).parent().parent().path
            env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
            work = self.base.child("refused")
            work.makedirs()
            out, err, status = await getProcessOutputAndValue(
                twistd,
                [
                    "-n",
                    "--pidfile=",
                    "fractal",
                    "--app",
                    MAILBOX,
                    "--data",
                    "data",
                    "--listen",
                    f"tcp:{freePort()}:interface=127.0.0.1",
                    "--manhole",
                    f"tcp:{freePort()}",
                    "--manhole-keys",
                    self.authorizedKeys.path,
                ],
                env=env,
                path=work.path,
            )
            self.assertNotEqual(status, 0)
            self.assertIn(b"--manhole-allow-remote", out + err)
            self.assertFalse(work.child("data").exists())

        return Deferred.fromCoroutine(run())

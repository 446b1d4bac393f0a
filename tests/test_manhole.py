"""
Tests for L{fractal.manhole}: configuration checks, the host key, the
authorized keys, the consoles, and logins over real SSH connections on
loopback with twisted.conch's client.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.client.knownhosts import KnownHostsFile
from twisted.conch.endpoints import SSHCommandClientEndpoint
from twisted.conch.ssh import keys
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.session import packRequest_pty_req
from twisted.internet import reactor as globalReactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactor,
    MemoryReactorClock,
    StringTransport,
)
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from fractal.app import Application
from fractal.durable._threads import runSynchronously
from fractal.durable.interfaces import StaleEpoch
from fractal.durable.shipper import Shipper
from fractal.keys import InvalidUserKey, slotForKey, storeNameForKey
from fractal.manhole import (
    HELPERS,
    AuthorizedKeysFile,
    ManholeConfigurationError,
    ManholeService,
    Summary,
    UserList,
    _LineConsole,
    checkEndpoint,
    consoleHelper,
    consoleNamespace,
    fingerprint,
    loadOrCreateHostKey,
)
from fractal.node import FractalNode
from fractal.routing.interfaces import NodeAddress
from fractal.routing.topology import StaticTopology
from fractal.store import Item, text
from fractal.tap import Options, makeService
from fractal.testing import MemoryDurableBackend


class ManholeNote(Item):
    """
    An item written through the console in the tests.
    """

    typeName = "fractal_test_manhole_note"
    schemaVersion = 1
    body = text()


notesApplication = Application("notes", powerups=[])
"""
An application with nothing to call, for building nodes in these tests.
"""

NOTES = "tests.test_manhole:notesApplication"


def _newKey() -> keys.Key:
    """
    A fresh Ed25519 private key.
    """
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def _authorizedKeysFile(case: SynchronousTestCase, *authorized: keys.Key) -> FilePath[str]:
    """
    An C{authorized_keys} file holding C{authorized}, with a comment and a
    line with options that must be skipped.
    """
    path = FilePath(case.mktemp())
    lines = [b"# operators"]
    lines += [key.public().toString("openssh") + b" operator@example" for key in authorized]
    lines.append(b'from="10.0.0.1" ' + _newKey().public().toString("openssh"))
    path.setContent(b"\n".join(lines) + b"\n")
    os.chmod(path.path, 0o600)
    return path


class EndpointCheckTests(SynchronousTestCase):
    """
    L{checkEndpoint} lets a loopback endpoint through and refuses any other
    unless remote access is allowed.
    """

    def test_loopbackAccepted(self) -> None:
        """
        TCP on 127.0.0.0/8, C{::1} or C{localhost} (keyword or positional
        interface), and UNIX sockets, are accepted.
        """
        for description in [
            "tcp:2222:interface=127.0.0.1",
            "tcp:port=2222:interface=127.0.0.2",
            "tcp:2222:127.0.0.1",
            "tcp:2222:interface=localhost",
            "tcp6:2222:interface=\\:\\:1",
            "unix:/var/run/manhole.sock",
        ]:
            checkEndpoint(description)

    def test_remoteRefused(self) -> None:
        """
        An endpoint listening on every interface, a routable address, or an
        endpoint type whose reach is unknown is refused with a message naming
        the flag that allows it.
        """
        for description in [
            "tcp:2222",
            "tcp:2222:interface=0.0.0.0",
            "tcp:2222:interface=10.1.2.3",
            "tcp6:2222:interface=\\:\\:",
            "tcp:2222:interface=example.com",
            "ssl:2222:privateKey=key.pem",
            "systemd:domain=INET:index=0",
        ]:
            error = self.assertRaises(ManholeConfigurationError, checkEndpoint, description)
            self.assertIn("--manhole-allow-remote", str(error))
            self.assertIn(repr(description), str(error))

    def test_remoteAllowed(self) -> None:
        """
        With C{allowRemote}, any endpoint is accepted.
        """
        checkEndpoint("tcp:2222", allowRemote=True)
        checkEndpoint("tcp:2222:interface=0.0.0.0", allowRemote=True)

    def test_empty(self) -> None:
        """
        An empty description is refused, even with C{allowRemote}.
        """
        self.assertRaises(ManholeConfigurationError, checkEndpoint, "", True)

    def test_serviceRefusesPublicInterface(self) -> None:
        """
        A L{ManholeService} asked to listen on every interface without
        C{allowRemote} refuses to be built, so nothing ever listens; with it,
        the service listens where it was told.
        """
        reactor = MemoryReactor()
        keysFile = _authorizedKeysFile(self, _newKey())
        hostKey = FilePath(self.mktemp())
        self.assertRaises(
            ManholeConfigurationError,
            ManholeService,
            "tcp:2222",
            keysFile,
            hostKey,
            dict,
            reactor=reactor,
        )
        self.assertEqual(reactor.tcpServers, [])
        self.assertFalse(hostKey.exists())

        service = ManholeService(
            "tcp:2222", keysFile, hostKey, dict, allowRemote=True, reactor=reactor
        )
        service.privilegedStartService()
        service.startService()
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (2222, ""))
        service.stopService()


class HostKeyTests(SynchronousTestCase):
    """
    L{loadOrCreateHostKey} generates the host key once, private to its
    owner, and reuses it.
    """

    def test_createdPrivateAndReused(self) -> None:
        """
        The first call writes a new key with mode 0600 and its public half
        beside it; later calls return the same key without rewriting it.
        """
        path = FilePath(self.mktemp()).child("data").child("manhole_host_key")
        key = loadOrCreateHostKey(path)
        self.assertTrue(key.isPublic() is False)
        self.assertEqual(os.stat(path.path).st_mode & 0o777, 0o600)
        public = keys.Key.fromFile(path.path + ".pub")
        self.assertEqual(public, key.public())
        content = path.getContent()
        again = loadOrCreateHostKey(path)
        self.assertEqual(again, key)
        self.assertEqual(path.getContent(), content)
        self.assertFalse(path.siblingExtension(".new").exists())

    def test_looseModeRefused(self) -> None:
        """
        A host key other users can read is refused with the command that
        fixes it.
        """
        path = FilePath(self.mktemp())
        loadOrCreateHostKey(path)
        os.chmod(path.path, 0o644)
        error = self.assertRaises(ManholeConfigurationError, loadOrCreateHostKey, path)
        self.assertIn("chmod 600", str(error))

    def test_garbageRefused(self) -> None:
        """
        A host key file that is not a key is refused with a clear error, not
        replaced.
        """
        path = FilePath(self.mktemp())
        path.setContent(b"not a key\n")
        os.chmod(path.path, 0o600)
        error = self.assertRaises(ManholeConfigurationError, loadOrCreateHostKey, path)
        self.assertIn("cannot be loaded", str(error))
        self.assertEqual(path.getContent(), b"not a key\n")


class AuthorizedKeysFileTests(SynchronousTestCase):
    """
    L{AuthorizedKeysFile} reads an OpenSSH C{authorized_keys} file at each
    login.
    """

    def test_keys(self) -> None:
        """
        The plain key lines are returned, for any user name; comments and
        lines with options are skipped.
        """
        first, second = _newKey(), _newKey()
        path = _authorizedKeysFile(self, first, second)
        found = list(AuthorizedKeysFile(path).getAuthorizedKeys(b"anyone"))
        self.assertEqual(found, [first.public(), second.public()])

    def test_rereadEachTime(self) -> None:
        """
        A key added to the file is accepted at the next lookup.
        """
        first, second = _newKey(), _newKey()
        path = _authorizedKeysFile(self, first)
        db = AuthorizedKeysFile(path)
        self.assertEqual(list(db.getAuthorizedKeys(b"admin")), [first.public()])
        path.setContent(second.public().toString("openssh") + b"\n")
        self.assertEqual(list(db.getAuthorizedKeys(b"admin")), [second.public()])

    def test_missingFile(self) -> None:
        """
        A file that has gone away authorizes nobody, and says so in the log.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        db = AuthorizedKeysFile(FilePath(self.mktemp()))
        self.assertEqual(list(db.getAuthorizedKeys(b"admin")), [])
        self.assertTrue(any("authorized keys" in e["log_format"] for e in observer))
        self.flushLoggedErrors()

    def test_serviceRefusesMissingOrWritableFile(self) -> None:
        """
        The service refuses a key file that does not exist or that other
        users may write.
        """
        hostKey = FilePath(self.mktemp())
        self.assertRaises(
            ManholeConfigurationError,
            ManholeService,
            "tcp:0:interface=127.0.0.1",
            FilePath(self.mktemp()),
            hostKey,
            dict,
        )
        path = _authorizedKeysFile(self, _newKey())
        os.chmod(path.path, 0o666)
        error = self.assertRaises(
            ManholeConfigurationError,
            ManholeService,
            "tcp:0:interface=127.0.0.1",
            path,
            hostKey,
            dict,
        )
        self.assertIn("chmod go-w", str(error))


class SummaryTests(SynchronousTestCase):
    """
    L{Summary} and L{UserList} read well in 80 columns.
    """

    def test_rows(self) -> None:
        """
        Each row is one aligned C{name  value} line under the title; rows
        are looked up by name.
        """
        summary = Summary("where('alice')", (("slot", 12), ("owner", "n1"), ("local", True)))
        self.assertEqual(
            repr(summary),
            "where('alice')\n  slot   12\n  owner  n1\n  local  yes",
        )
        self.assertEqual(summary["slot"], 12)
        self.assertEqual(summary.asDict(), {"slot": 12, "owner": "n1", "local": True})
        self.assertRaises(KeyError, lambda: summary["nope"])

    def test_wrapped(self) -> None:
        """
        A long value wraps within 80 columns, aligned under its first line.
        """
        summary = Summary("stats()", (("address", "word " * 60),))
        lines = repr(summary).splitlines()
        self.assertGreater(len(lines), 3)
        self.assertTrue(all(len(line) <= 80 for line in lines))
        self.assertTrue(all(line.startswith("           ") for line in lines[2:]))

    def test_userList(self) -> None:
        """
        A L{UserList} is a tuple of keys shown one per line, escaped.
        """
        listing = UserList(["alice", "bob\u202e"])
        self.assertEqual(listing[0], "alice")
        self.assertEqual(repr(listing), "2 users\n  'alice'\n  'bob\\u202e'")


class LineConsoleTests(SynchronousTestCase):
    """
    L{_LineConsole} runs Python lines in order and ends with its input.
    """

    def _console(
        self, namespace: dict[str, object], echo: bool = True
    ) -> tuple[_LineConsole, StringTransport, list[int]]:
        statuses: list[int] = []
        console = _LineConsole(namespace, "admin", "127.0.0.1:1", echo, statuses.append)
        transport = StringTransport()
        console.makeConnection(transport)
        console.start()
        return console, transport, statuses

    def test_transcript(self) -> None:
        """
        Each line is echoed after a prompt and followed by its output; a
        block is ended by a blank line; the session ends, with status 0,
        when the input does.
        """
        console, transport, statuses = self._console({"__greeting__": "hi"})
        console.dataReceived(b"x = 6*7\r\nx\nfor i in range(2):\n  print(i)\n\n")
        console.inputEnded()
        self.assertEqual(
            transport.value().decode(),
            "hi\n>>> x = 6*7\n>>> x\n42\n>>> for i in range(2):\n...   print(i)\n"
            "... \n0\n1\n",
        )
        self.assertEqual(statuses, [0])

    def test_errorStatus(self) -> None:
        """
        A line that raises shows its traceback, the following lines still
        run, and the session ends with status 1.
        """
        console, transport, statuses = self._console({}, echo=False)
        console.dataReceived(b"1/0\n'after'\n")
        console.inputEnded()
        output = transport.value().decode()
        self.assertIn("ZeroDivisionError", output)
        self.assertTrue(output.endswith("'after'\n"))
        self.assertEqual(statuses, [1])

    def test_deferredHoldsLines(self) -> None:
        """
        A line whose value is a pending Deferred holds the next lines until
        it fires; its result is shown and bound to C{_}, and the session
        ends only after that.
        """
        gate: Deferred[str] = Deferred()
        console, transport, statuses = self._console({"gate": gate}, echo=False)
        console.dataReceived(b"gate\n_ + '!'\n")
        console.inputEnded()
        self.assertEqual(transport.value(), b"<Deferred #0>\n")
        self.assertEqual(statuses, [])
        gate.callback("open")
        self.assertEqual(
            transport.value(), b"<Deferred #0>\nDeferred #0 called back: 'open'\n'open!'\n"
        )
        self.assertEqual(statuses, [0])

    def test_failedDeferred(self) -> None:
        """
        A Deferred that fails shows the error and counts as an error; the
        console leaves the failure in the Deferred for its other users.
        """
        gate: Deferred[str] = Deferred()
        console, transport, statuses = self._console({"gate": gate}, echo=False)
        console.dataReceived(b"gate\n")
        console.inputEnded()
        gate.errback(RuntimeError("boom"))
        self.assertIn(b"Deferred #0 failed: 'boom'", transport.value())
        self.assertEqual(statuses, [1])
        self.failureResultOf(gate, RuntimeError)

    def test_deferredResultUnchanged(self) -> None:
        """
        Showing a Deferred's result does not change it.
        """
        gate: Deferred[str] = Deferred()
        console, transport, statuses = self._console({"gate": gate}, echo=False)
        console.dataReceived(b"gate\n")
        gate.callback("value")
        self.assertEqual(self.successResultOf(gate), "value")

    def test_notUtf8(self) -> None:
        """
        A line that is not UTF-8 is refused with a message; the console goes
        on.
        """
        console, transport, statuses = self._console({}, echo=False)
        console.dataReceived(b"'\xff'\n1+1\n")
        console.inputEnded()
        self.assertEqual(transport.value(), b"the line is not valid UTF-8; it was ignored\n2\n")
        self.assertEqual(statuses, [1])

    def test_exitAndSystemExit(self) -> None:
        """
        C{exit()} and C{raise SystemExit} end the session, not the process;
        later lines do not run.
        """
        for line in [b"exit()", b"raise SystemExit(3)", b"quit()"]:
            console, transport, statuses = self._console({}, echo=False)
            console.dataReceived(line + b"\n'not run'\n")
            self.assertEqual(statuses, [0])
            self.assertNotIn(b"not run", transport.value())

    def test_inputRefused(self) -> None:
        """
        C{input()} would read the node's own standard input: it raises.
        """
        console, transport, statuses = self._console({}, echo=False)
        console.dataReceived(b"input()\n")
        self.assertIn(b"input() would block the node", transport.value())

    def test_terminalLineEnds(self) -> None:
        """
        A command run with a terminal ends its lines with CR LF.
        """
        statuses: list[int] = []
        console = _LineConsole({}, "admin", "127.0.0.1:1", False, statuses.append, True)
        transport = StringTransport()
        console.makeConnection(transport)
        console.start()
        console.dataReceived(b"print('a\\nb')\n")
        console.inputEnded()
        self.assertEqual(transport.value(), b"a\r\nb\r\n")

    def test_unfinishedBlock(self) -> None:
        """
        A block still open when the input ends is run.
        """
        console, transport, statuses = self._console({}, echo=False)
        console.dataReceived(b"if True:\n  print('ran')")
        console.inputEnded()
        self.assertEqual(transport.value(), b"ran\n")
        self.assertEqual(statuses, [0])


class NamespaceTests(SynchronousTestCase):
    """
    The console namespace of a real L{FractalNode} (over a memory reactor,
    with real stores on disk).
    """

    def node(self, topology: StaticTopology | None = None) -> FractalNode:
        return FractalNode(
            MemoryReactorClock(),
            notesApplication,
            FilePath(self.mktemp()),
            "tcp:0:interface=127.0.0.1",
            topology=topology,
            runInThread=runSynchronously,
        )

    def test_objects(self) -> None:
        """
        The node's objects are in the namespace; C{shipper} only when the
        node has one.
        """
        node = self.node()
        namespace = consoleNamespace(node)
        self.assertIs(namespace["node"], node)
        self.assertIs(namespace["app"], node.application)
        self.assertIs(namespace["pool"], node.pool)
        self.assertIs(namespace["topology"], node.topology)
        self.assertNotIn("shipper", namespace)

    def test_help(self) -> None:
        """
        C{help()} lists every object and helper with its arguments and what
        it does, within 80 columns; C{help(obj)} gives obj's documentation.
        """
        namespace = consoleNamespace(self.node())
        help: Any = namespace["help"]
        listing = repr(help())
        for expected in [
            "node ",
            "app ",
            "pool ",
            "topology ",
            "where(user)",
            "store(user)",
            "users(limit=20)",
            "stats()",
            "shardmap()",
            "lag(limit=10)",
            "help(obj)",
        ]:
            self.assertIn(expected, listing)
        self.assertTrue(all(len(line) <= 80 for line in listing.splitlines()))
        self.assertIn("Where a user lives", repr(help(namespace["where"])))

    def test_whereAndStore(self) -> None:
        """
        C{where(user)} gives the user's slot, owner, epoch and whether its
        store is open here; C{store(user)} opens it through the pool, and
        what is written in its C{transact} is there.
        """
        node = self.node()
        namespace = consoleNamespace(node)
        where: Any = namespace["where"]
        store: Any = namespace["store"]
        before = where("alice")
        self.assertEqual(before["slot"], slotForKey("alice"))
        self.assertEqual((before["owner"], before["epoch"]), ("n1", 1))
        self.assertEqual((before["local"], before["open"]), (True, False))
        s = store("alice")
        self.assertEqual(node.pool.openKeys(), ["alice"])
        s.transact(lambda: ManholeNote(store=s, body="hello"))
        self.assertEqual([n.body for n in s.query(ManholeNote)], ["hello"])
        self.assertEqual(where("alice")["open"], True)
        self.assertTrue(all(len(line) <= 80 for line in repr(where("alice")).splitlines()))

    def test_invalidKey(self) -> None:
        """
        A key that is not valid is refused with the key module's error.
        """
        namespace = consoleNamespace(self.node())
        where: Any = namespace["where"]
        store: Any = namespace["store"]
        self.assertRaises(InvalidUserKey, where, "")
        self.assertRaises(InvalidUserKey, store, "../../etc/passwd\x00")

    def test_storeOfAnotherNode(self) -> None:
        """
        C{store(user)} is refused for a user another node owns, naming it,
        and no store is created here.
        """
        topology = StaticTopology(
            "n1",
            [
                NodeAddress("n1", "tcp:host=127.0.0.1:port=1", "tcp:host=127.0.0.1:port=3"),
                NodeAddress("n2", "tcp:host=127.0.0.1:port=2", "tcp:host=127.0.0.1:port=4"),
            ],
        )
        node = self.node(topology)
        shardMap = topology.currentMap()
        user = next(f"u{i}" for i in range(1000) if shardMap.ownerOfKey(f"u{i}").node == "n2")
        namespace = consoleNamespace(node)
        store: Any = namespace["store"]
        where: Any = namespace["where"]
        error = self.assertRaises(ValueError, store, user)
        self.assertIn("'n2'", str(error))
        self.assertEqual(node.pool.openKeys(), [])
        self.assertEqual(node.pool.knownKeys(10), [])
        self.assertEqual((where(user)["owner"], where(user)["local"]), ("n2", False))

    def test_users(self) -> None:
        """
        C{users(limit)} lists at most C{limit} users known on this node.
        """
        node = self.node()
        namespace = consoleNamespace(node)
        store: Any = namespace["store"]
        users: Any = namespace["users"]
        for name in ["alice", "bob", "carol"]:
            store(name)
        self.assertEqual(sorted(users()), ["alice", "bob", "carol"])
        self.assertEqual(len(users(2)), 2)
        self.assertTrue(repr(users()).startswith("3 users\n"))

    def test_statsAndShardmap(self) -> None:
        """
        C{stats()} shows the node's counters in words and says when there is
        no shipper; C{shardmap()} shows each node's share.
        """
        node = self.node()
        namespace = consoleNamespace(node)
        store: Any = namespace["store"]
        stats: Any = namespace["stats"]
        shardmap: Any = namespace["shardmap"]
        store("alice")
        summary = stats()
        self.assertEqual(summary["open stores"], 1)
        self.assertEqual(summary["calls served"], 0)
        self.assertIn("no shipper", summary["shipping"])
        lag: Any = namespace["lag"]
        self.assertIn("no shipper", lag()["shipping"])
        self.assertTrue(all(len(line) <= 80 for line in repr(summary).splitlines()))
        shares = shardmap()
        self.assertEqual(shares["slots"], 4096)
        self.assertIn("4096 slots (this node)", shares["node n1"])

    def test_statsWithShipper(self) -> None:
        """
        With a shipper, C{shipper} is in the namespace and C{stats()} shows
        the shipping lag: how old the oldest unshipped commit is, and how
        many stores are behind.
        """
        clock = MemoryReactorClock()
        dataDir = FilePath(self.mktemp())
        shipper = Shipper(MemoryDurableBackend(), clock, storesDirectory=dataDir.child("stores"))
        node = FractalNode(
            clock, notesApplication, dataDir, "tcp:0:interface=127.0.0.1", shipper=shipper,
            runInThread=runSynchronously,
        )
        shipper.serveNode(node)
        namespace = consoleNamespace(node)
        self.assertIs(namespace["shipper"], shipper)
        store: Any = namespace["store"]
        stats: Any = namespace["stats"]
        s = store("alice")
        s.transact(lambda: ManholeNote(store=s, body="unshipped"))
        clock.advance(3)
        summary = stats()
        self.assertEqual((summary["lag seconds"], summary["stores behind"]), (3.0, 1))
        lag: Any = namespace["lag"]
        behind = lag()
        self.assertEqual((behind["worst seconds"], behind["stores behind"]), (3.0, 1))
        self.assertTrue(str(behind["'alice'"]).startswith("3.0 s, "))
        self.assertEqual(len(lag(0).rows), 3)

    def test_fencedSlotsShown(self) -> None:
        """
        A slot the node stopped serving because it was fenced out of it is
        counted by C{stats()} and described by C{lag()}: slot, store and
        both epochs.
        """
        clock = MemoryReactorClock()
        dataDir = FilePath(self.mktemp())
        shipper = Shipper(MemoryDurableBackend(), clock, storesDirectory=dataDir.child("stores"))
        node = FractalNode(
            clock, notesApplication, dataDir, "tcp:0:interface=127.0.0.1", shipper=shipper,
            runInThread=runSynchronously,
        )
        shipper.serveNode(node)
        namespace = consoleNamespace(node)
        stats: Any = namespace["stats"]
        lag: Any = namespace["lag"]
        self.assertEqual(stats()["fenced slots"], 0)
        store = storeNameForKey("alice")
        node.server.fenceSlot("alice", StaleEpoch(store, 1, 2))
        self.assertEqual(stats()["fenced slots"], 1)
        shown = str(lag()[f"slot {slotForKey('alice')}"])
        self.assertTrue(shown.startswith("FENCED: "), shown)
        self.assertIn(f"fenced out at epoch 1 (store {store} is at epoch 2)", shown)

    def test_addHelper(self) -> None:
        """
        A function registered with L{consoleHelper} is offered, bound to the
        node, and listed by C{help()}; a L{Deferred} it returns that has
        fired is replaced by its result, a pending one is returned as is.
        """
        pending: Deferred[int] = Deferred()

        @consoleHelper
        def openCount(node: FractalNode, extra: int = 0) -> object:
            """
            How many stores are open, plus extra.
            """
            if extra < 0:
                return pending
            return succeed(len(node.pool.openKeys()) + extra)

        self.addCleanup(HELPERS.pop, "openCount")
        namespace = consoleNamespace(self.node())
        helper: Any = namespace["openCount"]
        help: Any = namespace["help"]
        self.assertEqual(helper(), 0)
        self.assertEqual(helper(extra=2), 2)
        self.assertIs(helper(-1), pending)
        self.assertIn("openCount(extra=0)", repr(help()))
        self.assertIn("How many stores are open, plus extra.", repr(help()))


class TapOptionsTests(SynchronousTestCase):
    """
    The C{--manhole} options of C{twistd fractal}, and their configuration
    file keys.
    """

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["--app", NOTES, "--data", self.mktemp(), *argv])
        return options

    def test_offByDefault(self) -> None:
        """
        Without C{--manhole} the node has no Manhole.
        """
        node: Any = makeService(self.parse(), MemoryReactorClock())
        self.assertRaises(KeyError, node.getServiceNamed, "manhole")

    def test_manholeChild(self) -> None:
        """
        C{--manhole} and C{--manhole-keys} add a Manhole service, named
        C{manhole}, to the node, keeping its host key in the data directory.
        """
        keysFile = _authorizedKeysFile(self, _newKey())
        options = self.parse(
            "--manhole", "tcp:2222:interface=127.0.0.1", "--manhole-keys", keysFile.path
        )
        node: Any = makeService(options, MemoryReactorClock())
        manhole = node.getServiceNamed("manhole")
        self.assertIsInstance(manhole, ManholeService)
        self.assertEqual(manhole.endpoint, "tcp:2222:interface=127.0.0.1")
        self.assertEqual(manhole.authorizedKeys, keysFile)
        self.assertEqual(manhole.hostKey, node.dataDir.child("manhole_host_key"))

    def test_publicRefused(self) -> None:
        """
        A Manhole endpoint on every interface is a usage error naming the
        flag; with C{--manhole-allow-remote} it is accepted.
        """
        keysFile = _authorizedKeysFile(self, _newKey()).path
        error = self.assertRaises(
            UsageError, self.parse, "--manhole", "tcp:2222", "--manhole-keys", keysFile
        )
        self.assertIn("--manhole-allow-remote", str(error))
        options = self.parse(
            "--manhole", "tcp:2222", "--manhole-keys", keysFile, "--manhole-allow-remote"
        )
        self.assertTrue(options["manhole-allow-remote"])

    def test_keysRequired(self) -> None:
        """
        C{--manhole} without C{--manhole-keys}, C{--manhole-keys} without
        C{--manhole}, or a keys file that does not exist, are usage errors.
        """
        self.assertRaises(UsageError, self.parse, "--manhole", "tcp:2222:interface=127.0.0.1")
        keysFile = _authorizedKeysFile(self, _newKey()).path
        self.assertRaises(UsageError, self.parse, "--manhole-keys", keysFile)
        error = self.assertRaises(
            UsageError,
            self.parse,
            "--manhole",
            "tcp:2222:interface=127.0.0.1",
            "--manhole-keys",
            self.mktemp(),
        )
        self.assertIn("cannot be read", str(error))

    def test_looseHostKeyRefused(self) -> None:
        """
        A host key in the data directory that other users can read is a
        usage error before the node starts.
        """
        keysFile = _authorizedKeysFile(self, _newKey()).path
        data = FilePath(self.mktemp())
        loadOrCreateHostKey(data.child("manhole_host_key"))
        os.chmod(data.child("manhole_host_key").path, 0o640)
        options = Options()
        error = self.assertRaises(
            UsageError,
            options.parseOptions,
            ["--app", NOTES, "--data", data.path, "--manhole", "tcp:2222:interface=127.0.0.1",
             "--manhole-keys", keysFile],
        )
        self.assertIn("chmod 600", str(error))

    def test_noReactorWhileParsing(self) -> None:
        """
        Checking the Manhole options does not import the global reactor, so
        C{twistd}'s choice of reactor is still free.
        """
        keysFile = _authorizedKeysFile(self, _newKey()).path
        script = (
            "import sys\n"
            "from fractal.tap import Options\n"
            f"Options().parseOptions(['--app', 'examples.mailbox:application', '--data', {self.mktemp()!r},"
            f" '--manhole', 'tcp:2222:interface=127.0.0.1', '--manhole-keys', {keysFile!r}])\n"
            "print('twisted.internet.reactor' in sys.modules)\n"
        )
        root = FilePath(__file__).parent().parent().path
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, timeout=60, env=env, cwd=root
        )
        self.assertEqual((result.returncode, result.stdout), (0, b"False\n"), result.stderr)

    def test_configFile(self) -> None:
        """
        The configuration file takes the same keys.
        """
        keysFile = _authorizedKeysFile(self, _newKey()).path
        config = FilePath(self.mktemp())
        config.setContent(
            f"""app = "{NOTES}"
manhole = "tcp:2222"
manhole-keys = "{keysFile}"
manhole-allow-remote = true
""".encode()
        )
        options = self.parse("--config", config.path)
        self.assertEqual(
            (options["manhole"], options["manhole-keys"], options["manhole-allow-remote"]),
            ("tcp:2222", keysFile, True),
        )


# ---------------------------------------------------------------------------
# Real SSH connections on loopback.


class _Collector(Protocol):
    """
    Collects what a session writes; fires L{ended} with C{(output, reason)}.
    """

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[tuple[bytes, Failure]] = Deferred()
        self._waits: list[tuple[bytes, Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.output += data
        waits, self._waits = self._waits, []
        for marker, d in waits:
            self._check(marker, d)

    def _check(self, marker: bytes, d: Deferred[bytes]) -> None:
        if marker in self.output:
            d.callback(self.output)
        else:
            self._waits.append((marker, d))

    def waitFor(self, marker: bytes) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self._check(marker, d)
        return d

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.ended.callback((self.output, reason))


class _TerminalChannel(SSHChannel):
    """
    A session channel that asks for a terminal and a shell, like an
    interactive C{ssh}.
    """

    name = b"session"

    def __init__(self, collector: _Collector, **kw: Any) -> None:
        super().__init__(**kw)
        self.collector = collector
        self.opened: Deferred[None] = Deferred()
        self.exitStatus: int | None = None

    def channelOpen(self, data: bytes) -> None:
        pty = packRequest_pty_req(b"xterm", (24, 80, 0, 0), b"")
        d = self.conn.sendRequest(self, b"pty-req", pty, wantReply=True)
        d.addCallback(lambda _: self.conn.sendRequest(self, b"shell", b"", wantReply=True))
        d.addCallback(lambda _: self.opened.callback(None))

    def dataReceived(self, data: bytes) -> None:
        self.collector.dataReceived(data)

    def request_exit_status(self, data: bytes) -> int:
        (self.exitStatus,) = struct.unpack(">L", data)
        return 1

    def closed(self) -> None:
        self.collector.connectionLost(None)


_ESCAPES = re.compile(rb"\x1b(\[[0-9;?]*[A-Za-z]|c)")


class SSHLoginTests(TestCase):
    """
    A L{ManholeService} on loopback, driven by twisted.conch's SSH client.
    """

    timeout = 60

    def setUp(self) -> None:
        self.clientKey = _newKey()
        self.keysFile = _authorizedKeysFile(self, self.clientKey)
        self.hostKeyPath = FilePath(self.mktemp())
        self.gate: Deferred[str] = Deferred()
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.service = ManholeService(
            "tcp:0:interface=127.0.0.1",
            self.keysFile,
            self.hostKeyPath,
            lambda: {"gate": self.gate, "answer": 42, "__greeting__": "hello operator"},
            reactor=globalReactor,
        )
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)
        return self.service.whenListening().addCallback(self._listening)

    def _listening(self, port: Any) -> None:
        self.port = port.getHost().port
        self.knownHosts = KnownHostsFile(FilePath(self.mktemp()))
        self.knownHosts.addHostKey(b"127.0.0.1", loadOrCreateHostKey(self.hostKeyPath).public())

    def _session(self, command: bytes, key: keys.Key | None = None) -> Deferred[tuple[bytes, Failure]]:
        """
        Run C{command} in an exec session; fires with the output and the
        reason the session ended.
        """
        endpoint = SSHCommandClientEndpoint.newConnection(
            globalReactor,
            command,
            b"admin",
            b"127.0.0.1",
            self.port,
            keys=[key or self.clientKey],
            knownHosts=self.knownHosts,  # type: ignore[arg-type]
        )
        collector = _Collector()
        d = endpoint.connect(Factory.forProtocol(lambda: collector))
        return d.addCallback(lambda _: collector.ended)

    def _events(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.log if event.get("manhole") == kind]

    @inlineCallbacks
    def test_evaluate(self) -> Any:
        """
        An authorized key logs in; the command's lines are evaluated in the
        console namespace and their values come back; the login and each
        line are logged, with the key's fingerprint and no key material.
        """
        output, reason = yield self._session(b"answer + 1\nx = [answer]\nx * 2")
        self.assertEqual(output, b"43\n[42, 42]\n")
        self.assertNotIsInstance(reason.value, ProcessTerminated)
        [login] = self._events("login")
        self.assertEqual(login["user"], "admin")
        self.assertEqual(
            login["fingerprint"],
            fingerprint(self.clientKey),
        )
        lines = [event["line"] for event in self._events("line")]
        self.assertEqual(lines, ["answer + 1", "x = [answer]", "x * 2"])
        blob = self.clientKey.public().toString("openssh").split()[1].decode()
        self.assertFalse(any(blob in repr(event) for event in self.log))

    @inlineCallbacks
    def test_errorExitStatus(self) -> Any:
        """
        A command that raises shows its traceback and ends with exit status
        1.
        """
        output, reason = yield self._session(b"answer / 0")
        self.assertIn(b"ZeroDivisionError", output)
        self.assertIsInstance(reason.value, ProcessTerminated)
        self.assertEqual(reason.value.exitCode, 1)

    @inlineCallbacks
    def test_unknownKeyRefused(self) -> Any:
        """
        A key that is not in the authorized keys file cannot log in, and the
        refusal is logged.
        """
        stranger = _newKey()
        failure = yield self.assertFailure(self._session(b"answer", key=stranger), Exception)
        self.assertIn("auth", str(failure).lower())
        refused = self._events("refused")
        self.assertTrue(refused)
        self.assertEqual(
            refused[-1]["fingerprint"],
            fingerprint(stranger),
        )
        self.assertEqual(self._events("login"), [])

    @inlineCallbacks
    def test_passwordRefused(self) -> Any:
        """
        Password authentication is not offered: a client with only a
        password cannot log in.
        """
        endpoint = SSHCommandClientEndpoint.newConnection(
            globalReactor,
            b"answer",
            b"admin",
            b"127.0.0.1",
            self.port,
            password=b"admin",
            knownHosts=self.knownHosts,  # type: ignore[arg-type]
        )
        yield self.assertFailure(endpoint.connect(Factory.forProtocol(Protocol)), Exception)
        self.assertEqual(self._events("login"), [])

    @inlineCallbacks
    def test_deferredDoesNotFreeze(self) -> Any:
        """
        A session waiting on a Deferred does not hold up the node: another
        session is served meanwhile, and the first shows the result when it
        fires.
        """
        waiting = self._session(b"gate\n_.upper()")
        other, _ = yield self._session(b"answer")
        self.assertEqual(other, b"42\n")
        self.assertNoResult(waiting)
        self.gate.callback("fired")
        output, reason = yield waiting
        self.assertEqual(output, b"<Deferred #0>\nDeferred #0 called back: 'fired'\n'FIRED'\n")

    @inlineCallbacks
    def test_terminalConsole(self) -> Any:
        """
        A session with a terminal gets the colour REPL: a greeting, coloured
        input echo, results, and C{exit()} closes it.
        """
        # A command session holds the connection open while a terminal
        # session runs beside it on the same connection.
        holder = _Collector()
        endpoint = SSHCommandClientEndpoint.newConnection(
            globalReactor,
            b"gate",
            b"admin",
            b"127.0.0.1",
            self.port,
            keys=[self.clientKey],
            knownHosts=self.knownHosts,  # type: ignore[arg-type]
        )
        protocol = yield endpoint.connect(Factory.forProtocol(lambda: holder))
        connection = protocol.transport.conn
        screen = _Collector()
        channel = _TerminalChannel(screen, conn=connection)
        connection.openChannel(channel)
        yield channel.opened
        yield screen.waitFor(b">>> ")
        channel.write(b"answer * 2\r")
        yield screen.waitFor(b"84")
        channel.write(b"exit()\r")
        yield screen.ended
        self.assertIn(b"hello operator", screen.output)
        self.assertIn(b"\x1b[", screen.output)
        plain = _ESCAPES.sub(b"", screen.output)
        self.assertIn(b"84\r\n", plain)
        self.assertEqual(channel.exitStatus, 0)
        self.gate.callback("done")
        yield holder.ended
        lines = [event["line"] for event in self._events("line")]
        self.assertEqual(lines, ["gate", "answer * 2", "exit()"])

    @inlineCallbacks
    def test_clientDisconnectNotAnError(self) -> Any:
        """
        A client that closes its connection normally leaves no error in the
        log.
        """
        yield self._session(b"answer")
        # Let the client's disconnect message arrive.
        for _ in range(20):
            if not self.service._factory.connections:  # type: ignore[union-attr]
                break
            yield deferLater(globalReactor, 0.01, lambda: None)
        errors = [e for e in self.log if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
        self.assertEqual(errors, [])

    @inlineCallbacks
    def test_stopClosesSessions(self) -> Any:
        """
        Stopping the service stops listening and closes open sessions.
        """
        waiting = self._session(b"gate")
        yield self._session(b"answer")
        yield self.service.stopService()
        yield waiting
        failure = yield self.assertFailure(self._session(b"answer"), Exception)
        self.assertIn("refused", str(failure).lower())

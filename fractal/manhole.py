# -*- test-case-name: tests.test_manhole -*-
# mypy: allow-untyped-calls
# (twisted.conch is mostly unannotated: calls into it are untyped.)
"""
Manhole: an SSH console into a live node, for debugging production.

An operator logs into a running node with an ordinary SSH client and gets a
Python console inside the node's process, with the node's objects and a few
helpers (see L{consoleNamespace})::

    ssh -p 2222 admin@127.0.0.1

The console is off unless configured (C{twistd fractal --manhole ENDPOINT
--manhole-keys FILE}).  It accepts public-key authentication only, against an
OpenSSH C{authorized_keys} file that is read again at every login, so keys can
be added and removed without a restart.  The host key is generated on first
start (Ed25519, mode 0600) and reused afterwards.  An endpoint that does not
bind a loopback interface is refused unless remote access is explicitly
allowed.  Logins, refused logins and every line entered are logged as
structured events in the C{fractal.manhole} namespace; no key material and no
passwords (which are never accepted) appear in them.

Two kinds of session are served:

    - With a terminal (C{ssh -p 2222 admin@host}): a colour Python REPL with
      line editing and history (L{twisted.conch.manhole.ColoredManhole}).
    - Without one (C{ssh ... < script.py}, or a command: C{ssh ... 'stats()'}):
      a plain line console that reads Python lines, runs them in order, waits
      for a L{Deferred} result to fire before running the next line, and ends
      when its input does, with exit status 1 if any line raised.

Everything typed runs in the node's reactor thread: an expression holds the
node for as long as it runs, and no longer.  A helper that has to wait returns
a L{Deferred}; the console shows its result when it fires and binds it to
C{_}, while the node goes on serving.

Adding a helper is one function and one decorator::

    @consoleHelper
    def unread(node: FractalNode, user: str) -> Deferred[int]:
        \"\"\"
        How many unread messages a user has.
        \"\"\"
        d = node.pool.openStore(user)
        return d.addCallback(
            lambda store: store.query(Message, Message.read == False).count()
        )

The function takes the node as its first argument; the console passes it, so
the operator types C{unread("alice")}.  Its docstring's first line is what
C{help()} shows.
"""

from __future__ import annotations

import functools
import inspect
import os
import pydoc
import re
import textwrap
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, TypeVar

from attrs import frozen
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application.service import Service
from twisted.conch import error as conchError
from twisted.conch.avatar import ConchUser
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser, ISession
from twisted.conch.manhole import ColoredManhole, ManholeInterpreter
from twisted.conch.ssh import factory as sshFactory
from twisted.conch.ssh import keys
from twisted.conch.ssh.common import getNS
from twisted.conch.ssh.connection import SSHConnection
from twisted.conch.ssh.session import SSHSession, wrapProtocol
from twisted.conch.ssh.transport import (
    DISCONNECT_BY_APPLICATION,
    DISCONNECT_CONNECTION_LOST,
    SSHServerTransport,
)
from twisted.conch.ssh.userauth import SSHUserAuthServer
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IListeningPort, ITransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python import components
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from fractal._manholeconfig import (
    HOST_KEY_NAME,
    ManholeConfigurationError,
    checkEndpoint,
    checkHostKeyFile,
    checkKeysFile,
)
from fractal.keys import slotForKey, validateKey

if TYPE_CHECKING:  # pragma: no cover
    from fractal.node import FractalNode

__all__ = [
    "ManholeConfigurationError",
    "ManholeService",
    "AuthorizedKeysFile",
    "Summary",
    "UserList",
    "checkEndpoint",
    "checkKeysFile",
    "checkHostKeyFile",
    "manholeForNode",
    "HOST_KEY_NAME",
    "loadOrCreateHostKey",
    "fingerprint",
    "consoleHelper",
    "consoleNamespace",
    "HELPERS",
]

_log = Logger(namespace="fractal.manhole")

_F = TypeVar("_F", bound=Callable[..., object])

COLUMNS = 80
"""
The width helper output is laid out for.
"""





def fingerprint(key: keys.Key) -> str:
    """
    The fingerprint of C{key} as OpenSSH shows it (C{ssh-keygen -l}):
    C{SHA256:} and the unpadded base64 SHA-256 of the public key.

    @param key: a public or private key.
    """
    digest: str = key.fingerprint(keys.FingerprintFormats.SHA256_BASE64)
    return "SHA256:" + digest.rstrip("=")


def loadOrCreateHostKey(path: FilePath[str]) -> keys.Key:
    """
    Load the Manhole's SSH host key from C{path}, generating an Ed25519 key
    there first if the file does not exist.

    A new key is written with mode 0600 (through a temporary file renamed into
    place, so a crash never leaves half a key), with its public half beside it
    in C{path + ".pub"} for operators' C{known_hosts} files.

    @param path: the private key file, in OpenSSH format.
    @return: the private host key.
    @raise ManholeConfigurationError: if an existing key file is readable by
        other users, or cannot be read or parsed.
    """
    if not path.exists():
        key = keys.Key(ed25519.Ed25519PrivateKey.generate())
        path.parent().makedirs(ignoreExistingDirectory=True)
        temporary = path.siblingExtension(".new")
        if temporary.exists():
            temporary.remove()
        fd = os.open(temporary.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.toString("openssh"))
            f.flush()
            os.fsync(f.fileno())
        public = path.siblingExtension(".pub")
        fd = os.open(public.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(key.public().toString("openssh") + b"\n")
        temporary.moveTo(path)
        _log.info(
            "manhole: generated host key {fingerprint} in {path}",
            fingerprint=fingerprint(key),
            path=path.path,
        )
        return key
    checkHostKeyFile(path)
    try:
        loaded: keys.Key = keys.Key.fromFile(path.path)
    except (OSError, keys.BadKeyError, ValueError) as e:
        raise ManholeConfigurationError(
            f"the manhole host key {path.path!r} cannot be loaded: {e}; "
            "move it away to have a new one generated"
        ) from None
    return loaded


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """
    The public keys allowed to log into the Manhole: one OpenSSH
    C{authorized_keys} file, read at every login so changes apply at once.

    Every key in the file is valid for every user name.  Lines with options
    (C{from="..."}, C{command="..."}) cannot be honoured and are skipped, as
    are comments and lines that are not keys.

    @ivar path: the file.
    """

    def __init__(self, path: FilePath[str]) -> None:
        self.path = path

    def getAuthorizedKeys(self, avatarId: bytes) -> Iterable[keys.Key]:
        """
        The keys in the file; none if it cannot be read.

        @param avatarId: the user name logging in (not used).
        """
        try:
            content = self.path.getContent()
        except OSError as e:
            _log.error(
                "manhole: cannot read authorized keys {path}: {error}",
                path=self.path.path,
                error=e.strerror,
            )
            return []
        found = []
        for number, line in enumerate(content.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            try:
                found.append(keys.Key.fromString(line))
            except (keys.BadKeyError, ValueError):
                _log.warn(
                    "manhole: line {number} of {path} is not a plain public key"
                    " (options are not supported); skipped",
                    number=number,
                    path=self.path.path,
                )
        return found


# ---------------------------------------------------------------------------
# The SSH server: authentication with logging, sessions, consoles.


def _text(value: bytes, limit: int = 64) -> str:
    """
    A short printable rendering of client-supplied bytes for the log.
    """
    text = value.decode("utf-8", "replace")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return repr(text)[1:-1]


def _peerOf(transport: Any) -> str:
    """
    The remote address of a connection, as C{host:port}.
    """
    peer = transport.getPeer()
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    return f"{host}:{port}" if host is not None else str(peer)


class _ManholeUserAuth(SSHUserAuthServer):
    """
    The SSH user authentication service, logging every login attempt that
    decides something (not the C{none} probe or the public-key query that
    precedes a signed attempt).
    """

    transport: _ManholeTransport
    loginTimeout = 120
    attemptsBeforeDisconnect = 6

    def serviceStarted(self) -> None:
        self.clock = self.transport.factory.reactor
        super().serviceStarted()

    def tryAuth(self, kind: bytes, user: bytes, data: bytes) -> Deferred[Any]:
        d = super().tryAuth(kind, user, data)
        if kind == b"none":
            return d
        peer = _peerOf(self.transport.transport)
        offered = "-"
        if kind == b"publickey":
            try:
                offered = fingerprint(keys.Key.fromString(getNS(data[1:], 2)[1]))
            except Exception:
                offered = "unparsable"
        fields = dict(user=_text(user), peer=peer, method=_text(kind), fingerprint=offered)

        def succeeded(result: object) -> object:
            _log.info(
                "manhole login: {user} from {peer} with key {fingerprint}",
                manhole="login",
                **fields,
            )
            return result

        def failed(reason: Failure) -> Failure:
            if not reason.check(conchError.IgnoreAuthentication):
                _log.warn(
                    "manhole login refused: {user} from {peer} by {method}"
                    " (key {fingerprint}): {reason}",
                    manhole="refused",
                    reason=reason.getErrorMessage(),
                    **fields,
                )
            return reason

        return d.addCallbacks(succeeded, failed)


class _ManholeTransport(SSHServerTransport):
    """
    The server side of one SSH connection, known to its factory while open so
    stopping the service can close it.
    """

    factory: _ManholeFactory

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.connections.discard(self)
        super().connectionLost(reason)

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        # A client closing its connection says so with a disconnect message:
        # not an error worth an operator's attention.
        if reasonCode in (DISCONNECT_BY_APPLICATION, DISCONNECT_CONNECTION_LOST):
            return
        super().receiveError(reasonCode, description)


class _ManholeFactory(sshFactory.SSHFactory):
    """
    The SSH server factory of the Manhole: one host key, public-key logins.
    """

    protocol = _ManholeTransport
    services = {**sshFactory.SSHFactory.services, b"ssh-userauth": _ManholeUserAuth}

    def __init__(self, portal: Portal, hostKey: keys.Key, reactor: Any) -> None:
        self.portal = portal
        self.reactor = reactor
        self.publicKeys = {hostKey.sshType(): hostKey.public()}
        self.privateKeys = {hostKey.sshType(): hostKey}
        self.connections: set[_ManholeTransport] = set()


class _Console(ConchUser):
    """
    A logged-in operator: may open session channels, nothing else (no port
    forwarding, no subsystems).

    @ivar user: the user name, for the log.
    @ivar namespace: builds a fresh console namespace for each session.
    @ivar reactor: the reactor, to start consoles once their request is
        answered.
    """

    def __init__(
        self, user: str, namespace: Callable[[], dict[str, object]], reactor: Any
    ) -> None:
        super().__init__()
        self.user = user
        self.namespace = namespace
        self.reactor = reactor
        self.channelLookup[b"session"] = SSHSession


class _ConsoleInterpreter(ManholeInterpreter):
    """
    The Manhole interpreter, made safe for a shared process: input that is
    not UTF-8 is refused, C{SystemExit} closes the session instead of
    reaching the reactor, a Deferred's result is bound to C{_} when it fires
    (the Deferred's own result is left as it was), and errors are counted.
    """

    errors = 0

    def push(self, line: bytes) -> bool:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            self.errors += 1
            self.write("the line is not valid UTF-8; it was ignored\n")
            return bool(self.buffer)
        more: bool = super().push(line)
        return more

    def runcode(self, *a: Any, **kw: Any) -> None:
        try:
            super().runcode(*a, **kw)
        except SystemExit:
            self.handler.closeSession()

    def showtraceback(self) -> None:
        self.errors += 1
        super().showtraceback()

    def showsyntaxerror(self, filename: str | None = None, **kwargs: Any) -> None:
        self.errors += 1
        super().showsyntaxerror(filename, **kwargs)

    def displayhook(self, obj: object) -> None:
        super().displayhook(obj)
        if isinstance(obj, Deferred) and not obj.called:
            self.handler.deferredPending(obj)

    def _cbDisplayDeferred(self, result: object, k: int, obj: Deferred[Any]) -> object:
        self.locals["_"] = result
        return super()._cbDisplayDeferred(result, k, obj)

    def _ebDisplayDeferred(self, failure: Failure, k: int, obj: Deferred[Any]) -> Failure:
        # Shown, and passed on unchanged: the console only watches a
        # Deferred, which may be shared with the node's own code.
        self.errors += 1
        passed: Failure = super()._ebDisplayDeferred(failure, k, obj)
        return passed


def _sessionNamespace(console: Any, namespace: dict[str, object]) -> dict[str, object]:
    """
    Add the per-session names: C{exit} and C{quit} close the session, and
    C{input} refuses, since it would read the node's own standard input and
    block it.
    """

    class _Exit:
        def __repr__(self) -> str:
            return "Use exit() or Ctrl-D to close the session."

        def __call__(self, *args: object) -> None:
            console.closeSession()

    def input(*args: object) -> str:
        raise RuntimeError("input() would block the node; assign values instead")

    namespace = dict(namespace)
    namespace.update(exit=_Exit(), quit=_Exit(), input=input)
    return namespace


def _logLine(user: str, peer: str, line: bytes) -> None:
    """
    Log one line an operator entered.
    """
    _log.info(
        "manhole {user} from {peer} entered: {line}",
        manhole="line",
        user=user,
        peer=peer,
        line=_text(line, 500),
    )


class _ColorConsole(ColoredManhole):
    """
    The terminal console: Twisted's colour REPL with line editing and
    history, a greeting, per-session names, and every line logged.
    """

    def __init__(self, namespace: dict[str, object], user: str, peer: str) -> None:
        super().__init__(namespace)
        self.user, self.peer = user, peer

    def connectionMade(self) -> None:
        super().connectionMade()
        self.interpreter = _ConsoleInterpreter(
            self, _sessionNamespace(self, self.namespace or {})
        )
        self.namespace = self.interpreter.locals

    def initializeScreen(self) -> None:
        # Keep what the client's terminal shows: greet instead of resetting.
        greeting = (self.namespace or {}).get("__greeting__")
        if greeting:
            self.terminal.write(f"{greeting}".encode())
            self.terminal.nextLine()
        self.terminal.write(self.ps[self.pn])
        self.setInsertMode()

    def terminalSize(self, width: int, height: int) -> None:
        # Follow the window without clearing it.
        self.width, self.height = width, height

    def lineReceived(self, line: bytes) -> None:
        _logLine(self.user, self.peer, line)
        super().lineReceived(line)

    def deferredPending(self, d: Deferred[Any]) -> None:
        """
        Results are shown asynchronously; input goes on meanwhile.
        """

    def closeSession(self) -> None:
        """
        Close the session (C{exit()}, C{SystemExit}).
        """
        self.terminal.loseConnection()


class _LineConsole(Protocol):
    """
    The console without a terminal: Python lines in, plain text out, no
    escape sequences.  Lines run in order; a line whose value is a pending
    L{Deferred} holds the following lines until it fires.  When the input
    ends (and the last result is in) the session ends, with exit status 1
    if any line raised.

    @ivar echo: whether each line is written back after a prompt, making the
        output a readable transcript (true for shells, false for commands).

    A command run with a terminal (C{ssh -t host 'stats()'}) gets C{\r\n}
    line ends, which a terminal in raw mode needs.
    """

    maxLineLength = 65536

    def __init__(
        self,
        namespace: dict[str, object],
        user: str,
        peer: str,
        echo: bool,
        finished: Callable[[int], None],
        terminal: bool = False,
    ) -> None:
        self.user, self.peer, self.echo = user, peer, echo
        self._terminal = terminal
        self._namespace = namespace
        self._finished = finished
        self._buffer = b""
        self._lines: deque[bytes] = deque()
        self._waiting: Deferred[Any] | None = None
        self._inputEnded = False
        self._done = False
        self._running = False
        self._atLineStart = True
        self._prompt = b">>> "
        self._started = False

    def connectionMade(self) -> None:
        self.interpreter = _ConsoleInterpreter(
            self, _sessionNamespace(self, self._namespace)
        )

    def start(self) -> None:
        """
        Greet (when echoing) and run the lines received so far; until then
        input is only collected.
        """
        if self._started:
            return
        self._started = True
        greeting = self._namespace.get("__greeting__")
        if self.echo and greeting:
            self._write(f"{greeting}\n".encode())
        self._run()

    def _write(self, data: bytes) -> None:
        if data and not self._done and self.transport is not None:
            self._atLineStart = data.endswith(b"\n")
            if self._terminal:
                data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            self.transport.write(data)

    def addOutput(self, data: bytes | str, isAsync: bool | None = None) -> None:
        """
        Output of the interpreter: values, printed text, tracebacks, and
        Deferred results as they fire.
        """
        if isinstance(data, str):
            data = data.encode("utf-8", "replace")
        self._write(data)
        if isAsync and not self._atLineStart:
            self._write(b"\n")

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > self.maxLineLength:
            self._write(b"line too long; closing the session\n")
            self._lines.clear()
            self._buffer = b""
            self._inputEnded = True
            self.interpreter.errors += 1
        self._lines.extend(line.rstrip(b"\r") for line in lines)
        self._run()

    def inputEnded(self) -> None:
        """
        The client will send nothing more: finish the remaining lines (and
        an unfinished block), then end the session.
        """
        if self._buffer:
            self._lines.append(self._buffer.rstrip(b"\r"))
            self._buffer = b""
        self._inputEnded = True
        self._run()

    def _run(self) -> None:
        if self._running or not self._started:
            return
        self._running = True
        try:
            while self._lines and self._waiting is None and not self._done:
                line = self._lines.popleft()
                _logLine(self.user, self.peer, line)
                if self.echo:
                    self._write(self._prompt + line + b"\n")
                more = self.interpreter.push(line)
                self._prompt = b"... " if more else b">>> "
                if not self._atLineStart:
                    self._write(b"\n")
            if self._inputEnded and not self._lines and self._waiting is None:
                if self.interpreter.buffer:
                    # An unfinished block at the end of the input: end it.
                    self._lines.append(b"")
                    self._running = False
                    self._run()
                    return
                self.closeSession()
        finally:
            self._running = False

    def deferredPending(self, d: Deferred[Any]) -> None:
        """
        Hold the following lines until C{d} fires (its result is shown
        first).
        """
        self._waiting = d

        def resume(result: object) -> object:
            self._waiting = None
            self._run()
            return result

        d.addBoth(resume)

    def closeSession(self) -> None:
        """
        End the session with exit status 0, or 1 if any line raised.
        """
        if not self._done:
            self._done = True
            self._finished(1 if self.interpreter.errors else 0)


@implementer(ITransport)
class _TerminalTransport:
    """
    The transport of a terminal console: writes go to the session channel,
    and closing ends the session with exit status 0, as a shell that exits
    normally does.
    """

    disconnecting = False

    def __init__(self, proto: Any, end: Callable[[int], None]) -> None:
        self._proto = proto
        self._end = end

    def write(self, data: bytes) -> None:
        self._proto.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self._proto.write(b"".join(data))

    def loseConnection(self) -> None:
        self.disconnecting = True
        self._end(0)

    def getPeer(self) -> Any:
        return self._proto.getPeer()

    def getHost(self) -> Any:
        return self._proto.getHost()


@implementer(ISession)
class _ConsoleSession:
    """
    One session channel of a logged-in operator: a colour console when the
    client asked for a terminal, a line console otherwise.
    """

    def __init__(self, avatar: _Console) -> None:
        self.avatar = avatar
        self._size: tuple[int, int] | None = None
        self._terminal: insults.ServerProtocol | None = None
        self._lineConsole: _LineConsole | None = None
        self._closed = False

    def _peer(self) -> str:
        return _peerOf(self.avatar.conn.transport.transport)

    def _ender(self, proto: Any) -> Callable[[int], None]:
        """
        A function ending the session with an exit status, once, and not
        after the client closed the channel.
        """

        def end(status: int) -> None:
            if self._closed:
                return
            self._closed = True
            reason = ProcessDone(None) if status == 0 else ProcessTerminated(exitCode=status)
            proto.processEnded(Failure(reason))

        return end

    def getPty(self, term: bytes, windowSize: tuple[int, ...], modes: object) -> None:
        rows, columns = windowSize[0], windowSize[1]
        self._size = (columns or COLUMNS, rows or 24)

    def openShell(self, proto: Any) -> None:
        namespace = self.avatar.namespace()
        if self._size is None:
            self._attachLineConsole(proto, namespace, echo=True, command=None)
            return
        width, height = self._size
        terminal = insults.ServerProtocol(_ColorConsole, namespace, self.avatar.user, self._peer())
        terminal.makeConnection(_TerminalTransport(proto, self._ender(proto)))
        proto.makeConnection(wrapProtocol(terminal))
        console: Any = terminal.terminalProtocol
        console.terminalSize(width, height)
        self._terminal = terminal

    def execCommand(self, proto: Any, command: bytes) -> None:
        namespace = self.avatar.namespace()
        self._attachLineConsole(proto, namespace, echo=False, command=command)

    def _attachLineConsole(
        self, proto: Any, namespace: dict[str, object], echo: bool, command: bytes | None
    ) -> None:
        console = _LineConsole(
            namespace,
            self.avatar.user,
            self._peer(),
            echo,
            self._ender(proto),
            terminal=self._size is not None,
        )
        self._lineConsole = console
        console.makeConnection(proto)
        proto.makeConnection(wrapProtocol(console))
        if command is not None:
            console.dataReceived(command + b"\n")
            console.inputEnded()
        # Output only once the client has the answer to its shell or exec
        # request: some clients (twisted.conch's) drop data that comes first.
        self.avatar.reactor.callLater(0, console.start)

    def windowChanged(self, newWindowSize: tuple[int, ...]) -> None:
        if self._terminal is not None:
            rows, columns = newWindowSize[0], newWindowSize[1]
            console: Any = self._terminal.terminalProtocol
            console.terminalSize(columns, rows)

    def eofReceived(self) -> None:
        if self._lineConsole is not None:
            self._lineConsole.inputEnded()
        elif self._terminal is not None:
            self._terminal.loseConnection()

    def closed(self) -> None:
        self._closed = True
        self._lineConsole = None
        self._terminal = None


components.registerAdapter(_ConsoleSession, _Console, ISession)


@implementer(IRealm)
class _ConsoleRealm:
    """
    Gives each operator who logs in a L{_Console}.
    """

    def __init__(self, namespace: Callable[[], dict[str, object]], reactor: Any) -> None:
        self._namespace = namespace
        self._reactor = reactor

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any
    ) -> tuple[Any, _Console, Callable[[], None]]:
        if IConchUser not in interfaces or not isinstance(avatarId, bytes):
            raise NotImplementedError("the manhole only serves SSH users")
        user = _text(avatarId)

        def logout() -> None:
            _log.info("manhole logout: {user}", manhole="logout", user=user)

        return IConchUser, _Console(user, self._namespace, self._reactor), logout


class ManholeService(Service):
    """
    The Manhole: an SSH server that opens a Python console inside this
    process for operators whose public key is in an C{authorized_keys} file.

    The endpoint and the key file are checked when the service is built, so
    a bad configuration is refused before the node starts.  The host key is
    loaded, or generated, when the service starts.

    @ivar endpoint: the server endpoint description it listens on.
    @ivar authorizedKeys: the OpenSSH C{authorized_keys} file.
    @ivar hostKey: the host key file (its public half is beside it, C{.pub}).
    """

    _log = Logger(namespace="fractal.manhole")

    def __init__(
        self,
        endpoint: str,
        authorizedKeys: FilePath[str],
        hostKey: FilePath[str],
        namespace: Callable[[], dict[str, object]],
        *,
        allowRemote: bool = False,
        reactor: Any = None,
    ) -> None:
        """
        @param endpoint: a server endpoint description.
        @param authorizedKeys: the OpenSSH C{authorized_keys} file whose keys
            may log in.
        @param hostKey: where the host key is kept.
        @param namespace: builds the namespace of each new console, for
            example C{lambda: consoleNamespace(node)}.
        @param allowRemote: allow an endpoint other machines can reach.
        @param reactor: the reactor to listen with; the global one if
            L{None}.
        @raise ManholeConfigurationError: if the endpoint is remote without
            C{allowRemote}, or the key file is missing or writable by others.
        """
        checkEndpoint(endpoint, allowRemote)
        checkKeysFile(authorizedKeys)
        self.endpoint = endpoint
        self.authorizedKeys = authorizedKeys
        self.hostKey = hostKey
        self._namespace = namespace
        self._reactor = reactor
        self._factory: _ManholeFactory | None = None
        self._listening: Deferred[IListeningPort] | None = None
        self._port: IListeningPort | None = None
        self._waiters: list[Deferred[IListeningPort]] = []

    def privilegedStartService(self) -> None:
        """
        Load or create the host key and start listening (before a node
        started as root drops its privileges).

        @raise ManholeConfigurationError: if the host key cannot be used.
        """
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        self._listen()

    def _listen(self) -> None:
        if self._listening is not None:
            return
        from twisted.internet.endpoints import serverFromString

        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        key = loadOrCreateHostKey(self.hostKey)
        portal = Portal(_ConsoleRealm(self._namespace, reactor))
        portal.registerChecker(SSHPublicKeyChecker(AuthorizedKeysFile(self.authorizedKeys)))
        self._factory = _ManholeFactory(portal, key, reactor)
        self._listening = serverFromString(reactor, self.endpoint).listen(self._factory)

        def listening(port: IListeningPort) -> None:
            self._port = port
            self._log.info(
                "manhole listening on {endpoint}, host key {fingerprint}",
                manhole="listening",
                endpoint=self.endpoint,
                fingerprint=fingerprint(key),
            )
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(port)

        def failed(reason: Failure) -> None:
            self._log.critical(
                "manhole could not listen on {endpoint}: {error}; the node runs"
                " without its console",
                manhole="failed",
                endpoint=self.endpoint,
                error=reason.getErrorMessage(),
            )
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.errback(reason)

        self._listening.addCallbacks(listening, failed)

    def whenListening(self) -> Deferred[IListeningPort]:
        """
        The port the Manhole listens on, once it does.

        @return: a L{Deferred} firing with the L{IListeningPort}, or failing
            if listening failed.
        """
        if self._port is not None:
            return succeed(self._port)
        d: Deferred[IListeningPort] = Deferred()
        self._waiters.append(d)
        return d

    def stopService(self) -> Deferred[None] | None:
        """
        Stop listening and close every open session.
        """
        super().stopService()
        listening, self._listening = self._listening, None
        port, self._port = self._port, None
        if self._factory is not None:
            for connection in list(self._factory.connections):
                # Close each session first, so clients see it end, then
                # the connection.
                service = connection.service
                if isinstance(service, SSHConnection):
                    for channel in list(service.channels.values()):
                        service.sendClose(channel)
                connection.sendDisconnect(
                    DISCONNECT_BY_APPLICATION, b"the node's manhole is stopping"
                )
        if port is not None:
            return port.stopListening()
        if listening is not None:
            listening.cancel()
        return None


# ---------------------------------------------------------------------------
# The console namespace: the node's objects and the helpers.


def _render(value: object) -> str:
    """
    A value as shown in a summary row.
    """
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return repr(value)


@frozen
class Summary:
    """
    A small named table, shown one C{name  value} row per line so it reads
    well in an 80-column terminal.  Rows are looked up by name:
    C{where("alice")["slot"]}.

    @ivar title: the first line.
    @ivar rows: C{(name, value)} pairs, in order.
    """

    title: str
    rows: tuple[tuple[str, object], ...]

    def __getitem__(self, name: str) -> object:
        for rowName, value in self.rows:
            if rowName == name:
                return value
        raise KeyError(name)

    def asDict(self) -> dict[str, object]:
        """
        The rows as a dictionary.
        """
        return dict(self.rows)

    def __repr__(self) -> str:
        width = min(max((len(name) for name, _ in self.rows), default=0), 24)
        lines = [self.title]
        for name, value in self.rows:
            indent = " " * (2 + width + 2)
            text = _render(value)
            wrapped = textwrap.wrap(
                text,
                COLUMNS,
                initial_indent=f"  {name:<{width}}  ",
                subsequent_indent=indent,
                break_on_hyphens=False,
            ) or [f"  {name}"]
            lines.extend(wrapped)
        return "\n".join(lines)


class UserList(tuple[str, ...]):
    """
    User keys, shown one per line.
    """

    def __repr__(self) -> str:
        count = f"{len(self)} user{'s' if len(self) != 1 else ''}"
        return "\n".join([count] + [f"  {key!r}" for key in self])


def _settled(result: object) -> object:
    """
    The result of a L{Deferred} that has already fired (raising its error if
    it failed); anything else, including a pending L{Deferred}, unchanged.
    """
    if not isinstance(result, Deferred) or not result.called:
        return result
    box: list[object] = []

    def keep(value: object) -> object:
        box.append(value)
        return value

    result.addBoth(keep)
    if not box:
        return result
    value = box[0]
    if isinstance(value, Failure):
        result.addErrback(lambda f: None)
        value.raiseException()
    return value


def _then(result: object, f: Callable[[Any], object]) -> object:
    """
    Apply C{f} to C{result}, or to its value when it fires if it is a
    L{Deferred}.
    """
    result = _settled(result)
    if isinstance(result, Deferred):
        return result.addCallback(f)
    return f(result)


HELPERS: dict[str, Callable[..., object]] = {}
"""
The console helpers by name: functions taking the node first.  Register one
with L{consoleHelper}.
"""


def consoleHelper(function: _F) -> _F:
    """
    Register C{function} as a console helper named after it.  The console
    calls it with the node as first argument, followed by what the operator
    typed; the first line of its docstring is shown by C{help()}.  A
    L{Deferred} it returns is shown when it fires.

    @param function: the helper.
    @return: C{function}, unchanged.
    """
    HELPERS[function.__name__] = function
    return function


def _words(name: str) -> str:
    """
    A counter's name as words: C{"callsServed"} is C{"calls served"}.
    """
    return re.sub(r"(?<=[a-z0-9])([A-Z])", lambda m: " " + m.group(1).lower(), name).replace(
        "_", " "
    )


def _firstLine(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _bind(function: Callable[..., object], node: FractalNode) -> Callable[..., object]:
    """
    C{function} with the node bound as its first argument, keeping its name,
    docstring and the rest of its signature.
    """

    @functools.wraps(function)
    def helper(*args: object, **kwargs: object) -> object:
        return _settled(function(node, *args, **kwargs))

    # Shown by help(): the operator's arguments, without annotations.
    signature = inspect.signature(function)
    parameters = [
        parameter.replace(annotation=inspect.Parameter.empty)
        for parameter in list(signature.parameters.values())[1:]
    ]
    plain = signature.replace(
        parameters=parameters, return_annotation=inspect.Signature.empty
    )
    setattr(helper, "__signature__", plain)
    del helper.__wrapped__
    return helper


@consoleHelper
def where(node: FractalNode, user: str) -> Summary:
    """
    Where a user lives: slot, owner node, epoch, whether here and open.

    @param user: the user key.
    """
    key = validateKey(user)
    shardMap = node.topology.currentMap()
    slot = slotForKey(key, shardMap.slots)
    owner = shardMap.ownerOf(slot)
    local = owner.node == node.nodeId
    address = shardMap.nodes[owner.node].client
    return Summary(
        f"where({key!r})",
        (
            ("slot", slot),
            ("owner", owner.node),
            ("epoch", owner.epoch),
            ("local", local),
            ("open", local and key in set(node.pool.openKeys())),
            ("address", address),
        ),
    )


@consoleHelper
def store(node: FractalNode, user: str) -> object:
    """
    The user's Store, opened through the pool; write only in s.transact(f).

    Refused for a user another node owns: that node is the only writer.

    @param user: the user key.
    @return: the L{fractal.store.Store}, or a L{Deferred} firing with it.
    @raise ValueError: if another node owns the user.
    """
    key = validateKey(user)
    owner = node.topology.currentMap().ownerOfKey(key)
    if owner.node != node.nodeId:
        raise ValueError(
            f"user {key!r} lives on node {owner.node!r} (epoch {owner.epoch}), "
            f"not here ({node.nodeId!r}); use that node's manhole"
        )
    return node.pool.openStore(key)


@consoleHelper
def users(node: FractalNode, limit: int = 20) -> object:
    """
    Known users on this node, at most limit of them.

    @param limit: the most keys to list.
    @return: a L{UserList}, or a L{Deferred} firing with one.
    """
    return _then(node.pool.knownKeys(limit), lambda keys: UserList(keys))


@consoleHelper
def stats(node: FractalNode) -> object:
    """
    The node's counters: open stores, calls served, errors, shipping lag.

    @return: a L{Summary}, or a L{Deferred} firing with one.
    """

    def summarize(counters: Mapping[str, object]) -> Summary:
        rows: list[tuple[str, object]] = [
            (_words(str(name)), value) for name, value in counters.items()
        ]
        shipper = getattr(node, "shipper", None)
        if shipper is None:
            rows.append(("shipping", "no shipper: stores are local only"))
        else:
            lag = shipper.lag()
            rows.append(("lag seconds", round(lag.seconds, 3)))
            rows.append(("lag bytes", lag.bytesPending))
            rows.append(("stores behind", len(lag.stores)))
        return Summary(f"stats() of node {node.nodeId!r}", tuple(rows))

    return _then(node.stats(), summarize)


@consoleHelper
def lag(node: FractalNode, limit: int = 10) -> Summary:
    """
    Shipping lag: the stores furthest behind their durable copies, and the
    slots this node stopped serving because it was fenced out of them.

    @param limit: the most stores to list.
    """
    shipper = getattr(node, "shipper", None)
    if shipper is None:
        return Summary("lag()", (("shipping", "no shipper: stores are local only"),))
    current = shipper.lag()
    rows: list[tuple[str, object]] = [
        ("worst seconds", round(current.seconds, 3)),
        ("bytes pending", current.bytesPending),
        ("stores behind", len(current.stores)),
    ]
    for fence in node.server.fencedSlots():
        rows.append((f"slot {fence.slot}", f"FENCED: {fence.describe()}"))
    behind = sorted(current.stores, key=lambda store: -store.seconds)[:limit]
    for store in behind:
        fenced = ", FENCED" if store.fenced else ""
        rows.append(
            (
                repr(store.key),
                f"{store.seconds:.1f} s, {store.bytesPending} bytes, seq {store.seq}{fenced}",
            )
        )
    return Summary("lag()", tuple(rows))


@consoleHelper
def shardmap(node: FractalNode) -> Summary:
    """
    The current shard map: version, slots, and each node's share.
    """
    shardMap = node.topology.currentMap()
    rows: list[tuple[str, object]] = [("version", shardMap.version), ("slots", shardMap.slots)]
    for name in sorted(shardMap.nodes):
        owned = shardMap.slotsOf(name)
        here = " (this node)" if name == node.nodeId else ""
        rows.append(
            (f"node {name}", f"{len(owned)} slots{here}, {shardMap.nodes[name].client}")
        )
    return Summary("shardmap()", tuple(rows))


_OBJECTS: tuple[tuple[str, str, Callable[[FractalNode], object]], ...] = (
    ("node", "the FractalNode service", lambda node: node),
    ("app", "the Application this node serves", lambda node: node.application),
    ("pool", "the StorePool of open user stores", lambda node: node.pool),
    ("topology", "who owns which slot; topology.currentMap()", lambda node: node.topology),
    ("shipper", "the durable shipper", lambda node: getattr(node, "shipper", None)),
)
"""
The node's objects in the namespace: name, description, how to get it.  One
whose value is L{None} is left out.
"""


def consoleNamespace(
    node: FractalNode, helpers: Mapping[str, Callable[..., object]] | None = None
) -> dict[str, object]:
    """
    The namespace of a new console on C{node}: its objects (C{node}, C{app},
    C{pool}, C{topology}, C{shipper} when it has one), the registered helpers
    bound to it (C{where}, C{store}, C{users}, C{stats}, C{shardmap}, ...),
    and C{help()}.

    @param node: the node.
    @param helpers: the helpers to offer; L{HELPERS} by default.
    @return: a fresh dictionary.
    """
    namespace: dict[str, object] = {}
    lines = ["Objects:"]
    for name, description, get in _OBJECTS:
        value = get(node)
        if value is not None:
            namespace[name] = value
            lines.append(f"  {name:<10} {description}")
    lines.append("Helpers:")
    for name, function in sorted((HELPERS if helpers is None else helpers).items()):
        bound = _bind(function, node)
        namespace[name] = bound
        call = f"{name}{inspect.signature(bound)}"
        lines.append(f"  {call}")
        lines.append(f"      {_firstLine(function)}")
    lines.append("  help(obj)")
    lines.append("      the documentation of obj")
    lines.append("A Deferred result is shown when it fires and bound to _.")
    listing = "\n".join(lines)

    class _Text(str):
        def __repr__(self) -> str:
            return str(self)

    def help(obj: object = None) -> object:
        """
        What is in this console, or the documentation of obj.
        """
        if obj is None:
            return _Text(listing)
        plain = pydoc.plaintext  # type: ignore[attr-defined]
        return _Text(pydoc.render_doc(obj, renderer=plain).rstrip())

    namespace["help"] = help
    namespace["__greeting__"] = (
        f"txfractal manhole on node {node.nodeId!r}; help() lists the helpers."
    )
    return namespace


def manholeForNode(
    node: FractalNode,
    endpoint: str,
    authorizedKeys: FilePath[str],
    allowRemote: bool = False,
) -> ManholeService:
    """
    The Manhole of C{node}: its consoles get L{consoleNamespace}C{(node)},
    its host key is L{HOST_KEY_NAME} in the node's data directory, and it
    listens with the node's reactor.  Make it a child of the node with
    C{setServiceParent(node)}.

    @param node: the node.
    @param endpoint: a server endpoint description.
    @param authorizedKeys: the OpenSSH C{authorized_keys} file.
    @param allowRemote: allow an endpoint other machines can reach.
    @raise ManholeConfigurationError: as L{ManholeService} does.
    """
    service = ManholeService(
        endpoint,
        authorizedKeys,
        node.dataDir.child(HOST_KEY_NAME),
        lambda: consoleNamespace(node),
        allowRemote=allowRemote,
        reactor=node.reactor,
    )
    service.setName("manhole")
    return service

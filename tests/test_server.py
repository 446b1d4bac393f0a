"""
Tests for L{fractal.server}: the AMP front door of a node.

Clients are real L{amp.AMP} protocols talking to a real L{FractalServer} over
L{twisted.test.iosim}, against real SQLite stores under C{mktemp()}; raw byte
inputs go through a L{StringTransport}.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from fractal import app
from fractal.keys import InvalidUserKey
from fractal.pool import StorePool, UserKey
from fractal.protocol import (
    FRAMEWORK_ERRORS,
    CallFailed,
    InvalidRequest,
    NodeStopping,
    NotOwner,
    Overloaded,
    OwnerUnavailable,
)
from fractal.routing.interfaces import NodeAddress, SlotOwner
from fractal.routing.topology import SingleNodeTopology, StaticTopology
from fractal.server import FractalServer, NodeProtocol, ServerLimits
from fractal.store import Item, integer, text


def callRemote(client: amp.AMP, command: type[amp.Command], **kw: Any) -> Deferred[Any]:
    """
    Call C{command} on C{client}, with the result in a new L{Deferred}: AMP
    drops a connection whose call fails without an errback, and a test looks
    at the result only after the pump has run.
    """
    result: Deferred[Any] = Deferred()
    client.callRemote(command, **kw).chainDeferred(result)
    return result

class NoSuchNote(Exception):
    """
    A declared error.
    """


class AddNote(app.UserCommand):
    arguments = [(b"body", amp.Unicode()), (b"count", amp.Integer(optional=True))]
    response = [(b"noteID", amp.Integer())]


class CountNotes(app.UserCommand):
    response = [(b"notes", amp.Integer()), (b"added", amp.Integer())]


class ReadNote(app.UserCommand):
    arguments = [(b"noteID", amp.Integer())]
    response = [(b"body", amp.Unicode())]
    errors = {NoSuchNote: b"NO_SUCH_NOTE"}


class Explode(app.UserCommand):
    arguments = [(b"body", amp.Unicode())]


class Later(app.UserCommand):
    response = [(b"value", amp.Integer())]


class BadAnswer(app.UserCommand):
    arguments = [(b"body", amp.Unicode())]
    response = [(b"noteID", amp.Integer())]


class Awaiting(app.UserCommand):
    response = [(b"value", amp.Integer())]


class Durably(app.UserCommand):
    ack = "durable"


class RawAddNote(amp.Command):
    """
    L{AddNote} as a client that sends the user key as raw bytes sees it.
    """

    commandName = b"AddNote"
    arguments = [(b"user", amp.String()), (b"body", amp.Unicode())]
    response = [(b"noteID", amp.Integer())]
    errors = dict(FRAMEWORK_ERRORS)


class NoUserAddNote(amp.Command):
    """
    L{AddNote} without its user key.
    """

    commandName = b"AddNote"
    arguments = [(b"body", amp.Unicode())]
    response = [(b"noteID", amp.Integer())]
    errors = dict(FRAMEWORK_ERRORS)


class ServerTestNote(Item):
    typeName = "test_server_note"
    body = text()


class ServerTestNotebook(Item):
    typeName = "test_server_notebook"
    added = integer(default=0)

    pending: list[Deferred[dict[str, Any]]] = []

    @AddNote.responder
    def addNote(self, body: str, count: int | None) -> dict[str, Any]:
        note = ServerTestNote(store=self.store, body=body)
        self.added += 1
        return {"noteID": note.storeID}

    @CountNotes.responder
    def countNotes(self) -> dict[str, Any]:
        return {"notes": self.store.query(ServerTestNote).count(), "added": self.added}

    @ReadNote.responder
    def readNote(self, noteID: int) -> dict[str, Any]:
        note = self.store.getItemByID(noteID, default=None)
        if not isinstance(note, ServerTestNote):
            raise NoSuchNote(f"no note {noteID}")
        return {"body": note.body}

    @Explode.responder
    def explode(self, body: str) -> dict[str, Any]:
        ServerTestNote(store=self.store, body=body)
        self.added += 1
        raise RuntimeError("the responder broke")

    @BadAnswer.responder
    def badAnswer(self, body: str) -> dict[str, Any]:
        note = ServerTestNote(store=self.store, body=body)
        self.added += 1
        return {"noteID": str(note.storeID)}

    @Later.responder
    def later(self) -> Deferred[dict[str, Any]]:
        d: Deferred[dict[str, Any]] = Deferred()
        ServerTestNotebook.pending.append(d)
        return d

    @Awaiting.responder
    async def awaiting(self) -> dict[str, Any]:
        self.added += 10
        d: Deferred[int] = Deferred()
        ServerTestNotebook.pending.append(d)  # type: ignore[arg-type]
        value = await d
        return {"value": value}


class ServerTestDurable(Item):
    typeName = "test_server_durable"
    unused = integer(default=0)

    @Durably.responder
    def durably(self) -> dict[str, Any]:
        return {}


application = app.Application("notes", powerups=[ServerTestNotebook])


def _twoNodes() -> StaticTopology:
    """
    The topology of a two-node cluster, as node C{n1} sees it.
    """
    return StaticTopology(
        "n1",
        [
            NodeAddress("n1", "tcp:host=127.0.0.1:port=7101", "tcp:host=127.0.0.1:port=7201"),
            NodeAddress("n2", "tcp:host=127.0.0.1:port=7102", "tcp:host=127.0.0.1:port=7202"),
        ],
        slots=16,
    )


def _keyOwnedBy(topology: StaticTopology, node: str) -> str:
    """
    A user key whose slot C{node} owns.
    """
    shardMap = topology.currentMap()
    return next(k for k in (f"user{i}" for i in range(1000)) if shardMap.ownerOfKey(k).node == node)


_keys = st.sampled_from([b"_ask", b"_command", b"user", b"body", b"count", b"noteID", b"x"])
_values = st.one_of(
    st.sampled_from([b"1", b"AddNote", b"CountNotes", b"ReadNote", b"alice", b"", b"\xff", b"-5"]),
    st.binary(max_size=40),
)
_boxes = st.dictionaries(_keys, _values, max_size=6)


class ServerFuzzTests(SynchronousTestCase):
    """
    Arbitrary input never breaks a node.
    """

    @settings(max_examples=60, deadline=None)
    @given(boxes=st.lists(_boxes, max_size=6), tail=st.binary(max_size=30))
    def test_anyBoxesAnyBytes(self, boxes: list[dict[bytes, bytes]], tail: bytes) -> None:
        """
        Any sequence of boxes, followed by any bytes, gets at most one answer
        per box, logs no error, and leaves the node serving a new connection.
        """
        clock = Clock()
        pool = StorePool(clock, self.dataDir, prepare=application.installOn)
        server = FractalServer(
            application, pool, SingleNodeTopology("n1", "tcp:host=127.0.0.1:port=1")
        )
        proto = server.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        for box in boxes:
            proto.dataReceived(amp.AmpBox(box).serialize())
        proto.dataReceived(tail)
        answers = amp.parseString(transport.value())
        # The tail may itself complete one more box.
        self.assertLessEqual(len(answers), len(boxes) + 1)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(server.inFlight, 0)
        other = server.buildProtocol(None)
        otherTransport = StringTransport()
        other.makeConnection(otherTransport)
        other.dataReceived(amp.AmpBox(_command=b"CountNotes", _ask=b"1", user=b"bob").serialize())
        [answer] = amp.parseString(otherTransport.value())
        self.assertIn(b"notes", answer)
        self.successResultOf(pool.close())

    @settings(max_examples=40, deadline=None)
    @given(
        boxes=st.lists(_boxes, max_size=6),
        cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
        maxBoxBytes=st.sampled_from([40, 1 << 20]),
    )
    def test_anyFraming(
        self, boxes: list[dict[bytes, bytes]], cuts: list[int], maxBoxBytes: int
    ) -> None:
        """
        The answers to a stream of boxes do not depend on how the stream is
        cut into reads: all at once, at any points, or a byte at a time (which
        leaves every box to AMP's own parser), boxes over the size limit
        included.
        """
        calls = [dict(box, _ask=b"%d" % i) for i, box in enumerate(boxes)]
        stream = b"".join(amp.AmpBox(box).serialize() for box in calls)
        points = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
        answers = []
        byteByByte = [stream[i : i + 1] for i in range(len(stream))]
        for reads in [[stream], [stream[a:b] for a, b in zip(points, points[1:])], byteByByte]:
            pool = StorePool(Clock(), FilePath(self.mktemp()), prepare=application.installOn)
            server = FractalServer(
                application,
                pool,
                SingleNodeTopology("n1", "tcp:host=127.0.0.1:port=1"),
                limits=ServerLimits(maxBoxBytes=maxBoxBytes),
            )
            proto = server.buildProtocol(None)
            transport = StringTransport()
            proto.makeConnection(transport)
            for data in reads:
                proto.dataReceived(data)
            answers.append(transport.value())
            self.successResultOf(pool.close())
        self.assertEqual(answers[0], answers[2])
        self.assertEqual(answers[1], answers[2])
        self.assertEqual(self.flushLoggedErrors(), [])

    def setUp(self) -> None:
        self.dataDir = FilePath(self.mktemp())


class ServerTests(SynchronousTestCase):
    """
    Tests for L{FractalServer} and L{NodeProtocol}.
    """

    def setUp(self) -> None:
        ServerTestNotebook.pending = []
        self.clock = Clock()
        self.root = FilePath(self.mktemp())
        self.dataDir = self.root.child("data")
        self.pool = StorePool(
            self.clock, self.dataDir, prepare=application.installOn, maxOpenStores=4
        )
        self.addCleanup(self.pool.close)
        self.topology = SingleNodeTopology("n1", "tcp:host=127.0.0.1:port=7100")
        self.server = FractalServer(application, self.pool, self.topology)

    def connect(self) -> tuple[amp.AMP, NodeProtocol, iosim.IOPump]:
        """
        A real AMP client connected to the server over an in-memory link.
        """
        client, server, pump = iosim.connectedServerAndClient(
            lambda: self.server.buildProtocol(None), amp.AMP, clock=self.clock
        )
        return client, server, pump

    def call(self, command: type[amp.Command], **kw: Any) -> Any:
        """
        Call C{command} on a fresh connection and return its result.
        """
        client, _, pump = self.connect()
        d = callRemote(client, command, **kw)
        pump.flush()
        return self.successResultOf(d)

    def callFails(self, command: type[amp.Command], error: type[Exception], **kw: Any) -> Exception:
        """
        Call C{command} on a fresh connection and return the error it fails
        with, which must be C{error}.
        """
        client, _, pump = self.connect()
        d = callRemote(client, command, **kw)
        pump.flush()
        return self.failureResultOf(d, error).value  # type: ignore[return-value]

    def rawCall(self, box: amp.AmpBox, proto: NodeProtocol | None = None) -> amp.AmpBox:
        """
        Send one box over a L{StringTransport} and return the single answer.
        """
        if proto is None:
            proto = self.server.buildProtocol(None)
            proto.makeConnection(StringTransport())
        transport = proto.transport
        assert isinstance(transport, StringTransport)
        transport.clear()
        proto.dataReceived(box.serialize())
        [answer] = amp.parseString(transport.value())
        return answer

    def test_dispatch(self) -> None:
        """
        A user command runs its responder in the user's store and answers
        with its response.
        """
        client, _, pump = self.connect()
        first = callRemote(client, AddNote, user="alice", body="hello")
        second = callRemote(client, AddNote, user="alice", body="again")
        count = callRemote(client, CountNotes, user="alice")
        pump.flush()
        noteID = self.successResultOf(first)["noteID"]
        self.assertNotEqual(self.successResultOf(second)["noteID"], noteID)
        self.assertEqual(self.successResultOf(count), {"notes": 2, "added": 2})
        read = callRemote(client, ReadNote, user="alice", noteID=noteID)
        pump.flush()
        self.assertEqual(self.successResultOf(read), {"body": "hello"})
        self.assertEqual(self.server.callsServed, 4)
        self.assertEqual(self.server.inFlight, 0)
        self.assertTrue(self.pool.pathForKey("alice").child("db.sqlite").isfile())

    def test_usersAreSeparate(self) -> None:
        """
        Each user has their own store.
        """
        self.call(AddNote, user="alice", body="a")
        self.call(AddNote, user="alice", body="b")
        self.call(AddNote, user="bob", body="c")
        self.assertEqual(self.call(CountNotes, user="alice")["notes"], 2)
        self.assertEqual(self.call(CountNotes, user="bob")["notes"], 1)
        self.assertEqual(self.call(CountNotes, user="carol")["notes"], 0)

    def test_declaredError(self) -> None:
        """
        An error the command declares reaches the client as that error, and
        the connection carries on.
        """
        client, _, pump = self.connect()
        d = callRemote(client, ReadNote, user="alice", noteID=999)
        after = callRemote(client, CountNotes, user="alice")
        pump.flush()
        self.assertEqual(str(self.failureResultOf(d, NoSuchNote).value), "no note 999")
        self.assertEqual(self.successResultOf(after)["notes"], 0)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_undeclaredErrorRollsBack(self) -> None:
        """
        An undeclared exception in a responder rolls back everything the call
        did, fails that call alone with L{CallFailed}, and is logged; calls of
        the same and other users on the same connection carry on.
        """
        client, _, pump = self.connect()
        before = callRemote(client, AddNote, user="alice", body="kept")
        boom = callRemote(client, Explode, user="alice", body="lost")
        other = callRemote(client, AddNote, user="bob", body="fine")
        after = callRemote(client, CountNotes, user="alice")
        pump.flush()
        self.successResultOf(before)
        failure = self.failureResultOf(boom, CallFailed)
        self.assertIn("Explode failed", str(failure.value))
        self.assertIn("rolled back", str(failure.value))
        self.assertNotIn("the responder broke", str(failure.value))
        self.successResultOf(other)
        self.assertEqual(self.successResultOf(after), {"notes": 1, "added": 1})
        [logged] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(str(logged.value), "the responder broke")
        self.assertEqual(self.server.responderErrors, 1)
        self.assertEqual(self.server.callsFailed, 1)

    def test_answerThatDoesNotFitRollsBack(self) -> None:
        """
        A synchronous responder whose answer does not fit its command's
        response (a value its argument cannot convert) is rolled back and
        fails with L{CallFailed}, like a responder that raises; the next
        call carries on.
        """
        client, _, pump = self.connect()
        bad = callRemote(client, BadAnswer, user="alice", body="lost")
        good = callRemote(client, AddNote, user="alice", body="kept")
        after = callRemote(client, CountNotes, user="alice")
        pump.flush()
        self.assertIn("BadAnswer failed", str(self.failureResultOf(bad, CallFailed).value))
        self.assertIsInstance(self.successResultOf(good)["noteID"], int)
        self.assertEqual(self.successResultOf(after), {"notes": 1, "added": 1})
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_deferredResponder(self) -> None:
        """
        A responder may return a Deferred: the call is answered when it fires,
        the store stays held meanwhile, and other calls are answered at once.
        """
        client, _, pump = self.connect()
        later = callRemote(client, Later, user="alice")
        now = callRemote(client, CountNotes, user="bob")
        pump.flush()
        self.assertNoResult(later)
        self.successResultOf(now)
        self.assertEqual(self.server.inFlight, 1)
        self.clock.advance(self.pool.idleTimeout * 2)
        self.assertIn("alice", self.pool.openKeys())
        ServerTestNotebook.pending.pop().callback({"value": 5})
        pump.flush()
        self.assertEqual(self.successResultOf(later), {"value": 5})
        self.assertEqual(self.server.inFlight, 0)

    def test_coroutineResponder(self) -> None:
        """
        A responder may be a coroutine function: the part before its first
        wait runs in the transaction, and the call is answered with what it
        returns.
        """
        client, _, pump = self.connect()
        d = callRemote(client, Awaiting, user="alice")
        pump.flush()
        self.assertNoResult(d)
        ServerTestNotebook.pending.pop().callback(7)
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"value": 7})
        self.assertEqual(self.call(CountNotes, user="alice")["added"], 10)

    def test_deferredResponderFails(self) -> None:
        """
        A responder's Deferred failing with an undeclared error fails that
        call with L{CallFailed}.
        """
        client, _, pump = self.connect()
        later = callRemote(client, Later, user="alice")
        pump.flush()
        ServerTestNotebook.pending.pop().errback(ZeroDivisionError())
        pump.flush()
        self.failureResultOf(later, CallFailed)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_badKeys(self) -> None:
        """
        An empty key, a key of 256 bytes and a key with a NUL are each
        answered with L{InvalidUserKey}, and no store is created.
        """
        for key in ["", "x" * 256, "a\x00b", "tab\there"]:
            error = self.callFails(AddNote, InvalidUserKey, user=key, body="x")
            self.assertIn("user key", str(error))
        self.assertEqual(self.call(CountNotes, user="é" * 127)["notes"], 0)
        self.assertEqual(self.pool.openKeys(), ["é" * 127])

    def test_undecodableKey(self) -> None:
        """
        A user key whose bytes are not UTF-8 is answered with
        L{InvalidUserKey}.
        """
        error = self.callFails(RawAddNote, InvalidUserKey, user=b"\xff\xfe", body="x")
        self.assertIn("not valid UTF-8", str(error))
        self.assertEqual(self.pool.openKeys(), [])

    def test_pathLikeKey(self) -> None:
        """
        A key that looks like a path works like any other, and no file appears
        outside the data directory.
        """
        key = "../../etc/passwd"
        self.call(AddNote, user=key, body="x")
        self.assertEqual(self.call(CountNotes, user=key)["notes"], 1)
        self.assertEqual(self.root.listdir(), ["data"])
        store = self.successResultOf(self.pool.openStore(key))
        self.assertTrue(store.dbdir.path.startswith(self.dataDir.path + "/"))
        self.assertEqual(store.findUnique(UserKey).key, key)

    def test_unknownCommand(self) -> None:
        """
        A command the application does not declare is answered with AMP's
        unhandled-command error, and the connection carries on; AMP's
        C{StartTLS} is not among the commands.
        """

        class Nonsense(amp.Command):
            arguments = [(b"user", amp.Unicode())]

        self.callFails(Nonsense, amp.UnhandledCommand, user="alice")
        answer = self.rawCall(
            amp.AmpBox(_command=b"StartTLS", _ask=b"1", user=b"alice", tls_localCertificate=b"x")
        )
        self.assertEqual(answer[b"_error_code"], amp.UNHANDLED_ERROR_CODE)
        answer = self.rawCall(amp.AmpBox(_command=b"amp_addNote", _ask=b"2", user=b"alice"))
        self.assertEqual(answer[b"_error_code"], amp.UNHANDLED_ERROR_CODE)
        self.assertEqual(self.call(CountNotes, user="alice")["notes"], 0)

    def test_missingArgument(self) -> None:
        """
        A call missing an argument, the user key or another, is answered with
        L{InvalidRequest} naming it.
        """
        error = self.callFails(NoUserAddNote, InvalidRequest, body="x")
        self.assertIn("'user'", str(error))
        answer = self.rawCall(amp.AmpBox(_command=b"AddNote", _ask=b"1", user=b"alice"))
        self.assertEqual(answer[b"_error_code"], b"INVALID_REQUEST")
        self.assertIn(b"missing argument 'body'", answer[b"_error_description"])

    def test_badArgument(self) -> None:
        """
        An argument that does not decode (bad UTF-8, an integer that is not
        one) is answered with L{InvalidRequest}.
        """
        answer = self.rawCall(
            amp.AmpBox(_command=b"AddNote", _ask=b"1", user=b"alice", body=b"\xff")
        )
        self.assertEqual(answer[b"_error_code"], b"INVALID_REQUEST")
        answer = self.rawCall(
            amp.AmpBox(_command=b"AddNote", _ask=b"1", user=b"alice", body=b"x", count=b"many")
        )
        self.assertEqual(answer[b"_error_code"], b"INVALID_REQUEST")
        self.assertEqual(self.call(CountNotes, user="alice")["notes"], 0)

    def test_oversizedValue(self) -> None:
        """
        A value longer than AMP's 65,535 bytes cannot be sent: the client
        refuses it with L{amp.TooLong} and the node carries on.
        """
        client, _, pump = self.connect()
        self.assertRaises(
            amp.TooLong, client.callRemote, AddNote, user="alice", body="x" * 70000
        )
        pump.flush()
        self.assertEqual(self.call(AddNote, user="alice", body="x" * 65000)["noteID"] > 0, True)

    def test_tooLongKeyDropsConnection(self) -> None:
        """
        A box key longer than AMP allows drops that connection only.
        """
        proto = self.server.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"\x01\x00" + b"k" * 256)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.call(CountNotes, user="alice")["notes"], 0)

    def test_tooManyKeys(self) -> None:
        """
        A call with more keys than the limit is answered with
        L{InvalidRequest}.
        """
        self.server.limits = ServerLimits(maxKeysPerBox=6)
        box = amp.AmpBox(_command=b"AddNote", _ask=b"1", user=b"alice", body=b"x")
        box.update({b"extra%d" % i: b"y" for i in range(3)})
        answer = self.rawCall(box)
        self.assertEqual(answer[b"_error_code"], b"INVALID_REQUEST")
        self.assertIn(b"7 keys", answer[b"_error_description"])
        self.assertEqual(self.call(CountNotes, user="alice")["notes"], 0)

    def test_boxTooBig(self) -> None:
        """
        A box growing beyond C{maxBoxBytes} is not held: the rest of it is
        skipped as it arrives, the call is answered L{InvalidRequest}, the
        refusal is logged, and the connection carries on.
        """
        self.server.limits = ServerLimits(maxBoxBytes=10000)
        client, proto, pump = self.connect()
        d = callRemote(client, AddNote, user="alice", body="x" * 20000)
        pump.flush()
        self.assertIn("larger than 10000 bytes", str(self.failureResultOf(d, InvalidRequest).value))
        self.assertIsNone(proto._currentBox)
        after = callRemote(client, AddNote, user="alice", body="x" * 5000)
        pump.flush()
        self.successResultOf(after)

    def test_boxTooBigHeldBytes(self) -> None:
        """
        While an oversized box is still arriving, the node keeps no more than
        the limit (plus the one string being framed) of it, whatever the
        order of its keys.
        """
        self.server.limits = ServerLimits(maxBoxBytes=10000)
        proto = self.server.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        value = b"v" * 4000
        pairs = [(b"A%d" % i, value) for i in range(50)]
        pairs += [(b"_ask", b"5"), (b"_command", b"AddNote"), (b"user", b"alice")]
        for k, v in pairs:
            proto.dataReceived(len(k).to_bytes(2, "big") + k + len(v).to_bytes(2, "big") + v)
            self.assertLessEqual(sum(map(len, proto._currentBox.values())), 10000)
        self.assertEqual(transport.value(), b"")
        proto.dataReceived(b"\x00\x00")
        [answer] = amp.parseString(transport.value())
        self.assertEqual(answer[b"_error"], b"5")
        self.assertEqual(answer[b"_error_code"], b"INVALID_REQUEST")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.rawCall(amp.AmpBox(_command=b"CountNotes", _ask=b"6", user=b"alice"), proto)[b"notes"], b"0")

    def test_boxBytesCountedPerBox(self) -> None:
        """
        The box size limit applies to each box, not to a connection's total.
        """
        self.server.limits = ServerLimits(maxBoxBytes=200)
        client, _, pump = self.connect()
        calls = [callRemote(client, AddNote, user="alice", body="x" * 50) for _ in range(20)]
        pump.flush()
        for d in calls:
            self.successResultOf(d)

    def test_outstandingLimit(self) -> None:
        """
        Calls beyond the connection's limit of outstanding calls are answered
        with the retryable L{Overloaded}; once calls finish, new ones run.
        """
        self.server.limits = ServerLimits(maxOutstanding=2)
        client, _, pump = self.connect()
        held = [callRemote(client, Later, user="alice") for _ in range(2)]
        refused = callRemote(client, CountNotes, user="bob")
        pump.flush()
        self.assertIn("limit is 2", str(self.failureResultOf(refused, Overloaded).value))
        # Another connection has its own allowance.
        self.assertEqual(self.call(CountNotes, user="bob")["notes"], 0)
        for d in ServerTestNotebook.pending:
            d.callback({"value": 1})
        pump.flush()
        for d in held:
            self.successResultOf(d)
        accepted = callRemote(client, CountNotes, user="bob")
        pump.flush()
        self.successResultOf(accepted)

    def test_storesExhausted(self) -> None:
        """
        When every open store is held by a running call, a call for another
        user is answered with the retryable L{Overloaded}.
        """
        client, _, pump = self.connect()
        held = [callRemote(client, Later, user=f"user{i}") for i in range(4)]
        refused = callRemote(client, CountNotes, user="other")
        pump.flush()
        self.failureResultOf(refused, Overloaded)
        for d in ServerTestNotebook.pending:
            d.callback({"value": 1})
        pump.flush()
        for d in held:
            self.successResultOf(d)
        self.assertEqual(self.call(CountNotes, user="other")["notes"], 0)

    def test_manyUsersFewStores(self) -> None:
        """
        Ten times as many users as open stores are all served, their data
        kept, while never more than C{maxOpenStores} stores are open.
        """
        self.pool.maxOpenStores = 2
        client, _, pump = self.connect()
        users = [f"user{i}" for i in range(10 * self.pool.maxOpenStores)]
        for round in range(2):
            for user in users:
                d = callRemote(client, AddNote, user=user, body=user)
                pump.flush()
                self.successResultOf(d)
                self.assertLessEqual(len(self.pool.openKeys()), self.pool.maxOpenStores)
        for user in users:
            d = callRemote(client, CountNotes, user=user)
            pump.flush()
            self.assertEqual(self.successResultOf(d), {"notes": 2, "added": 2})
        self.assertEqual(sorted(self.pool.knownKeys(limit=1000)), sorted(users))

    def test_notOwner(self) -> None:
        """
        A call for a user whose slot another node owns is answered with
        L{NotOwner} naming that node, when there is no forwarder.
        """
        topology = _twoNodes()
        self.server = FractalServer(application, self.pool, topology)
        key = _keyOwnedBy(topology, "n2")
        error = self.callFails(AddNote, NotOwner, user=key, body="x")
        self.assertEqual(error.owner, "n2")  # type: ignore[attr-defined]
        self.assertEqual(self.pool.openKeys(), [])
        self.assertEqual(self.call(CountNotes, user=_keyOwnedBy(topology, "n1"))["notes"], 0)

    def test_newMapRoutesAgain(self) -> None:
        """
        Routing follows the topology's current map: a user served here is
        answered L{NotOwner} once a new map gives the user's slot to another
        node.
        """
        topology = _twoNodes()
        key = _keyOwnedBy(topology, "n2")
        self.assertEqual(self.call(CountNotes, user=key)["notes"], 0)
        self.server.topology = topology
        self.assertEqual(self.callFails(CountNotes, NotOwner, user=key).owner, "n2")  # type: ignore[attr-defined]

    def test_forward(self) -> None:
        """
        A call for another node's user is handed, as its raw box, to the
        forwarder, and the answer box is relayed back with the caller's tag;
        a forwarder failure that is not a framework error becomes
        L{OwnerUnavailable}.  A connection built without forwarding answers
        L{NotOwner} instead (at most one hop).
        """
        topology = _twoNodes()
        seen: list[tuple[amp.AmpBox, SlotOwner, str]] = []
        results: list[Any] = []

        def forward(box: amp.AmpBox, owner: SlotOwner, key: str) -> Any:
            seen.append((box, owner, key))
            return results.pop(0)

        self.server = FractalServer(application, self.pool, topology, forward=forward)
        key = _keyOwnedBy(topology, "n2")
        d: Deferred[amp.AmpBox] = Deferred()
        results.append(d)
        client, _, pump = self.connect()
        call = callRemote(client, AddNote, user=key, body="hi")
        pump.flush()
        [(box, owner, forwardedKey)] = seen
        self.assertEqual((box[b"body"], owner.node, forwardedKey), (b"hi", "n2", key))
        self.assertNoResult(call)
        d.callback(amp.AmpBox(_answer=b"77", noteID=b"12"))
        pump.flush()
        self.assertEqual(self.successResultOf(call), {"noteID": 12})
        error = Deferred()
        results.append(error)
        call = callRemote(client, AddNote, user=key, body="hi")
        pump.flush()
        error.errback(RuntimeError("link broke"))
        pump.flush()
        self.failureResultOf(call, OwnerUnavailable)
        self.flushLoggedErrors(RuntimeError)
        client, _, pump = iosim.connectedServerAndClient(
            lambda: self.server.peerFactory().buildProtocol(None), amp.AMP, clock=self.clock
        )
        call = callRemote(client, AddNote, user=key, body="hi")
        pump.flush()
        self.failureResultOf(call, NotOwner)
        self.assertEqual(self.server.inFlight, 0)

    def test_internalCommand(self) -> None:
        """
        A node's internal command is answered by its registered responder,
        without a user key; a framework error it raises is answered as such.
        """

        def ping(box: amp.AmpBox) -> amp.AmpBox:
            if box[b"ping"] == b"busy":
                raise Overloaded("too busy to answer")
            return amp.AmpBox(pong=box[b"ping"])

        self.server.internalCommands[b"fractal.Ping"] = ping
        answer = self.rawCall(amp.AmpBox(_command=b"fractal.Ping", _ask=b"9", ping=b"x"))
        self.assertEqual(answer, {b"_answer": b"9", b"pong": b"x"})
        answer = self.rawCall(amp.AmpBox(_command=b"fractal.Ping", _ask=b"10", ping=b"busy"))
        self.assertEqual(answer[b"_error_code"], b"OVERLOADED")
        self.assertEqual(self.server.inFlight, 0)

    def test_stopping(self) -> None:
        """
        After L{FractalServer.stopAccepting}, new calls are answered with the
        retryable L{NodeStopping}, calls running finish, and
        L{FractalServer.whenDrained} fires when the last is answered.
        """
        client, _, pump = self.connect()
        later = callRemote(client, Later, user="alice")
        pump.flush()
        self.server.stopAccepting()
        drained = self.server.whenDrained()
        refused = callRemote(client, CountNotes, user="alice")
        pump.flush()
        self.failureResultOf(refused, NodeStopping)
        self.assertNoResult(drained)
        ServerTestNotebook.pending.pop().callback({"value": 1})
        pump.flush()
        self.successResultOf(later)
        self.successResultOf(drained)
        self.successResultOf(self.server.whenDrained())

    def test_connectionLostDuringCall(self) -> None:
        """
        A call whose connection is lost before it is answered finishes
        without error, and is no longer counted as in flight.
        """
        client, proto, pump = self.connect()
        callRemote(client, Later, user="alice").addErrback(lambda f: None)
        pump.flush()
        self.assertEqual(self.server.connections, 1)
        client.transport.loseConnection()
        pump.flush()
        self.assertEqual(self.server.connections, 0)
        ServerTestNotebook.pending.pop().callback({"value": 1})
        self.assertEqual(self.server.inFlight, 0)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_notACall(self) -> None:
        """
        A box that is not a call (an answer nobody asked for) is ignored.
        """
        proto = self.server.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(amp.AmpBox(_answer=b"1", x=b"y").serialize())
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)

    def test_callWithoutAnswer(self) -> None:
        """
        A call that asks for no answer runs and sends nothing back.
        """
        proto = self.server.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(amp.AmpBox(_command=b"AddNote", user=b"alice", body=b"x").serialize())
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.call(CountNotes, user="alice")["notes"], 1)

    def test_durableNeedsShipper(self) -> None:
        """
        An application acknowledging a command durably cannot be served
        without a durable shipper.
        """
        durable = app.Application("sync", powerups=[ServerTestDurable])
        with self.assertRaises(ValueError) as e:
            FractalServer(durable, self.pool, self.topology)
        self.assertIn("Durably", str(e.exception))
        self.assertIn("no durable shipper", str(e.exception))


class _UnreadSocket(FileDescriptor):
    """
    Twisted's own buffered writing (L{FileDescriptor}: its C{bufferSize}, and
    the pausing and resuming of a streaming producer) over a socket whose
    peer reads only when the test lets it.

    @ivar peerReads: whether the peer reads what is written.
    @ivar delivered: the bytes the peer has read.
    """

    def __init__(self, reactor: MemoryReactor, bufferSize: int) -> None:
        super().__init__(reactor)  # type: ignore[arg-type]
        self.bufferSize = bufferSize
        self.connected = 1
        self.peerReads = False
        self.delivered = b""

    def writeSomeData(self, data: bytes) -> int:
        if not self.peerReads:
            return 0
        self.delivered += bytes(data)
        return len(data)

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 7100)


class BackpressureTests(SynchronousTestCase):
    """
    A client that sends calls but does not read the answers makes the node
    stop reading from it once the connection's write buffer is full, not
    buffer answers without bound.
    """

    def setUp(self) -> None:
        self.pool = StorePool(Clock(), FilePath(self.mktemp()), prepare=application.installOn)
        self.addCleanup(self.pool.close)
        self.server = FractalServer(
            application, self.pool, SingleNodeTopology("n1", "tcp:host=127.0.0.1:port=7100")
        )

    def calls(self, count: int, first: int = 0) -> bytes:
        """
        C{count} serialised CountNotes calls for alice, tagged from C{first}.
        """
        return b"".join(
            amp.AmpBox(_command=b"CountNotes", _ask=b"%d" % n, user=b"alice").serialize()
            for n in range(first, first + count)
        )

    def test_registersAsPushProducer(self) -> None:
        """
        A connection registers a streaming producer on its transport, and
        when the transport pauses it, the connection pauses the transport's
        reading and parses no more calls until it is resumed.
        """
        proto = self.server.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertTrue(transport.streaming)
        assert transport.producer is not None
        transport.producer.pauseProducing()
        self.assertTrue(proto.readingPaused)
        self.assertEqual(transport.producerState, "paused")
        proto.dataReceived(self.calls(3))
        self.assertEqual(transport.value(), b"")
        transport.producer.resumeProducing()
        self.assertFalse(proto.readingPaused)
        self.assertEqual(transport.producerState, "producing")
        answers = amp.parseString(transport.value())
        self.assertEqual([a[b"_answer"] for a in answers], [b"0", b"1", b"2"])

    def test_fullBufferPausesReadingUntilDrained(self) -> None:
        """
        With a peer that does not read, the answers fill the transport's
        buffer past its bound: the connection stops reading (the transport
        leaves the reactor's readers) and runs none of the calls after that
        point, while another connection is served as usual.  Once the peer
        reads, reading resumes, and every call is answered, in order.
        """
        reactor = MemoryReactor()
        transport = _UnreadSocket(reactor, bufferSize=2048)
        proto = self.server.buildProtocol(None)
        proto.makeConnection(transport)
        transport.startReading()
        self.assertIn(transport, reactor.getReaders())

        proto.dataReceived(self.calls(300))
        self.assertTrue(proto.readingPaused)
        self.assertNotIn(transport, reactor.getReaders())
        served = self.server.callsServed
        self.assertLess(served, 300)
        buffered = len(transport.dataBuffer) + transport._tempDataLen
        self.assertGreater(buffered, 2048)
        # Bytes that were already read wait, unparsed.
        proto.dataReceived(self.calls(10, first=300))
        self.assertEqual(self.server.callsServed, served)
        self.assertEqual(transport.delivered, b"")

        other = self.server.buildProtocol(None)
        otherTransport = StringTransport()
        other.makeConnection(otherTransport)
        other.dataReceived(self.calls(2))
        self.assertFalse(other.readingPaused)
        self.assertEqual(len(amp.parseString(otherTransport.value())), 2)
        self.assertTrue(proto.readingPaused)

        transport.peerReads = True
        pauses = 0
        while transport in reactor.getWriters():
            transport.doWrite()
            pauses += proto.readingPaused
        self.assertFalse(proto.readingPaused)
        self.assertIn(transport, reactor.getReaders())
        answers = amp.parseString(transport.delivered)
        self.assertEqual([a[b"_answer"] for a in answers], [b"%d" % n for n in range(310)])
        self.assertTrue(all(a[b"notes"] == b"0" for a in answers))
        self.assertGreater(pauses, 0)
        self.assertEqual(proto.outstanding, 0)

    def test_lostWhilePaused(self) -> None:
        """
        A connection lost while its reading is paused is forgotten by the
        server; nothing is parsed or sent after that.
        """
        reactor = MemoryReactor()
        transport = _UnreadSocket(reactor, bufferSize=512)
        proto = self.server.buildProtocol(None)
        proto.makeConnection(transport)
        proto.dataReceived(self.calls(100))
        self.assertTrue(proto.readingPaused)
        served = self.server.callsServed
        transport.connectionLost(Failure(ConnectionDone()))
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.server.connections, 0)
        proto._resumeReading()
        self.assertEqual(self.server.callsServed, served)
        self.assertEqual(self.server.inFlight, 0)

"""
Tests for L{fractal._framing}: its use of Twisted's private AMP names, and
its conversion of a command's values from a box.

The first tests fail when a Twisted release renames or changes one of the private
names of L{amp.AMP} that fractal relies on, rather than every call failing.
"""

from __future__ import annotations

from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from fractal._framing import (
    AMP_PRIVATE_ATTRIBUTES,
    WireBox,
    boxMaker,
    boxParser,
    expectAnswer,
    failedReason,
    nextTag,
    takeAnswer,
    usualArguments,
    writableTransport,
)


class AMPPrivateNamesTests(SynchronousTestCase):
    """
    The private names of L{amp.AMP} listed in L{AMP_PRIVATE_ATTRIBUTES} exist
    and mean what L{fractal._framing}'s functions assume.
    """

    def test_namesExist(self) -> None:
        """
        Every listed name is an attribute of an L{amp.AMP} instance; the ones
        fractal calls or overrides are methods of AMP's own classes, so an
        override in L{fractal.client} is still the method AMP calls.
        """
        protocol = amp.AMP()
        missing = [name for name in AMP_PRIVATE_ATTRIBUTES if not hasattr(protocol, name)]
        self.assertEqual(missing, [])
        for name in ("_nextTag", "_answerReceived", "_errorReceived"):
            self.assertTrue(callable(getattr(amp.BoxDispatcher, name)), name)
        self.assertIsInstance(protocol._outstandingRequests, dict)
        self.assertTrue(callable(amp.Command._doCommand))

    def test_answerAndError(self) -> None:
        """
        AMP's dispatch hands an answer box to C{_answerReceived} and an error
        box to C{_errorReceived} (the methods L{fractal.client} overrides),
        and L{takeAnswer} there gives the L{Deferred} that L{expectAnswer}
        registered under the box's tag from L{nextTag}, no longer
        outstanding.
        """
        received: list[tuple[str, amp.AmpBox]] = []

        class Recording(amp.AMP):
            def _answerReceived(self, box: amp.AmpBox) -> None:
                received.append(("answer", box))
                takeAnswer(self, box[amp.ANSWER]).callback(box)

            def _errorReceived(self, box: amp.AmpBox) -> None:
                received.append(("error", box))
                takeAnswer(self, box[amp.ERROR]).errback(Failure(ValueError("error box")))

        protocol = Recording()
        protocol.makeConnection(StringTransport())
        first, second = nextTag(protocol), nextTag(protocol)
        self.assertNotEqual(first, second)
        answered = expectAnswer(protocol, first)
        failed = expectAnswer(protocol, second)
        answer = amp.AmpBox({amp.ANSWER: first, b"x": b"1"})
        error = amp.AmpBox(
            {amp.ERROR: second, amp.ERROR_CODE: b"BOOM", amp.ERROR_DESCRIPTION: b"it broke"}
        )
        protocol.ampBoxReceived(answer)
        protocol.ampBoxReceived(error)
        self.assertEqual(received, [("answer", answer), ("error", error)])
        self.assertIs(self.successResultOf(answered), answer)
        self.failureResultOf(failed, ValueError)
        self.assertEqual(protocol._outstandingRequests, {})
        self.assertRaises(KeyError, takeAnswer, protocol, first)

    def test_writableAndFailed(self) -> None:
        """
        L{writableTransport} is the transport of a connected protocol, and
        L{None} before it connects or while TLS starts; L{failedReason} is
        L{None} while the connection is up and the reason it was lost after,
        when the calls still awaited fail with it.
        """
        protocol = amp.AMP()
        self.assertIsNone(writableTransport(protocol))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIs(writableTransport(protocol), transport)
        protocol._startingTLSBuffer = []
        self.assertIsNone(writableTransport(protocol))
        protocol._startingTLSBuffer = None
        self.assertIsNone(failedReason(protocol))
        pending = expectAnswer(protocol, nextTag(protocol))
        reason = Failure(ConnectionError("gone"))
        protocol.connectionLost(reason)
        self.assertIs(failedReason(protocol), reason)
        self.failureResultOf(pending, ConnectionError)


class BoxParserTests(SynchronousTestCase):
    """
    Tests for L{boxParser} and L{usualArguments}.
    """

    def test_parse(self) -> None:
        """
        L{boxParser} converts each value of the schema from the box by its
        Python name (a wire name's C{-} read as C{_}), gives L{None} for an
        optional value the box lacks, and raises C{KeyError} with the wire
        name of a required one it lacks.
        """
        schema = [
            (b"the-count", amp.Integer()),
            (b"note", amp.Unicode(optional=True)),
        ]
        self.assertTrue(usualArguments(schema, ("fromBox", "retrieve")))
        parse = boxParser(schema)
        self.assertEqual(
            parse(amp.AmpBox({b"the-count": b"7", b"note": b"hi"}), None),
            {"the_count": 7, "note": "hi"},
        )
        self.assertEqual(
            parse(amp.AmpBox({b"the-count": b"7"}), None), {"the_count": 7, "note": None}
        )
        error = self.assertRaises(KeyError, parse, amp.AmpBox({b"note": b"hi"}), None)
        self.assertEqual(error.args, (b"the-count",))

    def test_unusual(self) -> None:
        """
        A schema with an argument that overrides one of the named methods,
        or with a wire name twice, is not usual.
        """

        class Custom(amp.Integer):
            def fromBox(self, *args: object) -> None:
                pass

        self.assertFalse(usualArguments([(b"a", Custom())], ("fromBox", "retrieve")))
        self.assertTrue(usualArguments([(b"a", Custom())], ("toBox",)))
        self.assertFalse(
            usualArguments([(b"a", amp.Integer()), (b"a", amp.Integer())], ("fromBox",))
        )


class BoxMakerTests(SynchronousTestCase):
    """
    Tests for L{boxMaker} and L{WireBox}.
    """

    schema = [
        (b"the-count", amp.Integer()),
        (b"note", amp.Unicode(optional=True)),
    ]

    def test_make(self) -> None:
        """
        L{boxMaker} makes the box AMP's C{_objectsToStrings} makes from the
        same values: each value by its Python name, an optional one that is
        L{None} or missing left out, keys the schema does not name ignored,
        and the values given left as they were.
        """
        make = boxMaker(self.schema)
        for objects in [
            {"the_count": 7, "note": "h\u00e9"},
            {"the_count": 7, "note": None},
            {"the_count": 7},
            {"the_count": 7, "other": "ignored"},
        ]:
            given = dict(objects)
            box = make(objects, None)
            self.assertIsInstance(box, WireBox)
            self.assertEqual(
                box, amp._objectsToStrings(objects, self.schema, amp.AmpBox(), None)
            )
            self.assertEqual(objects, given)

    def test_makeErrors(self) -> None:
        """
        A required value missing raises C{KeyError} with its Python name, and
        a value its argument cannot convert raises what the argument raises,
        as AMP's C{makeResponse} does.
        """
        make = boxMaker(self.schema)
        error = self.assertRaises(KeyError, make, {"note": "hi"}, None)
        self.assertEqual(error.args, ("the_count",))
        self.assertRaises(
            KeyError, amp._objectsToStrings, {"note": "hi"}, self.schema, amp.AmpBox(), None
        )
        expected = self.assertRaises(
            Exception,
            amp._objectsToStrings,
            {"the_count": "seven"},
            self.schema,
            amp.AmpBox(),
            None,
        )
        raised = self.assertRaises(type(expected), make, {"the_count": "seven"}, None)
        self.assertEqual(str(raised), str(expected))

    def test_serialize(self) -> None:
        """
        A L{WireBox} serializes to the bytes an L{amp.AmpBox} with the same
        pairs does, its keys sorted, for empty values and values of the
        longest length AMP allows too.
        """
        pairs = {
            b"zeta": b"",
            b"alpha": b"1",
            b"k" * amp.MAX_KEY_LENGTH: b"v" * amp.MAX_VALUE_LENGTH,
        }
        self.assertEqual(WireBox(pairs).serialize(), amp.AmpBox(pairs).serialize())
        self.assertEqual(WireBox().serialize(), b"\x00\x00")

    def test_serializeErrors(self) -> None:
        """
        A key or value that AMP refuses to serialize (too long, or C{str})
        raises from a L{WireBox} exactly what it raises from an
        L{amp.AmpBox}.
        """
        for pairs in [
            {b"k" * (amp.MAX_KEY_LENGTH + 1): b"v"},
            {b"k": b"v" * (amp.MAX_VALUE_LENGTH + 1)},
            {"k": b"v"},
            {b"k": "v"},
        ]:
            # Around AmpBox's constructor, which encodes str keys.
            box, wire = amp.AmpBox(), WireBox()
            dict.update(box, pairs)
            dict.update(wire, pairs)
            expected = self.assertRaises(Exception, box.serialize)
            raised = self.assertRaises(type(expected), wire.serialize)
            self.assertEqual(str(raised), str(expected))

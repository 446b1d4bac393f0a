# -*- test-case-name: tests.test_framing,tests.test_client,tests.test_server -*-
# mypy: disable-error-code="no-untyped-call"
"""
Reading AMP boxes without AMP's per-string state machine.

L{twisted.protocols.amp.BinaryBoxProtocol} frames every key and every value
through C{Int16StringReceiver} and a state machine: several method calls per
string.  L{readBoxes} reads the complete boxes at the start of a chunk in one
loop and leaves anything else (a partial box, a key longer than AMP allows, a
box over a size limit) to AMP's own parser, which then does exactly what it
would have done with the whole chunk.  The node's front door
(L{fractal.server.NodeProtocol}) and the client (L{fractal.client}) read
with it, and convert a command's values from a box with one
L{boxParser} per command rather than AMP's per-call copies.

Reading and writing boxes beside AMP's own code means relying on some of
Twisted's private names, which a Twisted release may rename or change
without a deprecation.  They are all listed here, in
L{AMP_PRIVATE_ATTRIBUTES}, and the client reaches its connection's through
the functions below rather than by name.  C{tests.test_framing} fails if any
of them is missing from an L{amp.AMP} instance or no longer means what these
functions assume, or if C{amp.Command._doCommand} (which the client
compares with a command's) is missing: a Twisted upgrade that breaks them
fails the tests instead of every call.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITransport
from twisted.protocols.amp import (
    AMP,
    MAX_KEY_LENGTH,
    MAX_VALUE_LENGTH,
    AmpBox,
    Argument,
    BinaryBoxProtocol,
)
from twisted.python.compat import nativeString
from twisted.python.failure import Failure

__all__ = [
    "AMP_PRIVATE_ATTRIBUTES",
    "readBoxes",
    "canReadBoxes",
    "usualArguments",
    "argumentSchema",
    "boxParser",
    "boxMaker",
    "WireBox",
    "writableTransport",
    "failedReason",
    "nextTag",
    "expectAnswer",
    "takeAnswer",
]

AMP_PRIVATE_ATTRIBUTES: dict[str, str] = {
    # BinaryBoxProtocol: its parser's state (readBoxes, canReadBoxes).
    "_unprocessed": "bytes received and not yet parsed",
    "_justStartedTLS": "whether TLS has just been started on the connection",
    "_MAX_KEY_LENGTH": "the longest key AMP reads",
    # BinaryBoxProtocol: the box being parsed (fractal.server.NodeProtocol.proto_value).
    "_currentKey": "the key whose value is being read",
    "_currentBox": "the box being read",
    # BinaryBoxProtocol: its writing state (writableTransport, failedReason).
    "_locked": "whether a switch to another protocol has been asked for",
    "_startingTLSBuffer": "boxes held while TLS starts, or None",
    # BoxDispatcher: calls awaiting answers (nextTag, expectAnswer, takeAnswer, failedReason).
    "_failAllReason": "why outstanding calls failed, once the connection is lost",
    "_nextTag": "a method giving the tag of a new call",
    "_outstandingRequests": "the Deferred of each unanswered call, by tag",
    # BoxDispatcher: the methods fractal.client._ClientAMP overrides.
    "_answerReceived": "the method called with each answer box",
    "_errorReceived": "the method called with each error box",
}
"""
Each private name of L{amp.AMP} that fractal relies on, and what it holds.
"""


def _emptyBox(boxType: type[AmpBox]) -> Any:
    """
    An empty box of C{boxType}, made without running L{AmpBox.__init__}:
    with nothing to initialise from, it only scans the new box for C{str}
    keys to encode, at several times the cost of making the box.
    """
    return dict.__new__(boxType)


def canReadBoxes(protocol: BinaryBoxProtocol) -> bool:
    """
    Whether L{readBoxes} may read the next chunk of C{protocol}: AMP's parser
    holds nothing (no partial string, no key pending), and the connection
    has not switched protocols or just started TLS.
    """
    return not (
        protocol.state != "init"
        or protocol._unprocessed
        or protocol.innerProtocol is not None
        or protocol._justStartedTLS
    )


def readBoxes(protocol: BinaryBoxProtocol, data: bytes, maxBoxBytes: int | None = None) -> int:
    """
    Deliver to C{protocol.boxReceiver} each complete box at the start of
    C{data}, until the protocol is paused.

    @param protocol: a protocol for which L{canReadBoxes} is true.
    @param data: bytes received.
    @param maxBoxBytes: stop before a box with more bytes (keys, values and
        their length prefixes) than this, or L{None} for no limit.
    @return: the offset of the first byte not consumed: the start of the
        first box that is incomplete or over a limit, or C{len(data)}.
    """
    end = len(data)
    limit = end if maxBoxBytes is None else maxBoxBytes
    maxKey = protocol._MAX_KEY_LENGTH
    receiver = protocol.boxReceiver
    offset = 0
    newBox = _emptyBox
    while not protocol.paused:
        box = newBox(AmpBox)
        position = offset
        size = 0
        while True:
            if position + 2 > end:
                return offset
            keyLength = (data[position] << 8) | data[position + 1]
            position += 2
            if not keyLength:
                break
            if keyLength > maxKey:
                return offset
            valueAt = position + keyLength
            if valueAt + 2 > end:
                return offset
            valueEnd = valueAt + 2 + ((data[valueAt] << 8) | data[valueAt + 1])
            if valueEnd > end:
                return offset
            size += valueEnd - position + 2
            if size > limit:
                return offset
            box[data[position:valueAt]] = data[valueAt + 2 : valueEnd]
            position = valueEnd
        offset = position
        receiver.ampBoxReceived(box)
    return offset


def writableTransport(protocol: AMP) -> ITransport | None:
    """
    The transport a box may be written straight to, as C{sendBox} would
    write it, or L{None} when C{protocol} is not connected or is switching
    protocols or starting TLS (its boxes must then go through AMP).
    """
    if protocol._locked or protocol._startingTLSBuffer is not None:
        return None
    return protocol.transport


def failedReason(protocol: AMP) -> Failure | None:
    """
    Why C{protocol}'s calls fail once its connection is lost, or L{None}
    while it is up.
    """
    reason: Failure | None = protocol._failAllReason
    return reason


def nextTag(protocol: AMP) -> bytes:
    """
    The tag of a new call on C{protocol}, as C{callRemote} would use.
    """
    tag: bytes = protocol._nextTag()
    return tag


def expectAnswer(protocol: AMP, tag: bytes) -> Deferred[Any]:
    """
    Await the answer to the call written with C{tag}.

    @return: fires with the answer box, or fails with the error it carries
        or the connection's loss, as for a call made with C{callRemote}.
    """
    answer: Deferred[Any] = Deferred()
    protocol._outstandingRequests[tag] = answer
    return answer


def takeAnswer(protocol: AMP, tag: bytes) -> Deferred[Any]:
    """
    The L{Deferred} of the call C{tag} answers, no longer outstanding.

    @raise KeyError: if no call with C{tag} is outstanding.
    """
    answer: Deferred[Any] = protocol._outstandingRequests.pop(tag)
    return answer


Schema = Sequence[tuple[bytes, Argument]]
"""
A command's C{arguments} or C{response}: (wire name, L{Argument}) pairs.
"""


def usualArguments(schema: Schema, methods: tuple[str, ...]) -> bool:
    """
    Whether no argument of C{schema} overrides any of C{methods} of
    L{Argument}, and their wire names are distinct: whether its values can be
    converted one by one, straight from or to a box, as AMP would.
    """
    wireNames = [wire for wire, _ in schema]
    return len(set(wireNames)) == len(wireNames) and all(
        getattr(type(argument), method) is getattr(Argument, method)
        for _, argument in schema
        for method in methods
    )


def argumentSchema(
    schema: Schema, conversion: str
) -> list[tuple[bytes, str, bool, Callable[[Any, Any], Any]]]:
    """
    Each argument of C{schema} as its wire name, its Python name, whether it
    is optional, and its method named C{conversion} (C{"toStringProto"} or
    C{"fromStringProto"}).
    """
    return [
        (
            wire,
            nativeString(wire.replace(b"-", b"_")),
            argument.optional,
            getattr(argument, conversion),
        )
        for wire, argument in schema
    ]


def boxParser(schema: Schema) -> Callable[[AmpBox, Any], dict[str, Any]]:
    """
    A function that reads the values of C{schema} from a box, as
    C{Command.parseArguments} or C{parseResponse} would, for a schema whose
    arguments are L{usualArguments} for C{fromBox} and C{retrieve}.

    @return: a function of a box and the protocol that received it,
        returning a C{dict} by Python name; a required value missing from
        the box raises C{KeyError(wire name)}, as AMP's does.
    """
    spec = argumentSchema(schema, "fromStringProto")

    def parse(box: AmpBox, proto: Any) -> dict[str, Any]:
        objects: dict[str, Any] = {}
        for wire, name, optional, convert in spec:
            if optional:
                value = box.get(wire)
                objects[name] = None if value is None else convert(value, proto)
            else:
                objects[name] = convert(box[wire], proto)
        return objects

    return parse


class WireBox(AmpBox):
    """
    An L{AmpBox} that serializes to the same bytes as AMP's, its pairs
    sorted by key, with one C{join} rather than a C{struct.pack} call per
    length.  A key or value that is not exactly C{bytes} or is too long is
    left to L{AmpBox.serialize}, which raises what AMP raises for it.
    """

    def serialize(self) -> bytes:
        parts: list[bytes] = []
        for key, value in sorted(self.items()):
            if (
                type(key) is not bytes
                or type(value) is not bytes
                or len(key) > MAX_KEY_LENGTH
                or len(value) > MAX_VALUE_LENGTH
            ):
                serialized: bytes = AmpBox.serialize(self)
                return serialized
            parts += (len(key).to_bytes(2, "big"), key, len(value).to_bytes(2, "big"), value)
        parts.append(b"\x00\x00")
        return b"".join(parts)


def boxMaker(schema: Schema) -> Callable[[dict[str, Any], Any], AmpBox]:
    """
    A function that writes values into a box by C{schema}, as
    C{Command.makeArguments} or C{makeResponse} would, for a schema whose
    arguments are L{usualArguments} for C{toBox} and C{retrieve} and whose
    Python names are distinct.

    @return: a function of a C{dict} by Python name and the protocol the
        box is for, returning a L{WireBox}; keys the schema does not name are
        ignored, an optional value of L{None} or missing is left out, and a
        required value missing raises C{KeyError(Python name)}, as AMP's
        do.
    """
    spec = argumentSchema(schema, "toStringProto")

    def make(objects: dict[str, Any], proto: Any) -> AmpBox:
        box: AmpBox = _emptyBox(WireBox)
        for wire, name, optional, convert in spec:
            if optional:
                value = objects.get(name)
                if value is not None:
                    box[wire] = convert(value, proto)
            else:
                box[wire] = convert(objects[name], proto)
        return box

    return make

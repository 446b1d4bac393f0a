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
with it.

Reading and writing boxes beside AMP's own code means relying on some of
Twisted's private names, which a Twisted release may rename or change
without a deprecation.  They are all listed here, in
L{AMP_PRIVATE_ATTRIBUTES}, and the client reaches its connection's through
the functions below rather than by name; C{tests.test_framing} fails if any
of them is missing from an L{amp.AMP} instance or no longer means what these
functions assume, so a Twisted upgrade that breaks them fails the tests
instead of every call.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITransport
from twisted.protocols.amp import AMP, AmpBox, BinaryBoxProtocol
from twisted.python.failure import Failure

__all__ = [
    "AMP_PRIVATE_ATTRIBUTES",
    "readBoxes",
    "canReadBoxes",
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
    while not protocol.paused:
        box = AmpBox()
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

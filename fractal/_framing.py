# -*- test-case-name: tests.test_client,tests.test_server -*-
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
"""

from __future__ import annotations

from twisted.protocols.amp import AmpBox, BinaryBoxProtocol

__all__ = ["readBoxes", "canReadBoxes"]


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

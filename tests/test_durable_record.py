"""
Tests for L{fractal.durable.record}: the record format, page diffs, and the
refusal of damaged records.
"""

from __future__ import annotations

import sqlite3
import struct
import sys
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fractal.durable import record
from fractal.durable.interfaces import CorruptRecord
from fractal.durable.record import (
    Delta,
    applyDelta,
    decodeRecord,
    diffImage,
    encodeRecord,
    imageDigest,
    pageDigests,
    pageSizeOf,
)
from fractal.keys import storeNameForKey

STORE = storeNameForKey("alice")


def makeImage(rows: int) -> bytes:
    """
    An SQLite database image with C{rows} rows.
    """
    connection = sqlite3.connect(":memory:")
    connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    connection.executemany("INSERT INTO t (v) VALUES (?)", [(f"row {i}" * 10,) for i in range(rows)])
    connection.commit()
    image = connection.serialize()
    connection.close()
    return image


def recordFor(image: bytes, previous: list[bytes] | None, seq: int, baseSeq: int) -> tuple[bytes, list[bytes]]:
    size = pageSizeOf(image)
    pages, digests = diffImage(image, size, previous)
    delta = Delta(
        store=STORE,
        epoch=1,
        seq=seq,
        baseSeq=baseSeq,
        pageSize=size,
        pageCount=len(digests),
        pages=pages,
        imageDigest=imageDigest(digests, size),
    )
    return encodeRecord(delta), digests


class RecordFormatTests(SynchronousTestCase):
    """
    Encoding, decoding and applying records.
    """

    def test_roundTrip(self) -> None:
        """
        A snapshot then a delta, encoded, decoded and applied in order,
        rebuild the second image exactly.
        """
        first = makeImage(200)
        second = bytearray(first)
        second.extend(bytes(pageSizeOf(first)))
        second[5000:5010] = b"0123456789"
        second = bytes(second)
        snapshot, digests = recordFor(first, None, 1, 0)
        delta, _ = recordFor(second, digests, 2, 1)
        decoded = decodeRecord(delta)
        self.assertEqual((decoded.seq, decoded.baseSeq, decoded.store), (2, 1, STORE))
        self.assertEqual([n for n, _ in decoded.pages], [2, len(second) // pageSizeOf(first)])
        image = bytearray()
        built: list[bytes] = []
        applyDelta(image, built, decodeRecord(snapshot))
        self.assertEqual(bytes(image), first)
        applyDelta(image, built, decoded)
        self.assertEqual(bytes(image), second)
        self.assertEqual(built, pageDigests(second, pageSizeOf(first)))

    def test_eitherCompressor(self) -> None:
        """
        A record compressed by the standard library's zlib, or by the
        fastest compressor at hand (ISA-L's, when installed), decodes to the
        same delta: the body is zlib either way.
        """
        image = makeImage(200)
        fast, _ = recordFor(image, None, 1, 0)
        self.patch(record, "_compress", zlib.compress)
        plain, _ = recordFor(image, None, 1, 0)
        self.assertEqual(decodeRecord(fast), decodeRecord(plain))
        loaded, _, _ = record._loadCompressor()
        self.assertEqual(zlib.decompress(loaded(b"page" * 1024, 0)), b"page" * 1024)

    def test_compressorFallback(self) -> None:
        """
        Without ISA-L, records are compressed by the standard library's zlib
        at level 1.
        """
        saved = sys.modules.get("isal")
        sys.modules["isal"] = None  # type: ignore[assignment]
        try:
            self.assertEqual(record._loadCompressor(), (zlib.compress, 1, 1))
        finally:
            if saved is None:
                del sys.modules["isal"]
            else:
                sys.modules["isal"] = saved

    def test_shrink(self) -> None:
        """
        A delta to a smaller image truncates it.
        """
        big = makeImage(300)
        small = big[: 2 * pageSizeOf(big)]
        snapshot, digests = recordFor(big, None, 1, 0)
        delta, _ = recordFor(small, digests, 2, 1)
        image = bytearray()
        built: list[bytes] = []
        applyDelta(image, built, decodeRecord(snapshot))
        applyDelta(image, built, decodeRecord(delta))
        self.assertEqual(bytes(image), small)

    def test_wrongBase(self) -> None:
        """
        A delta applied to an image other than its base is caught by the
        image digest.
        """
        first = makeImage(100)
        other = makeImage(150)
        second = bytearray(first)
        second[3000] ^= 0xFF
        _, digests = recordFor(first, None, 1, 0)
        delta, _ = recordFor(bytes(second), digests, 2, 1)
        otherSnapshot, _ = recordFor(other, None, 1, 0)
        image = bytearray()
        built: list[bytes] = []
        applyDelta(image, built, decodeRecord(otherSnapshot))
        self.assertRaises(CorruptRecord, applyDelta, image, built, decodeRecord(delta))

    def test_header(self) -> None:
        """
        A record starts with its magic and version, names its store, and
        carries when its image was taken.
        """
        record, _ = recordFor(makeImage(1), None, 1, 0)
        self.assertEqual(record[:6], b"FXDR\x01\x01")
        self.assertIn(bytes.fromhex(STORE), record[:200])
        image = makeImage(1)
        size = pageSizeOf(image)
        pages, digests = diffImage(image, size, None)
        delta = Delta(
            store=STORE, epoch=3, seq=1, baseSeq=0, pageSize=size, pageCount=len(digests),
            pages=pages, imageDigest=imageDigest(digests, size), takenAt=1234567890.25,
        )
        self.assertEqual(decodeRecord(encodeRecord(delta)), delta)

    def test_wrongVersion(self) -> None:
        """
        A record of an unknown format version is refused by name.
        """
        record = bytearray(recordFor(makeImage(1), None, 1, 0)[0])
        record[4] = 2
        error = self.assertRaises(CorruptRecord, decodeRecord, bytes(record))
        self.assertIn("version 2", str(error))

    def test_notARecord(self) -> None:
        """
        Bytes that are not a record at all are refused.
        """
        for data in [b"", b"hello", b"x" * 500]:
            self.assertRaises(CorruptRecord, decodeRecord, data)

    def test_inconsistentRefusedAtEncode(self) -> None:
        """
        The encoder refuses a delta that could not be decoded: pages out of
        order or of the wrong length.
        """
        page = bytes(4096)
        base = dict(store=STORE, epoch=1, seq=2, baseSeq=1, pageSize=4096, pageCount=3, imageDigest=bytes(32))
        self.assertRaises(ValueError, encodeRecord, Delta(pages=[(2, page), (1, page)], **base))  # type: ignore[arg-type]
        self.assertRaises(ValueError, encodeRecord, Delta(pages=[(4, page)], **base))  # type: ignore[arg-type]
        self.assertRaises(ValueError, encodeRecord, Delta(pages=[(1, b"x")], **base))  # type: ignore[arg-type]


class DamagedRecordTests(SynchronousTestCase):
    """
    Torn, truncated and bit-flipped records are refused, never decoded.
    """

    record = recordFor(makeImage(50), None, 1, 0)[0]

    @settings(max_examples=60, deadline=None)
    @given(st.data())
    def test_truncated(self, data: st.DataObject) -> None:
        """
        Every proper prefix of a record is refused.
        """
        length = data.draw(st.integers(0, len(self.record) - 1))
        self.assertRaises(CorruptRecord, decodeRecord, self.record[:length])

    @settings(max_examples=100, deadline=None)
    @given(st.data())
    def test_bitFlipped(self, data: st.DataObject) -> None:
        """
        A record with any one bit flipped is refused.
        """
        index = data.draw(st.integers(0, len(self.record) - 1))
        bit = data.draw(st.integers(0, 7))
        damaged = bytearray(self.record)
        damaged[index] ^= 1 << bit
        self.assertRaises(CorruptRecord, decodeRecord, bytes(damaged))

    @settings(max_examples=40, deadline=None)
    @given(st.data())
    def test_torn(self, data: st.DataObject) -> None:
        """
        A record whose tail was replaced by other bytes (a torn write), or
        that has bytes appended, is refused.
        """
        cut = data.draw(st.integers(0, len(self.record) - 1))
        tail = data.draw(st.binary(min_size=1, max_size=64))
        torn = self.record[:cut] + tail
        if torn != self.record:
            self.assertRaises(CorruptRecord, decodeRecord, torn)
        self.assertRaises(CorruptRecord, decodeRecord, self.record + tail)

    def test_checksumCoversBody(self) -> None:
        """
        A body rewritten with a recomputed length but the old checksum is
        refused.
        """
        headerSize = struct.calcsize(">4sBBHQQQIII32s32sdI")
        damaged = self.record[:headerSize] + b"\x00" * (len(self.record) - headerSize)
        self.assertRaises(CorruptRecord, decodeRecord, damaged)

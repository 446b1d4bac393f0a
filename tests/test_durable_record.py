"""
Tests for L{fractal.durable.record}: the record format, page diffs, and the
refusal of damaged records.
"""

from __future__ import annotations

import hashlib
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
    GROUP_PAGES,
    Delta,
    applyDelta,
    decodeRecord,
    diffImage,
    encodeRecord,
    groupDigests,
    imageDigest,
    pageDigests,
    pageSizeOf,
    regroup,
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


def recordFor(
    image: bytes,
    previous: list[bytes] | None,
    seq: int,
    baseSeq: int,
    store: str = STORE,
    takenAt: float = 0.0,
) -> tuple[bytes, list[bytes]]:
    """
    The record of C{store} that takes the image whose page digests are
    C{previous} (a snapshot if L{None}) to C{image}, and C{image}'s page
    digests.
    """
    size = pageSizeOf(image)
    pages, digests = diffImage(image, size, previous)
    delta = Delta(
        store=store,
        epoch=1,
        seq=seq,
        baseSeq=baseSeq,
        pageSize=size,
        pageCount=len(digests),
        pages=pages,
        imageDigest=imageDigest(digests, size),
        takenAt=takenAt,
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
        self.assertEqual(record[:6], b"FXDR\x02\x01")
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
        record[4] = 3
        error = self.assertRaises(CorruptRecord, decodeRecord, bytes(record))
        self.assertIn("version 3", str(error))

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


def _digest(n: int) -> bytes:
    return n.to_bytes(16, "big")


class ImageDigestTests(SynchronousTestCase):
    """
    The image digest of format version 2, over groups of page digests, and
    reading version 1 records.
    """

    def test_groups(self) -> None:
        """
        A version 2 image digest hashes the page size, the page count and
        the group size, then the digest of each group of L{GROUP_PAGES} page
        digests; given the groups, it is the same digest.
        """
        digests = [_digest(n) for n in range(2 * GROUP_PAGES + 3)]
        groups = groupDigests(digests)
        self.assertEqual(len(groups), 3)
        expected = hashlib.sha256(
            struct.pack(">III", 4096, len(digests), GROUP_PAGES) + b"".join(groups)
        ).digest()
        self.assertEqual(imageDigest(digests, 4096), expected)
        self.assertEqual(imageDigest(digests, 4096, groups), expected)
        self.assertEqual(
            groups[2], hashlib.blake2b(b"".join(digests[-3:]), digest_size=16).digest()
        )

    def test_versionOneDefinition(self) -> None:
        """
        Version 1's image digest hashes the page size, the page count and
        every page digest; an unknown version has none.
        """
        digests = [_digest(n) for n in range(GROUP_PAGES + 3)]
        expected = hashlib.sha256(
            struct.pack(">II", 1024, len(digests)) + b"".join(digests)
        ).digest()
        self.assertEqual(imageDigest(digests, 1024, version=1), expected)
        self.assertNotEqual(imageDigest(digests, 1024), expected)
        self.assertRaises(ValueError, imageDigest, digests, 1024, version=3)

    def test_everyPageCounts(self) -> None:
        """
        Changing, moving or dropping any page digest, or the page size,
        changes the image digest.
        """
        digests = [_digest(n) for n in range(GROUP_PAGES + 5)]
        original = imageDigest(digests, 1024)
        changed = digests[:]
        changed[GROUP_PAGES + 2] = _digest(10**6)
        swapped = digests[:]
        swapped[0], swapped[1] = swapped[1], swapped[0]
        others = {
            imageDigest(changed, 1024),
            imageDigest(swapped, 1024),
            imageDigest(digests[:-1], 1024),
            imageDigest(digests, 2048),
        }
        self.assertNotIn(original, others)
        self.assertEqual(len(others), 4)

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_regroup(self, data: st.DataObject) -> None:
        """
        L{regroup} gives the group digests of any new image made from an old
        one by changing some pages and growing or shrinking it, from the old
        groups and the pages changed.
        """
        maximum = 3 * GROUP_PAGES + 10
        before = data.draw(st.integers(0, maximum))
        after = data.draw(st.integers(0, maximum))
        old = [_digest(n) for n in range(before)]
        new = old[:after] + [_digest(10**6 + n) for n in range(after - len(old[:after]))]
        changed = data.draw(st.sets(st.integers(1, maximum), max_size=20))
        for number in changed:
            if number <= after:
                new[number - 1] = _digest(10**7 + number)
        grown = set(range(before + 1, after + 1))
        self.assertEqual(
            regroup(groupDigests(old), new, changed | grown, before), groupDigests(new)
        )

    def test_restoreKeepsGroups(self) -> None:
        """
        L{applyDelta} given the image's group digests keeps them up to date
        through snapshots, deltas, growth and shrinking.
        """
        images = [makeImage(300), makeImage(320), makeImage(40), makeImage(330)]
        image = bytearray()
        built: list[bytes] = []
        groups: list[bytes] = []
        previous: list[bytes] | None = None
        for seq, source in enumerate(images, 1):
            data, previous = recordFor(source, previous, seq, 0 if seq == 1 else seq - 1)
            applyDelta(image, built, decodeRecord(data), groups)
            self.assertEqual(bytes(image), source)
            self.assertEqual(groups, groupDigests(built))

    def test_versionOneRead(self) -> None:
        """
        A record of format version 1, whose image digest hashed every page
        digest, is still decoded and applied; one whose digest does not
        match that definition is refused.
        """
        first = makeImage(200)
        size = pageSizeOf(first)
        pages, digests = diffImage(first, size, None)
        fields = dict(
            store=STORE, epoch=1, seq=1, baseSeq=0, pageSize=size, pageCount=len(digests),
            pages=pages, version=1,
        )
        old = Delta(imageDigest=imageDigest(digests, size, version=1), **fields)  # type: ignore[arg-type]
        data = encodeRecord(old)
        self.assertEqual(data[4], 1)
        self.assertEqual(decodeRecord(data), old)
        image = bytearray()
        built: list[bytes] = []
        groups: list[bytes] = []
        applyDelta(image, built, decodeRecord(data), groups)
        self.assertEqual(bytes(image), first)
        # A chain written before and after the change: version 2 deltas on
        # a version 1 snapshot.
        second = bytearray(first)
        second[5000:5010] = b"0123456789"
        delta, _ = recordFor(bytes(second), digests, 2, 1)
        applyDelta(image, built, decodeRecord(delta), groups)
        self.assertEqual(bytes(image), bytes(second))
        mislabelled = Delta(imageDigest=imageDigest(digests, size), **fields)  # type: ignore[arg-type]
        self.assertRaises(
            CorruptRecord, applyDelta, bytearray(), [], decodeRecord(encodeRecord(mislabelled))
        )

    def test_grownPageNotCarried(self) -> None:
        """
        A delta that grows the image without carrying every new page is
        refused, whatever digest it promises.
        """
        first = makeImage(50)
        size = pageSizeOf(first)
        snapshot, digests = recordFor(first, None, 1, 0)
        image = bytearray()
        built: list[bytes] = []
        applyDelta(image, built, decodeRecord(snapshot))
        grown = digests + [_digest(1), _digest(2)]
        delta = Delta(
            store=STORE, epoch=1, seq=2, baseSeq=1, pageSize=size, pageCount=len(grown),
            pages=[(len(grown), bytes(size))], imageDigest=imageDigest(grown, size),
        )
        error = self.assertRaises(
            CorruptRecord, applyDelta, image, built, decodeRecord(encodeRecord(delta))
        )
        self.assertIn("grows by", str(error))


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

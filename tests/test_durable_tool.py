"""
Tests for L{fractal.durable.tool}: C{fractal restore} and C{fractal verify}.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
import sys

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from fractal._cli import main
from fractal.durable._threads import runSynchronously
from fractal.durable.filesystem import FilesystemBackend, encodeBatch
from fractal.durable.interfaces import RecordInfo
from fractal.durable.record import Delta, diffImage, encodeRecord, imageDigest, pageSizeOf
from fractal.keys import storeNameForKey
from fractal.testing import recordInfo


def chainRecords(key: str, rows: int) -> tuple[list[tuple[RecordInfo, bytes]], bytes]:
    """
    The records of a chain for C{key}: a snapshot of a database, then one
    delta per added row, as a shipper would make them.

    @return: the records, in order, and the final image.
    """
    store = storeNameForKey(key)
    connection = sqlite3.connect(":memory:")
    connection.execute("CREATE TABLE notes (n INTEGER PRIMARY KEY, body TEXT)")
    previous = None
    image = b""
    records = []
    for seq in range(1, rows + 2):
        if seq > 1:
            connection.execute("INSERT INTO notes VALUES (?, ?)", (seq, f"note {seq}" * 20))
        connection.commit()
        image = connection.serialize()
        size = pageSizeOf(image)
        pages, digests = diffImage(image, size, previous)
        data = encodeRecord(
            Delta(
                store=store,
                epoch=1,
                seq=seq,
                baseSeq=seq - 1 if previous is not None else 0,
                pageSize=size,
                pageCount=len(digests),
                pages=pages,
                imageDigest=imageDigest(digests, size),
            )
        )
        info = RecordInfo(
            store=store,
            epoch=1,
            seq=seq,
            baseSeq=seq - 1 if previous is not None else 0,
            size=len(data),
            digest=hashlib.sha256(data).digest(),
        )
        records.append((info, data))
        previous = digests
    return records, image


def shipChain(backend: FilesystemBackend, key: str, rows: int) -> bytes:
    """
    Store a chain for C{key} (see L{chainRecords}), one record per batch.

    @return: the final image.
    """
    records, image = chainRecords(key, rows)
    for info, data in records:
        backend.append(info, data)
    return image


class ToolTests(SynchronousTestCase):
    """
    The offline tools, run through the C{fractal} command.
    """

    def setUp(self) -> None:
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)
        self.data = FilePath(self.mktemp())
        self.backend = FilesystemBackend(self.data.child("durable"), runSynchronously)
        self.addCleanup(self.backend.close)

    def test_restore(self) -> None:
        """
        C{fractal restore --data DIR USER --to PATH} writes the user's store
        at C{PATH/db.sqlite}, exactly as last shipped.
        """
        image = shipChain(self.backend, "alice@example.com", 3)
        to = FilePath(self.mktemp())
        status = main(["restore", "--data", self.data.path, "alice@example.com", "--to", to.path])
        self.assertEqual(status, 0, self.stderr.getvalue())
        self.assertEqual(to.child("db.sqlite").getContent(), image)
        self.assertIn("at record 4", self.stdout.getvalue())
        self.assertIn("image taken 1970-01-01 00:00:00 UTC", self.stdout.getvalue())

    def test_restoreUnknownUser(self) -> None:
        """
        Restoring a user with no durable copy fails with status 1 and says so.
        """
        to = FilePath(self.mktemp())
        self.assertEqual(main(["restore", "--data", self.data.path, "bob", "--to", to.path]), 1)
        self.assertIn("no durable copy", self.stderr.getvalue())
        self.assertFalse(to.exists())

    def test_restoreBadKey(self) -> None:
        """
        A malformed user key is a usage error and touches nothing.
        """
        to = FilePath(self.mktemp())
        self.assertEqual(main(["restore", "--data", self.data.path, "a\x00b", "--to", to.path]), 2)
        self.assertIn("control character", self.stderr.getvalue())
        self.assertFalse(to.exists())

    def test_restoreExistingDestination(self) -> None:
        """
        C{--to} must name a new path: an existing one is never overwritten.
        """
        shipChain(self.backend, "alice", 1)
        to = FilePath(self.mktemp())
        to.makedirs()
        self.assertEqual(main(["restore", "--data", self.data.path, "alice", "--to", to.path]), 2)

    def test_verify(self) -> None:
        """
        C{fractal verify} checks every chain and reports a broken one, with
        status 1, naming the gap.
        """
        shipChain(self.backend, "alice", 2)
        shipChain(self.backend, "bob", 3)
        self.assertEqual(main(["verify", "--data", self.data.path]), 0)
        self.assertIn("2 stores, 0 broken", self.stdout.getvalue())
        bob = storeNameForKey("bob")
        # Flip a byte of bob's second record where it lies in its segment.
        second = self.successResultOf(self.backend.read(bob, 2))
        [segment] = self.data.child("durable").child("segments").children()
        content = segment.getContent()
        offset = content.index(second) + len(second) // 2
        segment.setContent(content[:offset] + bytes([content[offset] ^ 1]) + content[offset + 1 :])
        self.assertEqual(main(["verify", "--durable", self.data.child("durable").path]), 1)
        self.assertIn(f"BROKEN {bob}: store {bob}", self.stdout.getvalue())
        self.assertIn("2 stores, 1 broken", self.stdout.getvalue())
        self.assertIn("0 with a torn tail (expected after a crash), 1 damaged",
                      self.stdout.getvalue())
        self.assertIn(f"  stores with entries in or after the damage (1): {bob}\n",
                      self.stdout.getvalue())


class VerifySegmentsTests(SynchronousTestCase):
    """
    C{fractal verify} checks every segment in full and tells a torn tail
    (an unacknowledged append cut short by a crash) from damage inside
    acknowledged data.
    """

    def setUp(self) -> None:
        self.stdout = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", io.StringIO())
        self.root = FilePath(self.mktemp())
        backend = FilesystemBackend(self.root, runSynchronously)
        self.addCleanup(backend.close)
        self.store = storeNameForKey("alice")
        # Three batches in one segment: a snapshot, then two deltas.
        shipChain(backend, "alice", 2)
        backend.close()
        [self.segment] = self.root.child("segments").children()
        self.content = self.segment.getContent()
        self.second = self.content.index(b"FXSB", self.content.index(b"FXSB") + 1)

    def verify(self) -> int:
        self.stdout.seek(0)
        self.stdout.truncate()
        return main(["verify", "--durable", self.root.path])

    def tornBatch(self) -> bytes:
        """
        A batch as a writer would have appended next.
        """
        data = b"unacknowledged" * 40
        return encodeBatch([(1, recordInfo(self.store, 1, 4, 3, data), data)])

    def test_sound(self) -> None:
        """
        A sound segment is reported ok, with its batches, and the status is 0.
        """
        self.assertEqual(self.verify(), 0)
        output = self.stdout.getvalue()
        self.assertIn(
            f"ok      segment {self.segment.basename()}: {len(self.content)} bytes, "
            "3 intact batches, 3 entries",
            output,
        )
        self.assertIn("1 segments, 0 with a torn tail (expected after a crash), 0 damaged", output)
        self.assertNotIn("stores with entries", output)

    def test_tornTail(self) -> None:
        """
        A batch cut short at any point (fewer bytes than a header, or an
        intact header promising more than was written) is reported as a torn
        tail of an unacknowledged batch, expected after a crash, with its
        place and length; the status is 0 and the chain is ok.
        """
        batch = self.tornBatch()
        for cut in [1, 20, 32, 200, len(batch) - 1]:
            self.segment.setContent(self.content + batch[:cut])
            self.assertEqual(self.verify(), 0, cut)
            output = self.stdout.getvalue()
            self.assertIn(f"torn    segment {self.segment.basename()}", output)
            self.assertIn(
                f"  torn tail: {cut} bytes at byte {len(self.content)}: ", output
            )
            self.assertIn("an unacknowledged batch cut short by a crash (expected after a crash",
                          output)
            self.assertIn("1 with a torn tail (expected after a crash), 0 damaged", output)
            self.assertIn(f"ok     {self.store}: record 3", output)
            self.assertNotIn("DAMAGED", output)
        self.assertIn(f"{len(batch) - 1} of its {len(batch)} bytes were written",
                      self.stdout.getvalue())

    def test_damageInsideAcknowledged(self) -> None:
        """
        A flipped bit in a batch followed by intact batches (so written
        before them, and acknowledged) is damage: reported as such, with
        where the intact batches resume, and the status is 1.  The reader
        does not check the data CRC of such a batch; verify does.
        """
        third = self.content.index(b"FXSB", self.second + 1)
        for offset, reason in [
            (self.second + 3, "a batch header that fails its CRC"),
            (self.second + 40, "a batch whose entry table fails its CRC"),
            (third - 10, "a batch whose records fail their CRC"),
        ]:
            flipped = bytearray(self.content)
            flipped[offset] ^= 0x04
            self.segment.setContent(bytes(flipped))
            self.assertEqual(self.verify(), 1, offset)
            output = self.stdout.getvalue()
            self.assertIn(f"DAMAGED segment {self.segment.basename()}", output)
            self.assertIn(
                f"  DAMAGED: {third - self.second} bytes at byte {self.second}: {reason}, "
                f"followed by intact batches at byte {third}; damage inside acknowledged data",
                output,
            )
            self.assertIn("0 with a torn tail (expected after a crash), 1 damaged", output)
            self.assertIn(
                f"  stores with entries in or after the damage (1): {self.store}\n", output
            )

    def test_readableAfterDamage(self) -> None:
        """
        Damage to a batch in the middle of a segment is still reported
        (status 1), and the intact batches after it are reported readable:
        readers serve them, so the chain of a store with a record in the
        damaged batch and one after it has a gap and is reported broken,
        instead of passing as sound at the record before the damage.
        """
        third = self.content.index(b"FXSB", self.second + 1)
        for offset in [self.second + 3, self.second + 40]:
            flipped = bytearray(self.content)
            flipped[offset] ^= 0x04
            self.segment.setContent(bytes(flipped))
            self.assertEqual(self.verify(), 1, offset)
            output = self.stdout.getvalue()
            self.assertIn(f"  DAMAGED: {third - self.second} bytes at byte {self.second}: ",
                          output)
            self.assertIn(
                f"  readable: 1 intact batches after it, from byte {third}; readers go on "
                "there and serve their records\n",
                output,
            )
            self.assertIn(f"BROKEN {self.store}: ", output)
            self.assertNotIn(f"ok     {self.store}", output)
            self.assertIn("1 stores, 1 broken", output)

    def test_damagedLastBatch(self) -> None:
        """
        A last batch that is all there but fails a CRC is not provably an
        unfinished append: it is reported as damage (status 1).
        """
        flipped = bytearray(self.content)
        flipped[-5] ^= 0x01
        self.segment.setContent(bytes(flipped))
        self.assertEqual(self.verify(), 1)
        output = self.stdout.getvalue()
        self.assertIn("a batch whose records fail their CRC, to the end of the segment", output)
        self.assertIn(f"  stores with entries in or after the damage (1): {self.store}\n", output)
        self.assertIn("1 damaged", output)

    def test_damageBeforeTornTail(self) -> None:
        """
        Damage and a torn tail in one segment are both reported; the damage
        sets the status, and the torn tail is said to be kept.
        """
        flipped = bytearray(self.content + self.tornBatch()[:100])
        flipped[self.second + 3] ^= 0x01
        self.segment.setContent(bytes(flipped))
        self.assertEqual(self.verify(), 1)
        output = self.stdout.getvalue()
        self.assertIn("  DAMAGED: ", output)
        self.assertIn(f"  torn tail: 100 bytes at byte {len(self.content)}", output)
        self.assertIn("kept, since the segment holds damage", output)

    def test_segmentNotWhole(self) -> None:
        """
        A segment file cut short while it was created (part of its magic) is
        a torn tail; one whose first bytes are not a segment's is damage.
        """
        cut = self.root.child("segments").child("0000000000000002-0123456789abcdef.seg")
        cut.setContent(b"FXSE")
        self.assertEqual(self.verify(), 0)
        self.assertIn("a segment whose creation a crash cut short", self.stdout.getvalue())
        cut.setContent(b"not a segment at all")
        self.assertEqual(self.verify(), 1)
        self.assertIn("  DAMAGED: 20 bytes at byte 0: not a segment", self.stdout.getvalue())
        self.assertNotIn("stores with entries", self.stdout.getvalue())

    def test_noBackend(self) -> None:
        """
        A directory with no segments has nothing to report, and is sound.
        """
        self.assertEqual(
            main(["verify", "--durable", FilePath(self.mktemp()).path]), 0
        )
        self.assertIn("0 segments, 0 with a torn tail", self.stdout.getvalue())

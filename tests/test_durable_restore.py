"""
Tests for L{fractal.durable.restore}: choosing the chain to restore,
rebuilding an image from it with every link verified, SQLite's integrity
check, and writing the result.
"""

from __future__ import annotations

import hashlib
import sqlite3

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from fractal.durable._threads import runSynchronously
from fractal.durable.interfaces import BrokenChain, RecordInfo
from fractal.durable.record import diffImage, pageSizeOf
from fractal.durable.restore import (
    chainToRestore,
    quickCheck,
    rebuildFromBackend,
    rebuildImage,
    writeImage,
)
from fractal.keys import storeNameForKey
from fractal.testing import MemoryDurableBackend
from tests.test_durable_record import STORE, makeImage, recordFor


def damaged(image: bytes) -> bytes:
    """
    C{image} with its first table page claiming 500 cells: still an SQLite
    database, but one that fails C{PRAGMA quick_check} with a complaint
    about each of the missing cells.
    """
    copy = bytearray(image)
    page = pageSizeOf(image)
    copy[page + 3 : page + 5] = (500).to_bytes(2, "big")
    return bytes(copy)


class _Chain:
    """
    Records of one store's chain, built from successive images as a shipper
    would build them.
    """

    def __init__(self, store: str = STORE) -> None:
        self.store = store
        self.infos: list[RecordInfo] = []
        self.datas: list[bytes] = []
        self._digests: list[bytes] | None = None

    def add(self, image: bytes, snapshot: bool = False, takenAt: float = 0.0) -> RecordInfo:
        base = None if snapshot else self._digests
        seq = len(self.infos) + 1
        baseSeq = 0 if base is None else seq - 1
        data, self._digests = recordFor(image, base, seq, baseSeq, self.store, takenAt)
        info = RecordInfo(
            self.store, 1, seq, baseSeq, len(data), hashlib.sha256(data).digest()
        )
        self.infos.append(info)
        self.datas.append(data)
        return info


class ChainToRestoreTests(SynchronousTestCase):
    """
    L{chainToRestore} picks the newest snapshot and what follows it.
    """

    def test_fromNewestSnapshot(self) -> None:
        """
        The chain starts at the newest snapshot; older records are left out.
        """
        chain = _Chain()
        for rows, snapshot in [(10, True), (20, False), (30, True), (40, False)]:
            chain.add(makeImage(rows), snapshot)
        self.assertEqual(chainToRestore(STORE, chain.infos), chain.infos[2:])

    def test_noSnapshot(self) -> None:
        """
        Deltas with no snapshot before them are refused.
        """
        chain = _Chain()
        chain.add(makeImage(10), snapshot=True)
        chain.add(makeImage(20))
        with self.assertRaises(BrokenChain) as caught:
            chainToRestore(STORE, chain.infos[1:])
        self.assertIn("no snapshot", str(caught.exception))

    def test_gap(self) -> None:
        """
        A missing record is refused, naming the records on either side.
        """
        chain = _Chain()
        for rows in (10, 20, 30):
            chain.add(makeImage(rows), snapshot=rows == 10)
        with self.assertRaises(BrokenChain) as caught:
            chainToRestore(STORE, [chain.infos[0], chain.infos[2]])
        self.assertIn("gap in the chain between record 1 and record 3", str(caught.exception))

    def test_otherBase(self) -> None:
        """
        A record based on another than the record before it is refused.
        """
        chain = _Chain()
        for rows in (10, 20, 30):
            chain.add(makeImage(rows), snapshot=rows == 10)
        third = chain.infos[2]
        other = RecordInfo(STORE, 1, 3, 1, third.size, third.digest)
        with self.assertRaises(BrokenChain) as caught:
            chainToRestore(STORE, chain.infos[:2] + [other])
        self.assertIn("record 3 is based on 1, not on the record before it, 2", str(caught.exception))


class RebuildImageTests(SynchronousTestCase):
    """
    L{rebuildImage} applies a chain, verifying each record and the result.
    """

    def test_exact(self) -> None:
        """
        A snapshot and the deltas after it rebuild the newest image exactly,
        with what the shipper needs to go on from it.
        """
        chain = _Chain()
        images = [makeImage(rows) for rows in (50, 51, 120)]
        chain.add(images[0], snapshot=True, takenAt=1.0)
        chain.add(images[1], takenAt=2.0)
        chain.add(images[2], takenAt=3.0)
        rebuilt = rebuildImage(STORE, chain.infos, chain.datas)
        self.assertEqual(rebuilt.image, images[2])
        self.assertEqual(rebuilt.pageSize, pageSizeOf(images[2]))
        self.assertEqual(list(rebuilt.digests), diffImage(images[2], rebuilt.pageSize, None)[1])
        self.assertEqual(rebuilt.head, chain.infos[2])
        self.assertEqual(rebuilt.chainLength, 2)
        self.assertEqual(rebuilt.chainBytes, chain.infos[1].size + chain.infos[2].size)
        self.assertEqual(rebuilt.snapshotBytes, chain.infos[0].size)
        self.assertEqual(rebuilt.takenAt, 3.0)

    def test_bytesNotAsStored(self) -> None:
        """
        Record bytes that do not match the digest the backend stored for
        them are refused.
        """
        chain = _Chain()
        chain.add(makeImage(10), snapshot=True)
        data = bytearray(chain.datas[0])
        data[-1] ^= 1
        with self.assertRaises(BrokenChain) as caught:
            rebuildImage(STORE, chain.infos, [bytes(data)])
        self.assertIn("record 1 does not match its stored digest", str(caught.exception))

    def test_recordOfAnotherStore(self) -> None:
        """
        A sound record of another store, listed in this store's chain, is
        refused as a corrupt link.
        """
        other = _Chain(storeNameForKey("bob"))
        other.add(makeImage(10), snapshot=True)
        info = other.infos[0]
        listed = RecordInfo(STORE, info.epoch, info.seq, info.baseSeq, info.size, info.digest)
        with self.assertRaises(BrokenChain) as caught:
            rebuildImage(STORE, [listed], other.datas)
        self.assertIn("corrupt link", str(caught.exception))
        self.assertIn("another place in a chain", str(caught.exception))

    def test_integrityCheckFails(self) -> None:
        """
        A chain whose every record is sound but whose image fails SQLite's
        C{PRAGMA quick_check} is refused, saying so.
        """
        chain = _Chain()
        chain.add(makeImage(200), snapshot=True)
        chain.add(damaged(makeImage(200)))
        with self.assertRaises(BrokenChain) as caught:
            rebuildImage(STORE, chain.infos, chain.datas)
        self.assertIn("fails quick_check", str(caught.exception))


class QuickCheckTests(SynchronousTestCase):
    """
    L{quickCheck} runs SQLite's integrity check on an image in memory.
    """

    def test_sound(self) -> None:
        """
        A sound image passes.
        """
        self.assertIsNone(quickCheck(makeImage(200)))

    def test_walImage(self) -> None:
        """
        The image of a database in WAL mode (as every store is) passes too,
        and is left as it was.
        """
        image = bytearray(makeImage(20))
        image[18] = image[19] = 2
        wal = bytes(image)
        self.assertIsNone(quickCheck(wal))
        self.assertEqual(wal[18:20], b"\x02\x02")

    def test_notSQLite(self) -> None:
        """
        Bytes that are not an SQLite database are refused by name.
        """
        self.assertEqual(quickCheck(b""), "not an SQLite database")
        self.assertEqual(quickCheck(b"x" * 4096), "not an SQLite database")

    def test_damagedBounded(self) -> None:
        """
        A damaged image gets SQLite's complaint on one line, and at most its
        first few errors, however many there are.
        """
        problem = quickCheck(damaged(makeImage(200)))
        assert problem is not None
        self.assertIn("On tree page 2", problem)
        self.assertNotIn("\n", problem)
        self.assertLessEqual(problem.count("On tree page"), 5)


class WriteImageTests(SynchronousTestCase):
    """
    L{writeImage} writes a restored image as a store's database.
    """

    def test_written(self) -> None:
        """
        The image becomes C{db.sqlite} in the destination, which is created;
        no temporary file is left.
        """
        image = makeImage(20)
        destination = FilePath(self.mktemp()).child("store")
        target = writeImage(image, destination)
        self.assertEqual(target, destination.child("db.sqlite"))
        self.assertEqual(target.getContent(), image)
        self.assertEqual(destination.listdir(), ["db.sqlite"])

    def test_existingKept(self) -> None:
        """
        An existing database is never overwritten.
        """
        destination = FilePath(self.mktemp())
        destination.makedirs()
        destination.child("db.sqlite").setContent(b"the local copy")
        with self.assertRaises(FileExistsError):
            writeImage(makeImage(20), destination)
        self.assertEqual(destination.child("db.sqlite").getContent(), b"the local copy")

    def test_strayLogRemoved(self) -> None:
        """
        A C{-wal} or C{-shm} file left in the destination, which SQLite
        would otherwise apply to the restored image, is removed.
        """
        destination = FilePath(self.mktemp())
        destination.makedirs()
        for suffix in ("-wal", "-shm"):
            destination.child("db.sqlite" + suffix).setContent(b"someone else's log")
        image = makeImage(20)
        target = writeImage(image, destination)
        self.assertEqual(destination.listdir(), ["db.sqlite"])
        connection = sqlite3.connect(target.path)
        self.addCleanup(connection.close)
        self.assertEqual(connection.execute("SELECT count(*) FROM t").fetchone(), (20,))


class RebuildFromBackendTests(SynchronousTestCase):
    """
    L{rebuildFromBackend} fetches a chain, rebuilds it and writes it.
    """

    def _backend(self, chain: _Chain) -> MemoryDurableBackend:
        backend = MemoryDurableBackend()
        for info, data in zip(chain.infos, chain.datas):
            self.successResultOf(backend.append(info, data))
        return backend

    def test_unknownStore(self) -> None:
        """
        A store the backend has no record of gives L{None}, and nothing is
        written.
        """
        destination = FilePath(self.mktemp())
        result = rebuildFromBackend(MemoryDurableBackend(), STORE, runSynchronously, destination)
        self.assertIsNone(self.successResultOf(result))
        self.assertFalse(destination.exists())

    def test_written(self) -> None:
        """
        A sound chain is rebuilt and written to the destination.
        """
        chain = _Chain()
        image = makeImage(60)
        chain.add(makeImage(40), snapshot=True)
        chain.add(image)
        destination = FilePath(self.mktemp())
        rebuilt = self.successResultOf(
            rebuildFromBackend(self._backend(chain), STORE, runSynchronously, destination)
        )
        assert rebuilt is not None
        self.assertEqual(rebuilt.head, chain.infos[-1])
        self.assertEqual(destination.child("db.sqlite").getContent(), image)

    def test_brokenWritesNothing(self) -> None:
        """
        A chain that fails its checks fails with L{BrokenChain}, and nothing
        is written.
        """
        chain = _Chain()
        chain.add(makeImage(200), snapshot=True)
        chain.add(damaged(makeImage(200)))
        destination = FilePath(self.mktemp())
        result = rebuildFromBackend(self._backend(chain), STORE, runSynchronously, destination)
        self.failureResultOf(result, BrokenChain)
        self.assertFalse(destination.child("db.sqlite").exists())

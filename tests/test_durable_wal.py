"""
Tests for L{fractal.durable._wal}: reading the pages a store committed since
a position of its write-ahead log, from real SQLite files.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import shutil
import sqlite3
import struct

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from fractal.durable._wal import (
    WalChanges,
    WalFiles,
    WalPosition,
    _indexChecksum,
    readChanges,
    walPosition,
)

PAGE = 4096


def image(path: str) -> bytes:
    """
    The committed image of the database at C{path}, through another
    connection.
    """
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        connection.execute("BEGIN")
        connection.execute("SELECT count(*) FROM sqlite_master").fetchall()
        return connection.serialize()
    finally:
        connection.close()


def apply(base: bytes, changes: WalChanges) -> bytes:
    """
    C{base} with C{changes} written over it.
    """
    result = bytearray(base[: changes.pageCount * PAGE].ljust(changes.pageCount * PAGE, b"\0"))
    for number, page in changes.pages.items():
        result[(number - 1) * PAGE : number * PAGE] = page
    return bytes(result)


class _Database:
    """
    A real WAL database, written through its own connection.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        directory = FilePath(case.mktemp())
        directory.makedirs()
        self.path = directory.child("db.sqlite").path
        self.connection = sqlite3.connect(self.path, isolation_level=None)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=NORMAL")
        self.connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        case.addCleanup(lambda: self.connection.close())

    def reopen(self) -> None:
        """
        Close the connection and open another, which reads the database.
        """
        self.connection.close()
        self.connection = sqlite3.connect(self.path, isolation_level=None)
        self.connection.execute("SELECT count(*) FROM t").fetchall()

    def insert(self, size: int = 100) -> None:
        self.connection.execute("INSERT INTO t (v) VALUES (?)", (os.urandom(size),))

    def copy(self, case: SynchronousTestCase) -> str:
        """
        Copy the database's three files elsewhere, as they are.
        """
        directory = FilePath(case.mktemp())
        directory.makedirs()
        copy = directory.child("db.sqlite").path
        for suffix in ("", "-wal", "-shm"):
            shutil.copyfile(self.path + suffix, copy + suffix)
        return copy


# SQLite's unix VFS takes a shared lock on this byte of the WAL index for as
# long as a connection has the database open; a connection that can lock it
# exclusively believes itself the database's only user.
_DMS_LOCK_BYTE = 128


def indexInUse(database: str) -> bool:
    """
    Whether a connection holds SQLite's lock on the WAL index of
    C{database}, as another process opening the database would find: an
    open file description lock conflicts with the POSIX locks SQLite takes,
    even those of this process.
    """
    fd = os.open(database + "-shm", os.O_RDWR)
    try:
        flock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _DMS_LOCK_BYTE, 1, 0)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return True
            raise
        unlock = struct.pack("hhqqi4x", fcntl.F_UNLCK, os.SEEK_SET, _DMS_LOCK_BYTE, 1, 0)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, unlock)
        return False
    finally:
        # Closing this descriptor drops this process's POSIX locks on the
        # file, SQLite's included: a test asks this once, at its end.
        os.close(fd)


def descriptorsOf(path: str) -> int:
    """
    How many descriptors this process has open on the file at C{path}.
    """
    status = os.stat(path)
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            opened = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if (opened.st_dev, opened.st_ino) == (status.st_dev, status.st_ino):
            count += 1
    return count


class WalFilesTests(SynchronousTestCase):
    """
    L{WalFiles} keeps a database's log files open between reads, so that
    reading never drops SQLite's locks.
    """

    if not hasattr(fcntl, "F_OFD_SETLK"):
        skip = "needs open file description locks (Linux)"

    def test_sqliteLocksKept(self) -> None:
        """
        Reading positions and changes through L{WalFiles} while a connection
        has the database open leaves that connection's lock on the WAL index
        in place; reading them with L{readChanges}, which closes the files
        after the read, drops it: the reason L{WalFiles} exists.
        """
        db = _Database(self)
        db.insert()
        files = WalFiles(db.path)
        self.addCleanup(files.close)
        position = files.position()
        assert position is not None
        db.insert()
        changes = files.changes(position, PAGE, maxFrames=32, settled=True)
        assert changes is not None
        self.assertTrue(changes.pages)
        self.assertTrue(indexInUse(db.path))
        # indexInUse closed a descriptor, like readChanges does: SQLite's
        # lock is gone.  Open the database again to retake it.
        self.assertFalse(indexInUse(db.path))
        db.reopen()
        self.assertTrue(indexInUse(db.path))
        db.reopen()
        readChanges(db.path, changes.end, PAGE)
        self.assertFalse(indexInUse(db.path))

    def test_keptOpen(self) -> None:
        """
        The files are opened once, on the first read, and closed by
        L{WalFiles.close}; a read after it opens them again.
        """
        db = _Database(self)
        db.insert()
        files = WalFiles(db.path)
        # The connection's own.
        shm, wal = descriptorsOf(db.path + "-shm"), descriptorsOf(db.path + "-wal")
        position = files.position()
        assert position is not None
        for _ in range(3):
            db.insert()
            changes = files.changes(position, PAGE)
            assert changes is not None
            position = changes.end
        self.assertEqual(descriptorsOf(db.path + "-shm"), shm + 1)
        self.assertEqual(descriptorsOf(db.path + "-wal"), wal + 1)
        files.close()
        self.assertEqual(descriptorsOf(db.path + "-shm"), shm)
        self.assertEqual(descriptorsOf(db.path + "-wal"), wal)
        self.assertEqual(files.position(), position)
        files.close()

    def test_filesReplaced(self) -> None:
        """
        When the database leaves WAL mode (SQLite deletes its log and index)
        and comes back (new ones, a new generation), L{WalFiles} reads the
        new files, not the deleted ones it had open: a position of the old
        generation is refused, and the new generation's changes are read.
        """
        db = _Database(self)
        db.insert()
        files = WalFiles(db.path)
        self.addCleanup(files.close)
        old = files.position()
        assert old is not None
        db.connection.execute("PRAGMA journal_mode=DELETE")
        db.connection.execute("PRAGMA journal_mode=WAL")
        db.insert()
        self.assertIsNone(files.changes(old, PAGE))
        new = files.position()
        assert new is not None
        self.assertNotEqual(new.salts, old.salts)
        before = image(db.path)
        db.insert()
        changes = files.changes(new, PAGE)
        assert changes is not None
        self.assertEqual(apply(before, changes), image(db.path))
        # The deleted files are closed: only the new index is open, once by
        # the connection and once here.
        self.assertEqual(descriptorsOf(db.path + "-shm"), 2)

    def test_missing(self) -> None:
        """
        A database without log files yet reads as no position and no
        changes, and its files are opened once they exist.
        """
        directory = FilePath(self.mktemp())
        directory.makedirs()
        path = directory.child("db.sqlite").path
        files = WalFiles(path)
        self.addCleanup(files.close)
        self.assertIsNone(files.position())
        self.assertIsNone(files.changes(WalPosition(b"\0" * 8, 0), PAGE))
        connection = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(connection.close)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE t (v)")
        self.assertIsNotNone(files.position())


class ReadChangesTests(SynchronousTestCase):
    """
    L{readChanges} and L{walPosition} on real write-ahead logs.
    """

    def twoCommits(self) -> tuple[_Database, WalPosition]:
        """
        A database with two commits, and the position between them.
        """
        db = _Database(self)
        db.insert()
        position = walPosition(db.path)
        assert position is not None
        db.insert()
        return db, position

    def test_changesRebuildImage(self) -> None:
        """
        Through random inserts, deletes, updates, checkpoints and a vacuum,
        the changes read since each position, written over the image at
        that position, give exactly the committed image; when the log has
        restarted since, L{readChanges} says so (L{None}) and a new position
        is taken with a whole image.
        """
        db = _Database(self)
        rng = random.Random(5)
        position = walPosition(db.path)
        base = image(db.path)
        read = restarts = 0
        for step in range(600):
            choice = rng.random()
            if choice < 0.55:
                db.insert(rng.randint(10, 6000))
            elif choice < 0.75:
                db.connection.execute(
                    "DELETE FROM t WHERE id IN (SELECT id FROM t ORDER BY random() LIMIT 3)"
                )
            elif choice < 0.77:
                db.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            elif choice < 0.78:
                db.connection.execute("VACUUM")
            else:
                db.connection.execute(
                    "UPDATE t SET v = ? WHERE id = (SELECT max(id) FROM t)", (b"u" * 50,)
                )
            if rng.random() < 0.3:
                changes = readChanges(db.path, position, PAGE) if position else None
                if changes is None:
                    restarts += 1
                    position = walPosition(db.path)
                    base = image(db.path)
                    continue
                base = apply(base, changes)
                self.assertEqual(base, image(db.path), f"step {step}")
                position = changes.end
                read += 1
        self.assertGreater(read, 100)
        self.assertGreater(restarts, 3)

    def test_manyFramesAcrossIndexBlocks(self) -> None:
        """
        Past a few frames, only the newest frame of each page is read, found
        from the WAL index's page numbers, whose first block holds 4062
        frames and each next one 4096: changes across thousands of frames,
        from positions in the first and in a later block, rebuild the image
        exactly.
        """
        db = _Database(self)
        db.connection.execute("PRAGMA wal_autocheckpoint=0")
        for _ in range(20):
            db.insert(300)
        rng = random.Random(7)
        positions = []
        for step in range(9000):
            db.connection.execute(
                "UPDATE t SET v = ? WHERE id = ?", (os.urandom(200), rng.randint(1, 20))
            )
            if step in (0, 4500, 8990):
                position = walPosition(db.path)
                assert position is not None
                positions.append((position, image(db.path)))
        last = walPosition(db.path)
        assert last is not None
        self.assertGreater(last.frames, 2 * 4062)
        for position, base in positions:
            changes = readChanges(db.path, position, PAGE)
            assert changes is not None
            self.assertEqual(apply(base, changes), image(db.path))
            self.assertEqual(changes.end, last)

    def test_nothingSince(self) -> None:
        """
        At the log's current position, there are no changes.
        """
        db = _Database(self)
        db.insert()
        position = walPosition(db.path)
        assert position is not None
        self.assertEqual(readChanges(db.path, position, PAGE), WalChanges({}, 2, position))

    def test_emptyLog(self) -> None:
        """
        An empty log, or none at all, has no position: the salts of its next
        generation are unknown.
        """
        db = _Database(self)
        db.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.assertIsNone(walPosition(db.path))
        self.assertIsNone(walPosition(db.path + "-missing"))
        self.assertIsNone(
            readChanges(db.path + "-missing", WalPosition(b"\0" * 8, 0), PAGE)
        )

    def test_restarted(self) -> None:
        """
        A position of an earlier generation of the log is refused.
        """
        db = _Database(self)
        db.insert()
        position = walPosition(db.path)
        assert position is not None
        db.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.insert()
        self.assertIsNone(readChanges(db.path, position, PAGE))

    def test_otherPageSize(self) -> None:
        """
        A page size other than the log's is refused.
        """
        db, position = self.twoCommits()
        self.assertIsNone(readChanges(db.path, position, 1024))

    def test_uncommittedLeftOut(self) -> None:
        """
        Frames of a transaction not yet committed (spilled from a small page
        cache) are not read: the changes are those of the commits only.
        """
        db = _Database(self)
        db.insert()
        position = walPosition(db.path)
        assert position is not None
        base = image(db.path)
        db.insert(5000)
        committed = image(db.path)
        db.connection.execute("PRAGMA cache_size=2")
        db.connection.execute("BEGIN")
        for _ in range(50):
            db.insert(3000)
        self.assertGreater(os.path.getsize(db.path + "-wal"), 20 * PAGE)
        changes = readChanges(db.path, position, PAGE)
        assert changes is not None
        self.assertEqual(apply(base, changes), committed)
        db.connection.execute("ROLLBACK")

    def test_damagedIndexRefused(self) -> None:
        """
        An index whose two header copies differ, or whose header checksum
        is wrong, is refused.
        """
        db, position = self.twoCommits()
        for offsets in [(16 + 48,), (16, 16 + 48)]:
            copy = db.copy(self)
            with open(copy + "-shm", "r+b") as f:
                for offset in offsets:
                    f.seek(offset)
                    f.write(b"\x7f")
            self.assertIsNone(readChanges(copy, position, PAGE))
            self.assertIsNotNone(readChanges(db.copy(self), position, PAGE))

    def test_foreignFrameRefused(self) -> None:
        """
        A committed frame whose salts are not its generation's, or a log
        shorter than its index says, is refused.
        """
        db, position = self.twoCommits()
        copy = db.copy(self)
        with open(copy + "-wal", "r+b") as f:
            f.seek(32 + position.frames * (24 + PAGE) + 8)
            f.write(b"\0" * 8)
        self.assertIsNone(readChanges(copy, position, PAGE))
        copy = db.copy(self)
        os.truncate(copy + "-wal", os.path.getsize(copy + "-wal") - 1)
        self.assertIsNone(readChanges(copy, position, PAGE))
        self.assertIsNone(readChanges(copy, position, PAGE, maxFrames=32, settled=True))

    def test_indexClaimingMoreThanLogRefused(self) -> None:
        """
        An index whose header is whole (both copies the same, the checksum
        right) but counts more committed frames than the log holds is
        refused before the frames are read: however many it claims, the
        answer is L{None}, not an attempt to read (and allocate) them all.
        """
        db, position = self.twoCommits()
        copy = db.copy(self)
        with open(copy + "-shm", "r+b") as f:
            header = bytearray(f.read(48))
            # szPage 1 means 65536-byte pages; mxFrame the most there can be.
            struct.pack_into("=HI", header, 14, 1, 0xFFFFFFFF)
            struct.pack_into("=II", header, 40, *_indexChecksum(bytes(header[:40])))
            f.seek(0)
            f.write(header + header)
        self.assertIsNone(readChanges(copy, position, 65536))

    def test_indexClaimingAFewMoreRefused(self) -> None:
        """
        An index whose header is whole but counts a few more committed
        frames than the log holds is refused by a bounded read too, which
        reads the log without first checking its size.
        """
        db, position = self.twoCommits()
        copy = db.copy(self)
        with open(copy + "-shm", "r+b") as f:
            header = bytearray(f.read(48))
            (frames,) = struct.unpack_from("=I", header, 16)
            struct.pack_into("=I", header, 16, frames + 2)
            struct.pack_into("=II", header, 40, *_indexChecksum(bytes(header[:40])))
            f.seek(0)
            f.write(header + header)
        self.assertIsNone(readChanges(copy, position, PAGE, maxFrames=32, settled=True))
        self.assertIsNone(readChanges(copy, position, PAGE))
        self.assertIsNotNone(
            readChanges(db.copy(self), position, PAGE, maxFrames=32, settled=True)
        )

"""
Tests for L{fractal.durable._images}: consistent images of real SQLite
databases read through a bounded set of kept connections.
"""

from __future__ import annotations

import os
import sqlite3

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from fractal.durable._images import ImageReader
from fractal.durable.shipper import readImage


def makeDatabase(path: FilePath[str], rows: int, body: str = "x") -> None:
    """
    Create (or add to) a database in WAL mode at C{path} with C{rows} rows.
    """
    path.parent().makedirs(ignoreExistingDirectory=True)
    connection = sqlite3.connect(path.path)
    try:
        connection.execute("PRAGMA journal_mode=wal")
        connection.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER, body TEXT)")
        connection.executemany(
            "INSERT INTO t VALUES (?, ?)", [(n, body * 100) for n in range(rows)]
        )
        connection.commit()
    finally:
        connection.close()


def rowsOf(image: bytes) -> list[tuple[int, str]]:
    """
    The rows of table C{t} in the database C{image}.
    """
    connection = sqlite3.connect(":memory:")
    try:
        # An image of a database in WAL mode says so in its header; read it
        # as a rollback-journal one.
        connection.deserialize(image[:18] + b"\x01\x01" + image[20:])
        return list(connection.execute("SELECT n, body FROM t ORDER BY rowid"))
    finally:
        connection.close()


class ImageReaderTests(SynchronousTestCase):
    """
    L{ImageReader} reads the same images as a fresh connection would, keeps
    a bounded number of connections, and never reads a replaced file through
    an old one.
    """

    def setUp(self) -> None:
        self.root = FilePath(self.mktemp())
        self.reader = ImageReader(maxOpen=2)
        self.addCleanup(self.reader.close)

    def test_sameImageAsFreshConnection(self) -> None:
        """
        Each read gives the image a new connection reads, including commits
        made since the previous read through the same kept connection.
        """
        database = self.root.child("a").child("db.sqlite")
        makeDatabase(database, 5)
        self.assertEqual(self.reader.read(database), readImage(database))
        makeDatabase(database, 7, "y")
        image = self.reader.read(database)
        self.assertEqual(image, readImage(database))
        assert image is not None
        self.assertEqual(len(rowsOf(image)), 12)

    def test_missing(self) -> None:
        """
        A database file that does not exist reads as L{None}.
        """
        self.assertIsNone(self.reader.read(self.root.child("none").child("db.sqlite")))

    def test_keepsConnection(self) -> None:
        """
        The connection of a database read is kept for its next read.
        """
        database = self.root.child("a").child("db.sqlite")
        makeDatabase(database, 1)
        self.reader.read(database)
        first = self.reader._idle[database.path].connection
        self.reader.read(database)
        self.assertIs(self.reader._idle[database.path].connection, first)

    def test_notKept(self) -> None:
        """
        A database read with C{keep=False} (a store that is not open) has its
        connection closed after the read.
        """
        database = self.root.child("a").child("db.sqlite")
        makeDatabase(database, 1)
        self.assertEqual(self.reader.read(database, keep=False), readImage(database))
        self.assertEqual(dict(self.reader._idle), {})

    def test_bounded(self) -> None:
        """
        At most C{maxOpen} connections are kept, the least recently used
        closed first.
        """
        databases = [self.root.child(name).child("db.sqlite") for name in "abc"]
        for database in databases:
            makeDatabase(database, 1)
            self.reader.read(database)
        self.assertEqual(list(self.reader._idle), [d.path for d in databases[1:]])

    def test_replacedFile(self) -> None:
        """
        A database file replaced by another (a store set aside and restored
        in its place) is read from the new file, never through the kept
        connection to the old one.
        """
        database = self.root.child("a").child("db.sqlite")
        makeDatabase(database, 3)
        self.reader.read(database)
        other = self.root.child("b").child("db.sqlite")
        makeDatabase(other, 9, "z")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(database.path + suffix):
                os.remove(database.path + suffix)
        os.rename(other.path, database.path)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(other.path + suffix):
                os.rename(other.path + suffix, database.path + suffix)
        image = self.reader.read(database)
        assert image is not None
        self.assertEqual(rowsOf(image), [(n, "z" * 100) for n in range(9)])

    def test_discardCloses(self) -> None:
        """
        Discarding a database closes its kept connection, so the store's own
        connection is its last and SQLite removes the write-ahead log when
        that closes.
        """
        database = self.root.child("a").child("db.sqlite")
        makeDatabase(database, 1)
        self.reader.read(database)
        self.reader.discard(database)
        self.assertEqual(dict(self.reader._idle), {})
        connection = sqlite3.connect(database.path)
        connection.execute("INSERT INTO t VALUES (1, 'w')")
        connection.commit()
        connection.close()
        self.assertFalse(os.path.exists(database.path + "-wal"))

    def test_discardWhileReading(self) -> None:
        """
        A database discarded while its connection is in use has that
        connection closed when it is returned rather than kept.
        """
        database = self.root.child("a").child("db.sqlite")
        makeDatabase(database, 1)
        self.reader.read(database)
        entry = self.reader._idle.pop(database.path)
        self.reader._busy.add(database.path)
        self.reader.discard(database)
        self.reader._return(database.path, entry)
        self.assertEqual(dict(self.reader._idle), {})
        self.assertRaises(sqlite3.ProgrammingError, entry.connection.execute, "SELECT 1")

"""
Tests for L{fractal.store.Store}: opening, layout, locking, closing, files
and batchInsert.
"""

from __future__ import annotations

import sqlite3

from twisted.internet.defer import fail
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from fractal.store import Item, Store, errors, integer, text
from fractal.store.store import DEFAULT_PAGE_SIZE
from fractal.testing import ManualThreads


class Note(Item):
    """
    A note.
    """

    title = text()
    n = integer(default=0)


class Numbered(Item):
    """
    Has a default and a factory, for batchInsert.
    """

    a = integer(default=5)
    b = integer(defaultFactory=lambda: 7)
    c = text()


class OpenTests(SynchronousTestCase):
    """
    Opening and creating stores.
    """

    def test_inMemory(self) -> None:
        """
        Store() is in memory, with no directories.
        """
        s = Store()
        self.assertIsNone(s.dbdir)
        self.assertIsNone(s.filesdir)
        Note(store=s, title="x")
        self.assertEqual(s.count(Note), 1)

    def test_layout(self) -> None:
        """
        A new store directory holds db.sqlite, files/, temp/ and run/, and no
        temporary sibling is left behind.
        """
        path = FilePath(self.mktemp())
        s = Store(path)
        self.assertEqual(
            sorted(c.basename() for c in path.children()), ["db.sqlite", "db.sqlite-shm", "db.sqlite-wal", "files", "run", "temp"]
        )
        self.assertEqual(s.dbdir, path)
        self.assertEqual(s.filesdir, path.child("files"))
        self.assertEqual(path.parent().listdir(), [path.basename()])
        s.close()

    def pageSize(self, store: Store) -> int:
        """
        The page size of C{store}'s database.
        """
        [(size,)] = store._cursor.execute("PRAGMA page_size").fetchall()
        assert isinstance(size, int)
        return size

    def test_pageSize(self) -> None:
        """
        A new store's database has L{DEFAULT_PAGE_SIZE}-byte pages (not
        SQLite's default of 4096), or C{pageSize}'s; in memory too.
        """
        self.assertEqual(DEFAULT_PAGE_SIZE, 1024)
        for store in [Store(self.mktemp()), Store()]:
            self.assertEqual(self.pageSize(store), DEFAULT_PAGE_SIZE)
            store.close()
        for store, size in [(Store(self.mktemp(), pageSize=8192), 8192), (Store(pageSize=512), 512)]:
            Note(store=store, title="x" * 2000)
            self.assertEqual(self.pageSize(store), size)
            self.assertEqual(store.findUnique(Note).title, "x" * 2000)
            store.close()

    def test_existingKeepsItsPageSize(self) -> None:
        """
        An existing database keeps its page size, whatever C{pageSize} says;
        so does one laid out by another program (Axiom's, SQLite's default).
        """
        path = self.mktemp()
        Store(path, pageSize=2048).close()
        s = Store(path, pageSize=4096)
        self.assertEqual(self.pageSize(s), 2048)
        s.close()
        other = FilePath(self.mktemp())
        other.makedirs()
        sqlite3.connect(other.child("db.sqlite").path).execute(
            "CREATE TABLE t (x)"
        ).connection.close()
        s = Store(other)
        Note(store=s, title="x")
        self.assertEqual(self.pageSize(s), 4096)
        s.close()

    def test_pageSizeInExistingDirectory(self) -> None:
        """
        A database created in a directory that exists already (without one,
        or with an empty C{db.sqlite}) is new too: it gets C{pageSize}, or
        L{DEFAULT_PAGE_SIZE}, not SQLite's default, which switching it to WAL
        mode would otherwise fix before the first table is made.
        """
        for pageSize, emptyFile in [(None, False), (2048, False), (8192, True)]:
            path = FilePath(self.mktemp())
            path.makedirs()
            if emptyFile:
                path.child("db.sqlite").touch()
            s = Store(path) if pageSize is None else Store(path, pageSize=pageSize)
            Note(store=s, title="x")
            self.assertEqual(
                self.pageSize(s), DEFAULT_PAGE_SIZE if pageSize is None else pageSize
            )
            s.close()

    def test_invalidPageSize(self) -> None:
        """
        A page size SQLite does not support is refused before anything is
        created.
        """
        path = FilePath(self.mktemp())
        for bad in [0, 256, 1000, 131072, "1024"]:
            with self.assertRaises(ValueError) as e:
                Store(path, pageSize=bad)  # type: ignore[arg-type]
            self.assertIn("power of two from 512 to 65536", str(e.exception))
        self.assertFalse(path.exists())

    def test_strPath(self) -> None:
        """
        dbdir may be a str.
        """
        path = self.mktemp()
        s = Store(path)
        self.assertEqual(s.dbdir, FilePath(path))
        s.close()

    def test_reopen(self) -> None:
        """
        Data survives close and reopen.
        """
        path = self.mktemp()
        s = Store(path)
        Note(store=s, title="kept", n=3)
        s.close()
        s = Store(path)
        self.assertEqual([(n.title, n.n) for n in s.query(Note)], [("kept", 3)])
        s.close()

    def test_bothDirs(self) -> None:
        """
        Passing dbdir and filesdir raises ValueError.
        """
        self.assertRaises(ValueError, Store, self.mktemp(), filesdir=self.mktemp())

    def test_filesdirOnly(self) -> None:
        """
        An in-memory store can have a files directory.
        """
        files = FilePath(self.mktemp())
        s = Store(filesdir=files)
        self.assertEqual(s.newFilePath("a"), files.child("a"))

    def test_noCreate(self) -> None:
        """
        create=False and a missing directory raise StoreNotFound (a
        CannotOpenStore) and create nothing.
        """
        path = FilePath(self.mktemp())
        self.assertRaises(errors.StoreNotFound, Store, path, create=False)
        self.assertTrue(issubclass(errors.StoreNotFound, errors.CannotOpenStore))
        self.assertFalse(path.exists())
        Store(path).close()
        Store(path, create=False).close()

    def test_pragmas(self) -> None:
        """
        WAL with synchronous=NORMAL and trusted_schema=OFF by default.
        """
        s = Store(self.mktemp())
        cur = s._cursor
        self.assertEqual(cur.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(cur.execute("PRAGMA synchronous").fetchone()[0], 1)
        self.assertEqual(cur.execute("PRAGMA trusted_schema").fetchone()[0], 0)
        self.assertEqual(s.journalMode, "WAL")
        s.close()

    def test_journalMode(self) -> None:
        """
        Another journal mode can be chosen; an unknown one raises ValueError.
        """
        s = Store(self.mktemp(), journalMode="DELETE")
        self.assertEqual(s._cursor.execute("PRAGMA journal_mode").fetchone()[0], "delete")
        s.close()
        self.assertRaises(ValueError, Store, self.mktemp(), journalMode="WAL; DROP TABLE x")

    def test_attributes(self) -> None:
        """
        parent, idInParent and debug are kept.
        """
        parent = Store()
        s = Store(parent=parent, idInParent=4)
        self.assertIs(s.parent, parent)
        self.assertEqual(s.idInParent, 4)
        self.assertFalse(s.debug)


class ExclusionTests(SynchronousTestCase):
    """
    One store object per file, and bounded lock waits.
    """

    def test_secondOpenRefused(self) -> None:
        """
        Opening a store that is already open in this process raises
        StoreAlreadyOpen, even inside a transaction on the first (Axiom hung
        here); after close it opens again.
        """
        path = self.mktemp()
        s = Store(path)

        def inside() -> None:
            Note(store=s, title="x")
            self.assertRaises(errors.StoreAlreadyOpen, Store, path)

        s.transact(inside)
        s.close()
        Store(path).close()

    def test_lockTimeout(self) -> None:
        """
        A write lock held by another connection makes a transaction raise
        StoreLocked after lockTimeout instead of blocking forever; nothing
        is changed.
        """
        path = FilePath(self.mktemp())
        s = Store(path, lockTimeout=0.05)
        Note(store=s, title="before")
        other = sqlite3.connect(path.child("db.sqlite").path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        self.assertRaises(errors.StoreLocked, Note, store=s, title="blocked")
        self.assertRaises(errors.StoreLocked, s.transact, lambda: None)
        other.execute("ROLLBACK")
        Note(store=s, title="after")
        self.assertEqual(sorted(n.title for n in s.query(Note)), ["after", "before"])
        s.close()


class CloseTests(SynchronousTestCase):
    """
    close().
    """

    def test_useAfterClose(self) -> None:
        """
        Any use after close raises StoreClosed; closing twice is fine.
        """
        s = Store(self.mktemp())
        n = Note(store=s, title="x")
        storeID = n.storeID
        s.close()
        s.close()
        self.assertRaises(errors.StoreClosed, s.getItemByID, storeID)
        self.assertRaises(errors.StoreClosed, list, s.query(Note))
        self.assertRaises(errors.StoreClosed, s.count, Note)
        self.assertRaises(errors.StoreClosed, Note, store=s)
        self.assertRaises(errors.StoreClosed, setattr, n, "title", "y")
        self.assertRaises(errors.StoreClosed, s.transact, lambda: None)

    def test_closeInTransaction(self) -> None:
        """
        Closing inside a transaction raises TransactionInProgress.
        """
        s = Store()
        self.assertRaises(errors.TransactionInProgress, s.transact, s.close)
        Note(store=s, title="still open")


class CloseInTests(SynchronousTestCase):
    """
    closeIn(): the connection closed by a runner, off the caller's thread.
    """

    def test_closedAtOnce(self) -> None:
        """
        The store is closed for its callers at once; the connection is
        closed only when the runner runs the work, and the L{Deferred}
        fires then.
        """
        path = FilePath(self.mktemp())
        s = Store(path)
        Note(store=s, title="kept")
        threads = ManualThreads()
        closed = s.closeIn(threads)
        self.assertRaises(errors.StoreClosed, s.count, Note)
        self.assertNoResult(closed)
        self.assertTrue(path.child("db.sqlite-wal").exists())
        threads.runOne()
        self.assertIsNone(self.successResultOf(closed))
        # As close() leaves them: SQLite's log gone, its spare kept.
        self.assertFalse(path.child("db.sqlite-wal").exists())
        self.assertTrue(path.child("db.sqlite-wal.spare").exists())
        again = Store(path)
        self.addCleanup(again.close)
        self.assertEqual([n.title for n in again.query(Note)], ["kept"])

    def test_notReopenedWhileClosing(self) -> None:
        """
        Until the connection is closed, the file cannot be opened again in
        this process: never two connections of two Store objects on it.
        """
        path = FilePath(self.mktemp())
        s = Store(path)
        threads = ManualThreads()
        s.closeIn(threads)
        self.assertRaises(errors.StoreAlreadyOpen, Store, path)
        threads.runAll()
        Store(path).close()

    def test_twice(self) -> None:
        """
        Closing a closed or closing store does nothing.
        """
        s = Store(self.mktemp())
        threads = ManualThreads()
        first = s.closeIn(threads)
        self.successResultOf(s.closeIn(threads))
        s.close()
        self.assertEqual(len(threads.pending), 1)
        threads.runAll()
        self.successResultOf(first)

    def test_inTransaction(self) -> None:
        """
        Inside a transaction it raises TransactionInProgress, and the store
        stays open.
        """
        s = Store()
        self.assertRaises(
            errors.TransactionInProgress, s.transact, lambda: s.closeIn(ManualThreads())
        )
        Note(store=s, title="still open")

    def test_closeFails(self) -> None:
        """
        If closing the connection fails, the L{Deferred} fails with it, and
        the file can be opened again.
        """
        path = FilePath(self.mktemp())
        s = Store(path)

        def broken(f: object) -> object:
            return fail(sqlite3.OperationalError("disk I/O error"))

        self.failureResultOf(s.closeIn(broken), sqlite3.OperationalError)  # type: ignore[arg-type]
        Store(path).close()

    def test_runnerRaises(self) -> None:
        """
        A runner that raises instead of returning a L{Deferred} fails the
        returned one, and the file can be opened again.
        """
        path = FilePath(self.mktemp())
        s = Store(path)

        def refusing(f: object) -> object:
            raise RuntimeError("no threads here")

        self.failureResultOf(s.closeIn(refusing), RuntimeError)  # type: ignore[arg-type]
        self.assertRaises(errors.StoreClosed, s.count, Note)
        Store(path).close()


class KeptWALFilesTests(SynchronousTestCase):
    """
    A closed WAL store keeps its emptied C{-wal} and C{-shm} files as spares,
    and the next open puts them back instead of creating new files.
    """

    def _closedStore(self) -> FilePath[str]:
        """
        A store with one note, closed.
        """
        path = FilePath(self.mktemp())
        s = Store(path)
        Note(store=s, title="kept")
        s.close()
        return path

    def test_closeKeepsEmptySpares(self) -> None:
        """
        After close, the WAL files are gone (as SQLite leaves them) and
        their spares are there, empty.
        """
        db = self._closedStore().child("db.sqlite")
        for suffix in ("-wal", "-shm"):
            self.assertFalse(db.siblingExtension(suffix).exists())
            spare = db.siblingExtension(suffix + ".spare")
            self.assertTrue(spare.exists())
            self.assertEqual(spare.getsize(), 0)

    def test_openReusesSpares(self) -> None:
        """
        Opening a store again turns its spares back into its WAL files, the
        same files (inodes), and the store's content is intact.
        """
        db = self._closedStore().child("db.sqlite")
        inodes = [db.siblingExtension(s + ".spare").getInodeNumber() for s in ("-wal", "-shm")]
        s = Store(db.parent())
        self.addCleanup(s.close)
        self.assertEqual([n.title for n in s.query(Note)], ["kept"])
        for suffix, inode in zip(("-wal", "-shm"), inodes):
            self.assertFalse(db.siblingExtension(suffix + ".spare").exists())
            self.assertEqual(db.siblingExtension(suffix).getInodeNumber(), inode)
        Note(store=s, title="more")
        self.assertEqual(s.count(Note), 2)

    def test_nonEmptySpareDiscarded(self) -> None:
        """
        A spare that is not empty (never written by the store, but a stale
        copy of a log could be) is removed, not used: the store opens with
        its own content only.
        """
        path = self._closedStore()
        db = path.child("db.sqlite")
        stale = db.siblingExtension("-wal.spare")
        stale.setContent(b"not a log" * 100)
        s = Store(path)
        self.addCleanup(s.close)
        self.assertFalse(FilePath(stale.path).exists())
        # Not the inode number: the filesystem may give the removed spare's
        # inode to the log SQLite creates.
        self.assertNotIn(b"not a log", db.siblingExtension("-wal").getContent())
        self.assertEqual([n.title for n in s.query(Note)], ["kept"])

    def test_liveFilesNeverTouched(self) -> None:
        """
        Closing a store while another connection still has its database open
        leaves the live WAL files as they are and keeps no spare; that
        connection still reads every commit.
        """
        path = FilePath(self.mktemp())
        s = Store(path)
        Note(store=s, title="first")
        db = path.child("db.sqlite")
        other = sqlite3.connect(db.path)
        self.addCleanup(other.close)
        other.execute("SELECT 1 FROM sqlite_master").fetchall()
        Note(store=s, title="second")
        s.close()
        for suffix in ("-wal", "-shm"):
            self.assertTrue(db.siblingExtension(suffix).exists())
            self.assertFalse(db.siblingExtension(suffix + ".spare").exists())
        (table,) = other.execute(
            "SELECT name FROM sqlite_master WHERE name LIKE '%note%'"
        ).fetchone()
        self.assertEqual(other.execute(f"SELECT COUNT(*) FROM {table}").fetchone(), (2,))

    def test_liveFileWinsOverSpare(self) -> None:
        """
        If the WAL file exists when a store opens (left by another process or
        a crash), SQLite uses it and the spare is removed.
        """
        path = self._closedStore()
        db = path.child("db.sqlite")
        db.siblingExtension("-wal").touch()
        inode = db.siblingExtension("-wal").getInodeNumber()
        s = Store(path)
        self.addCleanup(s.close)
        self.assertFalse(db.siblingExtension("-wal.spare").exists())
        self.assertEqual(db.siblingExtension("-wal").getInodeNumber(), inode)
        self.assertEqual([n.title for n in s.query(Note)], ["kept"])

    def test_otherJournalModes(self) -> None:
        """
        A store in another journal mode keeps no spares.
        """
        path = FilePath(self.mktemp())
        s = Store(path, journalMode="DELETE")
        Note(store=s, title="x")
        s.close()
        self.assertEqual(
            sorted(c.basename() for c in path.children() if c.isfile()), ["db.sqlite"]
        )


class RestartLogTests(SynchronousTestCase):
    """
    L{Store.restartLog} checkpoints and restarts the write-ahead log, or does
    nothing, at once.
    """

    def test_restarted(self) -> None:
        """
        The log's frames go into the database file and the log is emptied;
        the content is unchanged, and later commits go on as usual.
        """
        s = Store(FilePath(self.mktemp()))
        self.addCleanup(s.close)
        for n in range(20):
            s.transact(lambda: Note(store=s, title="x" * 500, n=n))
        assert s.dbdir is not None
        log = s.dbdir.child("db.sqlite-wal")
        self.assertGreater(log.getsize(), 0)
        self.assertTrue(s.restartLog())
        log.restat()
        self.assertEqual(log.getsize(), 0)
        self.assertEqual(sorted(note.n for note in s.query(Note)), list(range(20)))
        s.transact(lambda: Note(store=s, title="after", n=20))
        other = sqlite3.connect(s.dbdir.child("db.sqlite").path)
        self.addCleanup(other.close)
        self.assertEqual(other.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
        self.assertEqual(s.count(Note), 21)

    def test_notWhileRead(self) -> None:
        """
        While another connection reads from the log, nothing is restarted
        and C{False} is returned at once, whatever the store's lock timeout;
        the connection's busy timeout is left as it was.
        """
        s = Store(FilePath(self.mktemp()), lockTimeout=600.0)
        self.addCleanup(s.close)
        s.transact(lambda: Note(store=s, title="x"))
        assert s.dbdir is not None
        reader = sqlite3.connect(s.dbdir.child("db.sqlite").path, isolation_level=None)
        self.addCleanup(reader.close)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM sqlite_master").fetchall()
        size = s.dbdir.child("db.sqlite-wal").getsize()
        self.assertFalse(s.restartLog())
        self.assertEqual(s.dbdir.child("db.sqlite-wal").getsize(), size)
        self.assertEqual(s.querySQL("PRAGMA busy_timeout"), [(600000,)])
        reader.execute("ROLLBACK")
        self.assertTrue(s.restartLog())

    def test_notWhileReading(self) -> None:
        """
        While a statement of the store's own connection is still being read,
        nothing is restarted; once it is done, the log is.
        """
        s = Store(FilePath(self.mktemp()))
        self.addCleanup(s.close)
        s.transact(lambda: [Note(store=s, title="x", n=n) for n in range(500)])
        cursor = s._conn.execute("SELECT * FROM sqlite_master, axiom_objects")
        cursor.fetchone()
        self.assertFalse(s.restartLog())
        cursor.fetchall()
        self.assertTrue(s.restartLog())

    def test_notInTransaction(self) -> None:
        """
        Inside a transaction nothing is done.
        """
        s = Store(FilePath(self.mktemp()))
        self.addCleanup(s.close)
        s.transact(lambda: Note(store=s, title="x"))
        self.assertFalse(s.transact(s.restartLog))

    def test_notWAL(self) -> None:
        """
        A store not in WAL mode has no log to restart.
        """
        s = Store(FilePath(self.mktemp()), journalMode="DELETE")
        self.addCleanup(s.close)
        s.transact(lambda: Note(store=s, title="x"))
        self.assertFalse(s.restartLog())

    def test_closed(self) -> None:
        """
        A closed store raises L{errors.StoreClosed}.
        """
        s = Store(FilePath(self.mktemp()))
        s.close()
        self.assertRaises(errors.StoreClosed, s.restartLog)


class FileTests(SynchronousTestCase):
    """
    newFilePath, newTemporaryFilePath, newDirectory and newFile.
    """

    def test_paths(self) -> None:
        """
        Paths are made under files/ and temp/; directories are created.
        """
        path = FilePath(self.mktemp())
        s = Store(path)
        self.assertEqual(s.newFilePath("a", "b"), path.child("files").child("a").child("b"))
        self.assertEqual(s.newTemporaryFilePath("t"), path.child("temp").child("t"))
        d = s.newDirectory("x", "y")
        self.assertTrue(d.isdir())
        s.close()

    def test_unsafeSegments(self) -> None:
        """
        Segments with separators, '..' or nothing are refused.
        """
        s = Store(self.mktemp())
        for bad in [("..",), ("a/b",), ("",), ()]:
            self.assertRaises(Exception, s.newFilePath, *bad)
        s.close()

    def test_newFile(self) -> None:
        """
        newFile writes in temp/ and appears at files/... only on close.
        """
        path = FilePath(self.mktemp())
        s = Store(path)
        f = s.newFile("dir", "file.bin")
        f.write(b"data")
        final = path.child("files").child("dir").child("file.bin")
        self.assertFalse(final.exists())
        result = self.successResultOf(f.close())
        self.assertEqual(result, final)
        self.assertEqual(final.getContent(), b"data")
        self.assertEqual(path.child("temp").listdir(), [])
        s.close()

    def test_abort(self) -> None:
        """
        abort() discards the file.
        """
        path = FilePath(self.mktemp())
        s = Store(path)
        f = s.newFile("gone")
        f.write(b"x")
        f.abort()
        self.assertFalse(path.child("files").child("gone").exists())
        self.assertEqual(path.child("temp").listdir(), [])
        s.close()

    def test_inMemoryNoFiles(self) -> None:
        """
        An in-memory store without a files directory raises RuntimeError.
        """
        s = Store()
        self.assertRaises(RuntimeError, s.newFilePath, "a")
        self.assertRaises(RuntimeError, s.newFile, "a")


class BatchInsertTests(SynchronousTestCase):
    """
    batchInsert.
    """

    def test_batchInsert(self) -> None:
        """
        Rows are inserted with defaults (and factories) for missing
        attributes, checked like attribute sets.
        """
        s = Store()
        s.batchInsert(Numbered, [Numbered.c, Numbered.a], [("x", 1), ("y", None)])
        self.assertEqual(
            sorted((n.c, n.a, n.b) for n in s.query(Numbered)), [("x", 1, 7), ("y", None, 7)]
        )
        self.assertRaises(TypeError, s.batchInsert, Numbered, [Numbered.c], [(1,)])
        self.assertEqual(s.count(Numbered), 2)


class DebugTests(SynchronousTestCase):
    """
    debug=True prints SQL.
    """

    def test_debugPrints(self) -> None:
        """
        Every statement is printed.
        """
        import io
        import sys

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        s = Store(debug=True)
        Note(store=s, title="x")
        self.assertIn("INSERT INTO", out.getvalue())
        self.assertTrue(s.debug)


class DamagedTests(SynchronousTestCase):
    """
    A damaged database file gives a clear error and is left alone.
    """

    def test_notADatabase(self) -> None:
        """
        A db.sqlite that is not a database raises CannotOpenStore, keeps its
        bytes, and does not stay registered as open.
        """
        path = FilePath(self.mktemp())
        Store(path).close()
        garbage = b"this is not a database" * 100
        path.child("db.sqlite").setContent(garbage)
        for suffix in ("-wal", "-shm"):
            if path.child("db.sqlite" + suffix).exists():
                path.child("db.sqlite" + suffix).remove()
        self.assertRaises(errors.CannotOpenStore, Store, path)
        self.assertRaises(errors.CannotOpenStore, Store, path)
        self.assertEqual(path.child("db.sqlite").getContent(), garbage)


class DescriptorTests(SynchronousTestCase):
    """
    Running out of file descriptors is reported as such.
    """

    def test_outOfDescriptors(self) -> None:
        """
        When the process has no descriptors left, opening or creating a store
        raises StoreOutOfDescriptors (an OSError with errno EMFILE, and a
        CannotOpenStore), not SQLite's vague "unable to open database file";
        once stores are closed, opening works again.
        """
        import errno
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        inUse = len(FilePath("/proc/self/fd").listdir())
        base = FilePath(self.mktemp())
        base.makedirs()
        resource.setrlimit(resource.RLIMIT_NOFILE, (inUse + 10, hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        opened = []
        try:
            for i in range(20):
                opened.append(Store(base.child(str(i))))
        except errors.StoreOutOfDescriptors as e:
            self.assertEqual(e.errno, errno.EMFILE)
            self.assertIsInstance(e, errors.CannotOpenStore)
            self.assertIsInstance(e, OSError)
        else:
            self.fail("20 stores opened with 10 descriptors to spare")
        for s in opened:
            s.close()
        again = Store(base.child("again"))
        again.close()


def _holdInCycle(store: Store) -> None:
    """
    Make C{store} part of a reference cycle (through a commit observer).
    """
    holder = [store]
    store.addCommitObserver(lambda: holder)


class DroppedStoreTests(SynchronousTestCase):
    """
    A store dropped without close() does not block reopening.
    """

    def test_droppedInCycle(self) -> None:
        """
        A store that is unreachable but kept in a reference cycle is
        collected when the same path is opened again, instead of the open
        failing with StoreAlreadyOpen.
        """
        path = self.mktemp()
        s = Store(path)
        Note(store=s, title="kept")
        _holdInCycle(s)
        del s
        again = Store(path)
        self.assertEqual([n.title for n in again.query(Note)], ["kept"])
        again.close()

# -*- test-case-name: tests.test_store_store -*-
"""
L{Store}: one SQLite database of items, laid out exactly as Axiom lays it
out, so Axiom data opens here and the other way round.

A store is one C{sqlite3} connection used from one thread.  Writes go to the
database inside an explicit C{BEGIN IMMEDIATE} transaction (L{Store.transact}),
or, outside one, each in its own short transaction.  Within a transaction, the
rows of new items and the changed attributes of existing ones (one C{UPDATE}
per item, as Axiom does) are written before the next statement that reads or
writes rows, and at commit.
"""

from __future__ import annotations

import errno
import gc
import importlib
import os
import sqlite3
import tempfile
import weakref
from typing import Any, Callable, Iterable, TypeVar

from twisted.application.service import IService, IServiceCollection, MultiService
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from fractal.store import attributes as _attributes
from fractal.store.errors import (
    CannotOpenStore,
    ChangeRejected,
    DeletionDisallowed,
    DuplicateUniqueItem,
    ItemNotFound,
    ItemUpgradeError,
    NoUpgradePathAvailable,
    StoreAlreadyOpen,
    StoreClosed,
    StoreLocked,
    StoreNotFound,
    StoreOutOfDescriptors,
    TransactionInProgress,
    UnknownItemType,
    UpgraderRecursion,
)
from fractal.store.interfaces import IAtomicFile, IBeneficiary, IScheduler
from fractal.store.item import (
    Empowered,
    Item,
    _allReferences,
    _generation,
    _legacyTypes,
    _makeLegacyClass,
    _PowerupConnector,
    _typeNameToMostRecentClass,
)
from fractal.store.query import ItemQuery, MultipleItemQuery

__all__ = ["AtomicFile", "DEFAULT_PAGE_SIZE", "Store", "STORE_SELF_ID"]

STORE_SELF_ID = -1
"""
The storeID of a store itself (what a reference to the store holds).
"""

DEFAULT_PAGE_SIZE = 1024
"""
The SQLite page size, in bytes, of a database a L{Store} creates (an existing
one keeps its own).

A store holds one user's items, so it is small, and its pages are the unit of
everything a commit costs: each page a commit changes is written to the
write-ahead log, and the durable shipper reads, hashes, compresses and ships
each one.  An Axiom insert changes four pages (the objects table, its type
index, the C{AUTOINCREMENT} counter and the item's table), whatever the item's
size; at 1 KiB they cost less than at SQLite's default of 4 KiB, which suits
large databases read in bulk.  An application whose items are mostly larger
than about a kilobyte (their rows overflow into more pages) may do better with
a larger size: see L{Store}'s C{pageSize} and
L{fractal.app.Application}'s.
"""

_MIN_STORE_ID = -(2**63)
_MAX_STORE_ID = 2**63 - 1
"""
The range of SQLite's integers, so of storeIDs; sqlite3 cannot even bind an
int outside it (C{OverflowError}).
"""

_T = TypeVar("_T")
_NOTHING: Any = object()

_CREATE_OBJECTS = """
CREATE TABLE "axiom_objects" (
    "oid" INTEGER PRIMARY KEY AUTOINCREMENT,
    "type_id" INTEGER NOT NULL
        CONSTRAINT "fk_type_id" REFERENCES "axiom_types"("oid")
)
"""
_CREATE_OBJECTS_IDX = """
CREATE INDEX "axiom_objects_type_idx"
    ON "axiom_objects"("type_id");
"""
_CREATE_TYPES = """
CREATE TABLE "axiom_types" (
    "oid" INTEGER PRIMARY KEY AUTOINCREMENT,
    "typename" VARCHAR,
    "module" VARCHAR,
    "version" INTEGER
)
"""
_CREATE_ATTRIBUTES = """
CREATE TABLE "axiom_attributes" (
    "type_id" INTEGER,
    "row_offset" INTEGER,
    "indexed" BOOLEAN,
    "sqltype" VARCHAR,
    "allow_none" BOOLEAN,
    "pythontype" VARCHAR,
    "attribute" VARCHAR,
    "docstring" TEXT
)
"""
_BASE_SCHEMA = [_CREATE_OBJECTS, _CREATE_OBJECTS_IDX, _CREATE_TYPES, _CREATE_ATTRIBUTES]

_INSERT_OBJECT = 'INSERT INTO "axiom_objects" ("type_id") VALUES (?)'
_INSERT_OBJECT_ID = 'INSERT INTO "axiom_objects" ("oid", "type_id") VALUES (?, ?)'
_BURN_OBJECT = 'INSERT INTO "axiom_objects" ("oid", "type_id") VALUES (?, -1)'
_TYPE_OF = 'SELECT "type_id" FROM "axiom_objects" WHERE "oid" = ?'
_CREATE_TYPE = 'INSERT INTO "axiom_types" ("typename", "module", "version") VALUES (?, ?, ?)'
_ADD_ATTRIBUTE = (
    'INSERT INTO "axiom_attributes" ("type_id", "row_offset", "indexed", "sqltype", '
    '"allow_none", "attribute", "docstring", "pythontype") VALUES (?, ?, ?, ?, ?, ?, ?, ?)'
)
_JOURNAL_MODES = frozenset(["DELETE", "TRUNCATE", "PERSIST", "MEMORY", "WAL", "OFF"])
_CHUNK = 500

_openStores: dict[str, weakref.ref[Store]] = {}

_updateSQLCache: dict[tuple[str, tuple[str, ...]], str] = {}
"""
The C{UPDATE} statement writing several changed attributes of an item, by
table and column names (not by class: a legacy class is made anew for each
store that needs it).
"""


class _ClosedCursor:
    """
    Stands in for the cursor of a closed store, so any use raises
    L{StoreClosed}.
    """

    def __getattr__(self, name: str) -> Any:
        raise StoreClosed("this store has been closed")


def _chunks(values: list[int]) -> Iterable[list[int]]:
    for i in range(0, len(values), _CHUNK):
        yield values[i : i + _CHUNK]


def _marks(n: int) -> str:
    return ", ".join(["?"] * n)


def _isLockError(e: sqlite3.Error) -> bool:
    text = str(e).lower()
    return "locked" in text or "busy" in text


def _descriptorsExhausted() -> int | None:
    """
    The errno (C{EMFILE} or C{ENFILE}) if this process cannot open another
    file right now, else C{None}.
    """
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            return e.errno
        return None
    os.close(fd)
    return None


def _checkDescriptors(e: BaseException, where: str) -> None:
    """
    Raise L{StoreOutOfDescriptors} if C{e} happened because the process ran
    out of file descriptors.
    """
    code = _descriptorsExhausted()
    if code is not None:
        raise StoreOutOfDescriptors(code, "no file descriptors left to open %s" % (where,)) from e


_WAL_FILES = ("-wal", "-shm")
"""
The suffixes of the files SQLite keeps beside a database in WAL mode: the
write-ahead log and its shared-memory index.
"""

_SPARE = ".spare"
"""
The suffix of a WAL file kept, empty, after its store was closed: see
L{_keepWALFiles}.
"""


def _keepWALFiles(dbpath: str, close: Callable[[], None]) -> None:
    """
    Call C{close} (which closes the last connection to the WAL database at
    C{dbpath}) and keep the inodes of its C{-wal} and C{-shm} files, emptied,
    as C{db.sqlite-wal.spare} and C{db.sqlite-shm.spare}, for
    L{_reuseWALFiles} to put back at the next open.

    SQLite deletes both files when the last connection closes and creates
    them again at the next open; creating a file costs far more than
    linking one on some filesystems (0.1 to several milliseconds on ext4
    under load, against microseconds), and that cost falls on a cold open's
    critical path.  The spare is taken as a second hard link before the
    close; if SQLite deleted the file, the spare is the only name left and is
    truncated (an empty file is what SQLite would create); if it did not (the
    database is still open elsewhere), the spare is a name of a live file and
    is removed at once, never touched.

    @param dbpath: the database file.
    @param close: closes the connection.
    """
    linked = []
    for suffix in _WAL_FILES:
        try:
            os.link(dbpath + suffix, dbpath + suffix + _SPARE)
        except OSError:
            # No such file (never opened in WAL mode, or another process
            # removed it), or a spare already there: no spare this time.
            continue
        linked.append(suffix)
    try:
        close()
    finally:
        for suffix in linked:
            spare = dbpath + suffix + _SPARE
            try:
                if os.path.lexists(dbpath + suffix):
                    # Still in use (or made anew) by another connection.
                    os.unlink(spare)
                else:
                    os.truncate(spare, 0)
            except OSError:
                try:
                    os.unlink(spare)
                except OSError:
                    pass


def _reuseWALFiles(dbpath: str) -> None:
    """
    Put back the empty C{-wal} and C{-shm} files L{_keepWALFiles} kept, so
    that SQLite opens them instead of creating them.  A spare is used only if
    it is empty and no C{-wal} or C{-shm} file exists (C{link} never replaces
    one); anything else removes it.

    @param dbpath: the database file.
    """
    for suffix in _WAL_FILES:
        spare = dbpath + suffix + _SPARE
        try:
            if os.stat(spare).st_size == 0:
                os.link(spare, dbpath + suffix)
        except FileNotFoundError:
            continue
        except OSError:
            # The database's file exists already (live, or left by a
            # crash): SQLite uses that one.
            pass
        try:
            os.unlink(spare)
        except OSError:
            pass


def _asFilePath(value: Any) -> FilePath[str] | None:
    if value is None:
        return None
    if isinstance(value, FilePath):
        return value
    if isinstance(value, str):
        return FilePath(value)
    raise TypeError("expected a str or FilePath, not %r" % (value,))


def _checkPageSize(pageSize: int) -> None:
    """
    @raise ValueError: if C{pageSize} is not a page size SQLite supports.
    """
    if not (
        isinstance(pageSize, int)
        and 512 <= pageSize <= 65536
        and pageSize & (pageSize - 1) == 0
    ):
        raise ValueError(
            "page size must be a power of two from 512 to 65536, not %r" % (pageSize,)
        )


def _isNewDatabase(dbpath: str) -> bool:
    """
    Whether the database file C{dbpath} is missing or empty: SQLite makes a
    new database there, whose page size is still free.
    """
    try:
        return os.stat(dbpath).st_size == 0
    except FileNotFoundError:
        return True
    except OSError:
        # SQLite will say what is wrong with it.
        return False


def _createStoreDirectory(dbdir: FilePath[str], pageSize: int) -> None:
    """
    Build a new store directory in a temporary sibling, then rename it into
    place, so a half-made store is never seen at C{dbdir}.

    @param pageSize: the new database's page size.
    """
    parent = dbdir.parent()
    parent.makedirs(ignoreExistingDirectory=True)
    temp = dbdir.temporarySibling(".tmp")
    temp.makedirs()
    try:
        for name in ("files", "temp", "run"):
            temp.child(name).makedirs()
        conn = sqlite3.connect(temp.child("db.sqlite").path, isolation_level=None)
        try:
            conn.execute("PRAGMA page_size=%d" % (pageSize,))
            conn.execute("BEGIN")
            for sql in _BASE_SCHEMA:
                conn.execute(sql)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            # Check before closing frees the descriptor it holds.
            _checkDescriptors(e, dbdir.path)
            raise
        finally:
            conn.close()
        temp.moveTo(dbdir)
    except BaseException:
        try:
            if temp.exists():
                temp.remove()
        except OSError:
            # Best effort (it fails, for one, when no descriptor is left):
            # a leftover temporary sibling is never mistaken for a store.
            pass
        raise


@implementer(IBeneficiary)
class Store(Empowered):
    """
    An Axiom-compatible object store.

    @ivar dbdir: the store directory (L{FilePath}), or C{None} in memory.
    @ivar filesdir: the directory for files belonging to the store
        (C{dbdir/files}), or C{None}.
    @ivar parent: the store this is a substore of, or C{None}.
    @ivar idInParent: the storeID of the SubStore item in C{parent}.
    @ivar journalMode: the SQLite journal mode (C{"WAL"} by default).
    @ivar debug: whether SQL statements are printed.
    @ivar lockTimeout: how many seconds to wait for another connection's
        lock before raising L{StoreLocked}.
    """

    _fKind = "store"
    log = Logger()
    storeID = STORE_SELF_ID
    __legacy__ = False

    def __init__(
        self,
        dbdir: FilePath[str] | str | None = None,
        filesdir: FilePath[str] | str | None = None,
        debug: bool = False,
        parent: Store | None = None,
        idInParent: int | None = None,
        journalMode: str | None = "WAL",
        create: bool = True,
        lockTimeout: float = 2.0,
        pageSize: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        """
        Open (or create) a store.

        @param dbdir: the store directory; C{None} for an in-memory store.
        @param filesdir: a files directory for an in-memory store.
        @param create: whether a missing C{dbdir} is created.  With
            C{create=False} a missing directory raises L{StoreNotFound}.
        @param journalMode: C{"WAL"} (default, with C{synchronous=NORMAL}),
            another SQLite journal mode, or C{None} for SQLite's default.
        @param lockTimeout: seconds to wait for a lock held by another
            connection before raising L{StoreLocked}.
        @param pageSize: the SQLite page size of the database, if this
            creates it (L{DEFAULT_PAGE_SIZE}); an existing database keeps its
            own.

        @raise ValueError: if both C{dbdir} and C{filesdir} are given, or
            C{pageSize} is not a power of two from 512 to 65536.
        @raise StoreAlreadyOpen: if this process already has the store open.
        """
        dbdirPath = _asFilePath(dbdir)
        filesdirPath = _asFilePath(filesdir)
        if dbdirPath is not None and filesdirPath is not None:
            raise ValueError("Give dbdir or filesdir, not both")
        if journalMode is not None and journalMode.upper() not in _JOURNAL_MODES:
            raise ValueError("Unknown journal mode %r" % (journalMode,))
        _checkPageSize(pageSize)
        self.dbdir = dbdirPath
        self.debug = debug
        self.parent = parent
        self.idInParent = idInParent
        self.journalMode = journalMode
        self.lockTimeout = lockTimeout
        self._registryKey: str | None = None
        # The database file of a WAL store in a directory, whose WAL files
        # are kept between opens (_keepWALFiles).
        self._dbpath: str | None = None
        self._conn: sqlite3.Connection | None = None
        self._cursor: Any = _ClosedCursor()
        self._txn = False
        self._rejecting = False
        self._touched: dict[int, tuple[Any, dict[str, Any] | None]] = {}
        self._deletedItems: list[Any] = []
        self._deletingIDs: set[int] = set()
        self._tablesCreated: list[tuple[str, int]] = []
        # What SQLite's count of changed rows was at BEGIN, and whether a
        # statement that may change only the schema ran since: a transaction
        # that changed neither wrote nothing, and its commit is not observed.
        self._changesAtBegin = 0
        self._schemaWritten = False
        self._allocated: int | None = None
        # Inside a transaction, after the first insert has shown the next
        # storeID, new items get their storeIDs here and their rows are
        # written in batches (_flush) before any other statement runs.
        self._nextID: int | None = None
        self._pending: list[tuple[int, Any]] = []
        self._pendingFrom: int | None = None
        # Items whose attributes changed in this transaction, with the
        # changed attributes (by hidden name): each is written with one
        # UPDATE by _flush, as Axiom does, not one UPDATE per assignment.
        self._dirty: dict[int, tuple[Any, dict[str, Any]]] = {}
        # Whether _pending or _dirty holds anything: checked before every
        # statement that reads or writes rows.
        self._unflushed = False
        self._upgrading: set[int] = set()
        self._commitObservers: list[Callable[[], object]] = []
        self._inMemory: dict[Any, Any] = {}
        self._aggregate: MultiService | None = None
        self._typeIDs: dict[tuple[str, int], int] = {}
        self._typeInfo: dict[int, tuple[str, str, int]] = {}
        self._diskSchema: dict[int, list[tuple[str, str, str, bool]]] = {}
        self._classByTypeID: dict[int, type[Item]] = {}
        self._referrers: dict[Any, tuple[list[Any], list[Any], list[Any]]] = {}
        self._referrersGeneration = -1
        self._powerupSQL: dict[int, str] = {}
        # The identity map: storeID -> weak reference.  Dead references are
        # swept when the map doubles in size, which costs less than a
        # callback per item.
        self._cache: dict[int, weakref.ref[Any]] = {}
        self._sweepAt = 1024

        if dbdirPath is not None:
            if not dbdirPath.exists():
                if not create:
                    raise StoreNotFound("No store at %s" % (dbdirPath.path,))
                try:
                    _createStoreDirectory(dbdirPath, pageSize)
                except sqlite3.Error as e:
                    _checkDescriptors(e, dbdirPath.path)
                    raise CannotOpenStore("Cannot create a store at %s: %s" % (dbdirPath.path, e)) from e
            elif not dbdirPath.isdir():
                raise CannotOpenStore("%s is not a directory" % (dbdirPath.path,))
            # Plain string paths here: FilePath.child normalises each path
            # again, and opening a store is on a call's critical path.
            base = dbdirPath.path
            for name in ("files", "temp", "run"):
                child = os.path.join(base, name)
                if not os.path.isdir(child):
                    FilePath(child).makedirs(ignoreExistingDirectory=True)
            self.filesdir: FilePath[str] | None = dbdirPath.preauthChild("files")
            self._tempdir: FilePath[str] | None = dbdirPath.preauthChild("temp")
            dbpath = os.path.join(base, "db.sqlite")
            # The page size to give the database: only a new one takes it.
            newPageSize = pageSize if _isNewDatabase(dbpath) else None
            key = os.path.realpath(dbpath)
            existing = _openStores.get(key)
            if existing is not None and existing() is not None:
                # An unreachable store in a reference cycle may still be
                # waiting for the garbage collector: give it the chance.
                gc.collect()
            if existing is not None and existing() is not None:
                raise StoreAlreadyOpen(
                    "%s is already open in this process (%r); use that Store object"
                    % (dbdirPath.path, existing())
                )
            self._registryKey = key
            _openStores[key] = weakref.ref(self)
            if journalMode is not None and journalMode.upper() == "WAL":
                self._dbpath = dbpath
                _reuseWALFiles(dbpath)
        else:
            self.filesdir = filesdirPath
            self._tempdir = filesdirPath.child("temp") if filesdirPath is not None else None
            dbpath = ":memory:"
            newPageSize = pageSize
        try:
            self._connect(dbpath, newPageSize)
            self._startup()
        except sqlite3.DatabaseError as e:
            try:
                _checkDescriptors(e, dbpath)
            finally:
                self._abandon()
            raise CannotOpenStore("Cannot open the store at %s: %s" % (dbpath, e)) from e
        except BaseException:
            self._abandon()
            raise

    # ------------------------------------------------------------------
    # Opening and closing

    def _connect(self, dbpath: str, pageSize: int | None) -> None:
        """
        Connect to the database at C{dbpath} and set up the connection.

        @param pageSize: the page size to give a new database, or L{None}
            for an existing one.  It is set before the journal mode: turning
            WAL on writes the database's header, which fixes its page size.
        """
        # Used by one thread at a time: the store's, and at the end the one
        # that closes it (L{closeIn}).
        conn = sqlite3.connect(
            dbpath,
            isolation_level=None,
            timeout=self.lockTimeout,
            cached_statements=512,
            check_same_thread=False,
        )
        self._conn = conn
        self._cursor = conn.cursor()
        if self.debug:
            conn.set_trace_callback(lambda sql: print("**", sql))
        cur = self._cursor
        try:
            cur.execute("PRAGMA trusted_schema=OFF")
            if pageSize is not None:
                cur.execute("PRAGMA page_size=%d" % (pageSize,))
            if self.journalMode is not None:
                cur.execute("PRAGMA journal_mode=%s" % (self.journalMode.upper(),))
                if self.journalMode.upper() == "WAL":
                    cur.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.OperationalError as e:
            if _isLockError(e):
                raise StoreLocked("%s stayed locked: %s" % (dbpath, e)) from e
            raise

    def _startup(self) -> None:
        cur = self._cursor
        master = cur.execute("SELECT type, name FROM sqlite_master").fetchall()
        if ("table", "axiom_objects") not in master:
            self.transact(self._createBaseSchema)
            master = None
        self._loadSchema(
            None if master is None else {name for kind, name in master if kind == "index"}
        )

    def _createBaseSchema(self) -> None:
        self._schemaWritten = True
        for sql in _BASE_SCHEMA:
            self._cursor.execute(sql)

    def _abandon(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._cursor = _ClosedCursor()
        self._unregister()

    def _unregister(self) -> None:
        key = self._registryKey
        if key is not None:
            ref = _openStores.get(key)
            if ref is not None and ref() in (self, None):
                del _openStores[key]
            self._registryKey = None

    def close(self) -> None:
        """
        Close the database.  Any later use of the store raises
        L{StoreClosed}.  Closing twice does nothing.

        @raise TransactionInProgress: if called inside a transaction.
        """
        closing = self._detach()
        if closing is not None:
            try:
                closing()
            finally:
                self._unregister()

    def closeIn(self, runInThread: Callable[[Callable[[], None]], Deferred[Any]]) -> Deferred[None]:
        """
        Close the database as L{close} does, with the connection itself
        closed by C{runInThread}: as the last connection to a database in
        WAL mode closes, SQLite checkpoints the log into the database and
        syncs it, which takes milliseconds.  The store is closed for its
        callers at once; its file may not be opened again in this process
        (L{StoreAlreadyOpen}) until the returned L{Deferred} fires.

        @param runInThread: runs a blocking callable and returns a
            L{Deferred} of its result, such as
            L{fractal.durable._threads.reactorThreads}.
        @return: fires when the connection is closed; fails if closing it
            failed.
        @raise TransactionInProgress: if called inside a transaction.
        """
        closing = self._detach()
        if closing is None:
            return succeed(None)
        # A runner that raises fails the Deferred, like a close that fails.
        d: Deferred[None] = maybeDeferred(runInThread, closing)

        def closed(result: object) -> object:
            self._unregister()
            return result

        return d.addBoth(closed)

    def _detach(self) -> Callable[[], None] | None:
        """
        Make the store closed for its callers, and return what closes its
        connection (keeping its WAL files), or L{None} if it is closed
        already.
        """
        conn = self._conn
        if conn is None:
            return None
        if self._txn:
            raise TransactionInProgress("cannot close a store inside a transaction")
        self._conn = None
        self._cursor = _ClosedCursor()
        self._cache.clear()
        dbpath = self._dbpath
        if dbpath is None:
            return conn.close
        return lambda: _keepWALFiles(dbpath, conn.close)

    def __del__(self) -> None:
        try:
            self._unregister()
        except Exception:
            pass

    def _checkOpen(self) -> None:
        if self._conn is None:
            raise StoreClosed("this store has been closed")

    def __repr__(self) -> str:
        where = self.dbdir.path if self.dbdir is not None else ":memory:"
        return "<Store %s@0x%X>" % (where, id(self))

    @property
    def store(self) -> Store:
        """
        The store itself, so that a store can be treated like an item.
        """
        return self

    @property
    def inTransaction(self) -> bool:
        """
        Whether a transaction is open.
        """
        return self._txn

    def restartLog(self) -> bool:
        """
        Copy the write-ahead log into the database file and start the log
        afresh (empty, with the salts of its next generation), on this
        store's connection, if that can be done at once: SQLite's
        C{wal_checkpoint(TRUNCATE)}, without waiting for other connections.
        Nothing is done inside a transaction (or a commit hook), while a
        statement of this connection is still being read or another
        connection reads from the log or writes, or when the database is
        not in WAL mode.

        SQLite checkpoints on its own once the log passes a thousand pages,
        and restarts it at the next write, with salts nobody can know
        beforehand.  A reader of the log (L{fractal.durable}'s shipper)
        restarts it itself once it has read everything in it, so that it
        knows where the next commit will be.

        @return: whether the log was restarted.
        @raise StoreClosed: if the store is closed.
        """
        self._checkOpen()
        if self._txn or self._rejecting:
            return False
        cursor = self._cursor
        [(timeout,)] = cursor.execute("PRAGMA busy_timeout").fetchall()
        cursor.execute("PRAGMA busy_timeout=0")
        try:
            [(busy, frames, _)] = cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.OperationalError as e:
            if not _isLockError(e):
                raise
            # A statement of this connection not read to its end.
            return False
        finally:
            cursor.execute("PRAGMA busy_timeout=%d" % (int(timeout),))
        return bool(busy == 0 and frames >= 0)

    # ------------------------------------------------------------------
    # Schema

    def _loadSchema(self, indexes: set[str] | None = None) -> None:
        if self._unflushed:
            self._flush()
        cur = self._cursor
        types = cur.execute('SELECT "oid", "typename", "module", "version" FROM "axiom_types"').fetchall()
        attrs = cur.execute(
            'SELECT "type_id", "attribute", "sqltype", "pythontype", "indexed" '
            'FROM "axiom_attributes" ORDER BY "type_id", "row_offset"'
        ).fetchall()
        if indexes is None:
            indexes = {
                row[0] for row in cur.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
            }
        self._typeIDs = {}
        self._typeInfo = {}
        self._diskSchema = {}
        self._classByTypeID = {}
        for typeID, attribute, sqltype, pythontype, indexed in attrs:
            self._diskSchema.setdefault(typeID, []).append(
                (attribute, sqltype, pythontype, bool(indexed))
            )
        for typeID, typeName, module, version in types:
            self._typeIDs[(typeName, version)] = typeID
            self._typeInfo[typeID] = (typeName, module, version)
            if typeName not in _typeNameToMostRecentClass:
                self._importModule(typeName, module)
        missingIndexes: list[str] = []
        legacy: list[tuple[int, int]] = []
        for typeID, (typeName, module, version) in self._typeInfo.items():
            current = _typeNameToMostRecentClass.get(typeName)
            if current is None:
                continue
            if version > current.schemaVersion:
                raise RuntimeError(
                    "The database holds %s version %d, but the code defines only version %d"
                    % (typeName, version, current.schemaVersion)
                )
            if version == current.schemaVersion:
                self._checkSchema(current, self._diskSchema.get(typeID, []))
                self._classByTypeID[typeID] = current
                for name, sql in _indexesFor(current):
                    if name not in indexes:
                        missingIndexes.append(sql)
            else:
                legacy.append((version, typeID))
        pending: list[tuple[int, int]] = []
        for version, typeID in sorted(legacy):
            typeName = self._typeInfo[typeID][0]
            cls = self._classForTypeID(typeID)
            if cur.execute("SELECT 1 FROM %s LIMIT 1" % (cls._fTable,)).fetchone() is None:
                continue
            self._checkUpgradePath(typeName, version)
            pending.append((version, typeID))
        if missingIndexes or pending:
            self.transact(self._prepare, missingIndexes, pending)

    def _importModule(self, typeName: str, module: str) -> None:
        candidates = [module]
        if module == "axiom" or module.startswith("axiom."):
            candidates.insert(0, "fractal.store" + module[len("axiom") :])
        for name in candidates:
            try:
                importlib.import_module(name)
            except ImportError:
                continue
            if typeName in _typeNameToMostRecentClass:
                return
        if typeName not in _typeNameToMostRecentClass:
            self.log.warn(
                "Item type {typeName} (module {module}) is not defined by any importable "
                "module; its items cannot be loaded",
                typeName=typeName,
                module=module,
            )

    def _checkSchema(self, cls: type[Item], disk: list[tuple[str, str, str, bool]]) -> None:
        onDisk = [(name, sqltype) for name, sqltype, _, _ in disk]
        inMemory = _columnsOf(cls)
        if onDisk != inMemory:
            raise RuntimeError(
                "Schema mismatch on %s version %d without a schemaVersion bump:\n"
                "  on disk:   %r\n  in memory: %r" % (cls.typeName, cls.schemaVersion, onDisk, inMemory)
            )

    def _checkUpgradePath(self, typeName: str, version: int) -> None:
        from fractal.store.upgrade import _upgradeRegistry

        current = _typeNameToMostRecentClass[typeName]
        while version < current.schemaVersion:
            entry = _upgradeRegistry.get((typeName, version))
            if entry is None:
                raise NoUpgradePathAvailable(
                    "No upgrader for %s from version %d (to reach version %d)"
                    % (typeName, version, current.schemaVersion)
                )
            version = entry[1]
            if version < current.schemaVersion and self._legacyClass(typeName, version) is None:
                raise NoUpgradePathAvailable(
                    "Type schema required for %s version %d: declare it with "
                    "declareLegacyItem" % (typeName, version)
                )

    def _legacyClass(self, typeName: str, version: int) -> type[Item] | None:
        found = _legacyTypes.get((typeName, version))
        if found is not None:
            return found
        typeID = self._typeIDs.get((typeName, version))
        if typeID is None:
            return None
        return self._classForTypeID(typeID)

    def _prepare(self, indexSQL: list[str], pending: list[tuple[int, int]]) -> None:
        cur = self._cursor
        self._schemaWritten = self._schemaWritten or bool(indexSQL)
        for sql in indexSQL:
            cur.execute(sql)
        for _, typeID in pending:
            cls = self._classForTypeID(typeID)
            ids = [row[0] for row in cur.execute("SELECT oid FROM %s ORDER BY oid" % (cls._fTable,))]
            for storeID in ids:
                row = cur.execute(cls._fSelectByIDSQL, (storeID,)).fetchone()  # type: ignore[attr-defined]
                if row is None:
                    continue
                self._upgradeItem(self._materialize(cls, row))

    def _classForTypeID(self, typeID: int) -> type[Item]:
        cls = self._classByTypeID.get(typeID)
        if cls is not None:
            return cls
        info = self._typeInfo.get(typeID)
        if info is None:
            self._loadSchema()
            info = self._typeInfo.get(typeID)
            if info is None:
                raise UnknownItemType("No item type with id %d" % (typeID,))
        typeName, module, version = info
        current = _typeNameToMostRecentClass.get(typeName)
        if current is not None and current.schemaVersion == version:
            cls = current
        else:
            if current is not None and version > current.schemaVersion:
                raise RuntimeError(
                    "%s version %d was found in the database; the code defines only version %d"
                    % (typeName, version, current.schemaVersion)
                )
            cls = _legacyTypes.get((typeName, version))
            if cls is None:
                if current is None:
                    raise UnknownItemType(
                        "Cannot load items of unknown type %s version %d (module %s)"
                        % (typeName, version, module)
                    )
                cls = self._legacyFromDisk(typeName, version, self._diskSchema.get(typeID, []))
        self._classByTypeID[typeID] = cls
        return cls

    def _legacyFromDisk(
        self, typeName: str, version: int, disk: list[tuple[str, str, str, bool]]
    ) -> type[Item]:
        attrs: dict[str, Any] = {}
        for name, sqltype, pythontype, indexed in disk:
            factory = getattr(_attributes, pythontype, None)
            if not (isinstance(factory, type) and issubclass(factory, _attributes.SQLAttribute)):
                factory = None
            if factory is None or factory is _attributes.SQLAttribute:
                attrs[name] = _RawAttribute(sqltype)
            elif issubclass(factory, _attributes.text):
                attrs[name] = factory(caseSensitive=(sqltype == "TEXT"))
            else:
                attrs[name] = factory()
            if attrs[name].sqltype != sqltype:
                attrs[name] = _RawAttribute(sqltype)
        return _makeLegacyClass(typeName, version, attrs, private=True)

    def _createTable(self, cls: type[Item]) -> int:
        key = (cls.typeName, cls.schemaVersion)
        cur = self._cursor
        columns = ["oid INTEGER PRIMARY KEY"] + [
            "\n%s %s" % (attr.columnName, attr.sqltype) for _, attr in cls._fSchema
        ]
        try:
            cur.execute("CREATE TABLE %s (%s)" % (cls._fTable, ", ".join(columns)))
        except sqlite3.OperationalError as e:
            if "already exists" not in str(e):
                raise
            self._loadSchema()
            return self._typeIDs[key]
        cur.execute(_CREATE_TYPE, (cls.typeName, cls.__module__, cls.schemaVersion))
        typeID = cur.lastrowid
        assert typeID is not None
        for _, sql in _indexesFor(cls):
            cur.execute(sql)
        for offset, (name, attr) in enumerate(cls._fSchema):
            cur.execute(
                _ADD_ATTRIBUTE,
                (
                    typeID,
                    offset,
                    attr.indexed,
                    attr.sqltype,
                    attr.allowNone,
                    name,
                    attr.doc,
                    type(attr).__name__,
                ),
            )
        self._typeIDs[key] = typeID
        self._typeInfo[typeID] = (cls.typeName, cls.__module__, cls.schemaVersion)
        self._classByTypeID[typeID] = cls
        self._diskSchema[typeID] = [
            (name, attr.sqltype, type(attr).__name__, attr.indexed) for name, attr in cls._fSchema
        ]
        self._tablesCreated.append(key)
        self._referrersGeneration = -1
        return int(typeID)

    def _hasTable(self, cls: Any) -> bool:
        return (cls.typeName, cls.schemaVersion) in self._typeIDs

    def getTableName(self, tableClass: type[Item]) -> str:
        """
        The name of the table of C{tableClass} (which may not exist yet).
        """
        return tableClass._fTable

    def getTypeID(self, tableClass: type[Item]) -> int:
        """
        The id of C{tableClass} in C{axiom_types}, creating its table if it
        does not exist.
        """
        found = self._typeIDs.get((tableClass.typeName, tableClass.schemaVersion))
        if found is not None:
            return found
        return self.transact(self._createTable, tableClass)

    # ------------------------------------------------------------------
    # Transactions

    def _begin(self) -> None:
        try:
            self._cursor.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if _isLockError(e):
                raise StoreLocked(
                    "%r stayed locked by another connection for more than %s seconds"
                    % (self, self.lockTimeout)
                ) from e
            raise
        self._txn = True
        assert self._conn is not None
        self._changesAtBegin = self._conn.total_changes
        self._schemaWritten = False

    def _changed(self) -> bool:
        """
        Whether the transaction running now wrote anything: a row (SQLite's
        count of changed rows moved) or the schema (a statement that may
        change only the schema ran: raw SQL, a new index).
        """
        assert self._conn is not None
        return self._schemaWritten or self._conn.total_changes != self._changesAtBegin

    def _commit(self) -> None:
        if self._unflushed:
            self._flush()
        self._cursor.execute("COMMIT")

    def _flush(self) -> None:
        """
        Write the rows of items created (and not yet written) in this
        transaction, with one C{executemany} per table, then the changed
        attributes of other items, with one C{UPDATE} per item.
        """
        self._unflushed = False
        pending = self._pending
        if pending:
            self._pending = []
            self._pendingFrom = None
            self._insertPending(pending)
        dirty = self._dirty
        if dirty:
            self._dirty = {}
            self._updateDirty(dirty)

    def _updateDirty(self, dirty: dict[int, tuple[Any, dict[str, Any]]]) -> None:
        """
        Write the changed attributes of each item in C{dirty}.
        """
        cur = self._cursor
        sqlCache = _updateSQLCache
        for storeID, (item, attrs) in dirty.items():
            d = item.__dict__
            if len(attrs) == 1:
                for hidden, attr in attrs.items():
                    cur.execute(attr._updateSQL, (d[hidden], storeID))
                continue
            columns = tuple(attr.columnName for attr in attrs.values())
            key = (type(item)._fTable, columns)
            sql = sqlCache.get(key)
            if sql is None:
                sql = sqlCache[key] = "UPDATE %s SET %s WHERE oid = ?" % (
                    key[0],
                    ", ".join("%s = ?" % (column,) for column in columns),
                )
            cur.execute(sql, (*map(d.__getitem__, attrs), storeID))

    def _insertPending(self, pending: list[tuple[int, Any]]) -> None:
        """
        Write the rows of the items created in this transaction and not yet
        written.
        """
        cur = self._cursor
        cur.executemany(
            _INSERT_OBJECT_ID, [(item.__dict__["_fstoreID"], typeID) for typeID, item in pending]
        )
        byClass: dict[Any, list[Any]] = {}
        for _, item in pending:
            byClass.setdefault(type(item), []).append(item)
        for cls, items in byClass.items():
            keys = cls._fLoadKeys
            cur.executemany(
                cls._fInsertSQL, [tuple(map(item.__dict__.__getitem__, keys)) for item in items]
            )

    def _clearTransaction(self) -> tuple[dict[int, Any], list[Any], list[tuple[str, int]], int | None]:
        state = (self._touched, self._deletedItems, self._tablesCreated, self._allocated)
        self._txn = False
        self._touched = {}
        self._deletedItems = []
        self._deletingIDs = set()
        self._tablesCreated = []
        self._allocated = None
        self._nextID = None
        self._pending = []
        self._pendingFrom = None
        self._dirty = {}
        self._unflushed = False
        return state

    def transact(self, f: Callable[..., _T], *a: Any, **kw: Any) -> _T:
        """
        Run C{f(*a, **kw)} in a transaction and return its result.

        The transaction begins with C{BEGIN IMMEDIATE}, so it holds the
        write lock from the start.  If C{f} raises, everything is rolled
        back: the database, the persistent attributes of the items it
        touched, and items it created (which are detached: their C{store}
        and C{storeID} become C{None}).  Inside a transaction, C{transact}
        simply calls C{f}.

        After a commit, C{committed()} runs on every touched item,
        C{deleted()} on deleted ones, then the commit observers.

        @raise StoreLocked: if another connection holds the lock for longer
            than C{lockTimeout}.
        """
        if self._txn:
            return f(*a, **kw)
        if self._rejecting:
            raise ChangeRejected("cannot start a transaction from a commit hook")
        self._begin()
        try:
            result = f(*a, **kw)
            if self._unflushed:
                self._flush()
            changed = self._changed()
            self._commit()
        except BaseException:
            self._rollback()
            raise
        self._afterCommit(changed)
        return result

    def _rollback(self) -> None:
        try:
            self._cursor.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        touched, deleted, tables, allocated = self._clearTransaction()
        cache = self._cache
        for storeID, (item, snapshot) in touched.items():
            d = item.__dict__
            if snapshot is None:
                d["_fstore"] = None
                d["_fstoreID"] = None
                if cache.get(storeID) is not None:
                    del cache[storeID]
            else:
                d.update(snapshot)
                d.pop("_fdeleting", None)
                if not item.__legacy__ and d.get("_fstore") is self:
                    cache[storeID] = weakref.ref(item)
        if tables:
            for key in tables:
                typeID = self._typeIDs.pop(key, None)
                if typeID is not None:
                    self._typeInfo.pop(typeID, None)
                    self._classByTypeID.pop(typeID, None)
                    self._diskSchema.pop(typeID, None)
            self._referrersGeneration = -1
        if allocated is not None:
            # The allocation of storeIDs was rolled back with everything
            # else; record the highest one as dead so it is never reused.
            try:
                self._cursor.execute("BEGIN IMMEDIATE")
                try:
                    self._cursor.execute(_BURN_OBJECT, (allocated,))
                    self._cursor.execute("COMMIT")
                except BaseException:
                    self._cursor.execute("ROLLBACK")
                    raise
            except Exception:
                self.log.failure("Could not retire storeID {storeID}", storeID=allocated)
            else:
                if self._commitObservers:
                    self._notifyObservers()

    def _afterCommit(self, changed: bool = True) -> None:
        touched, deleted, _, _ = self._clearTransaction()
        self._rejecting = True
        try:
            for item, _ in touched.values():
                if item._fHasCommitted:
                    item.committed()
            for item in deleted:
                if item._fHasDeleted:
                    item.deleted()
        finally:
            for item in deleted:
                item.__dict__["_fstore"] = None
            self._rejecting = False
            if changed and self._commitObservers:
                self._notifyObservers()

    def _notifyObservers(self) -> None:
        for observer in list(self._commitObservers):
            try:
                observer()
            except Exception:
                self.log.failure("Commit observer {observer!r} failed", observer=observer)

    def addCommitObserver(self, observer: Callable[[], object]) -> Callable[[], None]:
        """
        Call C{observer()} after every successful commit of this store that
        wrote something (each L{transact} and each write made outside one, and
        the small commit that retires the storeIDs of a rolled-back
        transaction that created items).  A transaction that only read (no
        row inserted, updated or deleted, no schema statement) changed
        nothing, and its commit is not observed, so an observer that ships
        changes (L{fractal.durable}) is not woken by reads.  Its exceptions
        are logged, never raised into the committing code.

        @return: a callable that removes the observer.
        """
        self._commitObservers.append(observer)

        def remove() -> None:
            try:
                self._commitObservers.remove(observer)
            except ValueError:
                pass

        return remove

    # ------------------------------------------------------------------
    # Item persistence (called by items and attributes)

    def _touch(self, item: Any, storeID: int) -> None:
        if storeID not in self._touched:
            d = item.__dict__
            self._touched[storeID] = (item, {k: d[k] for k in item._fHidden})

    def _writeAttribute(self, item: Any, attr: Any, dbval: Any) -> None:
        if not self._txn:
            if self._rejecting:
                raise ChangeRejected("%r was changed in a commit hook" % (item,))
            self.transact(self._writeAttribute, item, attr, dbval)
            return
        d = item.__dict__
        storeID = d["_fstoreID"]
        if storeID not in self._touched:
            self._touched[storeID] = (item, {k: d[k] for k in item._fHidden})
        pendingFrom = self._pendingFrom
        if pendingFrom is None or storeID < pendingFrom:
            # Written by _flush, with the item's other changes.
            changed = self._dirty.get(storeID)
            if changed is None:
                self._dirty[storeID] = (item, {attr.hidden: attr})
                self._unflushed = True
            else:
                changed[1][attr.hidden] = attr
        d[attr.hidden] = dbval

    def _resolveLate(self, item: Any) -> None:
        d = item.__dict__
        for attr in item._fLate:
            value = d[attr.hidden]
            if value is not None and not isinstance(value, (int, str)):
                d[attr.hidden] = attr.infilter(value, item, self)

    def _insertItem(self, item: Any) -> None:
        if not self._txn:
            if self._rejecting:
                raise ChangeRejected("%r was created in a commit hook" % (item,))
            self.transact(self._insertItem, item)
            return
        cls = type(item)
        typeID = self._typeIDs.get(cls._fKey)
        if typeID is None:
            typeID = self._createTable(cls)
        if cls._fLate:
            self._resolveLate(item)
        d = item.__dict__
        storeID = self._nextID
        if storeID is None:
            cur = self._cursor
            cur.execute(_INSERT_OBJECT, (typeID,))
            storeID = cur.lastrowid
            assert storeID is not None
            cur.execute(cls._fInsertSQL, (storeID, *map(d.__getitem__, cls._fHidden)))
        else:
            if self._pendingFrom is None:
                self._pendingFrom = storeID
            self._pending.append((typeID, item))
            self._unflushed = True
        self._nextID = storeID + 1
        d["_fstore"] = self
        d["_fstoreID"] = storeID
        self._allocated = storeID
        self._touched[storeID] = (item, None)
        if not cls.__legacy__:
            cache = self._cache
            cache[storeID] = weakref.ref(item)
            if len(cache) > self._sweepAt:
                self._sweep()
        if cls._fHasActivate:
            item.activate()
        if cls._fHasStored:
            item.stored()

    def _remember(self, storeID: int, item: Any) -> None:
        cache = self._cache
        cache[storeID] = weakref.ref(item)
        if len(cache) > self._sweepAt:
            self._sweep()

    def _sweep(self) -> None:
        cache = self._cache
        for storeID in [k for k, ref in cache.items() if ref() is None]:
            del cache[storeID]
        self._sweepAt = max(1024, 2 * len(cache))

    def _materialize(self, cls: Any, row: Any) -> Any:
        item = cls.__new__(cls)
        d = item.__dict__
        d.update(zip(cls._fLoadKeys, row))
        storeID = row[0]
        d["_fstore"] = self
        if not cls.__legacy__:
            self._remember(storeID, item)
        if cls._fHasActivate:
            item.activate()
        return item

    def _loadRows(self, cls: Any, rows: list[Any]) -> list[Any]:
        if cls.__legacy__ or cls._fHasActivate:
            return [self._cachedOrMaterialized(cls, row) for row in rows]
        cache = self._cache
        get = cache.get
        ref_ = weakref.ref
        new = cls.__new__
        keys = cls._fLoadKeys
        result: list[Any] = []
        append = result.append
        for row in rows:
            storeID = row[0]
            ref = get(storeID)
            if ref is not None:
                item = ref()
                if item is not None:
                    append(item)
                    continue
            item = new(cls)
            d = item.__dict__
            d.update(zip(keys, row))
            d["_fstore"] = self
            cache[storeID] = ref_(item)
            append(item)
        if len(cache) > self._sweepAt:
            self._sweep()
        return result

    def _cachedOrMaterialized(self, cls: Any, row: Any) -> Any:
        ref = self._cache.get(row[0])
        item = ref() if ref is not None else None
        if item is None:
            item = self._materialize(cls, row)
        return item

    def _itemOrNone(self, storeID: int, autoUpgrade: bool = True) -> Any:
        ref = self._cache.get(storeID)
        if ref is not None:
            item = ref()
            if item is not None:
                return item
        return self._load(storeID, autoUpgrade)

    def _load(self, storeID: int, autoUpgrade: bool) -> Any:
        if self._unflushed:
            self._flush()
        cur = self._cursor
        row = cur.execute(_TYPE_OF, (storeID,)).fetchone()
        if row is None or row[0] == -1:
            return None
        cls = self._classForTypeID(row[0])
        data = cur.execute(cls._fSelectByIDSQL, (storeID,)).fetchone()  # type: ignore[attr-defined]
        if data is None:
            return None
        item = self._materialize(cls, data)
        if cls.__legacy__ and autoUpgrade:
            return self._upgradeItem(item)
        return item

    def getItemByID(self, storeID: int, default: Any = _NOTHING, autoUpgrade: bool = True) -> Any:
        """
        The item with C{storeID} (the store itself for -1).  While any
        strong reference to an item exists, this returns that same object.

        @raise TypeError: if C{storeID} is not an int.
        @raise ItemNotFound: if there is no such item and no C{default}
            (also for an int no SQLite row can have, beyond 64-bit signed
            integers).
        """
        if not isinstance(storeID, int):
            raise TypeError("storeID must be an int, not %s" % (type(storeID).__name__,))
        if not _MIN_STORE_ID <= storeID <= _MAX_STORE_ID:
            if default is _NOTHING:
                raise ItemNotFound(storeID)
            return default
        ref = self._cache.get(storeID)
        if ref is not None:
            item = ref()
            if item is not None:
                return item
        if storeID == STORE_SELF_ID:
            return self
        item = self._load(storeID, autoUpgrade)
        if item is None:
            if default is _NOTHING:
                raise ItemNotFound(storeID)
            return default
        return item

    # ------------------------------------------------------------------
    # Deletion

    def _deleteItem(self, item: Any) -> None:
        if not self._txn:
            if self._rejecting:
                raise ChangeRejected("%r was deleted in a commit hook" % (item,))
            self.transact(self._deleteItem, item)
            return
        d = item.__dict__
        if d.get("_fdeleting"):
            return
        self._deleteIDs(type(item), [d["_fstoreID"]], {d["_fstoreID"]: item})

    def _referrersOf(self, cls: Any) -> tuple[list[Any], list[Any], list[Any]]:
        if self._referrersGeneration != _generation[0]:
            self._referrers = {}
            self._referrersGeneration = _generation[0]
        found = self._referrers.get(cls)
        if found is None:
            disallow: list[Any] = []
            cascade: list[Any] = []
            nullify: list[Any] = []
            for attr in _allReferences:
                if not attr.appliesTo(cls) or not self._hasTable(attr.type):
                    continue
                {
                    _attributes.reference.DISALLOW: disallow,
                    _attributes.reference.CASCADE: cascade,
                    _attributes.reference.NULLIFY: nullify,
                }[attr.whenDeleted].append(attr)
            found = self._referrers[cls] = (disallow, cascade, nullify)
        return found

    def _referringIDs(self, attr: Any, storeIDs: list[int], limit: bool = False) -> list[int]:
        result: list[int] = []
        for chunk in _chunks(storeIDs):
            sql = "SELECT oid FROM %s WHERE %s IN (%s)%s" % (
                attr.type._fTable,
                attr.columnName,
                _marks(len(chunk)),
                " LIMIT 1" if limit else "",
            )
            result.extend(row[0] for row in self._cursor.execute(sql, chunk))
        return result

    def _deleteIDs(self, cls: Any, storeIDs: list[int], items: dict[int, Any] | None = None) -> None:
        storeIDs = [s for s in storeIDs if s not in self._deletingIDs]
        if not storeIDs:
            return
        if self._unflushed:
            self._flush()
        cur = self._cursor
        disallow, cascade, nullify = self._referrersOf(cls)
        targets = set(storeIDs)
        for attr in disallow:
            blockers = [
                s
                for s in self._referringIDs(attr, storeIDs)
                if s not in self._deletingIDs and not (attr.type is cls and s in targets)
            ]
            if blockers:
                raise DeletionDisallowed(
                    "%s of item %d still refers to an item being deleted" % (attr, blockers[0])
                )
        self._deletingIDs.update(storeIDs)
        cache = self._cache
        doomed = []
        for storeID in storeIDs:
            item = items.get(storeID) if items else None
            if item is None:
                ref = cache.get(storeID)
                item = ref() if ref is not None else None
            if item is not None:
                self._touch(item, storeID)
                item.__dict__["_fdeleting"] = True
                doomed.append(item)
        for attr in cascade:
            referrers = [s for s in self._referringIDs(attr, storeIDs) if s not in self._deletingIDs]
            if not referrers:
                continue
            if attr.type._fOverridesDelete:
                for s in referrers:
                    referrer = self._itemOrNone(s)
                    if referrer is not None and not referrer.__dict__.get("_fdeleting"):
                        referrer.deleteFromStore()
            else:
                self._deleteIDs(attr.type, referrers)
        for attr in nullify:
            for chunk in _chunks(storeIDs):
                cur.execute(
                    "UPDATE %s SET %s = NULL WHERE %s IN (%s)"
                    % (attr.type._fTable, attr.columnName, attr.columnName, _marks(len(chunk))),
                    chunk,
                )
        for chunk in _chunks(storeIDs):
            marks = _marks(len(chunk))
            cur.execute("DELETE FROM %s WHERE oid IN (%s)" % (cls._fTable, marks), chunk)
            cur.execute('UPDATE "axiom_objects" SET "type_id" = -1 WHERE "oid" IN (%s)' % (marks,), chunk)
        for item in doomed:
            storeID = item.__dict__["_fstoreID"]
            if cache.get(storeID) is not None:
                del cache[storeID]
            self._deletedItems.append(item)

    # ------------------------------------------------------------------
    # Upgrades

    def _upgradeItem(self, item: Any) -> Any:
        if not self._txn:
            return self.transact(self._upgradeItem, item)
        from fractal.store.upgrade import _upgradeRegistry

        typeName = item.typeName
        current = _typeNameToMostRecentClass.get(typeName)
        if current is None:
            raise UnknownItemType("No current class for %s" % (typeName,))
        storeID = item.storeID
        if storeID in self._upgrading:
            raise UpgraderRecursion("%r was asked for while it is being upgraded" % (item,))
        self._upgrading.add(storeID)
        try:
            while item is not None and item.schemaVersion < current.schemaVersion:
                entry = _upgradeRegistry.get((typeName, item.schemaVersion))
                if entry is None:
                    raise NoUpgradePathAvailable(
                        "No upgrader for %s from version %d" % (typeName, item.schemaVersion)
                    )
                upgrader, newVersion = entry
                try:
                    item = upgrader(item)
                except (UpgraderRecursion, NoUpgradePathAvailable, ItemUpgradeError):
                    raise
                except Exception:
                    raise ItemUpgradeError(
                        Failure(), storeID, type(item), current  # type: ignore[no-untyped-call]
                    )
        finally:
            self._upgrading.discard(storeID)
        return item

    def _upgradeVersion(
        self, old: Any, typeName: str, oldVersion: int, newVersion: int, values: dict[str, Any]
    ) -> Any:
        if old.typeName != typeName or old.schemaVersion != oldVersion:
            raise ValueError(
                "upgradeVersion(%r, %d, %d) called on %s version %d"
                % (typeName, oldVersion, newVersion, old.typeName, old.schemaVersion)
            )
        current = _typeNameToMostRecentClass[typeName]
        if newVersion == current.schemaVersion:
            newCls: Any = current
        else:
            newCls = self._legacyClass(typeName, newVersion)
            if newCls is None:
                raise NoUpgradePathAvailable(
                    "Type schema required for %s version %d" % (typeName, newVersion)
                )
        storeID = old.storeID
        new = newCls.__new__(newCls)
        d = new.__dict__
        d.update(newCls._fDefaults)
        for attr in newCls._fFactories:
            d[attr.hidden] = attr._defaultDB()
        d["_fstore"] = None
        d["_fstoreID"] = None
        for name, value in values.items():
            setattr(new, name, value)
        for attr in newCls._fRequired:
            if d[attr.hidden] is None:
                raise TypeError("attribute [%s] must not be None" % (attr,))
        typeID = self._typeIDs.get((typeName, newVersion))
        if typeID is None:
            typeID = self._createTable(newCls)
        if newCls._fLate:
            self._resolveLate(new)
        if self._unflushed:
            self._flush()
        cur = self._cursor
        cur.execute(newCls._fInsertSQL, (storeID, *map(d.__getitem__, newCls._fHidden)))
        cur.execute('UPDATE "axiom_objects" SET "type_id" = ? WHERE "oid" = ?', (typeID, storeID))
        cur.execute("DELETE FROM %s WHERE oid = ?" % (type(old)._fTable,), (storeID,))
        d["_fstore"] = self
        d["_fstoreID"] = storeID
        if not newCls.__legacy__:
            self._remember(storeID, new)
        if newCls._fHasActivate:
            new.activate()
        return new

    def whenFullyUpgraded(self) -> Deferred[None]:
        """
        A Deferred that fires when no item needs upgrading.  Items are
        upgraded when the store opens, so it has already fired.
        """
        return succeed(None)

    # ------------------------------------------------------------------
    # Queries

    def query(
        self,
        tableClass: Any,
        comparison: Any = None,
        limit: int | None = None,
        offset: int | None = None,
        sort: Any = None,
    ) -> Any:
        """
        A lazy query for items of C{tableClass} (or tuples, for a tuple of
        classes) matching C{comparison}.  Values in the comparison are
        checked and converted now; each iteration runs the SQL again.
        """
        if isinstance(tableClass, tuple):
            return MultipleItemQuery(self, tableClass, comparison, limit, offset, sort)
        return ItemQuery(self, tableClass, comparison, limit, offset, sort)

    def count(self, tableClass: Any, comparison: Any = None) -> int:
        """
        The number of items of C{tableClass} matching C{comparison}.
        """
        result: int = self.query(tableClass, comparison).count()
        return result

    def sum(self, summableAttribute: Any, comparison: Any = None) -> Any:
        """
        The sum of an attribute over the items matching C{comparison}.
        """
        return (
            self.query(summableAttribute.type, comparison)
            .getColumn(summableAttribute.attrname)
            .sum()
        )

    def findUnique(self, tableClass: Any, comparison: Any = None, default: Any = _NOTHING) -> Any:
        """
        The one item matching C{comparison}.

        @raise ItemNotFound: if none matches and no C{default} is given.
        @raise DuplicateUniqueItem: if more than one matches.
        """
        results = list(self.query(tableClass, comparison, limit=2))
        if not results:
            if default is _NOTHING:
                raise ItemNotFound(comparison)
            return default
        if len(results) > 1:
            raise DuplicateUniqueItem(comparison, results)
        return results[0]

    def findFirst(
        self,
        tableClass: Any,
        comparison: Any = None,
        offset: int | None = None,
        sort: Any = None,
        default: Any = None,
    ) -> Any:
        """
        The first item matching C{comparison} (in C{sort} order), or
        C{default}.
        """
        for item in self.query(tableClass, comparison, limit=1, offset=offset, sort=sort):
            return item
        return default

    def findOrCreate(self, userItemClass: Any, __ifnew: Any = None, **attrs: Any) -> Any:
        """
        The first item of C{userItemClass} whose attributes equal C{attrs},
        or a new one created with them (then C{__ifnew(item)} is called).
        Runs in a transaction, so it is race free.  Note that text
        attributes compare case-insensitively for ASCII unless declared
        C{caseSensitive=True}.
        """
        return self.transact(self._findOrCreate, userItemClass, __ifnew, attrs)

    def _findOrCreate(self, cls: Any, ifNew: Any, attrs: dict[str, Any]) -> Any:
        from fractal.store.attributes import AND

        comparisons = [getattr(cls, name) == value for name, value in attrs.items()]
        if comparisons:
            found = self.findFirst(cls, AND(*comparisons))
        else:
            found = self.findFirst(cls)
        if found is not None:
            return found
        item = cls(store=self, **attrs)
        if ifNew is not None:
            ifNew(item)
        return item

    def batchInsert(self, itemType: Any, itemAttributes: list[Any], dataRows: Iterable[Any]) -> None:
        """
        Insert many items of C{itemType} without building item objects: no
        C{activate()} or C{stored()} runs and nothing is cached.  Attributes
        not listed get their default (C{defaultFactory} is honoured).

        @param itemAttributes: the attributes (C{[Cls.a, Cls.b]}) given by
            each row.
        @param dataRows: sequences of values, one per attribute.
        """
        self.transact(self._batchInsert, itemType, list(itemAttributes), dataRows)

    def _batchInsert(self, cls: Any, attrs: list[Any], rows: Iterable[Any]) -> None:
        if self._rejecting:
            raise ChangeRejected("batchInsert in a commit hook")
        typeID = self._typeIDs.get((cls.typeName, cls.schemaVersion))
        if typeID is None:
            typeID = self._createTable(cls)
        positions = {}
        for i, attr in enumerate(attrs):
            if getattr(attr, "type", None) is not cls or not hasattr(attr, "hidden"):
                raise ValueError("%r is not an attribute of %r" % (attr, cls))
            positions[attr.hidden] = (i, attr)
        if self._unflushed:
            self._flush()
        self._nextID = None
        cur = self._cursor
        for row in rows:
            values = []
            for attr in cls._fAttrs:
                where = positions.get(attr.hidden)
                if where is None:
                    dbval = attr._defaultDB()
                else:
                    value = row[where[0]]
                    dbval = None if value is None else attr.infilter(value, None, self)
                if dbval is None and not attr.allowNone:
                    raise TypeError("attribute [%s] must not be None" % (attr,))
                values.append(dbval)
            cur.execute(_INSERT_OBJECT, (typeID,))
            storeID = cur.lastrowid
            self._allocated = storeID
            cur.execute(cls._fInsertSQL, (storeID, *values))

    # ------------------------------------------------------------------
    # Raw SQL (Axiom's escape hatches)

    def querySQL(self, sql: str, args: Iterable[Any] = ()) -> list[Any]:
        """
        Run a C{SELECT} (or another reading statement) and return its rows.
        """
        self._checkOpen()
        if self._unflushed:
            self._flush()
        rows: list[Any] = self._cursor.execute(sql, tuple(args)).fetchall()
        return rows

    def executeSQL(self, sql: str, args: Iterable[Any] = ()) -> int | None:
        """
        Run a writing statement in a transaction (the current one, if any)
        and return the last inserted rowid.  Item objects are not told about
        what it changes.
        """
        return self.transact(self._executeSQL, sql, tuple(args))

    def _executeSQL(self, sql: str, args: tuple[Any, ...]) -> int | None:
        if self._rejecting:
            raise ChangeRejected("executeSQL in a commit hook")
        if self._unflushed:
            self._flush()
        self._nextID = None
        self._schemaWritten = True
        self._cursor.execute(sql, args)
        result: int | None = self._cursor.lastrowid
        return result

    createSQL = executeSQL

    # ------------------------------------------------------------------
    # Powerups

    def _powerupTarget(self) -> tuple[Store | None, int | None]:
        return self, STORE_SELF_ID

    def _inMemoryPowerups(self) -> dict[Any, Any]:
        return self._inMemory

    def _cachedAggregate(self) -> MultiService | None:
        return self._aggregate

    def _serviceAggregate(self) -> MultiService:
        if self._aggregate is None:
            aggregate = MultiService()  # type: ignore[no-untyped-call]
            if self.parent is None:
                scheduler = IScheduler(self, None)
                if scheduler is not None and IService.providedBy(scheduler):
                    aggregate.addService(scheduler)  # type: ignore[no-untyped-call]
            for service in self.powerupsFor(IService):
                aggregate.addService(service)  # type: ignore[no-untyped-call]
            self._aggregate = aggregate
        return self._aggregate

    def __conform__(self, interface: Any) -> Any:
        """
        Adapt the store through its powerups; see L{Empowered.__conform__}.
        With no C{IScheduler} powerup, C{IScheduler(store)} gives the
        store's scheduler from L{fractal.store.scheduler}.
        """
        if interface is IService or interface is IServiceCollection:
            return self._serviceAggregate()
        for powerup in self.powerupsFor(interface):
            return powerup
        if interface is IScheduler:
            try:
                from fractal.store.scheduler import _schedulerFor
            except ImportError:
                return None
            return _schedulerFor(self)
        return None

    def _storedPowerups(self, storeID: int, names: tuple[str, ...]) -> list[Any]:
        if not self._hasTable(_PowerupConnector):
            return []
        sql = self._powerupSQL.get(len(names))
        if sql is None:
            sql = self._powerupSQL[len(names)] = (
                "SELECT [powerup] FROM %s WHERE [item] = ? AND [interface] IN (%s) "
                "ORDER BY [priority] DESC, oid ASC" % (_PowerupConnector._fTable, _marks(len(names)))
            )
        if self._unflushed:
            self._flush()
        rows = self._cursor.execute(sql, (storeID, *names)).fetchall()
        result = []
        for (powerupID,) in rows:
            if powerupID is None:
                continue
            powerup = self._itemOrNone(powerupID)
            if powerup is not None:
                result.append(powerup)
        return result

    def _powerupInterfaceNames(self, storeID: int, powerupID: int) -> list[str]:
        if not self._hasTable(_PowerupConnector):
            return []
        if self._unflushed:
            self._flush()
        rows = self._cursor.execute(
            "SELECT [interface] FROM %s WHERE [item] = ? AND [powerup] = ? ORDER BY oid"
            % (_PowerupConnector._fTable,),
            (storeID, powerupID),
        ).fetchall()
        return [row[0] for row in rows]

    # ------------------------------------------------------------------
    # Files

    def _requireFiles(self) -> FilePath[str]:
        if self.filesdir is None:
            raise RuntimeError("%r is in memory and has no files directory" % (self,))
        return self.filesdir

    @staticmethod
    def _descend(base: FilePath[str], segments: tuple[str, ...]) -> FilePath[str]:
        if not segments:
            raise ValueError("at least one path segment is required")
        result = base
        for segment in segments:
            if not isinstance(segment, str) or not segment or segment in (".", ".."):
                raise ValueError("invalid path segment %r" % (segment,))
            result = result.child(segment)
        return result

    def newFilePath(self, *segments: str) -> FilePath[str]:
        """
        A path under the store's files directory.  Segments are checked: no
        separators, no C{..}.

        @raise RuntimeError: for an in-memory store without a files
            directory.
        """
        return self._descend(self._requireFiles(), segments)

    def newTemporaryFilePath(self, *segments: str) -> FilePath[str]:
        """
        A path under the store's C{temp/} directory.
        """
        self._requireFiles()
        assert self._tempdir is not None
        return self._descend(self._tempdir, segments)

    def newDirectory(self, *segments: str) -> FilePath[str]:
        """
        A directory under the store's files directory (created if missing).
        """
        result = self.newFilePath(*segments)
        result.makedirs(ignoreExistingDirectory=True)
        return result

    def newFile(self, *segments: str) -> AtomicFile:
        """
        A new file that appears at C{files/<segments>} only when its
        C{close()} succeeds.
        """
        final = self.newFilePath(*segments)
        assert self._tempdir is not None
        self._tempdir.makedirs(ignoreExistingDirectory=True)
        fd, name = tempfile.mkstemp(dir=self._tempdir.path, prefix="newfile-")
        return AtomicFile(os.fdopen(fd, "wb"), FilePath(name), final)


class _RawAttribute(_attributes.SQLAttribute):
    """
    An attribute of a legacy type read from the database schema whose Python
    type is unknown: the database value as is.
    """

    def __init__(self, sqltype: str) -> None:
        _attributes.SQLAttribute.__init__(self)
        self.sqltype = sqltype

    def infilter(self, pyval: Any, oself: Any, store: Any) -> Any:
        return pyval


_indexCache: weakref.WeakKeyDictionary[type, list[tuple[str, str]]] = weakref.WeakKeyDictionary()
_schemaCache: weakref.WeakKeyDictionary[type, list[tuple[str, str]]] = weakref.WeakKeyDictionary()


def _indexesFor(cls: type[Item]) -> list[tuple[str, str]]:
    """
    The names and C{CREATE INDEX} statements of C{cls}'s indexes, computed
    once per class (a class's schema never changes).
    """
    found = _indexCache.get(cls)
    if found is None:
        found = _indexCache[cls] = _computeIndexes(cls)
    return found


def _columnsOf(cls: type[Item]) -> list[tuple[str, str]]:
    """
    The names and SQL types of C{cls}'s columns, computed once per class.
    """
    found = _schemaCache.get(cls)
    if found is None:
        found = _schemaCache[cls] = [(name, attr.sqltype) for name, attr in cls._fSchema]
    return found


def _computeIndexes(cls: type[Item]) -> list[tuple[str, str]]:
    specs: list[tuple[Any, ...]] = []
    for _, attr in cls._fSchema:
        if attr.indexed:
            specs.append((attr,))
        for compound in attr.compoundIndexes:
            if compound not in specs:
                specs.append(compound)
    result = []
    seen = set()
    for spec in specs:
        name = "axiomidx_%s_v%d_%s" % (
            cls.typeName,
            cls.schemaVersion,
            "_".join(a.attrname for a in spec),
        )
        if name in seen:
            continue
        seen.add(name)
        result.append(
            (name, "CREATE INDEX %s ON %s(%s)" % (name, cls._fTable, ", ".join(a.columnName for a in spec)))
        )
    return result


@implementer(IAtomicFile)
class AtomicFile:
    """
    A file written under the store's C{temp/} directory and renamed to its
    final path on L{close}.
    """

    def __init__(self, fileObject: Any, tempPath: FilePath[str], finalPath: FilePath[str]) -> None:
        self._file = fileObject
        self.tempPath = tempPath
        self.finalPath = finalPath
        self.closed = False

    def write(self, data: bytes) -> None:
        """
        Append C{data}.
        """
        self._file.write(data)

    def close(self) -> Deferred[FilePath[str]]:
        """
        Flush the file and move it to its final path.

        @return: a Deferred firing with the final L{FilePath}.
        """
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.closed = True
        self.finalPath.parent().makedirs(ignoreExistingDirectory=True)
        self.tempPath.moveTo(self.finalPath)
        return succeed(self.finalPath)

    def abort(self) -> None:
        """
        Discard the file.
        """
        self._file.close()
        self.closed = True
        if self.tempPath.exists():
            self.tempPath.remove()

# -*- test-case-name: tests.test_durable_shipper -*-
"""
The shipper: ships every dirty user store's changed pages to a durable
backend, and restores a store from its chain.

Each commit marks its store dirty.  Every ship interval, and at once when a
caller waits for durability (L{Shipper.whenDurable}), a ship cycle builds the
next record of every dirty store: normally from the pages its write-ahead
log committed since the last record (L{fractal.durable._wal}), on the
reactor thread when they are a few frames and in a worker thread otherwise;
and in a worker thread, when the log cannot tell (a store just opened, a log
restarted since) or for a snapshot, from a consistent image of the whole
store (a separate read-only connection and C{sqlite3.Connection.serialize}
inside one read transaction).  The pages read are hashed and compared with
the digests of the image last shipped, and the record carries those that
changed; the cycle's records are stored as one batch
(L{IDurableBackend.appendMany}).
When the deltas since the last snapshot outweigh the snapshot, or the chain
grows past C{maxChain}, the next record is a new snapshot and the older
records are pruned.

The shipper keeps, next to each store's database, a small state file
(C{durable-state}) with the key, the last shipped record and its page
digests, so that after a restart it goes on shipping deltas where it
stopped; when that file does not match the backend's newest record, it ships
a snapshot instead, which is always correct.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from typing import Any, Callable, Iterator, Literal, Sequence, overload
from urllib.parse import quote

from attrs import frozen
from twisted.application.service import IService, Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredSemaphore,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from fractal.durable._images import ImageReader
from fractal.durable._threads import RunInThread, reactorThreads
from fractal.durable._wal import WalChanges, WalFiles, WalPosition
from fractal.durable.interfaces import (
    AnotherWriter,
    IDurableBackend,
    IShipper,
    RecordInfo,
    SequenceConflict,
    ShippingLag,
    StaleEpoch,
    StoreLag,
)
from fractal.durable.record import (
    FORMAT_VERSION,
    FORMAT_VERSIONS,
    Delta,
    diffImage,
    encodeRecord,
    groupDigests,
    imageDigest,
    pageSizeOf,
    regroup,
)
from fractal.durable.restore import rebuildFromBackend
from fractal.keys import storeNameForKey, validateKey

__all__ = ["Shipper", "readImage", "STATE_FILE"]

STATE_FILE = "durable-state"
"""
The name of the shipper's state file in a store's directory.
"""

_STATE_VERSION = 1
_DIGEST_SIZE = 16
_MAX_BACKOFF = 30.0
_GROUP_MAX = 32
_MAX_CYCLES = 2
_SENT_KEPT = 8
_INLINE_FRAMES = 32
# A store's write-ahead log holding at least this many frames, all shipped,
# is restarted by the shipper (L{Shipper._restartLog}): three quarters of
# SQLite's own automatic checkpoint (at a thousand pages), so that a store
# shipped every 250 pages written or more often never has its log restarted
# by SQLite, at a position the shipper cannot know.
_RESTART_FRAMES = 768
# At most this many logs are restarted in one reactor turn (each restart
# writes and syncs its store's database, a millisecond or two), so that
# stores written alike, which come due together, do not hold up every call
# of the node at once.
_RESTARTS_PER_TURN = 4


def readImage(database: FilePath[str]) -> bytes | None:
    """
    A consistent image of an SQLite database, read through a new read-only
    connection inside one read transaction, so that commits by the store's
    own connection meanwhile are not seen half-done.  Blocking.

    @return: the image, or L{None} if the database file does not exist.
    """
    if not database.isfile():
        return None
    connection = sqlite3.connect(
        f"file:{quote(database.path)}?mode=ro", uri=True, timeout=30, check_same_thread=False
    )
    try:
        connection.execute("BEGIN")
        connection.execute("SELECT count(*) FROM sqlite_master").fetchall()
        image = connection.serialize()
        connection.rollback()
    finally:
        connection.close()
    return image


@frozen
class _Built:
    """
    A record built from a store's image, not yet stored.
    """

    info: RecordInfo
    data: bytes
    digests: Sequence[bytes]
    groups: tuple[bytes, ...]
    pageSize: int
    takenAt: float
    wal: WalPosition | None


class _PatchedDigests(Sequence[bytes]):
    """
    The page digests of a store's image after a delta: a view of those
    before it (the shipper's list for the store, C{base}) with the digests
    the delta changed written over them, so that building a delta costs
    what it changed rather than what the store holds.  L{regroup} reads it
    a group at a time, and once the delta is stored the shipper's list is
    brought up to date in place (L{applyTo}).

    @ivar base: the digests before the delta.
    @ivar changed: the new digest of each page the delta changed, by
        0-based page index; every page past the end of C{base} is one.
    """

    def __init__(self, base: list[bytes], changed: dict[int, bytes], count: int) -> None:
        self.base = base
        self.changed = changed
        self._count = count

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._count)
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            chunk = self.base[start : max(start, min(stop, len(self.base)))]
            chunk.extend([b""] * (stop - start - len(chunk)))
            for i, digest in self.changed.items():
                if start <= i < stop:
                    chunk[i - start] = digest
            return chunk
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(index)
        found = self.changed.get(index)
        return self.base[index] if found is None else found

    def __iter__(self) -> Iterator[bytes]:
        return iter(self[:])

    def applyTo(self, digests: list[bytes]) -> None:
        """
        Bring C{digests}, the digests this view was made from, up to date.
        """
        del digests[self._count :]
        digests.extend([b""] * (self._count - len(digests)))
        for i, digest in self.changed.items():
            digests[i] = digest


class _StoreState:
    """
    What the shipper knows of one store.  Used only on the reactor thread,
    except that a ship's worker reads it while that ship is the only one for
    the store.
    """

    def __init__(self, key: str, dbdir: FilePath[str]) -> None:
        self.key = key
        self.name = storeNameForKey(key)
        self.dbdir = dbdir
        self.opens = 0
        self.generation = 0
        self.shippedGeneration = 0
        self.dirtySince: float | None = None
        self.loaded = False
        # The page digests of the image of the newest record: changed in
        # place when a delta of the store is stored (L{_PatchedDigests}).
        self.digests: list[bytes] | None = None
        # The group digests of C{digests} (L{groupDigests}), when known.
        self.groups: tuple[bytes, ...] | None = None
        self.pageSize = 0
        self.seq = 0
        self.headDigest = b""
        self.chainLength = 0
        self.chainBytes = 0
        self.snapshotBytes = 0
        self.pendingBytes = 0
        self.failures = 0
        self.retryAt = 0.0
        self.fenced: StaleEpoch | None = None
        self.savedSeq = -1
        self.savedAt = -1e18
        self.takenAt = 0.0
        self.shipping = False
        self.due = False
        self.afterShip: list[Callable[[], object]] = []
        self.waiters: list[tuple[int, Deferred[None]]] = []
        # Where the store's write-ahead log stood when the image of the
        # newest record was taken (at or before it), while that record is
        # known to have been built from this open of the store.
        self.wal: WalPosition | None = None
        # The open store, whose log the shipper restarts (L{Shipper._restartLog}).
        self.store: Any = None
        self.probing: list[Deferred[None]] | None = None
        # Found unchanged since its last ship by its state file's stamp when
        # opened (L{_closedUnchanged}), and not loaded since.
        self.stamped = False
        self.stamp: list[int] | None = None
        # The digests of the records sent since the last one known stored:
        # one of them may be stored though its answer was lost.
        self.sent: list[bytes] = []

    @property
    def dirty(self) -> bool:
        return self.generation != self.shippedGeneration

    def markDirty(self, now: float) -> None:
        if not self.dirty:
            self.dirtySince = now
        self.generation += 1


_STATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "key": str,
    "seq": int,
    "head": str,
    "epoch": int,
    "pageSize": int,
    "chainLength": int,
    "chainBytes": int,
    "snapshotBytes": int,
    "takenAt": (int, float),
}


def _readState(dbdir: FilePath[str]) -> dict[str, Any] | None:
    """
    The state file of the store at C{dbdir}, or L{None} if it is missing or
    not one this version wrote (a damaged one is ignored: it costs a
    snapshot, nothing else).
    """
    try:
        content = dbdir.child(STATE_FILE).getContent()
        line, _, rest = content.partition(b"\n")
        state = json.loads(line)
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
        return None
    for name, kind in _STATE_FIELDS.items():
        if not isinstance(state.get(name), kind) or isinstance(state.get(name), bool):
            return None
    if len(rest) % _DIGEST_SIZE:
        return None
    state["digests"] = tuple(
        rest[i : i + _DIGEST_SIZE] for i in range(0, len(rest), _DIGEST_SIZE)
    )
    return state


def _unchangedSince(
    saved: dict[str, Any] | None, readImage: Callable[[], bytes | None]
) -> bool:
    """
    Whether a store holds exactly the image last shipped, as its state file
    C{saved} describes it: the same page size and the same digest for every
    page.  Blocking.

    @param readImage: reads a consistent image of the store's database.
    @return: C{False} if the store changed since its last ship, was never
        shipped, or cannot be read (when in doubt, it is shipped again).
    """
    if saved is None or saved["seq"] == 0 or not saved["digests"]:
        return False
    try:
        image = readImage()
        if image is None:
            return False
        pageSize = pageSizeOf(image)
    except (OSError, ValueError, sqlite3.Error):
        return False
    digests = saved["digests"]
    if pageSize != saved["pageSize"] or len(image) != len(digests) * pageSize:
        return False
    pages, _ = diffImage(image, pageSize, digests)
    return not pages


def _writeState(dbdir: FilePath[str], state: dict[str, Any], digests: tuple[bytes, ...]) -> None:
    # One write and one rename (C{FilePath.setContent} would rename twice).
    temporary = dbdir.child(STATE_FILE + ".new").path
    with open(temporary, "wb") as f:
        f.write(json.dumps(dict(state, version=_STATE_VERSION)).encode("utf-8") + b"\n")
        f.write(b"".join(digests))
    os.replace(temporary, dbdir.child(STATE_FILE).path)


def _fileStamp(dbdir: FilePath[str]) -> list[int] | None:
    """
    The size, modification time (ns) and inode of the database file of the
    store at C{dbdir}, or L{None} if it cannot be looked at.  Any write to
    the file (a checkpoint) changes its time; a restore or a store set aside
    and replaced changes its inode.
    """
    try:
        status = os.stat(os.path.join(dbdir.path, "db.sqlite"))
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns, status.st_ino]


def _closedUnchanged(dbdir: FilePath[str], saved: dict[str, Any] | None, key: str) -> bool:
    """
    Whether the store of C{key} at C{dbdir} holds exactly the image its state
    file C{saved} names, known without reading it: the file says that when
    the store was last closed, fully shipped to that record, its database
    file had the stamp (L{_fileStamp}) it has now, and its write-ahead log
    holds nothing (every commit goes through the log first; only a
    checkpoint writes the database file).  A few system calls, no read of
    the store.

    The shipper writes the stamp only after closing a store it has shipped
    to its last commit, and takes it away before closing one that is not,
    so a commit of this node is never hidden by it; a write by another
    process lands at a later modification time (filesystems whose
    timestamps are coarser than such a write's distance from the stamp
    could hide it; nodes own their data directories).

    @return: C{False} when in doubt: the store is then compared page by page.
    """
    if saved is None or saved.get("key") != key or saved["seq"] == 0:
        return False
    stamp = saved.get("closed")
    if not isinstance(stamp, list) or len(stamp) != 3 or stamp != _fileStamp(dbdir):
        return False
    try:
        return os.stat(os.path.join(dbdir.path, "db.sqlite-wal")).st_size == 0
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _stampState(dbdir: FilePath[str], seq: int | None, key: str) -> None:
    """
    Add to the state file of the store at C{dbdir}, just closed with exactly
    the image of record C{seq} (L{None}: whichever record the file names,
    when the store was found unchanged at open and not written since), the
    database file's stamp (L{_closedUnchanged}); nothing if the file is not
    that record's or the stamp is there already.  Blocking.
    """
    saved = _readState(dbdir)
    if saved is None or saved["key"] != key or saved["seq"] == 0:
        return
    if seq is not None and saved["seq"] != seq:
        return
    stamp = _fileStamp(dbdir)
    if stamp is None or saved.get("closed") == stamp:
        return
    digests = saved.pop("digests")
    saved["closed"] = stamp
    _writeState(dbdir, saved, digests)


def _unstampState(dbdir: FilePath[str]) -> None:
    """
    Take the stamp (L{_closedUnchanged}) out of the state file of the store
    at C{dbdir}, if it has one: the store is closing with commits not
    shipped, and its close writes them into the database file.  Blocking.
    """
    saved = _readState(dbdir)
    if saved is None or "closed" not in saved:
        return
    digests = saved.pop("digests")
    del saved["closed"]
    _writeState(dbdir, saved, digests)


@implementer(IShipper, IService)
class Shipper(Service):
    """
    Ships dirty stores to a L{IDurableBackend} and restores stores from it.

    @ivar backend: where the records go.
    @ivar interval: seconds between ship cycles.
    @ivar recordFormat: the record format version it writes.
    """

    log = Logger()

    def __init__(
        self,
        backend: IDurableBackend,
        clock: IReactorTime,
        runInThread: RunInThread | None = None,
        interval: float = 1.0,
        epochForKey: Callable[[str], int] | None = None,
        storesDirectory: FilePath[str] | None = None,
        maxChain: int = 1024,
        compactBytes: int = 256 * 1024,
        concurrency: int = 64,
        buildConcurrency: int = 2,
        lagWarning: float = 10.0,
        saveInterval: float = 10.0,
        recordFormat: int = FORMAT_VERSION,
    ) -> None:
        """
        @param backend: the durable backend.
        @param clock: the reactor's clock, for the interval and the lag.
        @param runInThread: runs the blocking work (reading images, diffing,
            compressing, restoring); the reactor's thread pool by default.
        @param interval: seconds between ship cycles.
        @param epochForKey: the epoch at which this node owns a key's slot;
            always 1 by default (a lone node).
        @param storesDirectory: the pool's directory of stores
            (C{DATA/stores}); when given, starting the service looks there
            for stores changed since they were last shipped (after a crash)
            and ships them.
        @param compactBytes: the deltas since a snapshot may weigh this
            many bytes, or as much as the snapshot if that is more, before
            the next record is a new snapshot: fewer snapshots of small
            stores (each costs compressing the whole store) against a longer
            chain to store and to restore.
        @param maxChain: the most deltas after a snapshot before the next
            record is a new snapshot.
        @param concurrency: how many stores are shipped at the same time
            (their records waiting for the backend together, so a backend
            can commit them as a group).
        @param buildConcurrency: how many worker threads read and diff store
            images at the same time, each working through a group of stores
            one after the other (so many small stores cost one thread
            hand-off, not one each); this bounds the memory images take.
        @param lagWarning: log a warning when the oldest unshipped commit is
            older than this many seconds.
        @param saveInterval: the least seconds between writes of a store's
            state file while it is open (it is always written when the store
            closes and when the service stops); a state file that is behind
            costs a snapshot after a crash, nothing else.
        @param recordFormat: the record format version to write: the newest
            by default; 1 while nodes of a version that reads only version 1
            may restore this node's stores (a rolling upgrade).
        @raise ValueError: if C{recordFormat} is not a version this one
            writes.
        """
        if isinstance(recordFormat, bool) or recordFormat not in FORMAT_VERSIONS:
            raise ValueError(
                f"record format must be {' or '.join(map(str, FORMAT_VERSIONS))}, "
                f"not {recordFormat!r}"
            )
        self.recordFormat = recordFormat
        self.backend = backend
        self.interval = interval
        self._clock = clock
        self._run = runInThread if runInThread is not None else reactorThreads()
        self._epochForKey = epochForKey if epochForKey is not None else (lambda key: 1)
        self._storesDirectory = storesDirectory
        self._maxChain = maxChain
        self._compactBytes = compactBytes
        self._concurrency = max(1, concurrency)
        self._inFlight = 0
        self._cycles = 0
        self._owed = False
        self._buildConcurrency = buildConcurrency
        self._probes = DeferredSemaphore(buildConcurrency)
        self._buildsRunning = 0
        self._buildQueue: list[
            tuple[list[tuple[_StoreState, int, float]], Deferred[list[tuple[bool, Any]]]]
        ] = []
        self._lagWarning = lagWarning
        self._saveInterval = saveInterval
        self._states: dict[str, _StoreState] = {}
        self._dirty: dict[str, _StoreState] = {}
        # Probes put off until the next interval (or until waited on).
        self._probesDue: dict[str, _StoreState] = {}
        # Stores closing shipped to their last commit: the record their
        # state file must name for L{storeClosed} to stamp it (L{None}: the
        # one it names), and the stamp it has if known.
        self._closedClean: dict[str, tuple[int | None, list[int] | None]] = {}
        self._fencedObservers: list[Callable[[str, StaleEpoch], None]] = []
        self._loop: LoopingCall | None = None
        self._immediate: IDelayedCall | None = None
        self._lastLagLog = -1e9
        self._lagging = False
        self._images = ImageReader()
        # The write-ahead log files of the open stores, by database path,
        # kept open from a store's open to its close (see L{WalFiles}).
        self._walFiles: dict[str, WalFiles] = {}
        # The stores whose logs are due to be restarted, and when.
        self._restartsDue: dict[str, _StoreState] = {}
        self._restarting: IDelayedCall | None = None

    def serveNode(self, node: Any) -> None:
        """
        Ship for C{node} (a L{fractal.node.FractalNode} built with this
        shipper): take each key's epoch from the node
        (L{fractal.node.FractalNode.epochForKey}: the epoch at which the
        node's local copy was written, never another owner's), and run as
        one of the node's services, so it starts with the node and, when the
        node stops, ships what its closing stores left unshipped.
        """
        self._epochForKey = node.epochForKey
        if self.parent is None:
            self.setServiceParent(node)  # type: ignore[no-untyped-call]

    # IService

    def startService(self) -> None:
        """
        Start shipping every interval, and ship the stores that changed since
        they were last shipped.
        """
        Service.startService(self)  # type: ignore[no-untyped-call]
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: self.log.failure("Ship loop stopped", f)
        )
        if self._storesDirectory is not None:
            directory = self._storesDirectory
            self._run(lambda: list(self._findUnshipped(directory))).addCallbacks(
                self._resume, lambda f: self.log.failure("Cannot look for unshipped stores", f)
            )

    def stopService(self) -> Deferred[None]:
        """
        Stop the interval and ship every dirty store one last time.

        @return: fires when done; stores that could not be shipped are logged
            with their lag.
        """
        Service.stopService(self)  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._immediate is not None and self._immediate.active():
            self._immediate.cancel()
        self._immediate = None
        if self._restarting is not None and self._restarting.active():
            self._restarting.cancel()
        self._restarting = None
        self._restartsDue.clear()
        for state in self._states.values():
            state.retryAt = 0.0

        def report(_: object) -> None:
            lag = self.lag()
            if lag.stores:
                self.log.warn(
                    "Stopping with {stores} stores unshipped: {seconds:.1f}s, "
                    "{bytesPending} bytes behind",
                    stores=len(lag.stores),
                    seconds=lag.seconds,
                    bytesPending=lag.bytesPending,
                )

        def save(_: object) -> Deferred[None]:
            return self._saveStates(list(self._states.values()))

        def close(_: object) -> None:
            self._images.close()
            files, self._walFiles = self._walFiles, {}
            for wal in files.values():
                wal.close()

        return self.flush().addCallback(save).addCallback(report).addCallback(close)

    # IShipper

    def storeOpened(self, key: str, store: Any) -> None:
        state = self._states.get(key)
        dbdir: FilePath[str] = store.dbdir
        if state is None:
            state = self._states[key] = _StoreState(key, dbdir)
        state.opens += 1
        state.dbdir = dbdir
        state.store = store
        # A new open may start its write-ahead log afresh.
        state.wal = None
        database = os.path.join(dbdir.path, "db.sqlite")
        if database not in self._walFiles:
            self._walFiles[database] = WalFiles(database)
        self._closedClean.pop(key, None)
        reowned = False
        if state.fenced is not None and self._epochForKey(key) > state.fenced.current:
            # This node owns the slot again, at a newer epoch.
            state.fenced = None
            state.loaded = False
            state.stamped, state.stamp = False, None
            reowned = True
        if not state.loaded and not state.dirty and state.probing is None and not state.stamped:
            # Unknown whether it changed since it was last shipped (by an
            # earlier run of this node).  Its state file may say it did not,
            # from its stamp (a few system calls, here): then nothing is
            # read, and its chain is looked up when it is next shipped.
            # Otherwise it is compared with its state file in a worker
            # thread, from the next interval on (or at once when waited on),
            # not while this open's first call runs, and shipped only if it
            # changed.  A commit meanwhile marks it dirty anyway.
            stateFile = dbdir.child(STATE_FILE)
            saved = None if reowned else _readState(dbdir)
            if saved is not None and _closedUnchanged(dbdir, saved, key):
                state.stamped = True
                state.stamp = saved["closed"]
            elif stateFile.exists():
                self._probe(state, later=True)
            else:
                self._markDirty(state)
                # A new store: name its key next to it at once (a small
                # write, once per store), so that if this process dies before
                # the first ship, the next start finds the store and ships it.
                try:
                    _writeState(
                        dbdir,
                        self._stateRecord(key, RecordInfo(state.name, 0, 0, 0, 0, b""),
                                          0, 0, 0, 0, 0.0),
                        (),
                    )
                except OSError:
                    self.log.failure("Cannot write the shipping state of {store}",
                                     store=state.name)
        store.addCommitObserver(lambda: self._committed(state))

    def _probe(self, state: _StoreState, later: bool = False) -> None:
        """
        Learn where C{state}'s chain stands (L{_load}) and mark its store
        dirty unless its state file describes the backend's newest record and
        the store still holds exactly that image (the same digest for every
        page, compared in a worker thread).  Until that is known,
        L{whenDurable}, L{flush}, L{storeClosing} and ships of the store wait
        for it; a commit meanwhile marks it dirty anyway (and, if the probe
        has not started, spares it: its ship compares the pages).

        @param later: start at the next interval, or when something waits
            for it, rather than now.
        """
        state.probing = []
        if later:
            self._probesDue[state.key] = state
        else:
            self._startProbe(state)

    def _startProbe(self, state: _StoreState) -> None:
        """
        Start the probe (L{_probe}) of C{state}.
        """
        if self._probesDue.get(state.key) is state:
            del self._probesDue[state.key]
        database = state.dbdir.child("db.sqlite")

        async def look() -> None:
            await self._load(state)
            digests = None if state.digests is None else tuple(state.digests)
            saved = {"seq": state.seq, "digests": digests, "pageSize": state.pageSize}
            keep = state.opens > 0
            unchanged = digests is not None and await self._run(
                lambda: _unchangedSince(saved, lambda: self._images.read(database, keep=keep))
            )
            if not unchanged:
                self._markDirty(state)

        def failed(failure: Failure) -> None:
            self.log.failure("Cannot compare {store} with its last ship", failure,
                             store=state.name)
            self._markDirty(state)

        def done(_: object) -> None:
            waiters, state.probing = state.probing or [], None
            for d in waiters:
                d.callback(None)
            self._forgetIfDone(state)

        self._probes.run(lambda: Deferred.fromCoroutine(look())).addErrback(failed).addBoth(done)

    def _afterProbe(self, state: _StoreState) -> Deferred[None]:
        """
        Fire once it is known whether C{state}'s store changed since its last
        ship (at once, unless L{_probe} is still looking).
        """
        if self._probesDue.get(state.key) is state:
            self._startProbe(state)
        if state.probing is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        state.probing.append(d)
        return d

    def _startDueProbes(self) -> None:
        """
        Start every probe put off until this interval.
        """
        for state in list(self._probesDue.values()):
            self._startProbe(state)

    def _committed(self, state: _StoreState) -> None:
        self._states.setdefault(state.key, state)
        if self._probesDue.get(state.key) is state:
            # Changed anyway: its ship compares its pages with the last ship.
            del self._probesDue[state.key]
            waiters, state.probing = state.probing or [], None
            self._markDirty(state)
            for d in waiters:
                d.callback(None)
            return
        self._markDirty(state)

    def _markDirty(self, state: _StoreState) -> None:
        """
        Note a commit (or a possible change) of C{state}'s store; the dirty
        stores are kept apart so a cycle looks only at them.
        """
        state.markDirty(self._clock.seconds())
        self._dirty[state.key] = state

    def storeClosing(self, key: str, store: Any) -> Deferred[None]:
        state = self._states.get(key)
        if state is None:
            return succeed(None)

        def unstamp(_: object) -> Deferred[None] | None:
            # Still unshipped (the backend is down, say): the close about to
            # come writes those commits into the database file, so its state
            # file must not say the file is unchanged since a ship.
            if not state.dirty:
                return None
            dbdir = state.dbdir
            d: Deferred[None] = self._run(lambda: _unstampState(dbdir))
            return d.addErrback(
                lambda f: self.log.failure("Cannot write the shipping state of {store}", f,
                                           store=state.name)
            )

        def closed(_: object) -> None:
            state.opens = max(0, state.opens - 1)
            if not state.opens:
                self._images.discard(state.dbdir.child("db.sqlite"))
                state.wal = None
                state.store = None
                if (
                    not state.dirty
                    and state.fenced is None
                    and state.probing is None
                    and not state.shipping
                ):
                    if state.stamped:
                        self._closedClean[key] = (None, state.stamp)
                    elif (
                        state.loaded
                        and state.seq > 0
                        and state.digests is not None
                        and state.savedSeq == state.seq
                    ):
                        self._closedClean[key] = (state.seq, None)
            self._forgetIfDone(state)

        state.retryAt = 0.0
        d = self._afterProbe(state).addCallback(lambda _: self._shipAfterCurrent(state))
        d.addCallback(lambda _: self._saveStates([state]))
        d.addCallback(unstamp)
        return d.addBoth(closed)

    def storeClosed(self, key: str, store: Any) -> None:
        """
        The pool has closed C{key}'s store (after L{storeClosing}).  If it was
        shipped to its last commit, its state file gets the stamp of the
        database file as the close left it (the close checkpoints the
        write-ahead log into it), so that the next open, or the next start
        of the node, knows without reading the store that it is unchanged
        (L{_closedUnchanged}).  A few system calls, and a small write when
        the stamp changed; on the reactor thread, so that nothing else writes
        the state file meanwhile.
        """
        state = self._states.get(key)
        files = self._walFiles.pop(os.path.join(store.dbdir.path, "db.sqlite"), None)
        if files is not None:
            # No connection of this process has the database open now, so
            # closing its files drops no lock of SQLite's.
            if state is not None and state.shipping:
                state.afterShip.append(files.close)
            else:
                files.close()
        if key not in self._closedClean:
            return
        seq, stamp = self._closedClean.pop(key)
        if state is not None and (state.opens or state.dirty):
            return
        dbdir: FilePath[str] = store.dbdir
        if stamp is not None and _fileStamp(dbdir) == stamp:
            # Opened and closed without a write: its state file says so.
            return
        try:
            _stampState(dbdir, seq, key)
        except OSError:
            self.log.failure("Cannot write the shipping state of {store}",
                             store=storeNameForKey(key))

    def _forgetIfDone(self, state: _StoreState) -> None:
        """
        Drop what is known of a store that is closed and fully shipped, so
        memory stays bounded by the open and unshipped stores.
        """
        if not state.dirty and not state.opens and not state.waiters and state.probing is None:
            if self._states.get(state.key) is state:
                del self._states[state.key]
            if self._dirty.get(state.key) is state:
                del self._dirty[state.key]

    def _shipAfterCurrent(self, state: _StoreState) -> Deferred[None]:
        """
        Ship C{state} once, after the ship in progress for it (if any) has
        finished, if it is still dirty; never fails.
        """
        if state.shipping:
            d: Deferred[None] = Deferred()
            state.afterShip.append(lambda: self._shipAfterCurrent(state).chainDeferred(d))
            return d
        if not state.dirty or state.fenced is not None:
            return succeed(None)
        return self._cycle([state])

    def unshipped(self, key: str) -> bool:
        state = self._states.get(key)
        return state is not None and (
            state.dirty or state.shipping or state.probing is not None
        )

    def whenDurable(self, key: str) -> Deferred[None]:
        state = self._states.get(key)
        if state is None:
            return succeed(None)
        if state.fenced is not None:
            return fail(state.fenced)
        if state.probing is not None:
            return self._afterProbe(state).addCallback(lambda _: self.whenDurable(key))
        if not state.dirty:
            return succeed(None)
        d: Deferred[None] = Deferred()
        state.waiters.append((state.generation, d))
        self._shipSoon()
        return d

    def restore(self, key: str, destination: FilePath[str]) -> Deferred[bool]:
        validateKey(key)
        name = storeNameForKey(key)

        async def restore() -> bool:
            rebuilt = await rebuildFromBackend(self.backend, name, self._run, destination)
            if rebuilt is None:
                return False
            record = self._stateRecord(key, rebuilt.head, rebuilt.pageSize, rebuilt.chainLength,
                                       rebuilt.chainBytes, rebuilt.snapshotBytes, rebuilt.takenAt)
            await self._run(lambda: _writeState(destination, record, rebuilt.digests))
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = _StoreState(key, destination)
            state.dbdir = destination
            self._adopt(state, rebuilt.head, rebuilt.digests, rebuilt.pageSize,
                        rebuilt.chainLength, rebuilt.chainBytes, rebuilt.snapshotBytes)
            state.savedSeq = rebuilt.head.seq
            state.takenAt = record["takenAt"]
            self.log.info(
                "Restored store {store} (key {key!r}) from its durable copy, to record {seq} "
                "({size} bytes): an image taken at {taken} (takenAt={takenAt:.6f}), "
                "{age:.1f}s ago; any commit after that was not shipped and is lost",
                store=name,
                key=key,
                taken=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rebuilt.takenAt)),
                seq=rebuilt.head.seq,
                size=len(rebuilt.image),
                takenAt=rebuilt.takenAt,
                age=max(0.0, self._clock.seconds() - rebuilt.takenAt),
            )
            return True

        return Deferred.fromCoroutine(restore())

    def lag(self) -> ShippingLag:
        now = self._clock.seconds()
        stores = tuple(
            StoreLag(
                key=state.key,
                seconds=max(0.0, now - state.dirtySince) if state.dirtySince is not None else 0.0,
                bytesPending=state.pendingBytes,
                seq=state.seq,
                fenced=state.fenced is not None,
            )
            for state in self._dirty.values()
            if state.dirty
        )
        return ShippingLag(
            seconds=max((s.seconds for s in stores), default=0.0),
            bytesPending=sum(s.bytesPending for s in stores),
            stores=stores,
        )

    def addFencedObserver(self, observer: Callable[[str, StaleEpoch], None]) -> None:
        self._fencedObservers.append(observer)

    # Cycles

    def flush(self) -> Deferred[None]:
        """
        Ship every dirty store now, regardless of back-off, each after the
        ship in progress for it, if any.

        @return: fires when those ships have finished; never fails.
        """
        probing = [self._afterProbe(s) for s in self._states.values() if s.probing is not None]
        if probing:
            return DeferredList(probing).addCallback(lambda _: self.flush())
        idle: list[_StoreState] = []
        busy: list[_StoreState] = []
        for state in list(self._states.values()):
            state.retryAt = 0.0
            if state.dirty and state.fenced is None:
                (busy if state.shipping else idle).append(state)

        async def shipIdle() -> None:
            # One batch per C{concurrency} stores, one after the other, so
            # that the images and records in flight stay bounded.
            for start in range(0, len(idle), self._concurrency):
                await self._cycle(idle[start : start + self._concurrency])

        d = DeferredList(
            [Deferred.fromCoroutine(shipIdle())]
            + [self._shipAfterCurrent(state) for state in busy],
            consumeErrors=True,
        )
        return d.addCallback(lambda _: None)

    def _tick(self) -> None:
        self._startDueProbes()
        self._shipDue(interval=True)
        self._reportLag()

    def _shipSoon(self) -> None:
        if self._immediate is None:
            self._immediate = self._clock.callLater(0, self._immediateDue)

    def _immediateDue(self) -> None:
        self._immediate = None
        self._shipDue()

    def _shipDue(self, interval: bool = False) -> None:
        """
        Start one ship cycle for the dirty stores that are due: those with
        durable waiters, and those dirty at the last interval (C{interval}:
        this is it) and not shipped since.  Stores being shipped, fenced,
        being probed or backing off are left out; a store being shipped
        whose commits are waited on joins the next cycle, started when its
        ship ends (group commit).  At most C{concurrency} stores are in
        flight and C{_MAX_CYCLES} cycles run at once; what does not fit is
        owed, and shipped when a cycle ends (a store shipped meanwhile and
        dirty again waits for the next interval, unless waited on).
        """
        if interval:
            for state in self._dirty.values():
                state.due = state.dirty
        if self._cycles >= _MAX_CYCLES:
            self._owed = True
            return
        now = self._clock.seconds()
        room = self._concurrency - self._inFlight
        group: list[_StoreState] = []
        for state in list(self._dirty.values()):
            if (
                state.dirty
                and state.fenced is None
                and not state.shipping
                and state.probing is None
                and state.retryAt <= now
                and (state.waiters or state.due)
            ):
                if len(group) >= room:
                    self._owed = True
                    break
                state.due = False
                group.append(state)
        if group:
            self._cycle(group)

    def _cycle(self, states: list[_StoreState]) -> Deferred[None]:
        """
        Ship C{states} once, as one batch: their records built on the reactor
        thread where they can be (L{_buildAll}) and stored at once with one
        L{IDurableBackend.appendMany}, the others built in as few
        worker-thread hand-offs as the build threads allow and stored with
        one more when they are all built, and the state files due written
        in one more hand-off.  Never fails: errors are logged
        and counted per store, and a store that failed stays dirty.

        The callers leave out stores being shipped, fenced or probed.
        """
        states = [s for s in states if not s.shipping and s.fenced is None]
        done: Deferred[None] = Deferred()
        if not states:
            done.callback(None)
            return done
        for state in states:
            state.shipping = True
        self._inFlight += len(states)
        self._cycles += 1

        async def ship() -> None:
            unloaded = [state for state in states if not state.loaded]
            ready = [state for state in states if state.loaded]
            if unloaded:
                loads = await DeferredList(
                    [Deferred.fromCoroutine(self._load(state)) for state in unloaded],
                    consumeErrors=True,
                )
                for state, (ok, result) in zip(unloaded, loads):
                    if ok:
                        ready.append(state)
                    else:
                        self._failed(state, result)  # type: ignore[arg-type]
            if not ready:
                return
            # The generation before the image is read: commits made after
            # this may or may not be in the image, so they stay dirty.
            capturedAt = self._clock.seconds()
            jobs = []
            for state in ready:
                try:
                    epoch = self._epochForKey(state.key)
                except Exception:
                    # StaleEpoch: this node does not own the store's slot
                    # (now), so it is fenced like a refused write; anything
                    # else fails this store alone.
                    self._failed(state, Failure())  # type: ignore[no-untyped-call]
                    continue
                jobs.append((state, state.generation, epoch))
            if not jobs:
                return
            inline, later = self._buildAll(
                [(state, epoch, capturedAt) for state, _, epoch in jobs]
            )
            saving: list[_StoreState] = []
            # The records built here are stored at once; those built in
            # worker threads (snapshots, whole images) when they are done,
            # so that a big store's snapshot does not hold up the answers
            # of the small stores shipped with it.
            stores = [
                Deferred.fromCoroutine(
                    self._storeBuilt(
                        [
                            ((state, generation), outcome)
                            for (state, generation, _), outcome in zip(jobs, inline)
                            if outcome is not None
                        ],
                        capturedAt,
                        saving,
                    )
                )
            ]
            rest = [
                (state, generation)
                for (state, generation, _), outcome in zip(jobs, inline)
                if outcome is None
            ]
            if rest:

                async def storeRest() -> None:
                    outcomes = await later
                    await self._storeBuilt(list(zip(rest, outcomes)), capturedAt, saving)

                stores.append(Deferred.fromCoroutine(storeRest()))
            await gatherResults(stores, consumeErrors=True)
            if saving:
                await self._saveStates(saving)

        def finish(_: object) -> None:
            self._inFlight -= len(states)
            self._cycles -= 1
            now = self._clock.seconds()
            waited = False
            for state in states:
                state.shipping = False
                after, state.afterShip = state.afterShip, []
                for f in after:
                    f()
                if state.waiters and state.dirty and state.retryAt <= now:
                    # Commits made while this ship was under way are waited
                    # on: they go in the next cycle.
                    waited = True
            if self._owed:
                self._owed = False
                self._shipDue()
            elif waited:
                self._shipSoon()
            done.callback(None)

        Deferred.fromCoroutine(ship()).addErrback(
            lambda f: self.log.failure("Unexpected error shipping {count} stores", f,
                                       count=len(states))
        ).addBoth(finish)
        return done

    async def _storeBuilt(
        self,
        builds: list[tuple[tuple[_StoreState, int], tuple[bool, Any]]],
        capturedAt: float,
        saving: list[_StoreState],
    ) -> None:
        """
        Store the records just built, one per store, with one
        L{IDurableBackend.appendMany}, and take what the backend says of
        each: stored, refused for its sequence (L{_conflicted}) or failed.
        Never fails.

        @param builds: ((store, its generation when the cycle began), the
            build's outcome) per store.
        @param saving: the stores whose state files are due are added.
        """
        toStore: list[tuple[_StoreState, int, _Built]] = []
        for (state, generation), (ok, result) in builds:
            if not ok:
                self._failed(state, result)
            elif result is None:
                self._shipped(state, generation, capturedAt)
            else:
                state.pendingBytes = len(result.data)
                toStore.append((state, generation, result))
        if not toStore:
            return
        for state, _, built in toStore:
            state.sent = (state.sent + [built.info.digest])[-_SENT_KEPT:]
        try:
            outcomes = await self.backend.appendMany(
                [(built.info, built.data) for _, _, built in toStore]
            )
        except Exception:
            failure = Failure()  # type: ignore[no-untyped-call]
            for state, _, _ in toStore:
                self._failed(state, failure)
            return
        conflicts = []
        now = self._clock.seconds()
        for (state, generation, built), outcome in zip(toStore, outcomes):
            if isinstance(outcome, SequenceConflict):
                conflicts.append((state, built.info, outcome))
                continue
            if outcome is not None:
                self._failed(state, Failure(outcome))  # type: ignore[no-untyped-call]
                continue
            self._stored(state, generation, built, capturedAt)
            if not state.opens or now - state.savedAt >= self._saveInterval:
                saving.append(state)
        for state, info, conflict in conflicts:
            await self._conflicted(state, info, conflict)

    async def _conflicted(
        self, state: _StoreState, info: RecordInfo, conflict: SequenceConflict
    ) -> None:
        """
        The backend refused C{info}, the next record of C{state}'s chain as
        this shipper knows it, because its sequence number does not follow
        the newest stored record: tell whose that record is.

            - This shipper's own (a record sent earlier whose answer was
              lost), or one older than this shipper's chain (a backend that
              lost its newest records), or a late record of an older epoch
              (the slot's previous owner shipping its last changes): start
              again from the newest record, with a snapshot.
            - Another writer's at a newer epoch: fenced (L{StaleEpoch}).
            - Another writer's at this shipper's epoch: two nodes believe they
              own the store's slot at the same epoch.  Shipping a snapshot
              over it would throw the other's commits away (and the other
              would do the same), so this shipper refuses as if fenced
              (L{AnotherWriter}): it stops shipping the store, and its node
              stops serving the slot.
        """
        try:
            head = await self.backend.head(state.name)
        except Exception:
            self._failed(state, Failure(conflict))  # type: ignore[no-untyped-call]
            return
        if (
            head is None
            or head.digest in state.sent
            or head.seq < info.seq
            or head.epoch < info.epoch
        ):
            self._failed(state, Failure(conflict))  # type: ignore[no-untyped-call]
        elif head.epoch > info.epoch:
            self._failed(
                state, Failure(StaleEpoch(state.name, info.epoch, head.epoch))  # type: ignore[no-untyped-call]
            )
        else:
            self._failed(state, Failure(AnotherWriter(state.name, info.epoch, head)))  # type: ignore[no-untyped-call]

    def _stored(
        self, state: _StoreState, generation: int, built: _Built, capturedAt: float
    ) -> None:
        """
        C{built}, a record of C{state} built from its store at C{generation},
        is stored: it is the new head of the store's chain.
        """
        state.sent = []
        info = built.info
        if info.isSnapshot:
            chain = (0, 0, info.size)
        else:
            chain = (state.chainLength + 1, state.chainBytes + info.size, state.snapshotBytes)
        self._adopt(state, info, built.digests, built.pageSize, *chain, groups=built.groups)
        state.wal = built.wal
        self._shipped(state, generation, capturedAt)
        if built.wal is not None and built.wal.frames >= _RESTART_FRAMES:
            self._restartsDue[state.key] = state
            if self._restarting is None:
                # After the answers this record releases have gone out.
                self._restarting = self._clock.callLater(0, self._restartLogs)
        if info.isSnapshot and info.seq > 1:
            self.backend.prune(state.name, info.seq).addErrback(
                lambda f: self.log.failure("Cannot prune store {store}", f, store=state.name)
            )
        state.takenAt = built.takenAt

    def _restartLogs(self) -> None:
        self._restarting = None
        for key in list(self._restartsDue)[:_RESTARTS_PER_TURN]:
            self._restartLog(self._restartsDue.pop(key))
        if self._restartsDue:
            self._restarting = self._clock.callLater(0, self._restartLogs)

    def _restartLog(self, state: _StoreState) -> None:
        """
        Restart the write-ahead log of C{state}'s store if everything in it
        is shipped: if the log still ends where the newest record was read
        up to.  The log then starts at a position this shipper knows, so
        that the next record is still read from the log.  Otherwise SQLite
        restarts it itself, after a checkpoint that a commit runs once the
        log passes a thousand pages, at a position nobody can know, and the
        next record must be worked out from the store's whole image.

        On the reactor thread, the one that writes the store, so that
        nothing can commit between looking at the log and restarting it.
        Never waits for another connection (L{Store.restartLog}).
        """
        store, position = state.store, state.wal
        if store is None or position is None or state.shipping or state.fenced is not None:
            return
        files = self._walFiles.get(os.path.join(state.dbdir.path, "db.sqlite"))
        if files is None or files.position() != position:
            # Committed since: those frames are not shipped yet.
            return
        try:
            restarted = store.restartLog()
        except Exception:
            self.log.failure("Cannot restart the write-ahead log of {store}", store=state.name)
            state.wal = None
            return
        if restarted:
            after = files.position(empty=True)
            state.wal = after if after is not None and after.frames == 0 else None

    def _buildAll(
        self, jobs: list[tuple[_StoreState, int, float]]
    ) -> tuple[list[tuple[bool, Any] | None], Deferred[list[tuple[bool, Any]]]]:
        """
        Build the next record of each of C{jobs}' stores: here, on the
        reactor thread, when it is a small delta read from the store's
        write-ahead log (at most C{_INLINE_FRAMES} frames: a few
        microseconds of reading and hashing, less than a hand-off to a
        thread costs); otherwise in worker threads, a group of stores per
        hand-off (split so that the build threads share them), at most
        C{buildConcurrency} hand-offs at once.

        @param jobs: (store, epoch, when its image is taken) per store.
        @return: the outcomes built here, (C{True}, the record or L{None})
            or (C{False}, a L{Failure}) per job in order, with L{None} for
            the jobs handed to worker threads; and a L{Deferred} firing with
            those jobs' outcomes, in order.
        """
        outcomes: list[tuple[bool, Any] | None] = []
        threaded: list[tuple[_StoreState, int, float]] = []
        for state, epoch, takenAt in jobs:
            try:
                built = self._build(state, epoch, takenAt, inline=True)
            except Exception:
                outcomes.append((False, Failure()))  # type: ignore[no-untyped-call]
                continue
            if built is False:
                outcomes.append(None)
                threaded.append((state, epoch, takenAt))
            else:
                outcomes.append((True, built))
        size = min(_GROUP_MAX, max(4, -(-len(threaded) // self._buildConcurrency)))
        groups: list[Deferred[list[tuple[bool, Any]]]] = []
        for start in range(0, len(threaded), size):
            d: Deferred[list[tuple[bool, Any]]] = Deferred()
            self._buildQueue.append((threaded[start : start + size], d))
            groups.append(d)
        self._nextBuilds()
        later = gatherResults(groups).addCallback(
            lambda results: [outcome for group in results for outcome in group]
        )
        return outcomes, later

    def _nextBuilds(self) -> None:
        while self._buildQueue and self._buildsRunning < self._buildConcurrency:
            group, d = self._buildQueue.pop(0)
            self._buildsRunning += 1
            dispatching = [True]

            def work(
                group: list[tuple[_StoreState, int, float]] = group,
            ) -> list[tuple[bool, Any]]:
                results: list[tuple[bool, Any]] = []
                for state, epoch, takenAt in group:
                    try:
                        results.append((True, self._build(state, epoch, takenAt)))
                    except BaseException:
                        results.append((False, Failure()))  # type: ignore[no-untyped-call]
                return results

            def failed(
                failure: Failure, group: list[tuple[_StoreState, int, float]] = group
            ) -> list[tuple[bool, Any]]:
                return [(False, failure)] * len(group)

            def finished(
                results: list[tuple[bool, Any]],
                d: Deferred[list[tuple[bool, Any]]] = d,
                dispatching: list[bool] = dispatching,
            ) -> None:
                self._buildsRunning -= 1
                if not dispatching[0]:
                    self._nextBuilds()
                d.callback(results)

            self._run(work).addErrback(failed).addCallback(finished)
            dispatching[0] = False

    @overload
    def _build(self, state: _StoreState, epoch: int, takenAt: float) -> _Built | None: ...

    @overload
    def _build(
        self, state: _StoreState, epoch: int, takenAt: float, inline: bool
    ) -> _Built | None | Literal[False]: ...

    def _build(
        self, state: _StoreState, epoch: int, takenAt: float, inline: bool = False
    ) -> _Built | None | Literal[False]:
        """
        Build a store's next record; in a worker thread, unless C{inline}.
        A delta is built from the pages committed since the last record,
        read from the store's write-ahead log (L{_buildFromLog}) when it can
        be; otherwise, and for a snapshot, from the store's whole image.

        @param takenAt: the time to record as when the image was taken: the
            start of the ship cycle, at or before every read of the store.
        @param inline: build only a delta of at most C{_INLINE_FRAMES}
            frames of the log, cheap enough for the reactor thread; called on
            the reactor thread, which is the one that writes the stores, so
            that no commit or restart of the log can happen meanwhile.
        @return: the record, L{None} if nothing changed since the last one,
            or C{False} if C{inline} and the record must be built in a
            worker thread.
        @raise FileNotFoundError: if the store's database is gone.
        """
        path = os.path.join(state.dbdir.path, "db.sqlite")
        # The files kept open while the store is open; otherwise (no
        # connection of this process has it open) opened for this build.
        files = self._walFiles.get(path)
        kept = files is not None
        if files is None:
            files = WalFiles(path)
        try:
            delta = state.seq > 0 and state.chainLength < self._maxChain
            if delta and state.wal is not None and state.digests is not None:
                changes = files.changes(
                    state.wal,
                    state.pageSize,
                    maxFrames=_INLINE_FRAMES if inline else None,
                    settled=inline,
                )
                if changes is not None:
                    built = self._buildFromLog(state, epoch, changes, takenAt)
                    if built is not False:
                        return built
            if inline:
                return False
            position = files.position()
        finally:
            if not kept:
                files.close()
        database = FilePath(path)
        image = self._images.read(database, keep=state.opens > 0)
        if image is None:
            raise FileNotFoundError(f"store {state.name} has no database file to ship")
        pageSize = pageSizeOf(image)
        base = state.digests if state.pageSize == pageSize and delta else None
        pages, digests = diffImage(image, pageSize, base)
        if base is not None and not pages and len(digests) == len(base):
            return None
        built = self._encode(state, epoch, pageSize, pages, digests, base is None, takenAt, position)
        if base is not None and self._compactionDue(state, built):
            pages, digests = diffImage(image, pageSize, None)
            built = self._encode(state, epoch, pageSize, pages, digests, True, takenAt, position)
        return built

    def _buildFromLog(
        self, state: _StoreState, epoch: int, changes: WalChanges, takenAt: float
    ) -> _Built | None | Literal[False]:
        """
        Build the delta after C{state}'s last record from C{changes}, the
        pages its store committed since.  The pages are
        compared with the last record's digests, so a page written again
        with the same content is not shipped.

        @return: the delta, L{None} if nothing changed, or C{False} if the
            record must be built from the whole image: a snapshot is due, or
            the changes do not cover every page the store grew by.
        """
        base = state.digests
        assert base is not None
        count = changes.pageCount
        if count > len(base) and any(
            number not in changes.pages for number in range(len(base) + 1, count + 1)
        ):
            return False
        pages: list[tuple[int, bytes]] = []
        changed: dict[int, bytes] = {}
        known = len(base)
        for number in sorted(changes.pages):
            page = changes.pages[number]
            digest = hashlib.blake2b(page, digest_size=16).digest()
            if number > known or digest != base[number - 1]:
                changed[number - 1] = digest
                pages.append((number, page))
        if not pages and count == known:
            return None
        digests = _PatchedDigests(base, changed, count)
        groups = regroup(
            state.groups if state.groups is not None else groupDigests(base),
            digests,
            [number for number, _ in pages],
            known,
        )
        built = self._encode(
            state, epoch, state.pageSize, pages, digests, False, takenAt, changes.end, groups
        )
        if self._compactionDue(state, built):
            return False
        return built

    def _compactionDue(self, state: _StoreState, delta: _Built) -> bool:
        """
        Whether the deltas since C{state}'s snapshot, with C{delta}, now
        outweigh the snapshot: then the next record is a snapshot instead.
        """
        return state.chainBytes + delta.info.size > max(state.snapshotBytes, self._compactBytes)

    def _saveStates(self, states: list[_StoreState]) -> Deferred[None]:
        """
        Write the state file of each of C{states} that does not describe the
        newest record shipped, all in one worker-thread hand-off.  Never
        fails.
        """
        jobs: list[tuple[_StoreState, FilePath[str], dict[str, Any], tuple[bytes, ...], int]] = []
        for state in states:
            if state.savedSeq == state.seq or state.digests is None or state.seq == 0:
                continue
            record = self._stateRecord(
                state.key,
                RecordInfo(state.name, 0, state.seq, 0, 0, state.headDigest),
                state.pageSize,
                state.chainLength,
                state.chainBytes,
                state.snapshotBytes,
                state.takenAt,
            )
            # A copy: the list changes in place as deltas are stored.
            jobs.append((state, state.dbdir, record, tuple(state.digests), state.seq))
        if not jobs:
            return succeed(None)

        def work() -> list[Failure | None]:
            results: list[Failure | None] = []
            for _, dbdir, record, digests, _ in jobs:
                try:
                    _writeState(dbdir, record, digests)
                except Exception:
                    results.append(Failure())  # type: ignore[no-untyped-call]
                else:
                    results.append(None)
            return results

        def saved(results: list[Failure | None]) -> None:
            now = self._clock.seconds()
            for (state, _, _, _, seq), failure in zip(jobs, results):
                if failure is None:
                    state.savedSeq = seq
                    state.savedAt = now
                else:
                    self.log.failure("Cannot save the shipping state of {store}", failure,
                                     store=state.name)

        d: Deferred[list[Failure | None]] = self._run(work)
        return d.addCallback(saved).addErrback(
            lambda f: self.log.failure("Cannot save shipping states", f)
        )

    def _encode(
        self,
        state: _StoreState,
        epoch: int,
        pageSize: int,
        pages: list[tuple[int, bytes]],
        digests: Sequence[bytes],
        snapshot: bool,
        takenAt: float,
        wal: WalPosition | None,
        groups: list[bytes] | None = None,
    ) -> _Built:
        """
        Encode a store's next record.

        @param groups: L{groupDigests} of C{digests}, when they were worked
            out from the last record's (L{regroup}); computed otherwise.
        """
        seq = state.seq + 1
        if groups is None:
            groups = groupDigests(digests)
        data = encodeRecord(
            Delta(
                store=state.name,
                epoch=epoch,
                seq=seq,
                baseSeq=0 if snapshot else state.seq,
                pageSize=pageSize,
                pageCount=len(digests),
                pages=pages,
                imageDigest=imageDigest(digests, pageSize, groups, self.recordFormat),
                takenAt=takenAt,
                version=self.recordFormat,
            )
        )
        info = RecordInfo(
            store=state.name,
            epoch=epoch,
            seq=seq,
            baseSeq=0 if snapshot else state.seq,
            size=len(data),
            digest=hashlib.sha256(data).digest(),
        )
        return _Built(
            info=info,
            data=data,
            digests=digests,
            groups=tuple(groups),
            pageSize=pageSize,
            takenAt=takenAt,
            wal=wal,
        )

    async def _load(self, state: _StoreState) -> None:
        """
        Learn where C{state}'s chain stands: the backend's newest record, and
        whether this node's state file describes it.
        """
        head = await self.backend.head(state.name)
        dbdir = state.dbdir
        # A store with no record needs no state file: its next is a snapshot.
        saved = None if head is None else await self._run(lambda: _readState(dbdir))
        state.stamped, state.stamp = False, None
        if head is None:
            state.seq, state.digests = 0, None
        elif (
            saved is not None
            and saved.get("key") == state.key
            and saved.get("seq") == head.seq
            and saved.get("head") == head.digest.hex()
        ):
            self._adopt(state, head, saved["digests"], saved["pageSize"], saved["chainLength"],
                        saved["chainBytes"], saved["snapshotBytes"])
            state.savedSeq = head.seq
            state.takenAt = float(saved.get("takenAt", 0.0))
        else:
            # The chain moved on without this node knowing its pages: the
            # next record is a snapshot after the newest.
            state.seq, state.digests = head.seq, None
        state.loaded = True

    def _adopt(
        self,
        state: _StoreState,
        head: RecordInfo,
        digests: Sequence[bytes],
        pageSize: int,
        chainLength: int,
        chainBytes: int,
        snapshotBytes: int,
        groups: tuple[bytes, ...] | None = None,
    ) -> None:
        """
        C{head} is the newest record of C{state}'s chain, and C{digests}
        (with their L{groupDigests} C{groups}, if known) the page digests of
        its image.
        """
        state.loaded = True
        state.seq = head.seq
        state.headDigest = head.digest
        if isinstance(digests, _PatchedDigests) and digests.base is state.digests:
            digests.applyTo(digests.base)
        else:
            state.digests = list(digests)
        state.groups = groups
        state.pageSize = pageSize
        state.wal = None
        state.chainLength = chainLength
        state.chainBytes = chainBytes
        state.snapshotBytes = snapshotBytes

    @staticmethod
    def _stateRecord(
        key: str,
        head: RecordInfo,
        pageSize: int,
        chainLength: int,
        chainBytes: int,
        snapshotBytes: int,
        takenAt: float,
    ) -> dict[str, Any]:
        return {
            "key": key,
            "seq": head.seq,
            "head": head.digest.hex(),
            "epoch": head.epoch,
            "pageSize": pageSize,
            "chainLength": chainLength,
            "chainBytes": chainBytes,
            "snapshotBytes": snapshotBytes,
            "takenAt": takenAt,
        }

    def _shipped(
        self, state: _StoreState, generation: int, capturedAt: float | None = None
    ) -> None:
        """
        C{state}'s store is shipped up to C{generation}, which was its
        generation at C{capturedAt}, just before its image was read.
        """
        state.shippedGeneration = max(state.shippedGeneration, generation)
        state.pendingBytes = 0
        state.failures = 0
        state.retryAt = 0.0
        if not state.dirty:
            state.dirtySince = None
            if self._dirty.get(state.key) is state:
                del self._dirty[state.key]
        elif capturedAt is not None and state.dirtySince is not None:
            # The commits still unshipped were made after the capture.
            state.dirtySince = max(state.dirtySince, capturedAt)
        ready = [d for (g, d) in state.waiters if g <= generation]
        state.waiters = [(g, d) for (g, d) in state.waiters if g > generation]
        for d in ready:
            d.callback(None)
        self._forgetIfDone(state)

    def _failed(self, state: _StoreState, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, StaleEpoch):
            state.fenced = error
            waiters, state.waiters = state.waiters, []
            for _, d in waiters:
                d.errback(error)
            if isinstance(error, AnotherWriter):
                self.log.error(
                    "Two nodes write store {store} (key {key!r}) at epoch {epoch}: "
                    "record {seq} is another writer's.  This node stops shipping the "
                    "store and serving its slot; make every node's cluster "
                    "configuration the same, so that one node owns the slot",
                    store=state.name,
                    key=state.key,
                    epoch=error.epoch,
                    seq=error.head.seq,
                    error=str(error),
                )
            else:
                self.log.error(
                    "Store {store} (key {key!r}) is fenced: {error}; this node must stop "
                    "serving its slot",
                    store=state.name,
                    key=state.key,
                    error=str(error),
                )
            for observer in self._fencedObservers:
                try:
                    observer(state.key, error)
                except Exception:
                    self.log.failure("Fenced observer failed")
            return
        if isinstance(error, SequenceConflict):
            # This shipper's own record whose answer was lost, an older
            # owner's late one, or a backend that lost records (see
            # _conflicted): start again from the backend's newest record,
            # with a snapshot.
            state.loaded = False
        if isinstance(error, FileNotFoundError) and not state.opens:
            # A closed store whose files are gone: there is nothing left to
            # ship, and nothing to keep.
            self.log.warn("{error}; forgetting it", error=str(error))
            waiters, state.waiters = state.waiters, []
            for _, d in waiters:
                d.errback(error)
            if self._states.get(state.key) is state:
                del self._states[state.key]
            if self._dirty.get(state.key) is state:
                del self._dirty[state.key]
            return
        state.failures += 1
        state.retryAt = self._clock.seconds() + min(
            _MAX_BACKOFF, self.interval * 2 ** (state.failures - 1)
        )
        if state.failures & (state.failures - 1) == 0:
            self.log.warn(
                "Cannot ship store {store} (attempt {attempts}): {error}",
                store=state.name,
                attempts=state.failures,
                error=failure.getErrorMessage(),
            )

    def _reportLag(self) -> None:
        lag = self.lag()
        now = self._clock.seconds()
        if lag.seconds >= self._lagWarning:
            if now - self._lastLagLog >= self._lagWarning:
                self._lastLagLog = now
                self.log.warn(
                    "Durable shipping lag {seconds:.1f}s: {bytesPending} bytes pending "
                    "in {stores} stores",
                    seconds=lag.seconds,
                    bytesPending=lag.bytesPending,
                    stores=len(lag.stores),
                    lag=lag,
                )
            self._lagging = True
        elif self._lagging and not lag.stores:
            self._lagging = False
            self.log.info("Durable shipping caught up")

    # Resuming after a restart

    @staticmethod
    def _findUnshipped(directory: FilePath[str]) -> Iterator[tuple[str, FilePath[str]]]:
        """
        The stores under C{directory} changed since they were last shipped,
        as (key, store directory); in a worker thread.
        """
        if not directory.isdir():
            return
        for bucket in directory.children():
            if not bucket.isdir():
                continue
            for dbdir in bucket.children():
                saved = _readState(dbdir)
                if saved is None or not isinstance(saved.get("key"), str):
                    continue
                try:
                    validateKey(saved["key"])
                except ValueError:
                    continue
                if storeNameForKey(saved["key"]) != dbdir.basename():
                    continue
                if _closedUnchanged(dbdir, saved, saved["key"]):
                    # Closed shipped to its last commit, and not written
                    # since (its close's checkpoint came after that ship, so
                    # the times alone would say it changed).
                    continue
                changed = 0.0
                for name in ("db.sqlite", "db.sqlite-wal"):
                    try:
                        changed = max(changed, os.stat(dbdir.child(name).path).st_mtime)
                    except OSError:
                        pass
                if changed >= float(saved.get("takenAt", 0)) - 1.0:
                    yield saved["key"], dbdir

    def _resume(self, found: list[tuple[str, FilePath[str]]]) -> None:
        for key, dbdir in found:
            if key not in self._states:
                state = self._states[key] = _StoreState(key, dbdir)
                self._probe(state)
        if found:
            self.log.info("Resuming shipping of {count} stores", count=len(found))

            def shipped(results: list[tuple[bool, None]]) -> None:
                self.log.info(
                    "Shipped {shipped} of the {count} stores resumed",
                    shipped=sum(1 for ok, _ in results if ok),
                    count=len(results),
                )

            DeferredList(
                [self.whenDurable(key) for key, _ in found], consumeErrors=True
            ).addCallback(shipped)

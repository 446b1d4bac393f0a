# -*- test-case-name: tests.test_durable_backend -*-
"""
The default durable backend: a directory, ideally on another disk or a
network mount.

Layout: C{ROOT/<first two digits of the store name>/<store name>/} holds the
store's records, one file each, named
C{<seq>-<baseSeq>-<epoch>-<size>-<sha256 hex>.rec} (numbers as 16 decimal
digits), a
file C{epoch} with the fenced epoch, and a C{lock} file.  Every write goes to
a temporary file which is flushed, fsynced and renamed into place, and then
the directory is fsynced, so a record is either wholly there or absent.  The
check of epoch and sequence and the write happen under an exclusive
C{flock} of the store's lock file, so writers in several processes (or on
several machines, on a file system whose locks work across them) cannot both
succeed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import hashlib
import os
import re
from typing import Any, Callable, Sequence, TypeVar

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from fractal.durable._threads import RunInThread, reactorThreads
from fractal.durable.interfaces import (
    IDurableBackend,
    NoSuchRecord,
    RecordInfo,
    SequenceConflict,
    StaleEpoch,
)

__all__ = ["FilesystemBackend", "checkStoreName"]

T = TypeVar("T")

_STORE_NAME = re.compile(r"\A[0-9a-f]{64}\Z")
_RECORD_NAME = re.compile(r"\A(\d{16})-(\d{16})-(\d{16})-(\d{16})-([0-9a-f]{64})\.rec\Z")


def checkStoreName(store: str) -> str:
    """
    Check that C{store} is a store name (64 lowercase hexadecimal digits, as
    made by L{fractal.keys.storeNameForKey}) and return it.

    @raise ValueError: if it is not.
    """
    if not isinstance(store, str) or not _STORE_NAME.match(store):
        raise ValueError(f"not a store name: {store!r:.80}")
    return store


def checkInfo(info: RecordInfo, data: bytes) -> None:
    """
    Check that C{info} describes C{data} and is a possible record.

    @raise ValueError: if it is not.
    """
    checkStoreName(info.store)
    if info.size != len(data) or info.digest != hashlib.sha256(data).digest():
        raise ValueError("record info does not match its data")
    if info.epoch < 0 or info.seq < 1 or not 0 <= info.baseSeq < info.seq:
        raise ValueError(f"invalid record sequence {info.seq} on base {info.baseSeq}")


def _fsyncDirectory(path: FilePath[str]) -> None:
    fd = os.open(path.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writeAtomically(path: FilePath[str], data: bytes, sync: bool = True) -> None:
    """
    Write C{data} to C{path} so that it is wholly there or absent; durably
    at once if C{sync}, else once the file system is synced.
    """
    temporary = path.sibling(f".tmp-{path.basename()}-{os.getpid()}")
    # Plain descriptors: a buffered file object costs a few system calls
    # more per record (and each drops and retakes the GIL).
    fd = os.open(temporary.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary.path, path.path)
    if sync:
        _fsyncDirectory(path.parent())


def _loadSyncfs() -> Callable[[int], int] | None:
    """
    C{syncfs(2)} from the C library, or L{None} where there is none.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        syncfs: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return syncfs


_syncfs = _loadSyncfs()


@implementer(IDurableBackend)
class FilesystemBackend:
    """
    Chains of records kept as files in a directory.

    @ivar root: the directory.
    """

    def __init__(
        self,
        root: FilePath[str],
        runInThread: RunInThread | None = None,
        maxBatches: int = 2,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param root: the directory; created when first written.
        @param runInThread: runs the blocking file work; the global reactor's
            thread pool by default.
        @param maxBatches: how many batches of appends are written at the
            same time, each in its own thread.
        @param clock: when given, a batch starts at the end of the reactor
            turn in which its first append arrived, so that appends made in
            the same turn (a group of ships finishing together) share it;
            without one, a batch starts at once.
        """
        self.root = root
        self._run = runInThread if runInThread is not None else reactorThreads()
        self._pending: list[tuple[RecordInfo, bytes, Deferred[None]]] = []
        self._batching = 0
        self._maxBatches = maxBatches
        self._clock = clock
        self._gathering: IDelayedCall | None = None

    def _dir(self, store: str) -> FilePath[str]:
        checkStoreName(store)
        return self.root.child(store[:2]).child(store)

    def _defer(self, f: Callable[[], T]) -> Deferred[T]:
        return self._run(f)

    def _locked(self, store: str, f: Callable[[FilePath[str]], T], sync: bool = True) -> T:
        """
        Call C{f} with C{store}'s directory, created if missing (durably at
        once if C{sync}, else at the batch's file system sync), under its
        exclusive lock.
        """
        directory = self._dir(store)
        lockPath = directory.child("lock").path
        try:
            lock = os.open(lockPath, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            directory.makedirs(ignoreExistingDirectory=True)
            if sync:
                _fsyncDirectory(directory.parent())
                _fsyncDirectory(self.root)
            lock = os.open(lockPath, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return f(directory)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            os.close(lock)

    @staticmethod
    def _epoch(directory: FilePath[str]) -> int:
        try:
            fd = os.open(directory.child("epoch").path, os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            content = os.read(fd, 64)
        finally:
            os.close(fd)
        return int(content.decode("ascii").strip())

    @staticmethod
    def _parse(store: str, name: str) -> RecordInfo | None:
        match = _RECORD_NAME.match(name)
        if match is None:
            return None
        seq, baseSeq, epoch, size, digest = match.groups()
        return RecordInfo(
            store=store,
            epoch=int(epoch),
            seq=int(seq),
            baseSeq=int(baseSeq),
            size=int(size),
            digest=bytes.fromhex(digest),
        )

    @classmethod
    def _list(cls, store: str, directory: FilePath[str]) -> list[RecordInfo]:
        try:
            names = os.listdir(directory.path)
        except FileNotFoundError:
            return []
        result = [info for info in (cls._parse(store, name) for name in names) if info]
        result.sort(key=lambda info: info.seq)
        return result

    @classmethod
    def _newest(cls, store: str, directory: FilePath[str]) -> RecordInfo | None:
        """
        The newest record, found without parsing every name: record names
        start with their zero-padded sequence number, so they sort by it.
        """
        try:
            names = os.listdir(directory.path)
        except FileNotFoundError:
            return None
        for name in sorted((n for n in names if n.endswith(".rec")), reverse=True):
            info = cls._parse(store, name)
            if info is not None:
                return info
        return None

    @staticmethod
    def _fileName(info: RecordInfo) -> str:
        return (
            f"{info.seq:016d}-{info.baseSeq:016d}-{info.epoch:016d}-{info.size:016d}-"
            f"{info.digest.hex()}.rec"
        )

    def append(self, info: RecordInfo, data: bytes) -> Deferred[None]:
        """
        See L{IDurableBackend.append}.

        Appends arriving while C{maxBatches} batches are being written wait
        and then go together as the next batch, made durable by one C{syncfs(2)} of
        the backend's file system where there is one (group commit), instead
        of two C{fsync}s per record.
        """
        d: Deferred[None] = Deferred()
        self._pending.append((info, data, d))
        if self._clock is None:
            self._nextBatch()
        elif self._gathering is None:
            self._gathering = self._clock.callLater(0, self._gathered)
        return d

    def appendMany(
        self, records: Sequence[tuple[RecordInfo, bytes]]
    ) -> Deferred[list[BaseException | None]]:
        """
        See L{IDurableBackend.appendMany}.
        """
        appends = [self.append(info, data) for info, data in records]

        def outcomes(results: list[tuple[bool, Any]]) -> list[BaseException | None]:
            found: list[BaseException | None] = []
            for ok, result in results:
                if ok:
                    found.append(None)
                elif isinstance(result.value, (ValueError, StaleEpoch, SequenceConflict)):
                    found.append(result.value)
                else:
                    result.raiseException()
            return found

        return DeferredList(appends, consumeErrors=True).addCallback(outcomes)

    def _gathered(self) -> None:
        self._gathering = None
        self._nextBatch()

    def _nextBatch(self) -> None:
        """
        Write the pending appends as one batch, if fewer than C{maxBatches}
        are being written; each batch's end starts the next.
        """
        while self._pending and self._batching < self._maxBatches:
            batch, self._pending = self._pending, []
            self._batching += 1
            state = {"dispatching": True}

            def done(outcomes: list[BaseException | None], batch: Any = batch) -> None:
                for (_, _, d), outcome in zip(batch, outcomes):
                    if outcome is None:
                        d.callback(None)
                    else:
                        d.errback(outcome)

            def failed(failure: Failure, batch: Any = batch) -> None:
                for _, _, d in batch:
                    d.errback(failure)

            def finished(_: object, state: dict[str, bool] = state) -> None:
                self._batching -= 1
                if not state["dispatching"]:
                    self._nextBatch()

            def work(items: list[tuple[RecordInfo, bytes]] = [
                (info, data) for info, data, _ in batch
            ]) -> list[BaseException | None]:
                return self._appendBatch(items)

            self._defer(work).addCallbacks(done, failed).addBoth(finished)
            state["dispatching"] = False

    def _appendBatch(self, items: list[tuple[RecordInfo, bytes]]) -> list[BaseException | None]:
        """
        Check and write each record; then make them all durable at once.
        Blocking.

        @return: for each record, L{None} if stored, or the error refusing
            it.
        """
        grouped = _syncfs is not None and len(items) > 1

        def write(item: tuple[RecordInfo, bytes]) -> BaseException | None:
            info, data = item
            try:
                checkInfo(info, data)

                def appendOne(directory: FilePath[str]) -> None:
                    self._appendOne(directory, info, data, not grouped)

                self._locked(info.store, appendOne, not grouped)
            except Exception as e:
                return e
            return None

        outcomes = [write(item) for item in items]
        if grouped and None in outcomes:
            assert _syncfs is not None
            fd = os.open(self.root.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if _syncfs(fd) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"syncfs: {os.strerror(error)}")
            finally:
                os.close(fd)
        return outcomes

    def _appendOne(
        self, directory: FilePath[str], info: RecordInfo, data: bytes, sync: bool
    ) -> None:
        current = self._epoch(directory)
        if info.epoch < current:
            raise StaleEpoch(info.store, info.epoch, current)
        newest = self._newest(info.store, directory)
        if newest is not None:
            if info.seq != newest.seq + 1:
                raise SequenceConflict(
                    f"store {info.store}: record {info.seq} does not follow "
                    f"the newest stored record {newest.seq}"
                )
        elif not info.isSnapshot:
            raise SequenceConflict(f"store {info.store}: the first record must be a snapshot")
        if info.epoch > current:
            _writeAtomically(directory.child("epoch"), b"%d\n" % (info.epoch,), sync)
        _writeAtomically(directory.child(self._fileName(info)), data, sync)

    def fence(self, store: str, epoch: int) -> Deferred[None]:
        def fence(directory: FilePath[str]) -> None:
            current = self._epoch(directory)
            if epoch < current:
                raise StaleEpoch(store, epoch, current)
            if epoch > current:
                _writeAtomically(directory.child("epoch"), b"%d\n" % (epoch,))

        return self._defer(lambda: self._locked(store, fence))

    def head(self, store: str) -> Deferred[RecordInfo | None]:
        def head() -> RecordInfo | None:
            return self._newest(store, self._dir(store))

        return self._defer(head)

    def records(self, store: str) -> Deferred[list[RecordInfo]]:
        return self._defer(lambda: self._list(store, self._dir(store)))

    def read(self, store: str, seq: int) -> Deferred[bytes]:
        def read() -> bytes:
            directory = self._dir(store)
            prefix = f"{seq:016d}-"
            try:
                names = os.listdir(directory.path)
            except FileNotFoundError:
                names = []
            for name in names:
                if name.startswith(prefix):
                    info = self._parse(store, name)
                    if info is not None and info.seq == seq:
                        return directory.child(name).getContent()
            raise NoSuchRecord(f"store {store} has no record {seq}")

        return self._defer(read)

    def prune(self, store: str, beforeSeq: int) -> Deferred[int]:
        def prune(directory: FilePath[str]) -> int:
            records = self._list(store, directory)
            if not any(info.seq == beforeSeq and info.isSnapshot for info in records):
                return 0
            deleted = 0
            for info in records:
                if info.seq < beforeSeq:
                    directory.child(self._fileName(info)).remove()
                    deleted += 1
            if deleted:
                _fsyncDirectory(directory)
            return deleted

        return self._defer(lambda: self._locked(store, prune))

    def stores(self) -> Deferred[list[str]]:
        def stores() -> list[str]:
            found = []
            if not self.root.isdir():
                return []
            for prefix in self.root.children():
                if not prefix.isdir():
                    continue
                for child in prefix.children():
                    name = child.basename()
                    if _STORE_NAME.match(name) and name[:2] == prefix.basename():
                        found.append(name)
            return sorted(found)

        return self._defer(stores)

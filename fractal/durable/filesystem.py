# -*- test-case-name: tests.test_durable_backend -*-
"""
The default durable backend: a directory, ideally on another disk or a
network mount.

Layout: C{ROOT/<first two digits of the store name>/<store name>/} holds the
store's records, one file each, named
C{<seq>-<baseSeq>-<epoch>-<sha256 hex>.rec} (numbers as 16 decimal digits), a
file C{epoch} with the fenced epoch, and a C{lock} file.  Every write goes to
a temporary file which is flushed, fsynced and renamed into place, and then
the directory is fsynced, so a record is either wholly there or absent.  The
check of epoch and sequence and the write happen under an exclusive
C{flock} of the store's lock file, so writers in several processes (or on
several machines, on a file system whose locks work across them) cannot both
succeed.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from typing import Callable, TypeVar

from twisted.internet.defer import Deferred
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
_RECORD_NAME = re.compile(r"\A(\d{16})-(\d{16})-(\d{16})-([0-9a-f]{64})\.rec\Z")


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


def _writeAtomically(path: FilePath[str], data: bytes) -> None:
    """
    Write C{data} to C{path} so that it is wholly there or absent, durably.
    """
    temporary = path.sibling(f".tmp-{path.basename()}-{os.getpid()}")
    with open(temporary.path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary.path, path.path)
    _fsyncDirectory(path.parent())


@implementer(IDurableBackend)
class FilesystemBackend:
    """
    Chains of records kept as files in a directory.

    @ivar root: the directory.
    """

    def __init__(self, root: FilePath[str], runInThread: RunInThread | None = None) -> None:
        """
        @param root: the directory; created when first written.
        @param runInThread: runs the blocking file work; the global reactor's
            thread pool by default.
        """
        self.root = root
        self._run = runInThread if runInThread is not None else reactorThreads()

    def _dir(self, store: str) -> FilePath[str]:
        checkStoreName(store)
        return self.root.child(store[:2]).child(store)

    def _defer(self, f: Callable[[], T]) -> Deferred[T]:
        return self._run(f)

    def _locked(self, store: str, f: Callable[[FilePath[str]], T]) -> T:
        directory = self._dir(store)
        if not directory.isdir():
            directory.makedirs(ignoreExistingDirectory=True)
            _fsyncDirectory(directory.parent())
            _fsyncDirectory(self.root)
        with open(directory.child("lock").path, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                return f(directory)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def _epoch(directory: FilePath[str]) -> int:
        path = directory.child("epoch")
        try:
            return int(path.getContent().decode("ascii").strip())
        except FileNotFoundError:
            return 0

    @staticmethod
    def _list(store: str, directory: FilePath[str]) -> list[RecordInfo]:
        result = []
        try:
            names = os.listdir(directory.path)
        except FileNotFoundError:
            return []
        for name in names:
            match = _RECORD_NAME.match(name)
            if match is None:
                continue
            seq, baseSeq, epoch, digest = match.groups()
            result.append(
                RecordInfo(
                    store=store,
                    epoch=int(epoch),
                    seq=int(seq),
                    baseSeq=int(baseSeq),
                    size=directory.child(name).getsize(),
                    digest=bytes.fromhex(digest),
                )
            )
        result.sort(key=lambda info: info.seq)
        return result

    @staticmethod
    def _fileName(info: RecordInfo) -> str:
        return f"{info.seq:016d}-{info.baseSeq:016d}-{info.epoch:016d}-{info.digest.hex()}.rec"

    def append(self, info: RecordInfo, data: bytes) -> Deferred[None]:
        def append(directory: FilePath[str]) -> None:
            current = self._epoch(directory)
            if info.epoch < current:
                raise StaleEpoch(info.store, info.epoch, current)
            records = self._list(info.store, directory)
            if records:
                if info.seq != records[-1].seq + 1:
                    raise SequenceConflict(
                        f"store {info.store}: record {info.seq} does not follow "
                        f"the newest stored record {records[-1].seq}"
                    )
            elif not info.isSnapshot:
                raise SequenceConflict(
                    f"store {info.store}: the first record must be a snapshot"
                )
            if info.epoch > current:
                _writeAtomically(directory.child("epoch"), b"%d\n" % (info.epoch,))
            _writeAtomically(directory.child(self._fileName(info)), data)

        def run() -> None:
            checkInfo(info, data)
            self._locked(info.store, append)

        return self._defer(run)

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
            records = self._list(store, self._dir(store))
            return records[-1] if records else None

        return self._defer(head)

    def records(self, store: str) -> Deferred[list[RecordInfo]]:
        return self._defer(lambda: self._list(store, self._dir(store)))

    def read(self, store: str, seq: int) -> Deferred[bytes]:
        def read() -> bytes:
            directory = self._dir(store)
            for info in self._list(store, directory):
                if info.seq == seq:
                    return directory.child(self._fileName(info)).getContent()
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

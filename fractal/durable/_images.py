# -*- test-case-name: tests.test_durable_images -*-
"""
Reading consistent images of store databases for the shipper, through a
bounded set of read-only connections kept open between ship cycles.

Opening a connection (the file, the write-ahead log's shared memory, the
schema) costs several times what serialising a small store does, and a store
answering durable calls is read once per call; so the reader keeps the
connections of the stores it read last, up to a bound, and checks before
each use that the database file is still the one the connection opened (a
store set aside and restored in its place gets a new connection).
"""

from __future__ import annotations

import os
import resource
import sqlite3
import threading
from collections import OrderedDict
from urllib.parse import quote

from attrs import frozen
from twisted.python.filepath import FilePath

__all__ = ["ImageReader", "defaultMaxOpen"]


def defaultMaxOpen() -> int:
    """
    How many idle read connections to keep by default: a thirty-second of
    the soft C{RLIMIT_NOFILE} (each holds three descriptors: the database,
    its write-ahead log and its shared memory), between 8 and 128, well
    inside the quarter of the descriptors the pool leaves to others.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 1 << 20
    return max(8, min(128, soft // 32))


@frozen
class _Open:
    """
    A read-only connection, and the file (device and inode) it opened.
    """

    connection: sqlite3.Connection
    device: int
    inode: int


def _close(entry: _Open | None) -> None:
    if entry is not None:
        entry.connection.close()


class ImageReader:
    """
    Reads consistent images of SQLite databases; thread-safe.  A database is
    read by one thread at a time (the shipper ships a store once at a time);
    different databases may be read by different threads at once.

    @ivar maxOpen: the most connections kept open between reads.
    """

    def __init__(self, maxOpen: int | None = None) -> None:
        """
        @param maxOpen: the most idle connections kept open, the least
            recently used closed first; 0 closes each after its read;
            L{defaultMaxOpen} if L{None}.
        """
        self.maxOpen = defaultMaxOpen() if maxOpen is None else maxOpen
        self._lock = threading.Lock()
        self._idle: OrderedDict[str, _Open] = OrderedDict()
        self._busy: set[str] = set()
        self._discarded: set[str] = set()

    def read(self, database: FilePath[str], keep: bool = True) -> bytes | None:
        """
        A consistent image of C{database}, read inside one read transaction,
        so that commits by the store's own connection meanwhile are either
        wholly in it or not at all.  Blocking.

        @param keep: whether to keep the connection for the next read; not
            for a store that is not open (its files must not stay open).
        @return: the image, or L{None} if the database file does not exist.
        """
        path = database.path
        try:
            status = os.stat(path)
        except FileNotFoundError:
            self.discard(database)
            return None
        with self._lock:
            entry = self._idle.pop(path, None)
            self._busy.add(path)
            if keep:
                self._discarded.discard(path)
            else:
                self._discarded.add(path)
        try:
            if entry is not None and (entry.device, entry.inode) != (
                status.st_dev,
                status.st_ino,
            ):
                _close(entry)
                entry = None
            if entry is None:
                connection = sqlite3.connect(
                    f"file:{quote(path)}?mode=ro",
                    uri=True,
                    timeout=30,
                    check_same_thread=False,
                )
                # A small page cache: a write by the store discards it
                # anyway, and this bounds what kept connections hold (64
                # KiB each) whatever the store's size.
                connection.execute("PRAGMA cache_size=-64")
                entry = _Open(connection, status.st_dev, status.st_ino)
            connection = entry.connection
            try:
                connection.execute("BEGIN")
                connection.execute("SELECT count(*) FROM sqlite_master").fetchall()
                image = connection.serialize()
                connection.rollback()
            except BaseException:
                _close(entry)
                entry = None
                raise
            return image
        finally:
            self._return(path, entry)

    def _return(self, path: str, entry: _Open | None) -> None:
        """
        Keep C{entry} for the next read of C{path}, unless it was discarded
        meanwhile; close the least recently used beyond the bound.
        """
        closing: list[_Open] = []
        with self._lock:
            self._busy.discard(path)
            if entry is not None:
                if path in self._discarded or self.maxOpen <= 0:
                    closing.append(entry)
                else:
                    self._idle[path] = entry
                    while len(self._idle) > self.maxOpen:
                        closing.append(self._idle.popitem(last=False)[1])
            self._discarded.discard(path)
        for old in closing:
            _close(old)

    def discard(self, database: FilePath[str]) -> None:
        """
        Close the connection kept for C{database}, now if idle or else at the
        end of the read using it: its store is closing, and SQLite
        checkpoints and removes a database's write-ahead log only when its
        last connection closes.
        """
        with self._lock:
            entry = self._idle.pop(database.path, None)
            if database.path in self._busy:
                self._discarded.add(database.path)
        _close(entry)

    def close(self) -> None:
        """
        Close every idle connection (those in use close at the end of their
        read).
        """
        with self._lock:
            entries = list(self._idle.values())
            self._idle.clear()
            self._discarded.update(self._busy)
        for entry in entries:
            _close(entry)

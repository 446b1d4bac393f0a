# -*- test-case-name: tests.test_durable_wal -*-
"""
Reading the pages a store committed since its last ship from its SQLite
write-ahead log, so that a ship costs what changed rather than what the store
holds.

SQLite in WAL mode appends every committed page to the C{-wal} file as a
frame, and keeps in the C{-shm} file (the WAL index) a header saying how many
frames are committed (C{mxFrame}), how many pages the database has after the
last commit (C{nPage}) and the two salts of the current WAL generation.
Frames up to C{mxFrame} never change while the generation lasts: writers
append after them, and checkpoints only copy them into the database file.  A
generation ends when a checkpoint has copied every frame and a writer
restarts the log from its start, with new salts.  Both formats are SQLite's
documented file formats (U{https://www.sqlite.org/walformat.html},
U{https://www.sqlite.org/fileformat2.html#walformat}).

So the pages committed between two positions of one generation are those of
its frames between them, the last frame of each page winning.  A position is
a generation's salts and a frame count.  When the generation has changed
since a position (the frames after it may be gone into the database file
and overwritten), or anything does not look exactly as described, the reader
answers L{None} and the shipper reads the whole image instead.

Reading needs no lock: the frames read are committed and stay put while
their generation lasts, and the header is read again afterwards to check
that it did (a restart changes the salts in the index before it writes any
frame), unless the reader is the thread that writes the database, which
cannot restart the log meanwhile.
"""

from __future__ import annotations

import os
import struct

from attrs import frozen

__all__ = ["WalPosition", "WalChanges", "walPosition", "readChanges"]

_WAL_VERSION = 3007000
_WAL_HEADER_SIZE = 32
_FRAME_HEADER = struct.Struct(">II8s")  # page number, size after commit, salts
_FRAME_HEADER_SIZE = 24

# The WAL index header, in the native byte order, twice: iVersion, unused,
# iChange, isInit, bigEndCksum, szPage, mxFrame, nPage, aFrameCksum[2],
# aSalt[2] (raw bytes, as in the WAL header), aCksum[2].
_INDEX_HEADER = struct.Struct("=IIIBBHII8x8sII")
_INDEX_HEADER_SIZE = 48
_INDEX_CHECKSUMMED = struct.Struct("=10I")
_MASK = 0xFFFFFFFF

_MAX_TRIES = 4


@frozen
class WalPosition:
    """
    A point in a store's write-ahead log: the salts of its generation and
    how many of that generation's frames came before it.
    """

    salts: bytes
    frames: int


@frozen
class WalChanges:
    """
    What a store committed since a L{WalPosition}.

    @ivar pages: the content of each page written, by 1-based page number
        (pages past C{pageCount} left out).
    @ivar pageCount: the number of pages of the database after the last
        commit.
    @ivar end: the position after the last commit.
    """

    pages: dict[int, bytes]
    pageCount: int
    end: WalPosition


@frozen
class _Index:
    salts: bytes
    frames: int
    pageCount: int
    pageSize: int


def _indexChecksum(data: bytes) -> tuple[int, int]:
    """
    SQLite's WAL checksum of the first 40 bytes of an index header, in the
    native byte order.
    """
    words = _INDEX_CHECKSUMMED.unpack(data)
    s1 = s2 = 0
    for i in range(0, 10, 2):
        s1 = (s1 + words[i] + s2) & _MASK
        s2 = (s2 + words[i + 1] + s1) & _MASK
    return s1, s2


def _readIndex(shm: str) -> _Index | None:
    """
    The header of the WAL index at C{shm}, if it is initialised and reads
    the same in both its copies (a writer updates them one after the other).
    """
    try:
        fd = os.open(shm, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        for _ in range(_MAX_TRIES):
            data = os.pread(fd, 2 * _INDEX_HEADER_SIZE, 0)
            if len(data) < 2 * _INDEX_HEADER_SIZE:
                return None
            first, second = data[:_INDEX_HEADER_SIZE], data[_INDEX_HEADER_SIZE:]
            if first != second:
                continue
            (version, _, _, isInit, _, szPage, mxFrame, nPage, salts, c1, c2) = (
                _INDEX_HEADER.unpack(first)
            )
            if version != _WAL_VERSION or not isInit:
                return None
            if _indexChecksum(first[:40]) != (c1, c2):
                continue
            pageSize = 65536 if szPage == 1 else szPage
            return _Index(salts, mxFrame, nPage, pageSize)
        return None
    finally:
        os.close(fd)


def walPosition(database: str) -> WalPosition | None:
    """
    Where the write-ahead log of the WAL database at C{database} stands now:
    every commit made so far is at or before it.

    @return: the position, or L{None} if the database has no initialised
        WAL index or an empty log (the next commit may start a generation
        whose salts cannot be known yet).
    """
    index = _readIndex(database + "-shm")
    if index is None or index.frames == 0:
        return None
    return WalPosition(index.salts, index.frames)


def readChanges(
    database: str,
    since: WalPosition,
    pageSize: int,
    maxFrames: int | None = None,
    settled: bool = False,
) -> WalChanges | None:
    """
    The pages the WAL database at C{database} committed after C{since}.
    Blocking; safe while the database's own connection writes.

    @param pageSize: the database's page size, as last shipped.
    @param maxFrames: read at most this many frames.
    @param settled: whether the caller is the thread that writes the
        database (so nothing can restart its log while it is read, and the
        index need not be read again to check).
    @return: the changes (no pages if nothing was committed since), or
        L{None} if they cannot be read from the log: its generation changed
        since C{since}, the page size changed, the files do not look
        exactly as SQLite writes them, or there are more than C{maxFrames}
        frames to read.
    """
    index = _readIndex(database + "-shm")
    if (
        index is None
        or index.salts != since.salts
        or index.pageSize != pageSize
        or index.frames < since.frames
    ):
        return None
    if index.frames == since.frames:
        return WalChanges({}, index.pageCount, since)
    if maxFrames is not None and index.frames - since.frames > maxFrames:
        return None
    try:
        fd = os.open(database + "-wal", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        frameSize = _FRAME_HEADER_SIZE + pageSize
        count = index.frames - since.frames
        offset = _WAL_HEADER_SIZE + since.frames * frameSize
        if os.fstat(fd).st_size < offset + count * frameSize:
            # A log shorter than its index says is not the one the index
            # describes: refused before reading, so that a damaged index
            # cannot make this allocate the frames it claims.
            return None
        data = os.pread(fd, count * frameSize, offset)
    finally:
        os.close(fd)
    if len(data) != count * frameSize:
        return None
    starts: dict[int, int] = {}
    commit = 0
    for offset in range(0, len(data), frameSize):
        pageNumber, commit, salts = _FRAME_HEADER.unpack_from(data, offset)
        if salts != since.salts or pageNumber == 0:
            return None
        starts[pageNumber] = offset + _FRAME_HEADER_SIZE
    if commit != index.pageCount:
        # The last committed frame is a commit frame carrying the database's
        # size: anything else is not the log the index describes.
        return None
    if not settled:
        after = _readIndex(database + "-shm")
        if after is None or after.salts != since.salts:
            # Restarted while being read: the frames may have been overwritten.
            return None
    return WalChanges(
        {
            number: data[start : start + pageSize]
            for number, start in starts.items()
            if number <= index.pageCount
        },
        index.pageCount,
        WalPosition(since.salts, index.frames),
    )

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

Reading keeps its descriptors open (L{WalFiles}): closing any descriptor of
a file drops every POSIX lock the process holds on it, whichever descriptor
took the lock, and SQLite holds such locks on the WAL index for as long as a
connection has the database open.  A reader that opened and closed the index
for each read would silently drop the locks of the store's own connection,
and another process opening the database would then believe itself its only
user and initialise the WAL index afresh under the live connection.
"""

from __future__ import annotations

import os
import struct
import threading

from attrs import frozen

__all__ = ["WalPosition", "WalChanges", "WalFiles", "walPosition", "readChanges"]

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
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)

# After the headers, the WAL index holds, per 32 KiB block, the page number
# of each frame (native 32-bit integers: 4062 frames in the first block,
# after the two headers and the checkpoint information, 4096 in each next
# one), then a hash table of them.
_INDEX_BLOCK = 32768
_INDEX_HEADERS = 136
_FIRST_BLOCK_FRAMES = 4062
_BLOCK_FRAMES = 4096

# Up to this many bytes of frames are read in one go; past it, only the
# newest frame of each page, found from the index's page numbers.
_DENSE_BYTES = 64 * 1024


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


def _readIndex(shm: int) -> _Index | None:
    """
    The header of the WAL index open as C{shm}, if it is initialised and
    reads the same in both its copies (a writer updates them one after the
    other).
    """
    for _ in range(_MAX_TRIES):
        data = os.pread(shm, 2 * _INDEX_HEADER_SIZE, 0)
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


def _framePages(shm: int, first: int, last: int) -> list[int] | None:
    """
    The page numbers of frames C{first} to C{last} (counted from 1), from
    the WAL index open as C{shm}: where SQLite itself looks a page up in the
    log.
    """
    numbers: list[int] = []
    frame = first
    while frame <= last:
        if frame <= _FIRST_BLOCK_FRAMES:
            offset = _INDEX_HEADERS + (frame - 1) * 4
            left = _FIRST_BLOCK_FRAMES - frame + 1
        else:
            block, slot = divmod(frame - _FIRST_BLOCK_FRAMES - 1, _BLOCK_FRAMES)
            offset = (block + 1) * _INDEX_BLOCK + slot * 4
            left = _BLOCK_FRAMES - slot
        count = min(left, last - frame + 1)
        data = os.pread(shm, count * 4, offset)
        if len(data) != count * 4:
            return None
        numbers.extend(struct.unpack(f"={count}I", data))
        frame += count
    return numbers


class WalFiles:
    """
    The WAL index and the write-ahead log of one database, opened on first
    use and kept open until L{close}, so that reading them never closes a
    descriptor that SQLite's own locks may ride on (see the module
    docstring).  Close them once no connection of this process has the
    database open: for a store, after it is closed.  Reads may run in
    several threads at once.

    A file deleted since it was opened is opened again: SQLite deletes both
    when the last connection closes and when the database leaves WAL mode,
    and makes new ones (new generations, with new salts) when it is opened
    or goes back to WAL mode.  Closing a deleted file cannot drop a lock of
    a live connection: no connection can open it any more.

    @ivar database: the path of the database file.
    """

    def __init__(self, database: str) -> None:
        self.database = database
        self._lock = threading.Lock()
        self._descriptors: dict[str, int] = {}

    def _open(self, suffix: str) -> int | None:
        """
        The descriptor of the database's file with C{suffix} (C{-shm} or
        C{-wal}), opened now if it is not yet; L{None} if it does not exist.
        """
        with self._lock:
            fd = self._descriptors.get(suffix)
            if fd is not None and not os.fstat(fd).st_nlink:
                del self._descriptors[suffix]
                os.close(fd)
                fd = None
            if fd is None:
                try:
                    fd = os.open(self.database + suffix, _READ_FLAGS)
                except OSError:
                    return None
                self._descriptors[suffix] = fd
            return fd

    def position(self, empty: bool = False) -> WalPosition | None:
        """
        Where the database's write-ahead log stands now: every commit made so
        far is at or before it.

        @param empty: also answer the start of an empty log: only right
            after the caller restarted it (as C{wal_checkpoint(TRUNCATE)}
            does), when the next commit is known to go on in its generation.
        @return: the position, or L{None} if the database has no initialised
            WAL index or, unless C{empty}, an empty log (the next commit may
            start a generation whose salts cannot be known yet).
        """
        shm = self._open("-shm")
        if shm is None:
            return None
        index = _readIndex(shm)
        if index is None or (index.frames == 0 and not empty):
            return None
        return WalPosition(index.salts, index.frames)

    def changes(
        self,
        since: WalPosition,
        pageSize: int,
        maxFrames: int | None = None,
        settled: bool = False,
    ) -> WalChanges | None:
        """
        The pages the database committed after C{since}.  Blocking; safe
        while the database's own connection writes.

        @param pageSize: the database's page size, as last shipped.
        @param maxFrames: read at most this many frames.
        @param settled: whether the caller is the thread that writes the
            database (so nothing can restart its log while it is read, and
            the index need not be read again to check).
        @return: the changes (no pages if nothing was committed since), or
            L{None} if they cannot be read from the log: its generation
            changed since C{since}, the page size changed, the files do not
            look exactly as SQLite writes them, or there are more than
            C{maxFrames} frames to read.
        """
        shm = self._open("-shm")
        if shm is None:
            return None
        index = _readIndex(shm)
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
        frameSize = _FRAME_HEADER_SIZE + pageSize
        count = index.frames - since.frames
        fd = self._open("-wal")
        if fd is None:
            return None
        if maxFrames is None and os.fstat(fd).st_size < _WAL_HEADER_SIZE + index.frames * frameSize:
            # A log shorter than its index says is not the one the index
            # describes: refused before reading, so that a damaged index
            # cannot make this allocate the frames it claims.  (A read of at
            # most C{maxFrames} frames allocates no more than that, and a
            # short log reads short and is refused below.)
            return None
        if count * frameSize <= _DENSE_BYTES:
            pages = _readFrames(fd, since, count, frameSize, index.pageCount)
        else:
            pages = _readNewest(fd, shm, since, index, frameSize)
        if pages is None:
            return None
        if not settled:
            after = _readIndex(shm)
            if after is None or after.salts != since.salts:
                # Restarted while being read: the frames may have been
                # overwritten.
                return None
        return WalChanges(pages, index.pageCount, WalPosition(since.salts, index.frames))

    def close(self) -> None:
        """
        Close the files: only once no connection of this process has the
        database open (see the class docstring) and no read of them is
        under way.  Reading again opens them again.
        """
        with self._lock:
            descriptors, self._descriptors = self._descriptors, {}
        for fd in descriptors.values():
            os.close(fd)


def walPosition(database: str) -> WalPosition | None:
    """
    L{WalFiles.position} of the database at C{database}, opening its files
    for this one read: only for a database that no connection of this
    process has open.
    """
    files = WalFiles(database)
    try:
        return files.position()
    finally:
        files.close()


def readChanges(
    database: str,
    since: WalPosition,
    pageSize: int,
    maxFrames: int | None = None,
    settled: bool = False,
) -> WalChanges | None:
    """
    L{WalFiles.changes} of the database at C{database}, opening its files
    for this one read: only for a database that no connection of this
    process has open.
    """
    files = WalFiles(database)
    try:
        return files.changes(since, pageSize, maxFrames, settled)
    finally:
        files.close()


def _readFrames(
    fd: int, since: WalPosition, count: int, frameSize: int, pageCount: int
) -> dict[int, bytes] | None:
    """
    Read the C{count} frames after C{since} in one go, and keep the newest
    of each page up to C{pageCount}; L{None} if a frame is not of the
    generation, or the last is not a commit frame of C{pageCount} pages.
    """
    data = os.pread(fd, count * frameSize, _WAL_HEADER_SIZE + since.frames * frameSize)
    if len(data) != count * frameSize:
        return None
    starts: dict[int, int] = {}
    commit = 0
    for offset in range(0, len(data), frameSize):
        pageNumber, commit, salts = _FRAME_HEADER.unpack_from(data, offset)
        if salts != since.salts or pageNumber == 0:
            return None
        starts[pageNumber] = offset + _FRAME_HEADER_SIZE
    if commit != pageCount:
        # The last committed frame is a commit frame carrying the database's
        # size: anything else is not the log the index describes.
        return None
    size = frameSize - _FRAME_HEADER_SIZE
    return {
        number: data[start : start + size]
        for number, start in starts.items()
        if number <= pageCount
    }


def _readNewest(
    fd: int, shm: int, since: WalPosition, index: _Index, frameSize: int
) -> dict[int, bytes] | None:
    """
    Read only the newest frame of each page written after C{since}, found
    from the index's page numbers (a page written many times since is read
    once), checking that each frame read, and the last, are what the index
    says; L{None} otherwise.
    """
    numbers = _framePages(shm, since.frames + 1, index.frames)
    if numbers is None or 0 in numbers:
        return None
    newest: dict[int, int] = {}
    for frame, number in enumerate(numbers, since.frames):
        newest[number] = frame
    pages: dict[int, bytes] = {}
    for number, frame in newest.items():
        if number > index.pageCount:
            continue
        data = os.pread(fd, frameSize, _WAL_HEADER_SIZE + frame * frameSize)
        if len(data) != frameSize:
            return None
        pageNumber, _, salts = _FRAME_HEADER.unpack_from(data)
        if pageNumber != number or salts != since.salts:
            return None
        pages[number] = data[_FRAME_HEADER_SIZE:]
    last = os.pread(fd, _FRAME_HEADER_SIZE, _WAL_HEADER_SIZE + (index.frames - 1) * frameSize)
    if len(last) != _FRAME_HEADER_SIZE:
        return None
    pageNumber, commit, salts = _FRAME_HEADER.unpack_from(last)
    if pageNumber != numbers[-1] or salts != since.salts or commit != index.pageCount:
        return None
    return pages

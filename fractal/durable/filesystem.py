# -*- test-case-name: tests.test_durable_backend -*-
"""
The default durable backend: a directory, ideally on another disk or a
network mount, holding append-only segment files.

Layout::

    ROOT/lock                       taken shared to read, exclusively to write
    ROOT/segments/<n>-<id>.seg      append-only segments (n: 16 decimal digits)

A writer (a L{FilesystemBackend} that appends) writes batches to a segment of
its own, made by it and never appended to by anyone else, which it holds an
exclusive C{flock} on while it uses it.  A batch is made durable by one
C{fdatasync} of that one file (and, when the segment is new, one C{fsync} of
the directory), however many records, fences and prunes it holds: group
commit.  Every write, and every check of epoch and sequence before it, happens
under an exclusive C{flock} of C{ROOT/lock}, after reading whatever other
writers appended since, so that writers in several processes (or on several
machines, on a file system whose locks work across them) can never both
succeed; readers take the same lock shared.

A segment starts with the 8 bytes C{FXSEG} 0 0 1 and holds batches.  A batch,
all integers big-endian::

    magic       4 bytes   b"FXSB"
    version     1 byte    1
    reserved    3 bytes   0
    count       4 bytes   the number of entries
    tableCrc    4 bytes   CRC-32 of the entry table
    dataLength  8 bytes   the length of the data area
    dataCrc     4 bytes   CRC-32 of the data area
    headerCrc   4 bytes   CRC-32 of the 28 bytes before it
    table       count entries of 96 bytes: kind (1 byte: 1 record, 2 fence,
                3 prune), 3 bytes 0, epoch, seq, baseSeq (8 bytes each; a
                prune's seq is the snapshot it prunes before), length (4
                bytes: the record's length in the data area), store (32 raw
                bytes), digest (the record's SHA-256, 32 bytes)
    data        the records' bytes, in the table's order

A crash while a batch is written can leave it torn at the end of its segment
(a writer never writes after a batch it did not finish, and a new writer
starts a new segment): a batch that is incomplete, whose header or table
fails its CRC, or which is the last of its segment and whose data fails its
CRC, ends what is read of that segment, and is never served.  Such a batch
was never acknowledged, since a batch is acknowledged only after its
C{fdatasync}.  Damage to an earlier batch's data (a flipped bit) is caught
where it matters, when the record is read: its SHA-256 no longer matches, and
a restore refuses the chain.

A batch that fails a check but is not a torn tail (intact batches follow it:
damage to an acknowledged batch) hides only itself: readers go on at the
next intact batch, so the records after it are still served, and a store
with a record in the damaged batch has a gap, which a restore refuses.
When the damaged batch's header is intact, its own framing says where the
next batch starts.  When it is not, the segment is scanned forward, never
past its end, for the first offset where a batch starts that passes every
check (magic, version, header, table and data CRCs, fits in the file) and
is followed by such batches to the end of the segment or to its torn tail;
an intact-looking batch that stops short of that lies inside the damaged
batch's records (which can hold any bytes, an encoded batch included) and
is never read as one.  A damaged batch at the end with nothing intact
after it ends what is read of the segment, as a torn tail does.

What the entries say merges the same whichever order the segments are read
in: a store's epoch is the highest of its records and fences, its pruned
floor the highest of its prunes, and its records those at or above the floor
(the same record copied twice counts once).  A segment no writer holds any
more whose live records are few is compacted away: the writer first appends
a checkpoint of every store's epoch and floor and copies of the segment's
live records, syncs, and only then deletes it.  A segment that cannot be
read to its end, or was read past damage, is never deleted as it is.  When a full check of it (every
CRC, see L{inspectSegment}) finds every batch intact up to a torn tail whose
own framing shows it unfinished (fewer bytes than a batch header, or an
intact header promising more bytes than the file has), that tail was never
synced, so never acknowledged: compaction syncs the segment and cuts the
tail off, and the segment is then compacted like any other.  Any damage
(a region that fails a check although its batch is whole, or that intact
batches follow) keeps the whole segment as it is.

An older layout of this backend (one file per record, under
C{ROOT/<2 digits>/<store name>/}) is moved into a segment, then removed,
the first time a backend is used on its directory.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import re
import secrets
import struct
import threading
import zlib
from typing import Any, Callable, Iterator, NamedTuple, Sequence, TypeVar, Union

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from fractal.durable._threads import RunInThread, reactorThreads
from fractal.durable.interfaces import (
    DurableError,
    IDurableBackend,
    NoSuchRecord,
    RecordInfo,
    SequenceConflict,
    StaleEpoch,
)
from fractal.keys import checkStoreName, isStoreName

__all__ = [
    "FilesystemBackend",
    "SegmentProblem",
    "SegmentReport",
    "checkInfo",
    "checkAppend",
    "inspectSegment",
]

T = TypeVar("T")
_Buffer = Union[bytes, mmap.mmap]

_SEGMENT_NAME = re.compile(r"\A(\d{16})-([0-9a-f]{16})\.seg\Z")
_LEGACY_RECORD = re.compile(r"\A(\d{16})-(\d{16})-(\d{16})-(\d{16})-([0-9a-f]{64})\.rec\Z")

_SEGMENT_MAGIC = b"FXSEG\x00\x00\x01"
_BATCH = struct.Struct(">4sB3xIIQI")
_BATCH_CRC = struct.Struct(">I")
_BATCH_HEADER_SIZE = _BATCH.size + _BATCH_CRC.size
_BATCH_MAGIC = b"FXSB"
_BATCH_VERSION = 1
_ENTRY = struct.Struct(">B3xQQQI32s32s")
_RECORD = 1
_FENCE = 2
_PRUNE = 3
_MAX_ENTRIES = 1 << 20


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


def checkAppend(info: RecordInfo, epoch: int, newest: int) -> None:
    """
    Check that a backend may append the record C{info} to its store: every
    backend's rule.

    @param epoch: the store's epoch (its fence, or its slot's).
    @param newest: the sequence number of the store's newest record, C{0}
        if it has none.
    @raise StaleEpoch: if C{info.epoch} is below C{epoch}.
    @raise SequenceConflict: if C{info.seq} does not follow C{newest}, or
        the store's first record is not a snapshot.
    """
    if info.epoch < epoch:
        raise StaleEpoch(info.store, info.epoch, epoch)
    if newest:
        if info.seq != newest + 1:
            raise SequenceConflict(
                f"store {info.store}: record {info.seq} does not follow "
                f"the newest stored record {newest}"
            )
    elif not info.isSnapshot:
        raise SequenceConflict(f"store {info.store}: the first record must be a snapshot")


def _fsyncDirectory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writeAll(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def encodeBatch(entries: Sequence[tuple[int, RecordInfo, bytes]]) -> bytes:
    """
    Encode one batch of entries (kind, info, data); a fence's or a prune's
    data is empty and its info's C{size} 0.
    """
    table = b"".join(
        _ENTRY.pack(kind, info.epoch, info.seq, info.baseSeq, len(data),
                    bytes.fromhex(info.store), info.digest)
        for kind, info, data in entries
    )
    body = b"".join(data for _, _, data in entries)
    header = _BATCH.pack(
        _BATCH_MAGIC, _BATCH_VERSION, len(entries), zlib.crc32(table), len(body),
        zlib.crc32(body),
    )
    return b"".join((header, _BATCH_CRC.pack(zlib.crc32(header)), table, body))


class _Location:
    """
    Where a record's bytes are: a segment, an offset and what it is.
    """

    __slots__ = ("info", "segment", "offset")

    def __init__(self, info: RecordInfo, segment: str, offset: int) -> None:
        self.info = info
        self.segment = segment
        self.offset = offset


class _Chain:
    """
    What the segments say of one store.
    """

    __slots__ = ("epoch", "floor", "newest", "records")

    def __init__(self) -> None:
        self.epoch = 0
        self.floor = 0
        self.newest = 0
        self.records: dict[int, _Location] = {}


class _Segment:
    """
    How far one segment has been read, the bytes of live records in it, and
    whether reading it went on past damage.
    """

    __slots__ = ("read", "size", "live", "damaged")

    def __init__(self) -> None:
        self.read = 0
        self.size = -1
        self.live = 0
        self.damaged = False


def _batchHeader(raw: bytes) -> tuple[int, int, int, int] | str:
    """
    Parse a batch header: its entry count, table CRC, data length and data
    CRC; or, when it fails its CRC or is not a header this version writes,
    why, for people.
    """
    (crc,) = _BATCH_CRC.unpack_from(raw, _BATCH.size)
    if zlib.crc32(raw[: _BATCH.size]) != crc:
        return "a batch header that fails its CRC"
    magic, version, count, tableCrc, dataLength, dataCrc = _BATCH.unpack_from(raw)
    if magic != _BATCH_MAGIC or version != _BATCH_VERSION or count > _MAX_ENTRIES:
        return "a batch header with an unknown magic, version or count"
    return count, tableCrc, dataLength, dataCrc


def _readBatch(
    fd: int, offset: int, size: int
) -> tuple[int, list[tuple[int, RecordInfo, int]]] | str:
    """
    Read the batch at C{offset} of a segment as a reader does: every check
    but the data CRC of a batch that is not the last of the segment (damage
    there is caught by the records' digests when they are read).

    @return: the offset after it and its entries as (kind, info, data
        offset); or C{"incomplete"} when its framing shows it unfinished (a
        torn tail), C{"damaged"} when it fails a check.
    """
    raw = os.pread(fd, _BATCH_HEADER_SIZE, offset)
    if len(raw) < _BATCH_HEADER_SIZE:
        return "incomplete"
    header = _batchHeader(raw)
    if isinstance(header, str):
        return "damaged"
    count, tableCrc, dataLength, dataCrc = header
    tableStart = offset + _BATCH_HEADER_SIZE
    dataStart = tableStart + count * _ENTRY.size
    end = dataStart + dataLength
    if end > size:
        return "incomplete"
    table = os.pread(fd, count * _ENTRY.size, tableStart)
    if len(table) != count * _ENTRY.size or zlib.crc32(table) != tableCrc:
        return "damaged"
    if end == size:
        # The last batch of the segment: the one a crash could have torn.
        crc = 0
        position = dataStart
        while position < end:
            chunk = os.pread(fd, min(1 << 20, end - position), position)
            if not chunk:
                return "damaged"
            crc = zlib.crc32(chunk, crc)
            position += len(chunk)
        if crc != dataCrc:
            return "damaged"
    entries = []
    position = dataStart
    total = 0
    for i in range(count):
        kind, epoch, seq, baseSeq, length, store, digest = _ENTRY.unpack_from(
            table, i * _ENTRY.size
        )
        info = RecordInfo(store.hex(), epoch, seq, baseSeq, length, digest)
        entries.append((kind, info, position))
        position += length
        total += length
    if total != dataLength:
        return "damaged"
    return end, entries


def _resync(fd: int, offset: int, size: int) -> int | None:
    """
    Where a reader goes on after the damaged batch at C{offset} of a
    segment (see L{_resumeAfter}): the offset of an intact batch (every CRC
    checked), or C{None} when none follows.
    """
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as buf:
        following = _resumeAfter(buf, offset, size)
        while following is not None:
            status = _checkBatch(buf, following, size)[0]
            if status == "ok":
                return following
            if status == "incomplete":
                return None
            following = _resumeAfter(buf, following, size)
    return None


def _segmentEntries(
    fd: int, start: int, size: int
) -> Iterator[tuple[int, list[tuple[int, RecordInfo, int]], bool]]:
    """
    The whole, intact batches of a segment from C{start}: for each, the
    offset after it, its entries as (kind, info, data offset), and whether
    damage was skipped before it.  Stops at a torn tail (an unfinished
    batch) and at damage that no intact batch follows; goes on past damage
    at the next intact batch (see L{_resumeAfter}).
    """
    offset = start
    if offset == 0:
        if os.pread(fd, len(_SEGMENT_MAGIC), 0) != _SEGMENT_MAGIC:
            return
        offset = len(_SEGMENT_MAGIC)
        yield offset, [], False
    resumed = False
    while offset + _BATCH_HEADER_SIZE <= size:
        batch = _readBatch(fd, offset, size)
        if batch == "incomplete":
            return
        if isinstance(batch, str):
            following = _resync(fd, offset, size)
            if following is None:
                return
            offset = following
            resumed = True
            continue
        offset, entries = batch
        yield offset, entries, resumed


class SegmentProblem(NamedTuple):
    """
    A region of a segment that cannot be read as intact batches.

    @ivar offset: where the region starts, in bytes from the segment's start.
    @ivar length: how many bytes it spans.
    @ivar torn: C{True} when the framing proves it the unfinished tail of a
        batch a crash cut short, which was never acknowledged (an expected
        leftover of a crash); C{False} when it is damage, or may be damage,
        to acknowledged data.
    @ivar reason: what is wrong with it, for people.
    @ivar following: how many intact batches follow it, before the next
        problem or the end of the segment; readers serve them.
    """

    offset: int
    length: int
    torn: bool
    reason: str
    following: int = 0


class SegmentReport(NamedTuple):
    """
    What a full check of one segment found (see L{inspectSegment}).

    @ivar name: the segment's file name.
    @ivar size: its size in bytes.
    @ivar batches: how many intact batches it holds.
    @ivar entries: how many entries (records, fences, prunes) they hold.
    @ivar goodEnd: the end of the intact batches before the first problem:
        everything before it is whole.
    @ivar problems: the regions that are not intact batches, in order.
    @ivar held: whether a live writer holds the segment (it may still grow).
    @ivar affected: the stores with entries in a damaged batch whose entry
        table is intact, or in an intact batch after damage (which readers
        serve, but whose chains may have a gap at the damage), sorted.
    """

    name: str
    size: int
    batches: int
    entries: int
    goodEnd: int
    problems: tuple[SegmentProblem, ...]
    held: bool = False
    affected: tuple[str, ...] = ()

    @property
    def damaged(self) -> list[SegmentProblem]:
        """
        The problems that are, or may be, damage to acknowledged data.
        """
        return [p for p in self.problems if not p.torn]

    @property
    def tornTail(self) -> SegmentProblem | None:
        """
        The segment's torn tail (the unfinished batch a crash left at its
        end), if it has one.
        """
        if self.problems and self.problems[-1].torn:
            return self.problems[-1]
        return None


def _checkBatch(buf: _Buffer, offset: int, size: int) -> tuple[str, int, bytes, str]:
    """
    Check the batch at C{offset} of a segment's bytes, all of its CRCs.

    @return: (status, end, entry table, reason): status is C{"ok"},
        C{"incomplete"} (the framing shows a batch that runs past the end of
        the file: an unfinished append) or C{"damaged"}; the entry table is
        given when it passes its CRC.
    """
    remaining = size - offset
    if remaining < _BATCH_HEADER_SIZE:
        return ("incomplete", size, b"",
                f"{remaining} bytes, fewer than a batch header ({_BATCH_HEADER_SIZE})")
    header = _batchHeader(bytes(buf[offset : offset + _BATCH_HEADER_SIZE]))
    if isinstance(header, str):
        return ("damaged", 0, b"", header)
    count, tableCrc, dataLength, dataCrc = header
    tableStart = offset + _BATCH_HEADER_SIZE
    dataStart = tableStart + count * _ENTRY.size
    end = dataStart + dataLength
    if end > size:
        return ("incomplete", size, b"",
                f"an unfinished batch: {remaining} of its {end - offset} bytes were written")
    table = bytes(buf[tableStart:dataStart])
    if zlib.crc32(table) != tableCrc:
        return ("damaged", 0, b"", "a batch whose entry table fails its CRC")
    if _crc(buf, dataStart, end) != dataCrc:
        return ("damaged", 0, table, "a batch whose records fail their CRC")
    lengths = sum(
        _ENTRY.unpack_from(table, i * _ENTRY.size)[4] for i in range(count)
    )
    if lengths != dataLength:
        return ("damaged", 0, table, "a batch whose entries do not add up to its data")
    return ("ok", end, table, "")


def _crc(buf: _Buffer, start: int, end: int) -> int:
    """
    The CRC-32 of C{buf[start:end]}, read a megabyte at a time.
    """
    crc = 0
    for position in range(start, end, 1 << 20):
        crc = zlib.crc32(buf[position : min(position + (1 << 20), end)], crc)
    return crc


def _framedEnd(buf: _Buffer, offset: int, size: int) -> int | None:
    """
    The end of the batch at C{offset} as its header says, when its header
    is intact (CRC, magic, version and count) and the batch fits in the
    segment; C{None} otherwise.
    """
    if size - offset < _BATCH_HEADER_SIZE:
        return None
    header = _batchHeader(bytes(buf[offset : offset + _BATCH_HEADER_SIZE]))
    if isinstance(header, str):
        return None
    count, _, dataLength, _ = header
    end: int = offset + _BATCH_HEADER_SIZE + count * _ENTRY.size + dataLength
    return end if end <= size else None


def _runsToEnd(buf: _Buffer, start: int, size: int, known: dict[int, bool]) -> bool:
    """
    Whether an intact batch (every CRC) starts at C{start}, followed by
    intact batches to the end of the segment or to an unfinished last batch
    (a torn tail).  C{known} remembers the answer for each batch start
    walked, so that a scan walks each batch once.
    """
    walked = []
    position = start
    answer = True
    while position < size:
        if position in known:
            answer = known[position]
            break
        status, end, _, _ = _checkBatch(buf, position, size)
        if status != "ok":
            answer = status == "incomplete" and position != start
            break
        walked.append(position)
        position = end
    for position in walked:
        known[position] = answer
    return answer


def _resumeAfter(buf: _Buffer, offset: int, size: int) -> int | None:
    """
    Where reading a segment goes on after the batch at C{offset}, which
    fails a check but is not an unfinished tail, or C{None} if nowhere.

    When the batch's header is intact, its own framing says where the next
    batch starts, and that is the answer (the caller checks what is there).
    Otherwise the segment is scanned forward for the first offset where a
    batch starts that is intact (every CRC, the data's included) and
    followed by intact batches to the end of the segment or to its torn
    tail: an intact batch stopping short of that is taken for bytes inside
    the damaged batch's records (which could hold anything, a batch's bytes
    included), never for a batch.
    """
    framed = _framedEnd(buf, offset, size)
    if framed is not None:
        return framed if framed < size else None
    known: dict[int, bool] = {}
    position = offset + 1
    while True:
        found = buf.find(_BATCH_MAGIC, position, size)
        if found < 0:
            return None
        if _runsToEnd(buf, found, size, known):
            return found
        position = found + 1


def _inspectBytes(name: str, buf: _Buffer) -> SegmentReport:
    """
    Check every batch of a segment's bytes, and classify each region that is
    not an intact batch.
    """
    size = len(buf)
    head = bytes(buf[: len(_SEGMENT_MAGIC)])
    if head != _SEGMENT_MAGIC:
        if size < len(_SEGMENT_MAGIC) and _SEGMENT_MAGIC.startswith(head):
            problem = SegmentProblem(
                0, size, True, "a segment whose creation a crash cut short, holding nothing"
            )
        else:
            problem = SegmentProblem(0, size, False, "not a segment: its first bytes are wrong")
        return SegmentReport(name, size, 0, 0, 0, (problem,))
    offset = goodEnd = len(_SEGMENT_MAGIC)
    batches = entries = 0
    problems: list[SegmentProblem] = []
    affected: set[str] = set()
    while offset < size:
        status, end, table, reason = _checkBatch(buf, offset, size)
        if status != "incomplete" and (problems or status == "damaged"):
            affected.update(
                table[i + 32 : i + 64].hex()  # the entry's store
                for i in range(0, len(table), _ENTRY.size)
            )
        if status == "ok":
            batches += 1
            entries += len(table) // _ENTRY.size
            offset = end
            if not problems:
                goodEnd = end
            else:
                last = problems[-1]
                problems[-1] = last._replace(following=last.following + 1)
        elif status == "incomplete":
            # The last batch of the segment, and its own framing shows that
            # it was never written in full, so never synced, never
            # acknowledged: a writer writes nothing after a batch it did
            # not finish.
            problems.append(SegmentProblem(offset, size - offset, True, reason))
            break
        else:
            following = _resumeAfter(buf, offset, size)
            if following is None:
                # Its framing does not show it unfinished: it may have been
                # acknowledged, so it is taken for damage.
                problems.append(SegmentProblem(offset, size - offset, False, (
                    f"{reason}, to the end of the segment (damage, or a crash on a"
                    " file system that lets a file grow before its data is written)"
                )))
                break
            # Batches follow: what is in between was written before them,
            # so finished and acknowledged.
            after = {
                "ok": "intact batches",
                "incomplete": "an unfinished batch",
            }.get(_checkBatch(buf, following, size)[0], "another damaged batch")
            problems.append(SegmentProblem(
                offset, following - offset, False,
                f"{reason}, followed by {after} at byte {following}",
            ))
            offset = following
    return SegmentReport(
        name, size, batches, entries, goodEnd, tuple(problems), affected=tuple(sorted(affected))
    )


def inspectSegment(fd: int, name: str) -> SegmentReport:
    """
    Check every batch of an open segment file, all of its CRCs (a reader
    checks the data of the last batch only), and find the regions that are
    not intact batches: a torn tail (an unfinished batch at the end, which
    its own framing shows incomplete, so never acknowledged) or damage (a
    region that fails a check although its batch is complete, or followed by
    intact batches, so once acknowledged).  Reads the file as it is; the
    caller holds whatever lock keeps writers off it.

    @param fd: the segment, open for reading.
    @param name: its file name, for the report.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return _inspectBytes(name, b"")
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as buf:
        return _inspectBytes(name, buf)


@implementer(IDurableBackend)
class FilesystemBackend:
    """
    Chains of records kept in append-only segment files in a directory.

    @ivar root: the directory.
    """

    log = Logger()

    def __init__(
        self,
        root: FilePath[str],
        runInThread: RunInThread | None = None,
        maxBatches: int = 1,
        clock: IReactorTime | None = None,
        segmentBytes: int = 64 * 1024 * 1024,
    ) -> None:
        """
        @param root: the directory; created when first written.
        @param runInThread: runs the blocking file work; the global reactor's
            thread pool by default.
        @param maxBatches: how many batches are handed to threads at the same
            time (they are written one after the other, under the lock, so
            more than one only queues a batch earlier).
        @param clock: when given, a batch starts at the end of the reactor
            turn in which its first write arrived, so that writes made in
            the same turn (a ship cycle's records) share it; without one, a
            batch starts at once.
        @param segmentBytes: the size past which a writer starts a new
            segment; segments it leaves behind whose live records fill less
            than half of them are compacted away.
        """
        self.root = root
        self._run = runInThread if runInThread is not None else reactorThreads()
        self._pending: list[tuple[tuple[Any, ...], Deferred[Any]]] = []
        self._batching = 0
        self._maxBatches = max(1, maxBatches)
        self._clock = clock
        self._gathering: IDelayedCall | None = None
        self._segmentBytes = segmentBytes
        self._mutex = threading.Lock()
        self._chains: dict[str, _Chain] = {}
        self._segments: dict[str, _Segment] = {}
        self._fresh = False
        self._migrated = False
        self._active: tuple[str, int] | None = None
        self._activeSize = 0
        self._compactDue = False
        self._compacting = False
        # Segments a full check found damaged (or not provably torn): no
        # one writes to them any more, so they are not checked again.
        self._uncuttable: set[str] = set()

    # Paths and locks

    @property
    def _segmentsPath(self) -> str:
        return os.path.join(self.root.path, "segments")

    def _locked(self, exclusive: bool, f: Callable[[], T]) -> T:
        """
        Call C{f} holding the in-process mutex and C{ROOT/lock} (shared or
        exclusive), after reading what was appended since the last call.
        A reader of a directory that does not exist reads nothing and
        creates nothing.
        """
        with self._mutex:
            if not exclusive and not os.path.isdir(self.root.path):
                self._reset()
                return f()
            if exclusive:
                self._makeRoot()
            lock = os.open(os.path.join(self.root.path, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._migrated:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    self._migrateLegacy()
                    self._migrated = True
                    if not exclusive:
                        fcntl.flock(lock, fcntl.LOCK_SH)
                else:
                    fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                try:
                    self._refresh()
                    return f()
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
            finally:
                os.close(lock)

    def _makeRoot(self) -> None:
        if os.path.isdir(self._segmentsPath):
            return
        created = []
        for path in (self.root.path, self._segmentsPath):
            try:
                os.makedirs(path)
            except FileExistsError:
                pass
            else:
                created.append(path)
        for path in created:
            _fsyncDirectory(os.path.dirname(path) or ".")

    # Reading the segments

    def _reset(self) -> None:
        self._chains = {}
        self._segments = {}

    def _refresh(self) -> None:
        """
        Read what other writers appended since the last refresh; read every
        segment again if one was deleted (compacted away) meanwhile.
        """
        try:
            names = [n for n in os.listdir(self._segmentsPath) if _SEGMENT_NAME.match(n)]
        except FileNotFoundError:
            names = []
        present = set(names)
        if not self._fresh or any(name not in present for name in self._segments):
            self._reset()
            self._fresh = True
        for name in sorted(names):
            # This writer's own segment is skipped by its size, unless all
            # is read again.
            self._scan(name)

    def _scan(self, name: str) -> None:
        segment = self._segments.get(name)
        if segment is None:
            segment = self._segments[name] = _Segment()
        path = os.path.join(self._segmentsPath, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            size = os.fstat(fd).st_size
            if size == segment.size:
                return
            segment.size = size
            for end, entries, resumed in _segmentEntries(fd, segment.read, size):
                for kind, info, offset in entries:
                    self._apply(kind, info, name, offset)
                segment.read = end
                if resumed:
                    segment.damaged = True
        finally:
            os.close(fd)

    def _chain(self, store: str) -> _Chain:
        chain = self._chains.get(store)
        if chain is None:
            chain = self._chains[store] = _Chain()
        return chain

    def _apply(self, kind: int, info: RecordInfo, segment: str, offset: int) -> None:
        """
        Merge one entry into what is known of its store.
        """
        chain = self._chain(info.store)
        if info.epoch > chain.epoch:
            chain.epoch = info.epoch
        if kind == _RECORD:
            if info.seq < chain.floor or info.seq in chain.records:
                return
            chain.records[info.seq] = _Location(info, segment, offset)
            if info.seq > chain.newest:
                chain.newest = info.seq
            self._live(segment, info.size)
        elif kind == _PRUNE and info.seq > chain.floor:
            chain.floor = info.seq
            for seq in [s for s in chain.records if s < info.seq]:
                location = chain.records.pop(seq)
                self._live(location.segment, -location.info.size)

    def _live(self, segment: str, size: int) -> None:
        state = self._segments.get(segment)
        if state is None:
            state = self._segments[segment] = _Segment()
        state.live += size

    # Writing

    def _openActive(self) -> tuple[str, int]:
        """
        This writer's segment, made (and locked) if it has none.
        """
        if self._active is not None:
            return self._active
        numbers = [
            int(m.group(1))
            for m in (_SEGMENT_NAME.match(n) for n in os.listdir(self._segmentsPath))
            if m
        ]
        number = max(numbers, default=0) + 1
        name = f"{number:016d}-{secrets.token_hex(8)}.seg"
        path = os.path.join(self._segmentsPath, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _writeAll(fd, _SEGMENT_MAGIC)
            os.fdatasync(fd)
            _fsyncDirectory(self._segmentsPath)
        except BaseException:
            os.close(fd)
            raise
        self._active = (name, fd)
        self._activeSize = len(_SEGMENT_MAGIC)
        # A new segment: a good time to compact those left behind.
        self._compactDue = True
        state = self._segments[name] = _Segment()
        state.read = state.size = self._activeSize
        return self._active

    def _closeActive(self) -> None:
        if self._active is not None:
            os.close(self._active[1])
            self._active = None

    def _writeEntries(self, entries: list[tuple[int, RecordInfo, bytes]]) -> None:
        """
        Append one batch to this writer's segment and make it durable, then
        merge its entries.  On an error nothing of it is merged, the segment
        is left (a new one takes the next batch), and the error is raised.
        """
        name, fd = self._openActive()
        batch = encodeBatch(entries)
        start = self._activeSize
        try:
            _writeAll(fd, batch)
            os.fdatasync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            self._closeActive()
            self._fresh = False
            raise
        self._activeSize += len(batch)
        state = self._segments[name]
        state.read = state.size = self._activeSize
        position = start + _BATCH_HEADER_SIZE + len(entries) * _ENTRY.size
        for kind, info, data in entries:
            self._apply(kind, info, name, position)
            position += len(data)
        if self._activeSize >= self._segmentBytes:
            self._closeActive()
        if self._compactDue and not self._compacting:
            self._compactDue = False
            self._compacting = True
            try:
                self._compact()
            finally:
                self._compacting = False

    def _commit(self, ops: list[tuple[Any, ...]]) -> list[tuple[bool, Any]]:
        """
        Check every operation of a batch, in order, against the chains and
        the operations before it, and write those that pass as one batch.
        Blocking; under the exclusive lock.

        @return: per operation, (C{True}, its result) or (C{False}, the
            exception refusing it).
        """
        results: list[tuple[bool, Any]] = []
        entries: list[tuple[int, RecordInfo, bytes]] = []
        # What this batch has done so far, per store: epoch, newest, floor.
        batch: dict[str, list[int]] = {}

        def view(store: str) -> list[int]:
            found = batch.get(store)
            if found is None:
                chain = self._chains.get(store)
                found = batch[store] = (
                    [chain.epoch, chain.newest, chain.floor] if chain else [0, 0, 0]
                )
            return found

        for op in ops:
            try:
                if op[0] == "records":
                    outcomes: list[BaseException | None] = []
                    for info, data in op[1]:
                        try:
                            checkInfo(info, data)
                            state = view(info.store)
                            checkAppend(info, state[0], state[1])
                        except (ValueError, StaleEpoch, SequenceConflict) as e:
                            outcomes.append(e)
                            continue
                        state[0] = max(state[0], info.epoch)
                        state[1] = info.seq
                        entries.append((_RECORD, info, bytes(data)))
                        outcomes.append(None)
                    results.append((True, outcomes))
                elif op[0] == "fence":
                    store, epoch = op[1], op[2]
                    state = view(checkStoreName(store))
                    if epoch < state[0]:
                        raise StaleEpoch(store, epoch, state[0])
                    if epoch > state[0]:
                        state[0] = epoch
                        entries.append((_FENCE, RecordInfo(store, epoch, 0, 0, 0, b""), b""))
                    results.append((True, None))
                else:
                    store, beforeSeq = op[1], op[2]
                    state = view(checkStoreName(store))
                    results.append((True, self._prunable(store, beforeSeq, entries, state)))
                    if results[-1][1]:
                        state[2] = max(state[2], beforeSeq)
                        entries.append(
                            (_PRUNE, RecordInfo(store, 0, beforeSeq, 0, 0, b""), b"")
                        )
            except (ValueError, DurableError) as e:
                results.append((False, e))
        if entries:
            self._writeEntries(entries)
        return results

    def _prunable(
        self,
        store: str,
        beforeSeq: int,
        entries: list[tuple[int, RecordInfo, bytes]],
        state: list[int],
    ) -> int:
        """
        How many records of C{store} a prune before C{beforeSeq} deletes:
        none unless the record at C{beforeSeq} is a stored snapshot.
        """
        chain = self._chains.get(store)
        stored = {s: loc.info for s, loc in chain.records.items()} if chain else {}
        for kind, info, _ in entries:
            if kind == _RECORD and info.store == store:
                stored[info.seq] = info
        stored = {s: info for s, info in stored.items() if s >= state[2]}
        target = stored.get(beforeSeq)
        if target is None or not target.isSnapshot:
            return 0
        return sum(1 for s in stored if s < beforeSeq)

    # Compaction

    def _compact(self) -> None:
        """
        Move the live records of segments no writer holds, and which are
        less than half live, into this writer's segment, and delete them.
        Blocking; under the exclusive lock.
        """
        victims = []
        for name, state in sorted(self._segments.items()):
            if self._active is not None and name == self._active[0]:
                continue
            if state.size != state.read and name not in self._uncuttable:
                self._cutTornTail(name, state)
            # Only a segment read to its end without skipping damage: one
            # with damage (or a torn tail that could not be cut) is kept as
            # it is, for what can still be read of it.
            whole = state.size == state.read and not state.damaged
            small = state.size < self._segmentBytes // 16
            if whole and (state.live * 2 < state.size or small) and not self._held(name):
                victims.append(name)
        if not victims:
            return
        checkpoint: list[tuple[int, RecordInfo, bytes]] = []
        for store, chain in sorted(self._chains.items()):
            if chain.epoch:
                checkpoint.append((_FENCE, RecordInfo(store, chain.epoch, 0, 0, 0, b""), b""))
            if chain.floor:
                checkpoint.append((_PRUNE, RecordInfo(store, 0, chain.floor, 0, 0, b""), b""))
        for name in victims:
            moving = [
                location
                for chain in self._chains.values()
                for location in chain.records.values()
                if location.segment == name
            ]
            entries = list(checkpoint)
            checkpoint = []
            path = os.path.join(self._segmentsPath, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                for location in sorted(moving, key=lambda loc: loc.offset):
                    data = os.pread(fd, location.info.size, location.offset)
                    entries.append((_RECORD, location.info, data))
            finally:
                os.close(fd)
            if entries:
                # Copies of records already indexed: merged as the same ones,
                # then moved to their new place below.
                name2, _ = self._openActive()
                start = self._activeSize
                self._writeEntries(entries)
                position = start + _BATCH_HEADER_SIZE + len(entries) * _ENTRY.size
                for kind, info, data in entries:
                    if kind == _RECORD:
                        moved = self._chains[info.store].records.get(info.seq)
                        if moved is not None and moved.segment == name:
                            moved.segment, moved.offset = name2, position
                            self._live(name, -info.size)
                            self._live(name2, info.size)
                    position += len(data)
            os.unlink(path)
            _fsyncDirectory(self._segmentsPath)
            del self._segments[name]

    def _cutTornTail(self, name: str, state: _Segment) -> None:
        """
        Cut off the torn tail of segment C{name}, if no writer holds it and
        a full check shows it provably an unfinished append: every batch
        before it intact (all CRCs) and the tail an unfinished batch whose
        own framing shows it incomplete (fewer bytes than a header, or an
        intact header promising more bytes than the file has), so never
        synced and never acknowledged, where the readers' index stops.  The
        good part is synced before the cut, and the cut after.  Any damage
        anywhere, or a tail that may be damage, leaves the segment as it
        is.  Blocking; under the exclusive lock.
        """
        path = os.path.join(self._segmentsPath, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return
                raise
            report = inspectSegment(fd, name)
            tail = report.tornTail
            if (
                tail is None
                or report.damaged
                or tail.offset != state.read
                or tail.offset + tail.length != report.size
            ):
                self._uncuttable.add(name)
                return
            os.fsync(fd)
            os.ftruncate(fd, tail.offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        state.size = tail.offset
        self.log.info(
            "Cut the torn tail of durable segment {segment}: {length} bytes at "
            "{offset}, {reason}, which was never acknowledged",
            segment=name,
            length=tail.length,
            offset=tail.offset,
            reason=tail.reason,
        )

    def _held(self, name: str) -> bool:
        """
        Whether a live writer holds segment C{name}.
        """
        try:
            fd = os.open(os.path.join(self._segmentsPath, name), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        finally:
            os.close(fd)
        return False

    # The older layout

    def _migrateLegacy(self) -> None:
        """
        Move the records of the one-file-per-record layout into a segment,
        then remove their files.  Blocking; under the exclusive lock.
        """
        try:
            prefixes = [n for n in os.listdir(self.root.path) if re.match(r"\A[0-9a-f]{2}\Z", n)]
        except FileNotFoundError:
            return
        for prefix in sorted(prefixes):
            parent = os.path.join(self.root.path, prefix)
            if not os.path.isdir(parent):
                continue
            for store in sorted(os.listdir(parent)):
                directory = os.path.join(parent, store)
                if store[:2] != prefix or not isStoreName(store):
                    continue
                self._migrateStore(store, directory)
            try:
                os.rmdir(parent)
            except OSError:
                pass

    def _migrateStore(self, store: str, directory: str) -> None:
        self._makeRoot()
        self._refresh()
        entries: list[tuple[int, RecordInfo, bytes]] = []
        names = os.listdir(directory)
        try:
            with open(os.path.join(directory, "epoch"), "rb") as f:
                epoch = int(f.read(64).decode("ascii").strip())
        except (OSError, ValueError):
            epoch = 0
        if epoch:
            entries.append((_FENCE, RecordInfo(store, epoch, 0, 0, 0, b""), b""))
        chain = self._chains.get(store)
        for name in sorted(names):
            match = _LEGACY_RECORD.match(name)
            if match is None:
                continue
            seq, baseSeq, recordEpoch, size, digest = match.groups()
            info = RecordInfo(store, int(recordEpoch), int(seq), int(baseSeq), int(size),
                              bytes.fromhex(digest))
            if chain is not None and info.seq in chain.records:
                continue
            with open(os.path.join(directory, name), "rb") as f:
                entries.append((_RECORD, info, f.read()))
        if entries:
            self._writeEntries(entries)
        for name in names:
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)
        _fsyncDirectory(os.path.dirname(directory))
        self.log.info("Moved the records of store {store} into a segment", store=store)

    # IDurableBackend

    def append(self, info: RecordInfo, data: bytes) -> Deferred[None]:
        """
        See L{IDurableBackend.append}: written with the other writes
        pending (see L{appendMany}).
        """

        def single(outcomes: list[BaseException | None]) -> None:
            if outcomes[0] is not None:
                raise outcomes[0]

        return self.appendMany([(info, data)]).addCallback(single)

    def appendMany(
        self, records: Sequence[tuple[RecordInfo, bytes]]
    ) -> Deferred[list[BaseException | None]]:
        """
        See L{IDurableBackend.appendMany}.

        The writes arriving while a batch is being written wait and then go
        together as the next batch, one C{fdatasync} for all (group commit).
        """
        if not records:
            return succeed([])
        return self._enqueue(("records", list(records)))

    def fence(self, store: str, epoch: int) -> Deferred[None]:
        return self._enqueue(("fence", store, epoch))

    def prune(self, store: str, beforeSeq: int) -> Deferred[int]:
        return self._enqueue(("prune", store, beforeSeq))

    def _enqueue(self, op: tuple[Any, ...]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._pending.append((op, d))
        if self._clock is None:
            self._nextBatch()
        elif self._gathering is None:
            self._gathering = self._clock.callLater(0, self._gathered)
        return d

    def _gathered(self) -> None:
        self._gathering = None
        self._nextBatch()

    def _nextBatch(self) -> None:
        """
        Write the pending operations as one batch, if fewer than
        C{maxBatches} are under way; each batch's end starts the next.
        """
        while self._pending and self._batching < self._maxBatches:
            batch, self._pending = self._pending, []
            self._batching += 1
            state = {"dispatching": True}

            def done(results: list[tuple[bool, Any]], batch: Any = batch) -> None:
                for (_, d), (ok, value) in zip(batch, results):
                    if ok:
                        d.callback(value)
                    else:
                        d.errback(value)

            def failed(failure: Failure, batch: Any = batch) -> None:
                for _, d in batch:
                    d.errback(failure)

            def finished(_: object, state: dict[str, bool] = state) -> None:
                self._batching -= 1
                if not state["dispatching"]:
                    self._nextBatch()

            def work(ops: list[tuple[Any, ...]] = [op for op, _ in batch]) -> Any:
                return self._locked(True, lambda: self._commit(ops))

            self._run(work).addCallbacks(done, failed).addBoth(finished)
            state["dispatching"] = False

    def head(self, store: str) -> Deferred[RecordInfo | None]:
        def head() -> RecordInfo | None:
            chain = self._chains.get(store)
            if chain is None or not chain.records:
                return None
            location = chain.records.get(chain.newest) or chain.records[max(chain.records)]
            return location.info

        return self._read(store, head)

    def records(self, store: str) -> Deferred[list[RecordInfo]]:
        def records() -> list[RecordInfo]:
            chain = self._chains.get(store)
            if chain is None:
                return []
            return [chain.records[seq].info for seq in sorted(chain.records)]

        return self._read(store, records)

    def read(self, store: str, seq: int) -> Deferred[bytes]:
        def read() -> bytes:
            chain = self._chains.get(store)
            location = chain.records.get(seq) if chain is not None else None
            if location is None:
                raise NoSuchRecord(f"store {store} has no record {seq}")
            fd = os.open(os.path.join(self._segmentsPath, location.segment), os.O_RDONLY)
            try:
                data = os.pread(fd, location.info.size, location.offset)
            finally:
                os.close(fd)
            if len(data) != location.info.size:
                raise NoSuchRecord(f"store {store}: record {seq} is cut short")
            return data

        return self._read(store, read)

    def _read(self, store: str, f: Callable[[], T]) -> Deferred[T]:
        def work() -> T:
            checkStoreName(store)
            return self._locked(False, f)

        return self._run(work)

    def stores(self) -> Deferred[list[str]]:
        def stores() -> list[str]:
            return sorted(
                store for store, chain in self._chains.items() if chain.epoch or chain.records
            )

        return self._run(lambda: self._locked(False, stores))

    def inspect(self) -> Deferred[list[SegmentReport]]:
        """
        Check every segment in full, all of its CRCs (see
        L{inspectSegment}), under the shared lock, so that no batch is half
        written while it is read.

        @return: a L{Deferred} firing with one L{SegmentReport} per segment,
            oldest first.
        """

        def inspect() -> list[SegmentReport]:
            try:
                names = sorted(
                    n for n in os.listdir(self._segmentsPath) if _SEGMENT_NAME.match(n)
                )
            except FileNotFoundError:
                return []
            reports = []
            for name in names:
                try:
                    fd = os.open(os.path.join(self._segmentsPath, name), os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    report = inspectSegment(fd, name)
                finally:
                    os.close(fd)
                held = self._active is not None and self._active[0] == name
                reports.append(report._replace(held=held or self._held(name)))
            return reports

        return self._run(lambda: self._locked(False, inspect))

    def close(self) -> None:
        """
        Let go of this writer's segment (another writer may then compact it).
        """
        with self._mutex:
            self._closeActive()

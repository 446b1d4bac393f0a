# -*- test-case-name: tests.test_durable_restore -*-
"""
Rebuilding a store from its chain, verifying every link.

A chain is restored from its newest snapshot forward.  Each record must be
the one after the record before it (no gap), based on it, and of the same
store; each record's bytes must match the digest the backend stored and the
record's own checksum; each applied record must rebuild exactly the image its
writer had (the image digest); and the result must pass SQLite's
C{PRAGMA quick_check}.  Anything else is a L{BrokenChain}, and nothing is
served.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from typing import Sequence

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.python.filepath import FilePath

from fractal.durable._threads import RunInThread
from fractal.durable.interfaces import BrokenChain, CorruptRecord, IDurableBackend, RecordInfo
from fractal.durable.record import applyDelta, decodeRecord

__all__ = [
    "RebuiltImage",
    "chainToRestore",
    "rebuildImage",
    "quickCheck",
    "writeImage",
    "rebuildFromBackend",
]


_QUICK_CHECK_ERRORS = 5
"""
The most errors of a damaged image that L{quickCheck} reports.
"""


@frozen
class RebuiltImage:
    """
    A store image rebuilt from its chain.

    @ivar image: the SQLite database image.
    @ivar pageSize: its page size.
    @ivar digests: its page digests (L{fractal.durable.record.pageDigests}).
    @ivar head: the newest record applied.
    @ivar chainLength: the number of records applied after the snapshot.
    @ivar chainBytes: the total size of those records.
    @ivar snapshotBytes: the size of the snapshot.
    @ivar takenAt: when the writer took the image of the newest record, in
        seconds since the Unix epoch.
    """

    image: bytes
    pageSize: int
    digests: tuple[bytes, ...]
    head: RecordInfo
    chainLength: int
    chainBytes: int
    snapshotBytes: int
    takenAt: float


def chainToRestore(store: str, records: Sequence[RecordInfo]) -> list[RecordInfo]:
    """
    The records to apply to restore C{store}: its newest snapshot and every
    record after it, checked for continuity.

    @param records: every stored record of the store, ascending.
    @raise BrokenChain: if there is no snapshot, or a record does not follow
        the one before it.
    """
    starts = [i for i, info in enumerate(records) if info.isSnapshot]
    if not starts:
        raise BrokenChain(f"store {store}: no snapshot to restore from")
    chain = list(records[starts[-1] :])
    for previous, info in zip(chain, chain[1:]):
        if info.seq != previous.seq + 1:
            raise BrokenChain(
                f"store {store}: gap in the chain between record {previous.seq} "
                f"and record {info.seq}"
            )
        if info.baseSeq != previous.seq:
            raise BrokenChain(
                f"store {store}: record {info.seq} is based on {info.baseSeq}, "
                f"not on the record before it, {previous.seq}"
            )
    return chain


def rebuildImage(store: str, chain: Sequence[RecordInfo], datas: Sequence[bytes]) -> RebuiltImage:
    """
    Apply a chain's records, verifying each, and check the result.

    @param chain: from L{chainToRestore}.
    @param datas: the bytes of each record of C{chain}.
    @raise BrokenChain: if any link is damaged or inconsistent, or the image
        fails its integrity check.
    """
    image = bytearray()
    digests: list[bytes] = []
    # Kept up to date so that each record's image digest is checked at the
    # cost of what it changed.
    groups: list[bytes] = []
    pageSize = 0
    takenAt = 0.0
    for info, data in zip(chain, datas, strict=True):
        if len(data) != info.size or hashlib.sha256(data).digest() != info.digest:
            raise BrokenChain(f"store {store}: record {info.seq} does not match its stored digest")
        try:
            delta = decodeRecord(data)
            if (delta.store, delta.seq, delta.baseSeq, delta.epoch) != (
                store,
                info.seq,
                info.baseSeq,
                info.epoch,
            ):
                raise CorruptRecord(f"record {info.seq} describes another place in a chain")
            applyDelta(image, digests, delta, groups)
        except CorruptRecord as e:
            raise BrokenChain(f"store {store}: corrupt link: {e}") from None
        pageSize = delta.pageSize
        takenAt = delta.takenAt
    result = bytes(image)
    problem = quickCheck(result)
    if problem is not None:
        raise BrokenChain(f"store {store}: restored image fails quick_check: {problem}")
    return RebuiltImage(
        image=result,
        pageSize=pageSize,
        digests=tuple(digests),
        head=chain[-1],
        chainLength=len(chain) - 1,
        chainBytes=sum(info.size for info in chain[1:]),
        snapshotBytes=chain[0].size,
        takenAt=takenAt,
    )


def quickCheck(image: bytes) -> str | None:
    """
    Run SQLite's C{PRAGMA quick_check} on an image, in memory.

    @return: L{None} if the image passes, else SQLite's complaint: its first
        five errors, on one line.
    """
    if len(image) < 100 or image[:16] != b"SQLite format 3\x00":
        return "not an SQLite database"
    copy = bytearray(image)
    # An in-memory database cannot be in WAL mode: mark the copy as a
    # rollback-journal database, which changes nothing else about it.
    copy[18] = copy[19] = 1
    connection = sqlite3.connect(":memory:")
    try:
        connection.deserialize(bytes(copy))
        rows = connection.execute(f"PRAGMA quick_check({_QUICK_CHECK_ERRORS})").fetchall()
    except sqlite3.DatabaseError as e:
        return str(e)
    finally:
        connection.close()
    if rows != [("ok",)]:
        # SQLite gives one row per error, or one row of lines.
        lines = "\n".join(str(row[0]) for row in rows).splitlines()
        errors = [line for line in lines if line and not line.startswith("***")]
        return "; ".join(errors) or "quick_check did not answer ok"
    return None


def writeImage(image: bytes, destination: FilePath[str]) -> FilePath[str]:
    """
    Write a restored image as C{destination/db.sqlite}, durably and
    atomically.

    @return: the database file.
    @raise FileExistsError: if the database file already exists.
    """
    destination.makedirs(ignoreExistingDirectory=True)
    target = destination.child("db.sqlite")
    if target.exists():
        raise FileExistsError(f"{target.path} already exists; not overwriting it")
    for suffix in ("-wal", "-shm"):
        stale = destination.child("db.sqlite" + suffix)
        if stale.exists():
            stale.remove()
    temporary = destination.child(".restoring-db.sqlite")
    with open(temporary.path, "wb") as f:
        f.write(image)
        f.flush()
        os.fsync(f.fileno())
    os.rename(temporary.path, target.path)
    fd = os.open(destination.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return target


def rebuildFromBackend(
    backend: IDurableBackend,
    store: str,
    runInThread: RunInThread,
    destination: FilePath[str] | None = None,
) -> Deferred[RebuiltImage | None]:
    """
    Fetch C{store}'s chain from C{backend}, rebuild and verify its image off
    the calling thread, and, if C{destination} is given, write it there as
    C{destination/db.sqlite}.

    @return: fires with the rebuilt image, or L{None} if the backend has no
        record of the store; fails with L{BrokenChain} if the chain cannot be
        restored exactly (nothing is written then).
    """

    async def rebuild() -> RebuiltImage | None:
        records = await backend.records(store)
        if not records:
            return None
        chain = chainToRestore(store, records)
        datas = [await backend.read(store, info.seq) for info in chain]

        def work() -> RebuiltImage:
            rebuilt = rebuildImage(store, chain, datas)
            if destination is not None:
                writeImage(rebuilt.image, destination)
            return rebuilt

        result: RebuiltImage = await runInThread(work)
        return result

    return Deferred.fromCoroutine(rebuild())

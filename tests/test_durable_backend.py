"""
Tests for L{fractal.durable.filesystem} and the in-memory backend, both held
to the L{fractal.testing.DurableBackendTestsMixin} contract.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from fractal.durable._threads import runSynchronously
from fractal.durable.filesystem import FilesystemBackend, encodeBatch, inspectSegment
from fractal.durable.interfaces import (
    BrokenChain,
    IDurableBackend,
    SequenceConflict,
    StaleEpoch,
)
from fractal.durable.restore import rebuildFromBackend
from fractal.keys import storeNameForKey
from fractal.testing import (
    DurableBackendTestsMixin,
    ManualThreads,
    MemoryDurableBackend,
    recordInfo,
)
from tests.test_durable_tool import chainRecords, shipChain


class MemoryDurableBackendTests(DurableBackendTestsMixin, TestCase):
    """
    The in-memory backend keeps the backend contract.
    """

    def makeBackend(self) -> IDurableBackend:
        return MemoryDurableBackend()


class FilesystemBackendConformanceTests(DurableBackendTestsMixin, TestCase):
    """
    The filesystem backend keeps the backend contract.
    """

    def makeBackend(self) -> IDurableBackend:
        backend = FilesystemBackend(FilePath(self.mktemp()), runSynchronously)
        self.addCleanup(backend.close)
        return backend


def _segments(root: FilePath[str]) -> list[FilePath[str]]:
    """
    The segment files of the filesystem backend at C{root}, oldest first.
    """
    return sorted(
        (p for p in root.child("segments").children() if p.basename().endswith(".seg")),
        key=lambda p: p.basename(),
    )


def _records(backend: FilesystemBackend, store: str) -> list[tuple[int, int]]:
    return [
        (r.seq, r.baseSeq)
        for r in _synchronously(backend.records(store))
    ]


def _synchronously(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    return result


class FilesystemBackendTests(SynchronousTestCase):
    """
    What the filesystem backend leaves on disk, and how it reads it back.
    """

    def backend(self, root: FilePath[str], **kwargs: Any) -> FilesystemBackend:
        backend = FilesystemBackend(root, runSynchronously, **kwargs)
        self.addCleanup(backend.close)
        return backend

    def test_layout(self) -> None:
        """
        Records go into a segment file under C{ROOT/segments/}, with no
        temporary files and no path made of a key or a store name; a new
        backend object on the same directory sees them.
        """
        root = FilePath(self.mktemp())
        backend = self.backend(root)
        store = storeNameForKey("../../etc/passwd")
        self.successResultOf(backend.append(recordInfo(store, 3, 1, 0, b"s"), b"s"))
        self.assertEqual(sorted(os.listdir(root.path)), ["lock", "segments"])
        self.assertEqual(len(_segments(root)), 1)
        again = self.backend(root)
        self.assertEqual(self.successResultOf(again.read(store, 1)), b"s")
        self.assertEqual(self.successResultOf(again.head(store)).epoch, 3)  # type: ignore[union-attr]
        self.assertEqual([p.path for p in root.walk() if store in p.path or "etc" in p.path], [])

    def test_strayFilesIgnored(self) -> None:
        """
        Files among the segments that are not segments (such as a temporary
        file left by a crash) are ignored.
        """
        root = FilePath(self.mktemp())
        backend = self.backend(root)
        store = storeNameForKey("carol")
        self.successResultOf(backend.append(recordInfo(store, 1, 1, 0, b"s"), b"s"))
        root.child("segments").child(".tmp-junk").setContent(b"torn")
        junk = root.child("segments").child("0000000000000099-0123456789abcdef.seg")
        junk.setContent(b"junk")
        self.assertEqual(_records(self.backend(root), store), [(1, 0)])
        # A new writer compacts the segments left behind, but never one it
        # cannot read to its end.
        writer = self.backend(root)
        self.successResultOf(writer.append(recordInfo(store, 1, 2, 1, b"d"), b"d"))
        self.assertTrue(junk.exists())
        self.assertEqual(_records(self.backend(root), store), [(1, 0), (2, 1)])

    def _twoBatches(self, root: FilePath[str]) -> tuple[str, int]:
        """
        Write two batches for one store into one segment.

        @return: the store's name and the size of the segment after the
            first batch.
        """
        backend = self.backend(root)
        store = storeNameForKey("dave")
        self.successResultOf(backend.append(recordInfo(store, 1, 1, 0, b"one"), b"one"))
        [segment] = _segments(root)
        size = segment.getsize()
        self.successResultOf(backend.appendMany([
            (recordInfo(store, 1, 2, 1, b"two" * 100), b"two" * 100),
            (recordInfo(store, 1, 3, 2, b"three"), b"three"),
        ]))
        backend.close()
        return store, size

    def test_tornTail(self) -> None:
        """
        A batch cut short at the end of its segment, at any length, (a crash
        while it was written) is ignored: the records before it are served,
        and a new writer goes on after them.
        """
        root = FilePath(self.mktemp())
        store, size = self._twoBatches(root)
        [segment] = _segments(root)
        content = segment.getContent()
        for cut in [size + 1, size + 20, size + 40, len(content) - 200, len(content) - 1]:
            with open(segment.path, "r+b") as f:
                f.truncate(cut)
            backend = self.backend(root)
            self.assertEqual(_records(backend, store), [(1, 0)], cut)
            backend.close()
            segment.setContent(content)
        with open(segment.path, "r+b") as f:
            f.truncate(len(content) - 1)
        backend = self.backend(root)
        self.successResultOf(backend.append(recordInfo(store, 1, 2, 1, b"again"), b"again"))
        self.assertEqual(_records(self.backend(root), store), [(1, 0), (2, 1)])
        self.assertEqual(self.successResultOf(self.backend(root).read(store, 2)), b"again")

    def test_bitFlippedLastBatch(self) -> None:
        """
        A flipped bit anywhere in the last batch of a segment makes it read
        as torn: it is never served.
        """
        root = FilePath(self.mktemp())
        store, size = self._twoBatches(root)
        [segment] = _segments(root)
        content = segment.getContent()
        for offset in [size, size + 27, size + 40, size + 250, len(content) - 1]:
            flipped = content[:offset] + bytes([content[offset] ^ 0x10]) + content[offset + 1 :]
            segment.setContent(flipped)
            self.assertEqual(_records(self.backend(root), store), [(1, 0)], offset)
        segment.setContent(content)
        self.assertEqual(_records(self.backend(root), store), [(1, 0), (2, 1), (3, 2)])

    def test_bitFlippedEarlierRecord(self) -> None:
        """
        A flipped bit in the data of a record of an earlier batch is read
        back as it is on disk, and so no longer matches the digest the
        backend lists for it: a restore refuses the chain.
        """
        root = FilePath(self.mktemp())
        store, _ = self._twoBatches(root)
        [segment] = _segments(root)
        content = segment.getContent()
        offset = content.index(b"one")
        segment.setContent(content[:offset] + b"onf" + content[offset + 3 :])
        backend = self.backend(root)
        [first] = _synchronously(backend.records(store))[:1]
        data = self.successResultOf(backend.read(store, 1))
        self.assertNotEqual(hashlib.sha256(data).digest(), first.digest)

    def test_restoreAcrossSegments(self) -> None:
        """
        With small segments, a chain spread over several of them restores
        exactly; pruning after a new snapshot compacts the segments of the
        old records away, keeping the epoch, and a new backend object reads
        the same.
        """
        root = FilePath(self.mktemp())
        backend = self.backend(root, segmentBytes=400)
        key = "erin"
        store = storeNameForKey(key)
        image = shipChain(backend, key, 6)
        self.assertGreater(len(_segments(root)), 2)
        rebuilt = self.successResultOf(rebuildFromBackend(backend, store, runSynchronously))
        self.assertEqual(rebuilt.image, image)
        old = {p.basename() for p in _segments(root)}
        head = self.successResultOf(backend.head(store))
        assert head is not None
        snapshot = b"snapshot" * 300
        self.successResultOf(
            backend.append(recordInfo(store, 2, head.seq + 1, 0, snapshot), snapshot)
        )
        self.assertEqual(self.successResultOf(backend.prune(store, head.seq + 1)), head.seq)
        # More writes, so that the writer moves on and compacts.
        other = storeNameForKey("frank")
        for seq in range(1, 4):
            self.successResultOf(backend.append(
                recordInfo(other, 1, seq, seq - 1, b"x" * 1500), b"x" * 1500
            ))
        # Every segment of the pruned records is gone.
        self.assertEqual(old & {p.basename() for p in _segments(root)}, set())
        for reader in [backend, self.backend(root)]:
            self.assertEqual(_records(reader, store), [(head.seq + 1, 0)])
            self.assertEqual(self.successResultOf(reader.read(store, head.seq + 1)), snapshot)
            self.assertEqual(len(_records(reader, other)), 3)
            self.failureResultOf(
                reader.append(recordInfo(store, 1, head.seq + 2, head.seq + 1, b"d"), b"d"),
                StaleEpoch,
            )

    def test_headerFlipEndsSegment(self) -> None:
        """
        A flipped bit in the header of a batch that is not the last of its
        segment ends what is read of that segment; a chain with later
        records in another segment then has a gap, and is refused.
        """
        root = FilePath(self.mktemp())
        backend = self.backend(root, segmentBytes=1)
        key = "grace"
        store = storeNameForKey(key)
        shipChain(backend, key, 3)
        backend.close()
        segments = _segments(root)
        self.assertEqual(len(segments), 4)
        # Segment 2 holds record 2; flip its batch header's count.
        content = segments[1].getContent()
        segments[1].setContent(content[:14] + bytes([content[14] ^ 1]) + content[15:])
        reader = self.backend(root)
        self.assertEqual([seq for seq, _ in _records(reader, store)], [1, 3, 4])
        self.failureResultOf(rebuildFromBackend(reader, store, runSynchronously), BrokenChain)

    def _batchStarts(self, content: bytes) -> list[int]:
        """
        Where the batches of a segment's bytes start (records here hold no
        batch magic).
        """
        starts = []
        position = content.find(b"FXSB")
        while position >= 0:
            starts.append(position)
            position = content.find(b"FXSB", position + 1)
        return starts

    def _damagedSecondBatch(self, key: str) -> tuple[FilePath[str], FilePath[str], str]:
        """
        Ship three records of C{key}'s store (a batch each) into a new
        backend, then flip a bit of the second batch's header.

        @return: the backend's root, its one segment and the store's name.
        """
        root = FilePath(self.mktemp())
        backend = self.backend(root)
        shipChain(backend, key, 2)
        backend.close()
        [segment] = _segments(root)
        content = bytearray(segment.getContent())
        content[self._batchStarts(bytes(content))[1] + 3] ^= 0x01
        segment.setContent(bytes(content))
        return root, segment, storeNameForKey(key)

    def test_damagedMiddleBatchSkipped(self) -> None:
        """
        A batch in the middle of a segment whose header or entry table fails
        its CRC (damage to an acknowledged batch, not a torn tail) hides only
        itself: the intact batches after it are read, so a store whose newest
        records follow the damage has that head, and its chain restores.
        """
        root = FilePath(self.mktemp())
        backend = self.backend(root)
        alice, image = chainRecords("alice", 2)
        bob, _ = chainRecords("bob", 0)
        for info, data in [alice[0], bob[0], alice[1], alice[2]]:
            self.successResultOf(backend.append(info, data))
        backend.close()
        [segment] = _segments(root)
        content = segment.getContent()
        bobBatch = self._batchStarts(content)[1]
        store = alice[0][0].store
        for where in [bobBatch + 14, bobBatch + 30, bobBatch + 40]:
            flipped = bytearray(content)
            flipped[where] ^= 0x08
            segment.setContent(bytes(flipped))
            reader = self.backend(root)
            self.assertEqual(_records(reader, store), [(1, 0), (2, 1), (3, 2)], where)
            head = self.successResultOf(reader.head(store))
            self.assertEqual(head, alice[2][0], where)
            rebuilt = self.successResultOf(rebuildFromBackend(reader, store, runSynchronously))
            self.assertEqual(rebuilt.image, image, where)
            self.assertIsNone(self.successResultOf(reader.head(bob[0][0].store)), where)

    def test_damagedMiddleBatchGap(self) -> None:
        """
        A store with a record in a damaged middle batch and later records
        after it has a gap: its chain is refused, never restored to the
        record before the damage.
        """
        root, segment, store = self._damagedSecondBatch("carol")
        reader = self.backend(root)
        self.assertEqual([seq for seq, _ in _records(reader, store)], [1, 3])
        self.assertEqual(self.successResultOf(reader.head(store)).seq, 3)  # type: ignore[union-attr]
        self.failureResultOf(rebuildFromBackend(reader, store, runSynchronously), BrokenChain)

    def test_damagedSegmentKept(self) -> None:
        """
        A segment read past damage is never compacted away, although every
        intact batch of it was read: a writer's compaction leaves it byte for
        byte, and its records after the damage are still served.
        """
        root, segment, store = self._damagedSecondBatch("dan")
        content = segment.getContent()
        writer = self.backend(root)
        other = storeNameForKey("erin")
        self.successResultOf(writer.append(recordInfo(other, 1, 1, 0, b"s"), b"s"))
        self.assertEqual(segment.getContent(), bytes(content))
        self.assertEqual([seq for seq, _ in _records(self.backend(root), store)], [1, 3])

    def test_resyncNeedsIntactBatches(self) -> None:
        """
        Going on past a damaged batch header never takes for a batch bytes
        inside the damaged batch that look like one (a record holding an
        encoded batch, all of its CRCs good): only an intact batch followed
        by intact batches to the segment's end (or its torn tail) is read.
        Nor does it take a batch that runs past the end of the file.
        """
        root = FilePath(self.mktemp())
        backend = self.backend(root)
        victim = storeNameForKey("victim")
        mallory = storeNameForKey("mallory")
        forged = encodeBatch([
            (2, recordInfo(victim, 99, 0, 0, b""), b""),
            (1, recordInfo(victim, 99, 7, 0, b"forged"), b"forged"),
        ])
        payload = b"x" * 50 + forged + b"y" * 50
        self.successResultOf(backend.append(recordInfo(victim, 1, 1, 0, b"v1"), b"v1"))
        self.successResultOf(backend.append(recordInfo(mallory, 1, 1, 0, payload), payload))
        self.successResultOf(backend.append(recordInfo(victim, 1, 2, 1, b"v2"), b"v2"))
        backend.close()
        [segment] = _segments(root)
        content = bytearray(segment.getContent())
        starts = [s for s in self._batchStarts(bytes(content)) if s != content.find(forged)]
        self.assertEqual(len(starts), 3)
        content[starts[1] + 5] ^= 0x01
        segment.setContent(bytes(content))
        reader = self.backend(root)
        self.assertEqual(_records(reader, victim), [(1, 0), (2, 1)])
        self.assertEqual(self.successResultOf(reader.head(victim)).epoch, 1)  # type: ignore[union-attr]
        self.assertEqual(_records(reader, mallory), [])
        # The last batch cut short: nothing after the damage is whole.
        segment.setContent(bytes(content[:-1]))
        self.assertEqual(_records(self.backend(root), victim), [(1, 0)])

    def test_writersFenceEachOther(self) -> None:
        """
        Two writers on one directory (two processes) each see what the
        other wrote before checking a write: a fence by one refuses the
        other's older epoch, and a sequence taken by one is refused to the
        other.
        """
        root = FilePath(self.mktemp())
        first, second = self.backend(root), self.backend(root)
        store = storeNameForKey("heidi")
        self.successResultOf(first.append(recordInfo(store, 1, 1, 0, b"s"), b"s"))
        self.successResultOf(second.fence(store, 2))
        self.failureResultOf(first.append(recordInfo(store, 1, 2, 1, b"d"), b"d"), StaleEpoch)
        self.successResultOf(second.append(recordInfo(store, 2, 2, 1, b"d2"), b"d2"))
        self.failureResultOf(
            first.append(recordInfo(store, 2, 2, 1, b"d3"), b"d3"), SequenceConflict
        )
        self.assertEqual(len(_segments(root)), 2)
        self.assertEqual(self.successResultOf(first.read(store, 2)), b"d2")

    def test_olderLayoutMoved(self) -> None:
        """
        Records of the older one-file-per-record layout are moved into a
        segment, with their store's fenced epoch, and their files removed.
        """
        root = FilePath(self.mktemp())
        store = storeNameForKey("ivan")
        directory = root.child(store[:2]).child(store)
        directory.makedirs()
        for seq, data in [(1, b"snap"), (2, b"delta")]:
            info = recordInfo(store, 1, seq, seq - 1, data)
            directory.child(
                f"{seq:016d}-{seq - 1:016d}-{1:016d}-{len(data):016d}-{info.digest.hex()}.rec"
            ).setContent(data)
        directory.child("epoch").setContent(b"4\n")
        directory.child("lock").setContent(b"")
        backend = self.backend(root)
        self.assertEqual(_records(backend, store), [(1, 0), (2, 1)])
        self.assertEqual(self.successResultOf(backend.read(store, 2)), b"delta")
        self.assertFalse(root.child(store[:2]).exists())
        self.failureResultOf(backend.append(recordInfo(store, 3, 3, 2, b"d"), b"d"), StaleEpoch)


class FilesystemTornTailTests(SynchronousTestCase):
    """
    A segment left with a torn tail by a crash mid-append does not stay
    forever: the next writer's compaction cuts the tail off, or copies the
    segment's records forward and deletes it, but only when the tail is
    provably an unacknowledged append, and never when any damage is in the
    segment.
    """

    def setUp(self) -> None:
        self.root = FilePath(self.mktemp())
        self.store = storeNameForKey("judy")
        self.snapshot = bytes(range(256)) * 40

    def backend(self, **kwargs: Any) -> FilesystemBackend:
        backend = FilesystemBackend(self.root, runSynchronously, **kwargs)
        self.addCleanup(backend.close)
        return backend

    def crashedSegment(self, **kwargs: Any) -> tuple[FilePath[str], bytes, bytes]:
        """
        Write a snapshot and a delta as two batches of one segment, then
        the start of a third batch that a crash cut short.

        @return: the segment, its acknowledged content, and the whole
            batch that was being appended.
        """
        backend = self.backend(**kwargs)
        self.successResultOf(backend.append(
            recordInfo(self.store, 1, 1, 0, self.snapshot), self.snapshot
        ))
        self.successResultOf(backend.append(recordInfo(self.store, 1, 2, 1, b"d2"), b"d2"))
        backend.close()
        [segment] = _segments(self.root)
        good = segment.getContent()
        data = b"never acknowledged" * 20
        batch = encodeBatch([(1, recordInfo(self.store, 1, 3, 2, data), data)])
        return segment, good, batch

    def nextWriter(self, **kwargs: Any) -> FilesystemBackend:
        """
        A new writer that appends the record after the acknowledged ones
        (starting a segment, and so compacting).
        """
        writer = self.backend(**kwargs)
        self.assertEqual(_records(writer, self.store), [(1, 0), (2, 1)])
        self.successResultOf(writer.append(recordInfo(self.store, 1, 3, 2, b"d3"), b"d3"))
        return writer

    def assertChainServed(self) -> None:
        for reader in [self.backend(), self.backend()]:
            self.assertEqual(_records(reader, self.store), [(1, 0), (2, 1), (3, 2)])
            self.assertEqual(self.successResultOf(reader.read(self.store, 1)), self.snapshot)
            self.assertEqual(self.successResultOf(reader.read(self.store, 3)), b"d3")

    def test_tornTailCut(self) -> None:
        """
        A segment mostly live (so not compacted away) has its torn tail cut
        off, at any length of the tail: the file is its acknowledged bytes
        again, and every record is served.
        """
        for cut in [1, 31, 32, 200, -1]:
            if self.root.exists():
                self.root.remove()
            segment, good, batch = self.crashedSegment(segmentBytes=1 << 16)
            segment.setContent(good + batch[:cut])
            self.nextWriter(segmentBytes=1 << 16)
            self.assertEqual(segment.getContent(), good, cut)
            self.assertChainServed()
            [report, _] = self.successResultOf(self.backend().inspect())
            self.assertEqual(report.problems, ())

    def test_tornSegmentCompactedAway(self) -> None:
        """
        A small segment with a torn tail is cut, then compacted away like any
        small segment: its records copied forward, the file deleted.  A
        segment file whose creation was cut short (part of its magic) is
        deleted too.
        """
        segment, good, batch = self.crashedSegment()
        segment.setContent(good + batch[:100])
        empty = self.root.child("segments").child("0000000000000002-0123456789abcdef.seg")
        empty.setContent(b"FXS")
        self.nextWriter()
        self.assertFalse(segment.exists())
        self.assertFalse(empty.exists())
        self.assertChainServed()
        self.assertEqual(len(_segments(self.root)), 1)

    def test_damageBeforeTornTailKept(self) -> None:
        """
        A torn tail is never cut from a segment whose earlier data is
        damaged (a flipped bit in the snapshot, which readers do not check
        the batch CRC of): the segment is kept byte for byte.
        """
        segment, good, batch = self.crashedSegment()
        damaged = bytearray(good + batch[:100])
        damaged[good.index(self.snapshot) + 100] ^= 0x01
        segment.setContent(bytes(damaged))
        self.nextWriter()
        self.assertEqual(segment.getContent(), bytes(damaged))

    def test_damagedLastBatchKept(self) -> None:
        """
        A last batch that is all there but fails its CRC may be an
        acknowledged one damaged since: it is not cut, and the segment is
        kept as it is.
        """
        segment, good, batch = self.crashedSegment()
        damaged = bytearray(good)
        damaged[-1] ^= 0x01
        segment.setContent(bytes(damaged))
        writer = self.backend()
        self.assertEqual(_records(writer, self.store), [(1, 0)])
        self.successResultOf(writer.append(recordInfo(self.store, 1, 2, 1, b"x"), b"x"))
        self.assertEqual(segment.getContent(), bytes(damaged))

    def inspect(self, segment: FilePath[str]) -> Any:
        fd = os.open(segment.path, os.O_RDONLY)
        try:
            return inspectSegment(fd, segment.basename())
        finally:
            os.close(fd)

    def test_everyCutTorn(self) -> None:
        """
        A segment cut anywhere inside its last batch (a crash mid-append, at
        every length) is found torn there, with nothing damaged; cut between
        batches, it is whole.
        """
        self.snapshot = b"a small snapshot"
        segment, good, batch = self.crashedSegment()
        for cut in range(len(batch) + 1):
            segment.setContent(good + batch[:cut])
            report = self.inspect(segment)
            if cut in (0, len(batch)):
                self.assertEqual(report.problems, (), cut)
                continue
            self.assertEqual(report.damaged, [], cut)
            self.assertEqual(report.tornTail.offset, len(good), cut)
            self.assertEqual(report.tornTail.length, cut, cut)
            self.assertEqual(report.goodEnd, len(good), cut)

    def test_everyFlipDamage(self) -> None:
        """
        A flipped bit in any byte after the segment's magic, in any batch,
        the last included, is found as damage and never as a torn tail, so
        compaction never cuts it: only a framing that shows a batch
        unfinished is taken for one.
        """
        self.snapshot = b"a small snapshot"
        segment, good, batch = self.crashedSegment()
        whole = good + batch
        for offset in range(8, len(whole)):
            flipped = bytearray(whole)
            flipped[offset] ^= 1 << (offset % 8)
            segment.setContent(bytes(flipped))
            report = self.inspect(segment)
            self.assertNotEqual(report.damaged, [], offset)
            self.assertIsNone(report.tornTail, offset)

    def test_heldSegmentKept(self) -> None:
        """
        The torn tail of a segment a live writer holds is left alone; once
        it is let go, the next writer cuts it.
        """
        segment, good, batch = self.crashedSegment(segmentBytes=1 << 16)
        segment.setContent(good + batch[:100])
        fd = os.open(segment.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.nextWriter(segmentBytes=1 << 16)
            self.assertEqual(segment.getContent(), good + batch[:100])
        finally:
            os.close(fd)
        writer = self.backend(segmentBytes=1 << 16)
        self.successResultOf(writer.append(recordInfo(self.store, 1, 4, 3, b"d4"), b"d4"))
        self.assertEqual(segment.getContent(), good)


class FilesystemGroupCommitTests(SynchronousTestCase):
    """
    Appends that arrive while the most batches are being written are written
    together as the next batch.
    """

    def test_batches(self) -> None:
        """
        The first append is written at once; the appends arriving meanwhile
        wait and then go as one batch; a refused record in a batch fails
        alone.
        """
        threads = ManualThreads()
        backend = FilesystemBackend(FilePath(self.mktemp()), threads, maxBatches=1)
        self.addCleanup(backend.close)
        names = [storeNameForKey(f"user{i}") for i in range(4)]
        first = backend.append(recordInfo(names[0], 1, 1, 0, b"a"), b"a")
        self.assertEqual(len(threads.pending), 1)
        rest = [backend.append(recordInfo(name, 1, 1, 0, b"b"), b"b") for name in names[1:3]]
        refused = backend.append(recordInfo(names[3], 1, 2, 1, b"c"), b"c")
        self.assertEqual(len(threads.pending), 1)
        self.assertNoResult(first)
        threads.runOne()
        self.successResultOf(first)
        self.assertEqual(len(threads.pending), 1)
        for d in rest:
            self.assertNoResult(d)
        threads.runOne()
        for d in rest:
            self.successResultOf(d)
        self.failureResultOf(refused, SequenceConflict)
        self.assertEqual(threads.pending, [])
        records = [backend.records(name) for name in names[1:3]]
        threads.runOne()
        threads.runOne()
        for d in records:
            self.assertEqual(len(self.successResultOf(d)), 1)

    def test_gatherTurn(self) -> None:
        """
        With a clock, appends made in the same reactor turn wait for the end
        of the turn and go as one batch.
        """
        threads = ManualThreads()
        clock = Clock()
        backend = FilesystemBackend(FilePath(self.mktemp()), threads, clock=clock)
        self.addCleanup(backend.close)
        names = [storeNameForKey(f"user{i}") for i in range(3)]
        appends = [backend.append(recordInfo(name, 1, 1, 0, b"a"), b"a") for name in names]
        self.assertEqual(threads.pending, [])
        clock.advance(0)
        self.assertEqual(len(threads.pending), 1)
        threads.runOne()
        for d in appends:
            self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])

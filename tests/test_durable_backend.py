"""
Tests for L{fractal.durable.filesystem} and the in-memory backend, both held
to the L{fractal.testing.DurableBackendTestsMixin} contract.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from fractal.durable._threads import runSynchronously
from fractal.durable.filesystem import FilesystemBackend
from fractal.durable.interfaces import IDurableBackend, SequenceConflict
from fractal.keys import storeNameForKey
from fractal.testing import DurableBackendTestsMixin, MemoryDurableBackend, recordInfo


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
        return FilesystemBackend(FilePath(self.mktemp()), runSynchronously)


class FilesystemBackendTests(SynchronousTestCase):
    """
    What the filesystem backend leaves on disk.
    """

    def test_layout(self) -> None:
        """
        A store's records are files under C{ROOT/<2 digits>/<store name>/},
        with no temporary files left behind, and a new backend object on the
        same directory sees them.
        """
        root = FilePath(self.mktemp())
        backend = FilesystemBackend(root, runSynchronously)
        store = storeNameForKey("../../etc/passwd")
        self.successResultOf(backend.append(recordInfo(store, 3, 1, 0, b"s"), b"s"))
        directory = root.child(store[:2]).child(store)
        names = sorted(os.listdir(directory.path))
        self.assertEqual([n for n in names if n.startswith(".tmp")], [])
        self.assertIn("epoch", names)
        self.assertEqual(directory.child("epoch").getContent(), b"3\n")
        again = FilesystemBackend(root, runSynchronously)
        self.assertEqual(self.successResultOf(again.read(store, 1)), b"s")
        self.assertEqual(self.successResultOf(again.head(store)).epoch, 3)  # type: ignore[union-attr]
        self.assertEqual([p.basename() for p in root.walk() if p.isfile() and "etc" in p.path], [])

    def test_strayFilesIgnored(self) -> None:
        """
        Files in a store directory that are not records (such as a temporary
        file left by a crash mid-write) are not listed as records.
        """
        root = FilePath(self.mktemp())
        backend = FilesystemBackend(root, runSynchronously)
        store = storeNameForKey("carol")
        self.successResultOf(backend.append(recordInfo(store, 1, 1, 0, b"s"), b"s"))
        root.child(store[:2]).child(store).child(".tmp-junk").setContent(b"torn")
        self.assertEqual([r.seq for r in self.successResultOf(backend.records(store))], [1])


class _ManualThreads:
    """
    A runner that queues the work it is given until the test runs it, as a
    thread pool would run it later.
    """

    def __init__(self) -> None:
        self.queue: list[tuple[Any, Deferred[Any]]] = []

    def __call__(self, f: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append((f, d))
        return d

    def runOne(self) -> None:
        f, d = self.queue.pop(0)
        try:
            result = f()
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)


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
        threads = _ManualThreads()
        backend = FilesystemBackend(FilePath(self.mktemp()), threads, maxBatches=1)
        names = [storeNameForKey(f"user{i}") for i in range(4)]
        first = backend.append(recordInfo(names[0], 1, 1, 0, b"a"), b"a")
        self.assertEqual(len(threads.queue), 1)
        rest = [backend.append(recordInfo(name, 1, 1, 0, b"b"), b"b") for name in names[1:3]]
        refused = backend.append(recordInfo(names[3], 1, 2, 1, b"c"), b"c")
        self.assertEqual(len(threads.queue), 1)
        self.assertNoResult(first)
        threads.runOne()
        self.successResultOf(first)
        self.assertEqual(len(threads.queue), 1)
        for d in rest:
            self.assertNoResult(d)
        threads.runOne()
        for d in rest:
            self.successResultOf(d)
        self.failureResultOf(refused, SequenceConflict)
        self.assertEqual(threads.queue, [])
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
        threads = _ManualThreads()
        clock = Clock()
        backend = FilesystemBackend(FilePath(self.mktemp()), threads, clock=clock)
        names = [storeNameForKey(f"user{i}") for i in range(3)]
        appends = [backend.append(recordInfo(name, 1, 1, 0, b"a"), b"a") for name in names]
        self.assertEqual(threads.queue, [])
        clock.advance(0)
        self.assertEqual(len(threads.queue), 1)
        threads.runOne()
        for d in appends:
            self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])

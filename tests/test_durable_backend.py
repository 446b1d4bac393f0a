"""
Tests for L{fractal.durable.filesystem} and the in-memory backend, both held
to the L{fractal.testing.DurableBackendTestsMixin} contract.
"""

from __future__ import annotations

import os

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from fractal.durable._threads import runSynchronously
from fractal.durable.filesystem import FilesystemBackend
from fractal.durable.interfaces import IDurableBackend
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

"""
Tests for L{fractal.durable.tool}: C{fractal restore} and C{fractal verify}.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
import sys

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from fractal._cli import main
from fractal.durable._threads import runSynchronously
from fractal.durable.filesystem import FilesystemBackend
from fractal.durable.interfaces import RecordInfo
from fractal.durable.record import Delta, diffImage, encodeRecord, imageDigest, pageSizeOf
from fractal.keys import storeNameForKey


def shipChain(backend: FilesystemBackend, key: str, rows: int) -> bytes:
    """
    Store a chain for C{key}: a snapshot of a database, then one delta per
    added row, as a shipper would.

    @return: the final image.
    """
    store = storeNameForKey(key)
    connection = sqlite3.connect(":memory:")
    connection.execute("CREATE TABLE notes (n INTEGER PRIMARY KEY, body TEXT)")
    previous = None
    image = b""
    for seq in range(1, rows + 2):
        if seq > 1:
            connection.execute("INSERT INTO notes VALUES (?, ?)", (seq, f"note {seq}" * 20))
        connection.commit()
        image = connection.serialize()
        size = pageSizeOf(image)
        pages, digests = diffImage(image, size, previous)
        data = encodeRecord(
            Delta(
                store=store,
                epoch=1,
                seq=seq,
                baseSeq=seq - 1 if previous is not None else 0,
                pageSize=size,
                pageCount=len(digests),
                pages=pages,
                imageDigest=imageDigest(digests, size),
            )
        )
        info = RecordInfo(
            store=store,
            epoch=1,
            seq=seq,
            baseSeq=seq - 1 if previous is not None else 0,
            size=len(data),
            digest=hashlib.sha256(data).digest(),
        )
        backend.append(info, data)
        previous = digests
    return image


class ToolTests(SynchronousTestCase):
    """
    The offline tools, run through the C{fractal} command.
    """

    def setUp(self) -> None:
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)
        self.data = FilePath(self.mktemp())
        self.backend = FilesystemBackend(self.data.child("durable"), runSynchronously)

    def test_restore(self) -> None:
        """
        C{fractal restore --data DIR USER --to PATH} writes the user's store
        at C{PATH/db.sqlite}, exactly as last shipped.
        """
        image = shipChain(self.backend, "alice@example.com", 3)
        to = FilePath(self.mktemp())
        status = main(["restore", "--data", self.data.path, "alice@example.com", "--to", to.path])
        self.assertEqual(status, 0, self.stderr.getvalue())
        self.assertEqual(to.child("db.sqlite").getContent(), image)
        self.assertIn("at record 4", self.stdout.getvalue())
        self.assertIn("image taken 1970-01-01 00:00:00 UTC", self.stdout.getvalue())

    def test_restoreUnknownUser(self) -> None:
        """
        Restoring a user with no durable copy fails with status 1 and says so.
        """
        to = FilePath(self.mktemp())
        self.assertEqual(main(["restore", "--data", self.data.path, "bob", "--to", to.path]), 1)
        self.assertIn("no durable copy", self.stderr.getvalue())
        self.assertFalse(to.exists())

    def test_restoreBadKey(self) -> None:
        """
        A malformed user key is a usage error and touches nothing.
        """
        to = FilePath(self.mktemp())
        self.assertEqual(main(["restore", "--data", self.data.path, "a\x00b", "--to", to.path]), 2)
        self.assertIn("control character", self.stderr.getvalue())
        self.assertFalse(to.exists())

    def test_restoreExistingDestination(self) -> None:
        """
        C{--to} must name a new path: an existing one is never overwritten.
        """
        shipChain(self.backend, "alice", 1)
        to = FilePath(self.mktemp())
        to.makedirs()
        self.assertEqual(main(["restore", "--data", self.data.path, "alice", "--to", to.path]), 2)

    def test_verify(self) -> None:
        """
        C{fractal verify} checks every chain and reports a broken one, with
        status 1, naming the gap.
        """
        shipChain(self.backend, "alice", 2)
        shipChain(self.backend, "bob", 3)
        self.assertEqual(main(["verify", "--data", self.data.path]), 0)
        self.assertIn("2 stores, 0 broken", self.stdout.getvalue())
        bob = storeNameForKey("bob")
        # Flip a byte of bob's second record where it lies in its segment.
        second = self.successResultOf(self.backend.read(bob, 2))
        [segment] = self.data.child("durable").child("segments").children()
        content = segment.getContent()
        offset = content.index(second) + len(second) // 2
        segment.setContent(content[:offset] + bytes([content[offset] ^ 1]) + content[offset + 1 :])
        self.assertEqual(main(["verify", "--durable", self.data.child("durable").path]), 1)
        self.assertIn(f"BROKEN {bob}: store {bob}", self.stdout.getvalue())
        self.assertIn("2 stores, 1 broken", self.stdout.getvalue())

"""
Tests for L{fractal.durable.shipper}: shipping dirty stores as deltas, the
durable output gate, lag, fencing, compaction, restarts and restore.

The stores are real L{fractal.store.Store}s on disk; the backend is the
in-memory one (held to the same contract as the filesystem one), the clock a
L{Clock}, and blocking work runs synchronously.
"""

from __future__ import annotations

import fcntl
import random
import sqlite3
from typing import Any
from unittest import SkipTest

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from fractal.durable import shipper as shipperModule
from fractal.durable._threads import runSynchronously
from fractal.durable.interfaces import BrokenChain, IShipper, StaleEpoch
from fractal.durable.record import decodeRecord
from fractal.durable.shipper import STATE_FILE, Shipper, _PatchedDigests
from fractal.keys import storeNameForKey
from fractal.store import Item, Store, integer, text
from fractal.testing import ManualThreads, MemoryDurableBackend
from tests.test_durable_wal import descriptorsOf, indexInUse


class DurableTestNote(Item):
    typeName = "test_durable_note"
    number = integer()
    body = text()


def openStore(dbdir: FilePath[str]) -> Any:
    """
    Open (or create) a real store at C{dbdir}.
    """
    return Store(dbdir)


def write(store: Any, number: int, body: str) -> None:
    """
    Set note C{number} to C{body} in one transaction.
    """

    def change() -> None:
        note = store.findFirst(DurableTestNote, DurableTestNote.number == number)
        if note is None:
            DurableTestNote(store=store, number=number, body=body)
        else:
            note.body = body

    store.transact(change)


def delete(store: Any, number: int) -> None:
    """
    Delete note C{number}, if it exists, in one transaction.
    """

    def change() -> None:
        note = store.findFirst(DurableTestNote, DurableTestNote.number == number)
        if note is not None:
            note.deleteFromStore()

    store.transact(change)


def dump(database: FilePath[str]) -> list[str]:
    """
    The logical content of an SQLite database, as SQL statements.
    """
    connection = sqlite3.connect(f"file:{database.path}?mode=ro", uri=True)
    try:
        return list(connection.iterdump())
    finally:
        connection.close()


class _Harness:
    """
    A shipper on an in-memory backend with a clock, and stores for it.
    """

    def __init__(self, case: SynchronousTestCase, **kwargs: Any) -> None:
        self.case = case
        self.clock = Clock()
        self.backend = kwargs.pop("backend", None) or MemoryDurableBackend()
        self.root = kwargs.pop("root", None) or FilePath(case.mktemp())
        kwargs.setdefault("runInThread", runSynchronously)
        self.shipper = Shipper(self.backend, self.clock, **kwargs)
        self.fenced: list[tuple[str, StaleEpoch]] = []
        self.shipper.addFencedObserver(lambda key, error: self.fenced.append((key, error)))

    def dbdir(self, key: str) -> FilePath[str]:
        name = storeNameForKey(key)
        return self.root.child(name[:2]).child(name)

    def open(self, key: str) -> Any:
        store = openStore(self.dbdir(key))
        self.shipper.storeOpened(key, store)

        def close() -> None:
            # As the pool does; twice is harmless.
            store.close()
            self.shipper.storeClosed(key, store)

        self.case.addCleanup(close)
        return store

    def records(self, key: str) -> list[Any]:
        return self.case.successResultOf(self.backend.records(storeNameForKey(key)))

    def ship(self, key: str) -> None:
        """
        Ship C{key}'s store now and wait for it.
        """
        d = self.shipper.whenDurable(key)
        self.clock.advance(0)
        self.case.successResultOf(d)

    def countImageReads(self) -> list[str]:
        """
        Record the database of every whole image the shipper reads from now
        on.
        """
        reads: list[str] = []
        read = self.shipper._images.read

        def counting(database: FilePath[str], keep: bool = True) -> bytes | None:
            reads.append(database.path)
            return read(database, keep)

        self.case.patch(self.shipper._images, "read", counting)
        return reads

    def restored(self, key: str) -> list[str]:
        destination = FilePath(self.case.mktemp())
        other = Shipper(self.backend, Clock(), runInThread=runSynchronously)
        self.case.assertTrue(self.case.successResultOf(other.restore(key, destination)))
        return dump(destination.child("db.sqlite"))


class ShipperTests(SynchronousTestCase):
    """
    Shipping dirty stores.
    """

    def test_provides(self) -> None:
        """
        L{Shipper} provides L{IShipper} and L{IService}.
        """
        shipper = Shipper(MemoryDurableBackend(), Clock(), runInThread=runSynchronously)
        self.assertTrue(verifyObject(IShipper, shipper))
        self.assertTrue(verifyObject(IService, shipper))

    def test_shipsEveryInterval(self) -> None:
        """
        A store opened and changed is shipped at the next interval as a
        snapshot, which restores to exactly its content.
        """
        h = _Harness(self, interval=1.0)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        store = h.open("alice")
        write(store, 1, "hello")
        h.clock.advance(0.5)
        self.assertEqual(h.records("alice"), [])
        h.clock.advance(0.5)
        [record] = h.records("alice")
        self.assertTrue(record.isSnapshot)
        self.assertEqual(h.restored("alice"), dump(h.dbdir("alice").child("db.sqlite")))

    def test_deltaAfterSnapshot(self) -> None:
        """
        After the first snapshot, a one-row change ships as a small delta
        based on the record before it; a store with no new commit ships
        nothing.
        """
        h = _Harness(self)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        store = h.open("alice")
        for i in range(300):
            write(store, i, "x" * 200)
        h.clock.advance(1)
        h.clock.advance(1)
        self.assertEqual(len(h.records("alice")), 1)
        write(store, 7, "changed")
        h.clock.advance(1)
        snapshot, delta = h.records("alice")
        self.assertEqual((delta.seq, delta.baseSeq), (2, 1))
        self.assertLess(delta.size * 4, snapshot.size)
        self.assertEqual(h.restored("alice"), dump(h.dbdir("alice").child("db.sqlite")))

    def test_whenDurable(self) -> None:
        """
        L{Shipper.whenDurable} fires at once for a store with nothing
        unshipped; otherwise it starts a ship at once (not at the interval)
        and fires only when the backend has stored the record.
        """
        h = _Harness(self, interval=60.0)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        store = h.open("alice")
        first = h.shipper.whenDurable("alice")
        h.clock.advance(0)
        self.successResultOf(first)
        self.successResultOf(h.shipper.whenDurable("alice"))
        self.successResultOf(h.shipper.whenDurable("nobody"))
        h.backend.holdAppends = True
        write(store, 1, "durable")
        d = h.shipper.whenDurable("alice")
        self.assertNoResult(d)
        h.clock.advance(0)
        self.assertNoResult(d)
        h.backend.holdAppends = False
        h.backend.releaseAppends()
        self.successResultOf(d)
        self.assertIn("'durable'", "\n".join(h.restored("alice")))

    def test_unshipped(self) -> None:
        """
        L{Shipper.unshipped} is true for a store with commits not yet
        stored, and stays true while its ship is under way, even once the
        backend holds the record (its state file is still being written);
        it is false once the ship is over, and for a store it does not know.
        """
        threads = ManualThreads()
        h = _Harness(self, interval=60.0, runInThread=threads)
        self.assertFalse(h.shipper.unshipped("alice"))
        store = h.open("alice")
        write(store, 1, "one")
        self.assertTrue(h.shipper.unshipped("alice"))
        self.assertFalse(h.shipper.unshipped("nobody"))
        flushed = h.shipper.flush()
        storedWhileShipping = False
        while threads.pending:
            self.assertNoResult(flushed)
            self.assertTrue(h.shipper.unshipped("alice"))
            storedWhileShipping = storedWhileShipping or bool(h.records("alice"))
            threads.runOne()
        self.successResultOf(flushed)
        self.assertTrue(storedWhileShipping)
        self.assertFalse(h.shipper.unshipped("alice"))
        write(store, 2, "two")
        self.assertTrue(h.shipper.unshipped("alice"))

    def test_groupCommit(self) -> None:
        """
        Durable waiters of several users in the same turn share one ship
        cycle, and a commit made while a ship is under way is shipped right
        after it, not at the next interval.
        """
        h = _Harness(self, interval=60.0)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        stores = {key: h.open(key) for key in ["a", "b", "c"]}
        self.successResultOf(h.shipper.flush())
        h.backend.holdAppends = True
        waiters = []
        for key, store in stores.items():
            write(store, 1, key)
            waiters.append(h.shipper.whenDurable(key))
        h.clock.advance(0)
        write(stores["a"], 2, "later")
        later = h.shipper.whenDurable("a")
        # One batch of three records.
        self.assertEqual([len(records) for _, records, _ in h.backend._held], [3])
        h.backend.holdAppends = False
        h.backend.releaseAppends()
        for d in waiters:
            self.successResultOf(d)
        self.assertNoResult(later)
        h.clock.advance(0)
        self.successResultOf(later)
        self.assertIn("'later'", "\n".join(h.restored("a")))

    def test_backendDown(self) -> None:
        """
        While the backend is down the store goes on committing, the lag
        grows and is logged, and shipping recovers by itself when the
        backend returns.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        h = _Harness(self, lagWarning=5.0)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        store = h.open("alice")
        h.clock.advance(1)
        h.backend.available = False
        write(store, 1, "while down")
        for _ in range(10):
            h.clock.advance(1)
            write(store, 2, f"at {h.clock.seconds()}")
        lag = h.shipper.lag()
        self.assertGreaterEqual(lag.seconds, 9.0)
        self.assertGreater(lag.bytesPending, 0)
        [storeLag] = lag.stores
        self.assertEqual(storeLag.key, "alice")
        self.assertTrue(any(e.get("log_format", "").startswith("Durable shipping lag") for e in events))
        h.backend.available = True
        h.clock.advance(31)
        self.assertEqual(h.shipper.lag().stores, ())
        self.assertEqual(h.restored("alice"), dump(h.dbdir("alice").child("db.sqlite")))

    def test_staleEpoch(self) -> None:
        """
        When the backend refuses a write for a stale epoch, durable waiters
        fail with L{StaleEpoch}, the fenced observers are told the key, and
        the store is not shipped again.
        """
        h = _Harness(self, epochForKey=lambda key: 1)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        store = h.open("alice")
        h.clock.advance(1)
        self.successResultOf(h.backend.fence(storeNameForKey("alice"), 2))
        write(store, 1, "late")
        d = h.shipper.whenDurable("alice")
        h.clock.advance(0)
        self.failureResultOf(d, StaleEpoch)
        self.assertEqual([key for key, _ in h.fenced], ["alice"])
        self.failureResultOf(h.shipper.whenDurable("alice"), StaleEpoch)
        self.assertTrue(h.shipper.lag().stores[0].fenced)
        count = len(h.backend.appended)
        write(store, 2, "later")
        h.clock.advance(5)
        self.assertEqual(len(h.backend.appended), count)
        self.flushLoggedErrors()

    def started(self) -> tuple[_Harness, Any, list[str]]:
        """
        A started shipper with the store of C{"alice"} open, and the list of
        the whole images it reads from then on.
        """
        h = _Harness(self)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        store = h.open("alice")
        return h, store, h.countImageReads()

    def test_deltasFromLog(self) -> None:
        """
        After a store's first record, its deltas are built from the pages
        its write-ahead log committed since, without reading its whole
        image; the pages it wrote with unchanged content are left out, and
        the chain restores exactly.
        """
        h, store, reads = self.started()
        for number in range(40):
            write(store, number, f"note {number} " * 20)
        h.ship("alice")
        self.assertEqual(len(reads), 1)
        for round in range(5):
            write(store, round, f"changed {round}")
            write(store, 100 + round, "x" * 3000)
            h.ship("alice")
        write(store, 3, "changed 3")
        h.ship("alice")
        self.assertEqual(len(reads), 1)
        records = h.records("alice")
        self.assertEqual([r.isSnapshot for r in records], [True] + [False] * 5)
        self.assertEqual(h.restored("alice"), dump(h.dbdir("alice").child("db.sqlite")))

    def test_logRestartReadsImage(self) -> None:
        """
        When the write-ahead log was checkpointed and restarted since the
        last ship (its pages since then are in the database file, no longer
        in the log), the next delta is built from the whole image; the one
        after it from the log again.
        """
        h, store, reads = self.started()
        write(store, 1, "one")
        h.ship("alice")
        write(store, 2, "two")
        connection = sqlite3.connect(h.dbdir("alice").child("db.sqlite").path)
        self.assertEqual(
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0], 0
        )
        connection.close()
        write(store, 3, "three")
        h.ship("alice")
        self.assertEqual(len(reads), 2)
        write(store, 4, "four")
        h.ship("alice")
        self.assertEqual(len(reads), 2)
        self.assertFalse(h.records("alice")[-1].isSnapshot)
        self.assertEqual(h.restored("alice"), dump(h.dbdir("alice").child("db.sqlite")))

    def test_smallDeltasBuiltInline(self) -> None:
        """
        A delta of a few frames of the log is built on the calling (reactor)
        thread, without a hand-off to a worker thread; a bigger one, like
        the first record (read from the whole image), is built in a worker
        thread.
        """
        handedOff: list[object] = []

        def run(f: Any) -> Deferred[Any]:
            handedOff.append(f)
            return runSynchronously(f)

        h = _Harness(self, runInThread=run, saveInterval=1e9)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        store = h.open("alice")
        write(store, 1, "one")
        h.ship("alice")
        self.assertTrue(handedOff)
        del handedOff[:]
        for number in range(5):
            write(store, number, f"note {number}")
            h.ship("alice")
        self.assertEqual(handedOff, [])
        for number in range(40):
            write(store, 100 + number, "x" * 3000)
        h.ship("alice")
        self.assertEqual(len(handedOff), 1)
        self.assertEqual(h.restored("alice"), dump(h.dbdir("alice").child("db.sqlite")))

    def test_takenAtFromClock(self) -> None:
        """
        Every record says its image was taken at the start of its ship
        cycle, by the shipper's clock (whatever thread read the store), and
        a restore reports that time, not its own.
        """
        h = _Harness(self)
        h.clock.advance(1000)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        store = h.open("alice")
        write(store, 1, "one")
        h.ship("alice")
        h.clock.advance(7)
        write(store, 2, "two")
        h.ship("alice")
        name = storeNameForKey("alice")
        taken = [
            decodeRecord(self.successResultOf(h.backend.read(name, info.seq))).takenAt
            for info in h.records("alice")
        ]
        self.assertEqual(taken, [1000.0, 1007.0])
        other = Shipper(h.backend, Clock(), runInThread=runSynchronously)
        destination = FilePath(self.mktemp())
        self.assertTrue(self.successResultOf(other.restore("alice", destination)))
        self.assertEqual(other._states["alice"].takenAt, 1007.0)

    def test_reopenedStoreReadsImage(self) -> None:
        """
        A store closed and opened again ships its first change after the
        open from its whole image: the new open's log is a new one.
        """
        h, store, reads = self.started()
        write(store, 1, "one")
        h.ship("alice")
        self.successResultOf(h.shipper.storeClosing("alice", store))
        store.close()
        h.shipper.storeClosed("alice", store)
        store = h.open("alice")
        write(store, 2, "two")
        h.ship("alice")
        self.assertEqual(len(reads), 2)
        write(store, 3, "three")
        h.ship("alice")
        self.assertEqual(len(reads), 2)
        self.assertEqual(h.restored("alice"), dump(h.dbdir("alice").child("db.sqlite")))

    def test_compaction(self) -> None:
        """
        A chain longer than C{maxChain} is compacted: the next record is a
        snapshot and the records before it are pruned; restore stays exact.
        """
        h = _Harness(self, maxChain=3)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        store = h.open("alice")
        for i in range(6):
            write(store, i, f"note {i}")
            h.clock.advance(1)
        records = h.records("alice")
        self.assertEqual([r.seq for r in records], [5, 6])
        self.assertTrue(records[0].isSnapshot)
        self.assertEqual(h.restored("alice"), dump(h.dbdir("alice").child("db.sqlite")))

    def test_compactionByWeight(self) -> None:
        """
        Once the deltas since the snapshot outweigh both the snapshot and
        C{compactBytes}, the next record is a snapshot; below
        C{compactBytes}, deltas go on.
        """
        for compactBytes, expectSnapshot in [(0, True), (1 << 30, False)]:
            h = _Harness(self, compactBytes=compactBytes)
            store = h.open("alice")
            for i in range(20):
                write(store, i, f"note {i} " * 50)
                h.clock.advance(0)
                self.successResultOf(h.shipper.flush())
            snapshots = [r.seq for r in h.records("alice") if r.isSnapshot]
            self.assertEqual(snapshots[-1] > 1, expectSnapshot, (compactBytes, snapshots))
            self.assertEqual(h.restored("alice"), dump(h.dbdir("alice").child("db.sqlite")))

    def test_closingShipsAndForgets(self) -> None:
        """
        C{storeClosing} ships what is unshipped before it fires, and the
        shipper then forgets the closed store.
        """
        h = _Harness(self, interval=60.0)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        store = h.open("alice")
        write(store, 1, "final")
        self.successResultOf(h.shipper.storeClosing("alice", store))
        self.assertIn("'final'", "\n".join(h.restored("alice")))
        self.assertEqual(h.shipper._states, {})
        self.assertEqual(h.shipper._dirty, {})

    def test_closingWhileDown(self) -> None:
        """
        C{storeClosing} fires even when the backend is down; the closed
        store stays unshipped, visible in the lag, and is shipped from its
        file when the backend returns.
        """
        h = _Harness(self)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        store = h.open("alice")
        write(store, 1, "kept")
        h.backend.available = False
        self.successResultOf(h.shipper.storeClosing("alice", store))
        store.close()
        self.assertEqual([s.key for s in h.shipper.lag().stores], ["alice"])
        h.backend.available = True
        h.clock.advance(31)
        self.assertEqual(h.shipper.lag().stores, ())
        self.assertIn("'kept'", "\n".join(h.restored("alice")))
        self.assertEqual(h.shipper._states, {})
        self.assertEqual(h.shipper._dirty, {})

    def test_queuedShipOfClosedStoreSkipped(self) -> None:
        """
        A store queued for an interval ship (behind other stores) and then
        closed, which ships it, is not read again when its queued turn
        comes: the shipper never reads a store the pool has closed and
        forgotten (its files may even be gone).
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        h = _Harness(self, concurrency=1)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        alice = h.open("alice")
        bob = openStore(h.dbdir("bob"))
        h.shipper.storeOpened("bob", bob)
        write(alice, 1, "first")
        write(bob, 1, "first")
        h.backend.holdAppends = True
        h.clock.advance(1)
        # One store's ship waits for the backend; the other's is queued.
        h.backend.holdAppends = False
        write(alice, 2, "again")
        write(bob, 2, "again")
        self.successResultOf(h.shipper.storeClosing("bob", bob))
        bob.close()
        h.dbdir("bob").remove()
        h.backend.releaseAppends()
        h.clock.advance(0)
        self.assertEqual(
            [e["log_format"] for e in events if e.get("log_level") is not None
             and e["log_level"].name in ("warn", "error", "critical")],
            [],
        )
        self.assertIn("'again'", "\n".join(h.restored("bob")))

    def test_stopShipsEverything(self) -> None:
        """
        Stopping the service ships every dirty store.
        """
        h = _Harness(self, interval=60.0)
        h.shipper.startService()
        store = h.open("alice")
        write(store, 1, "at stop")
        self.successResultOf(h.shipper.stopService())
        self.assertIn("'at stop'", "\n".join(h.restored("alice")))

    def test_restartResumesDeltas(self) -> None:
        """
        A new shipper (a restarted node) on the same stores and backend goes
        on shipping deltas on the existing chain; if its state file does not
        match the backend it ships a snapshot after the newest record.
        """
        h = _Harness(self)
        h.shipper.startService()
        store = h.open("alice")
        write(store, 1, "one")
        self.successResultOf(h.shipper.storeClosing("alice", store))
        self.successResultOf(h.shipper.stopService())
        store.close()

        again = _Harness(self, backend=h.backend, root=h.root)
        again.shipper.startService()
        self.addCleanup(again.shipper.stopService)
        store = again.open("alice")
        write(store, 2, "two")
        again.clock.advance(1)
        self.assertEqual([(r.seq, r.baseSeq) for r in again.records("alice")], [(1, 0), (2, 1)])
        self.successResultOf(again.shipper.storeClosing("alice", store))
        store.close()

        again.dbdir("alice").child(STATE_FILE).remove()
        store = again.open("alice")
        write(store, 3, "three")
        again.clock.advance(1)
        self.assertEqual([(r.seq, r.baseSeq) for r in again.records("alice")], [(3, 0)])
        self.assertEqual(again.restored("alice"), dump(again.dbdir("alice").child("db.sqlite")))

    def test_resumeAfterCrash(self) -> None:
        """
        Stores changed after their last ship by a node that then died are
        found when a new shipper starts with the stores directory, and
        shipped without being opened; the shipper logs when they all are.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        h = _Harness(self)
        h.shipper.startService()
        store = h.open("alice")
        write(store, 1, "shipped")
        h.clock.advance(1)
        write(store, 2, "not yet shipped")
        store.close()
        h.clock.advance(0)

        again = _Harness(self, backend=h.backend, root=h.root, storesDirectory=h.root)
        again.shipper.startService()
        self.addCleanup(again.shipper.stopService)
        self.assertEqual([s.key for s in again.shipper.lag().stores], ["alice"])
        self.assertEqual([e for e in events if "stores resumed" in e.get("log_format", "")], [])
        again.clock.advance(1)
        self.assertIn("'not yet shipped'", "\n".join(again.restored("alice")))
        [done] = [e for e in events if "stores resumed" in e.get("log_format", "")]
        self.assertEqual((done["shipped"], done["count"]), (1, 1))


class DamagedLocalStateTests(SynchronousTestCase):
    """
    Damaged or missing local files never stop shipping for good.
    """

    def test_damagedStateFile(self) -> None:
        """
        A state file that is not one the shipper wrote (garbage, or fields
        of the wrong type) is ignored: the next record is a snapshot, and
        restore stays exact.
        """
        for content in [b"garbage", b'{"version": 1, "key": 5}\n', b'{"version": 1}\nxyz']:
            h = _Harness(self)
            h.shipper.startService()
            store = h.open("alice")
            write(store, 1, "one")
            h.clock.advance(1)
            self.successResultOf(h.shipper.storeClosing("alice", store))
            store.close()
            h.dbdir("alice").child(STATE_FILE).setContent(content)
            store = h.open("alice")
            write(store, 2, "two")
            h.clock.advance(1)
            self.assertEqual([r.baseSeq for r in h.records("alice")], [0])
            self.assertEqual(h.restored("alice"), dump(h.dbdir("alice").child("db.sqlite")))
            self.successResultOf(h.shipper.stopService())

    def test_deletedClosedStoreForgotten(self) -> None:
        """
        A closed, unshipped store whose files are deleted is forgotten with a
        warning, and its durable waiters fail, rather than being retried
        forever.
        """
        h = _Harness(self)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        store = h.open("alice")
        write(store, 1, "one")
        h.backend.available = False
        self.successResultOf(h.shipper.storeClosing("alice", store))
        store.close()
        d = h.shipper.whenDurable("alice")
        h.dbdir("alice").remove()
        h.backend.available = True
        h.clock.advance(31)
        self.failureResultOf(d, FileNotFoundError)
        self.assertEqual(h.shipper.lag().stores, ())
        self.assertEqual(h.shipper._states, {})
        self.assertEqual(h.shipper._dirty, {})


class RecordFormatTests(SynchronousTestCase):
    """
    The record format version a shipper writes (C{recordFormat}).
    """

    def versions(self, h: _Harness, key: str) -> list[int]:
        backend = h.backend
        name = storeNameForKey(key)
        return [
            decodeRecord(self.successResultOf(backend.read(name, info.seq))).version
            for info in h.records(key)
        ]

    def test_versionOneThenTwo(self) -> None:
        """
        A shipper told C{recordFormat=1} writes version 1 records (what a
        node of an older version reads); a shipper of the default format,
        taking the same store over after a restart, goes on with version 2
        deltas on that chain; the chain restores exactly either way.
        """
        h = _Harness(self, recordFormat=1)
        h.shipper.startService()
        store = h.open("alice")
        for number in range(300):
            write(store, number, f"note {number} " * 10)
        h.clock.advance(1)
        write(store, 7, "changed")
        h.clock.advance(1)
        self.assertEqual(self.versions(h, "alice"), [1, 1])
        self.assertEqual(h.restored("alice"), dump(h.dbdir("alice").child("db.sqlite")))
        self.successResultOf(h.shipper.storeClosing("alice", store))
        store.close()
        self.successResultOf(h.shipper.stopService())
        again = _Harness(self, backend=h.backend, root=h.root)
        again.shipper.startService()
        self.addCleanup(again.shipper.stopService)
        store = again.open("alice")
        write(store, 8, "after the upgrade")
        again.clock.advance(1)
        self.assertEqual(self.versions(again, "alice"), [1, 1, 2])
        self.assertEqual(
            again.restored("alice"), dump(again.dbdir("alice").child("db.sqlite"))
        )

    def test_unknownFormatRefused(self) -> None:
        """
        A record format this version does not write is refused when the
        shipper is made.
        """
        for bad in (0, 3, True):
            error = self.assertRaises(
                ValueError, Shipper, MemoryDurableBackend(), Clock(), recordFormat=bad
            )
            self.assertIn("record format must be 1 or 2", str(error))


class ReopenTests(SynchronousTestCase):
    """
    A store opened by a new shipper (a restarted node) is shipped again only
    if it differs from its last ship.
    """

    def _shippedAndStopped(self) -> _Harness:
        h = _Harness(self)
        h.shipper.startService()
        store = h.open("alice")
        write(store, 1, "one")
        self.successResultOf(h.shipper.storeClosing("alice", store))
        store.close()
        self.successResultOf(h.shipper.stopService())
        return h

    def test_unchangedNotShippedAgain(self) -> None:
        """
        A store unchanged since its last ship is not marked dirty when it is
        opened, and nothing is shipped for it; its next commit ships a delta
        on the existing chain.
        """
        h = self._shippedAndStopped()
        again = _Harness(self, backend=h.backend, root=h.root)
        again.shipper.startService()
        self.addCleanup(again.shipper.stopService)
        store = again.open("alice")
        self.assertEqual(again.shipper.lag().stores, ())
        again.clock.advance(1)
        self.assertEqual([r.seq for r in again.records("alice")], [1])
        write(store, 2, "two")
        again.clock.advance(1)
        self.assertEqual([(r.seq, r.baseSeq) for r in again.records("alice")], [(1, 0), (2, 1)])

    def test_changedWhileClosedShipped(self) -> None:
        """
        A store changed since its last ship (here by a process without a
        shipper) is compared with its last ship at the next interval after
        it is opened (not while it opens), marked dirty, and shipped.
        """
        h = self._shippedAndStopped()
        store = openStore(h.dbdir("alice"))
        write(store, 2, "behind the shippers back")
        store.close()
        again = _Harness(self, backend=h.backend, root=h.root)
        again.shipper.startService()
        self.addCleanup(again.shipper.stopService)
        again.open("alice")
        self.assertEqual(again.shipper.lag().stores, ())
        again.clock.advance(1)
        self.assertIn("'behind the shippers back'", "\n".join(again.restored("alice")))

    def test_backendAheadOfStateFileShipped(self) -> None:
        """
        A store whose pages match its state file is still shipped when the
        backend holds a newer record than that file names (a ship whose
        state file was not written before a crash).
        """
        h = self._shippedAndStopped()
        dbdir = h.dbdir("alice")
        saved = {name: dbdir.child(name).getContent() for name in ("db.sqlite", STATE_FILE)}
        again = _Harness(self, backend=h.backend, root=h.root)
        again.shipper.startService()
        store = again.open("alice")
        write(store, 2, "two")
        self.successResultOf(again.shipper.storeClosing("alice", store))
        store.close()
        self.successResultOf(again.shipper.stopService())
        self.assertEqual([r.seq for r in again.records("alice")], [1, 2])
        for name, content in saved.items():
            dbdir.child(name).setContent(content)

        third = _Harness(self, backend=h.backend, root=h.root)
        third.shipper.startService()
        self.addCleanup(third.shipper.stopService)
        third.open("alice")
        third.clock.advance(1)
        self.assertEqual([(r.seq, r.baseSeq) for r in third.records("alice")], [(3, 0)])
        self.assertEqual(third.restored("alice"), dump(dbdir.child("db.sqlite")))

    def test_whenDurableWaitsForComparison(self) -> None:
        """
        Until the comparison of a reopened store with its last ship is done
        (in a worker thread), C{whenDurable} does not fire; when it finds a
        change, C{whenDurable} fires only once that change is shipped.
        """
        h = self._shippedAndStopped()
        store = openStore(h.dbdir("alice"))
        write(store, 2, "changed")
        store.close()
        threads = ManualThreads()
        clock = Clock()
        shipper = Shipper(h.backend, clock, runInThread=threads)
        shipper.startService()
        store = openStore(h.dbdir("alice"))
        self.addCleanup(store.close)
        shipper.storeOpened("alice", store)
        durable = shipper.whenDurable("alice")
        self.assertNoResult(durable)
        threads.runAll()
        self.assertNoResult(durable)
        clock.advance(0)
        threads.runAll()
        self.successResultOf(durable)
        self.assertEqual([r.seq for r in h.records("alice")], [1, 2])
        stopped = shipper.stopService()
        threads.runAll()
        self.successResultOf(stopped)


class BatchedCycleTests(SynchronousTestCase):
    """
    A cycle ships its dirty stores as one batch: a few worker-thread
    hand-offs for their images, and one L{IDurableBackend.appendMany}.
    """

    def test_oneBatch(self) -> None:
        """
        A cycle with many dirty stores reads their images in no more
        hand-offs than the build threads share (groups of stores), stores
        every record with one batch append, and every store restores.
        """
        work = ManualThreads()
        h = _Harness(self)
        batches: list[int] = []
        appendMany = h.backend.appendMany

        def countingAppendMany(records: Any) -> Any:
            batches.append(len(records))
            return appendMany(records)

        h.backend.appendMany = countingAppendMany  # type: ignore[method-assign]
        shipper = Shipper(h.backend, h.clock, runInThread=work, buildConcurrency=2)
        keys = [f"user{n}" for n in range(20)]
        for key in keys:
            store = openStore(h.dbdir(key))
            self.addCleanup(store.close)
            shipper.storeOpened(key, store)
            write(store, 1, key)
        shipper.startService()
        h.clock.advance(1)
        # Two hand-offs of ten stores each, one per build thread.
        self.assertEqual(len(work.pending), 2)
        for _ in range(2):
            work.runOne()
        self.assertEqual(batches, [len(keys)])
        # The state files due (first ship of each store) in one more.
        self.assertEqual(len(work.pending), 1)
        work.runOne()
        self.assertEqual(shipper.lag().stores, ())
        for key in keys:
            self.assertIn(f"'{key}'", "\n".join(h.restored(key)))
        stopped = shipper.stopService()
        work.runAll()
        self.successResultOf(stopped)

    def test_threadedBuildsDoNotHoldUpInline(self) -> None:
        """
        In a cycle where one store's record is built in a worker thread (a
        change too big to read on the reactor thread) and another's on the
        reactor thread, the second is stored and answered at once, without
        waiting for the first's build; the first follows in a batch of its
        own.
        """
        work = ManualThreads()
        h = _Harness(self, runInThread=work)
        h.shipper.startService()
        self.addCleanup(lambda: work.runAll() or h.shipper.stopService())
        small, big = h.open("small"), h.open("big")
        for key, store in [("small", small), ("big", big)]:
            write(store, 0, "first")
            d = h.shipper.whenDurable(key)
            h.clock.advance(0)
            work.runAll()
            self.successResultOf(d)
        batches: list[list[str]] = []
        appendMany = h.backend.appendMany

        def countingAppendMany(records: Any) -> Any:
            batches.append([info.store for info, _ in records])
            return appendMany(records)

        self.patch(h.backend, "appendMany", countingAppendMany)
        write(small, 1, "a small change")
        for number in range(40):
            write(big, number, "b" * 2000)
        waits = [h.shipper.whenDurable("small"), h.shipper.whenDurable("big")]
        h.clock.advance(0)
        self.successResultOf(waits[0])
        self.assertNoResult(waits[1])
        self.assertEqual(batches, [[storeNameForKey("small")]])
        work.runAll()
        self.successResultOf(waits[1])
        self.assertEqual(batches[1:], [[storeNameForKey("big")]])
        for key, store in [("small", small), ("big", big)]:
            self.assertEqual(h.restored(key), dump(h.dbdir(key).child("db.sqlite")))

    def test_intervalShipsEachDirtyStoreOnce(self) -> None:
        """
        The stores dirty at an interval that do not fit in one cycle are
        shipped when it ends; a store shipped in that interval and changed
        again meanwhile waits for the next interval (so that with many
        stores, shipping does not run cycle after cycle).
        """
        work = ManualThreads()
        h = _Harness(self)
        shipper = Shipper(h.backend, h.clock, runInThread=work, concurrency=1)
        stores = {}
        for key in ["alice", "bob"]:
            stores[key] = openStore(h.dbdir(key))
            self.addCleanup(stores[key].close)
            shipper.storeOpened(key, stores[key])
            write(stores[key], 1, key)
        shipper.startService()
        h.clock.advance(1)
        # One store's cycle; the other is owed.
        self.assertEqual(len(work.pending), 1)
        work.runOne()
        [first] = [key for key in stores if h.records(key)]
        [second] = [key for key in stores if key != first]
        write(stores[first], 2, "again")
        work.runAll()
        self.assertEqual(len(h.records(first)), 1)
        self.assertEqual(len(h.records(second)), 1)
        h.clock.advance(1)
        work.runAll()
        self.assertEqual(len(h.records(first)), 2)
        stopped = shipper.stopService()
        work.runAll()
        self.successResultOf(stopped)

    def test_commitsDuringCycleJoinNext(self) -> None:
        """
        A durable waiter for a commit made while its store's ship is under
        way is answered by the next cycle, started as soon as that ship
        ends, not at the next interval.
        """
        h = _Harness(self, interval=60.0)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        store = h.open("alice")
        write(store, 1, "first")
        h.backend.holdAppends = True
        first = h.shipper.whenDurable("alice")
        h.clock.advance(0)
        self.assertNoResult(first)
        write(store, 2, "second")
        second = h.shipper.whenDurable("alice")
        h.clock.advance(0)
        self.assertEqual([len(records) for _, records, _ in h.backend._held], [1])
        h.backend.holdAppends = False
        h.backend.releaseAppends()
        self.successResultOf(first)
        self.assertNoResult(second)
        h.clock.advance(0)
        self.successResultOf(second)
        self.assertIn("'second'", "\n".join(h.restored("alice")))

    def test_refusedRecordAlone(self) -> None:
        """
        A record of a batch refused for a stale epoch fences its store
        alone; the other stores of the batch are shipped.
        """
        epochs = {"alice": 1, "bob": 1}
        h = _Harness(self, epochForKey=lambda key: epochs[key])
        alice, bob = h.open("alice"), h.open("bob")
        write(alice, 1, "a")
        write(bob, 1, "b")
        h.clock.advance(0)
        self.successResultOf(h.shipper.flush())
        self.successResultOf(h.backend.fence(storeNameForKey("alice"), 2))
        write(alice, 2, "late")
        write(bob, 2, "on time")
        waits = [h.shipper.whenDurable("alice"), h.shipper.whenDurable("bob")]
        h.clock.advance(0)
        self.failureResultOf(waits[0], StaleEpoch)
        self.successResultOf(waits[1])
        self.assertEqual([key for key, _ in h.fenced], ["alice"])
        self.assertIn("'on time'", "\n".join(h.restored("bob")))


class ResumeNeverShippedTests(SynchronousTestCase):
    """
    A store created and changed by a node that died before shipping it at
    all is still found and shipped by the next one.
    """

    def test_found(self) -> None:
        """
        Opening a new store names its key in its state file at once, so a
        shipper started later with the stores directory ships it.
        """
        h = _Harness(self, interval=60.0)
        h.shipper.startService()
        store = h.open("new user")
        write(store, 1, "before any ship")
        store.close()
        self.assertEqual(h.records("new user"), [])

        again = _Harness(self, backend=h.backend, root=h.root, storesDirectory=h.root)
        again.shipper.startService()
        self.addCleanup(again.shipper.stopService)
        again.clock.advance(60)
        self.assertIn("'before any ship'", "\n".join(again.restored("new user")))


class ClosedStampTests(SynchronousTestCase):
    """
    A store closed shipped to its last commit is stamped in its state file
    (L{Shipper.storeClosed}), so that opening it again, or starting a node on
    it, reads nothing of it; any change since shows.
    """

    def _closedClean(self, h: _Harness, key: str, body: str = "one") -> None:
        store = openStore(h.dbdir(key))
        h.shipper.storeOpened(key, store)
        write(store, 1, body)
        self.successResultOf(h.shipper.storeClosing(key, store))
        store.close()
        h.shipper.storeClosed(key, store)

    def _counting(self, h: _Harness, **kwargs: Any) -> tuple[Shipper, Clock, list[Any]]:
        """
        A new shipper on C{h}'s backend that runs its blocking work at once
        and records each hand-off.
        """
        handed: list[Any] = []

        def run(f: Any) -> Any:
            handed.append(f)
            return runSynchronously(f)

        clock = Clock()
        shipper = Shipper(h.backend, clock, runInThread=run, **kwargs)
        shipper.startService()
        self.addCleanup(shipper.stopService)
        return shipper, clock, handed

    def _reopen(self, h: _Harness) -> tuple[Shipper, Clock, list[Any], Any]:
        """
        A new shipper as L{_counting} makes, and C{"alice"}'s store opened
        again for it.
        """
        shipper, clock, handed = self._counting(h)
        store = openStore(h.dbdir("alice"))
        self.addCleanup(store.close)
        shipper.storeOpened("alice", store)
        return shipper, clock, handed, store

    def test_reopenReadsNothing(self) -> None:
        """
        Opening a store closed clean hands no work to a worker thread and
        marks nothing dirty, at open or at the following intervals; its next
        commit ships a delta on its chain (the chain is looked up then).
        """
        h = _Harness(self)
        h.shipper.startService()
        self._closedClean(h, "alice")
        self.successResultOf(h.shipper.stopService())
        shipper, clock, handed, store = self._reopen(h)
        self.successResultOf(shipper.whenDurable("alice"))
        clock.advance(5)
        self.assertEqual((handed, shipper.lag().stores), ([], ()))
        self.assertEqual([r.seq for r in h.records("alice")], [1])
        write(store, 2, "two")
        clock.advance(1)
        self.assertEqual([(r.seq, r.baseSeq) for r in h.records("alice")], [(1, 0), (2, 1)])
        self.assertEqual(h.restored("alice"), dump(h.dbdir("alice").child("db.sqlite")))

    def test_readOnlyReopenStaysStamped(self) -> None:
        """
        A store closed clean, then opened, only read and closed again, keeps
        its stamp without its state file being written again, and a
        shipper started later finds nothing to resume.
        """
        h = _Harness(self)
        h.shipper.startService()
        self._closedClean(h, "alice")
        self.successResultOf(h.shipper.stopService())
        stateFile = h.dbdir("alice").child(STATE_FILE)
        before = (stateFile.getContent(), stateFile.getInodeNumber())
        shipper, clock, handed = self._counting(h)
        store = openStore(h.dbdir("alice"))
        shipper.storeOpened("alice", store)
        self.assertEqual(store.query(DurableTestNote).count(), 1)
        self.successResultOf(shipper.storeClosing("alice", store))
        store.close()
        shipper.storeClosed("alice", store)
        stateFile.restat()
        self.assertEqual((stateFile.getContent(), stateFile.getInodeNumber()), before)
        self.assertEqual(handed, [])
        shipper, clock, handed = self._counting(h, storesDirectory=h.root)
        self.assertEqual(list(shipper._states), [])

    def test_cleanRestartResumesNothing(self) -> None:
        """
        A shipper started on stores that were closed clean finds none to
        resume (their closes wrote their database files after their last
        ships, which alone would make them look changed), and logs no
        resumption.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        h = _Harness(self)
        h.shipper.startService()
        for key in ["alice", "bob", "carol"]:
            self._closedClean(h, key)
        self.successResultOf(h.shipper.stopService())
        shipper, clock, handed = self._counting(h, storesDirectory=h.root)
        self.assertEqual(len(handed), 1)
        self.assertEqual(list(shipper._states), [])
        clock.advance(5)
        self.assertEqual(shipper.lag().stores, ())
        self.assertEqual([e for e in events if "Resuming" in e.get("log_format", "")], [])

    def test_changedAfterStampShipped(self) -> None:
        """
        A store changed after it was closed clean (here by a process without
        a shipper) is found changed, both by a starting shipper and when it
        is opened, and shipped.
        """
        h = _Harness(self)
        h.shipper.startService()
        self._closedClean(h, "alice")
        self.successResultOf(h.shipper.stopService())
        store = openStore(h.dbdir("alice"))
        write(store, 2, "behind the shippers back " * 200)
        store.close()
        shipper, clock, handed = self._counting(h, storesDirectory=h.root)
        self.assertEqual(list(shipper._states), ["alice"])
        clock.advance(1)
        self.assertEqual([r.seq for r in h.records("alice")], [1, 2])

        h2 = _Harness(self, backend=h.backend, root=h.root)
        self._closedClean(h2, "bob")
        store = openStore(h2.dbdir("bob"))
        write(store, 2, "behind the shippers back " * 200)
        store.close()
        shipper, clock, handed = self._counting(h2)
        store = openStore(h2.dbdir("bob"))
        self.addCleanup(store.close)
        shipper.storeOpened("bob", store)
        self.assertEqual(handed, [])
        clock.advance(1)
        self.assertIn("behind the shippers back", "\n".join(h2.restored("bob")))

    def test_unshippedCloseUnstamped(self) -> None:
        """
        A store closed with commits unshipped (the backend is down) loses
        its stamp before it is closed, so a node started after this one died
        finds it and ships it.
        """
        h = _Harness(self)
        h.shipper.startService()
        self._closedClean(h, "alice")
        stateFile = h.dbdir("alice").child(STATE_FILE)
        self.assertIn(b'"closed"', stateFile.getContent())
        store = openStore(h.dbdir("alice"))
        h.shipper.storeOpened("alice", store)
        write(store, 2, "unshipped")
        h.backend.available = False
        self.successResultOf(h.shipper.storeClosing("alice", store))
        store.close()
        h.shipper.storeClosed("alice", store)
        self.assertNotIn(b'"closed"', stateFile.getContent())

        h.backend.available = True
        shipper, clock, handed = self._counting(h, storesDirectory=h.root)
        clock.advance(1)
        self.assertIn("'unshipped'", "\n".join(h.restored("alice")))

    def test_unshippedWhileProbing(self) -> None:
        """
        L{Shipper.unshipped} is true for a reopened store not yet compared
        with its last ship (its state file has no stamp), and false once the
        comparison finds it unchanged, with nothing shipped.
        """
        h = _Harness(self)
        h.shipper.startService()
        store = openStore(h.dbdir("alice"))
        h.shipper.storeOpened("alice", store)
        write(store, 1, "one")
        self.successResultOf(h.shipper.storeClosing("alice", store))
        store.close()
        self.successResultOf(h.shipper.stopService())
        shipper, clock, handed, alice = self._reopen(h)
        self.assertTrue(shipper.unshipped("alice"))
        clock.advance(1)
        self.assertNotEqual(handed, [])
        self.assertFalse(shipper.unshipped("alice"))
        self.assertEqual([r.seq for r in h.records("alice")], [1])

    def test_probePutOff(self) -> None:
        """
        A store whose state file has no stamp (closed by a node that died) is
        compared with its last ship from the next interval on, not while it
        is opened; a commit before then spares the comparison.
        """
        h = _Harness(self)
        h.shipper.startService()
        for key in ["alice", "bob"]:
            store = openStore(h.dbdir(key))
            h.shipper.storeOpened(key, store)
            write(store, 1, "one")
            self.successResultOf(h.shipper.storeClosing(key, store))
            store.close()
        self.successResultOf(h.shipper.stopService())
        shipper, clock, handed, alice = self._reopen(h)
        bob = openStore(h.dbdir("bob"))
        self.addCleanup(bob.close)
        shipper.storeOpened("bob", bob)
        self.assertEqual(handed, [])
        write(bob, 2, "two")
        clock.advance(1)
        # alice's state file read and image compared; bob's chain looked up,
        # image built and state file saved by its ship.
        self.assertEqual(shipper.lag().stores, ())
        self.assertEqual([r.seq for r in h.records("alice")], [1])
        self.assertEqual([(r.seq, r.baseSeq) for r in h.records("bob")], [(1, 0), (2, 1)])


class RestoreTests(SynchronousTestCase):
    """
    Restoring a store from its chain.
    """

    def _shipped(self) -> tuple[_Harness, str]:
        h = _Harness(self)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        store = h.open("alice")
        for i in range(3):
            write(store, i, f"version {i}")
            h.clock.advance(1)
        return h, storeNameForKey("alice")

    def test_noCopy(self) -> None:
        """
        Restoring a key the backend has never seen answers C{False} and
        writes nothing.
        """
        h = _Harness(self)
        destination = FilePath(self.mktemp())
        self.assertFalse(self.successResultOf(h.shipper.restore("nobody", destination)))
        self.assertFalse(destination.exists())

    def test_restoredStoreShipsDeltas(self) -> None:
        """
        A restored store, opened, goes on shipping deltas on its chain.
        """
        h, name = self._shipped()
        other = _Harness(self, backend=h.backend)
        other.shipper.startService()
        self.addCleanup(other.shipper.stopService)
        self.assertTrue(self.successResultOf(other.shipper.restore("alice", other.dbdir("alice"))))
        store = other.open("alice")
        write(store, 9, "after restore")
        other.clock.advance(1)
        self.assertEqual(other.records("alice")[-1].baseSeq, 3)

    def test_gapRefused(self) -> None:
        """
        A chain with a missing link is refused with L{BrokenChain} and
        nothing is written.
        """
        h, name = self._shipped()
        h.backend.remove(name, 2)
        destination = FilePath(self.mktemp())
        failure = self.failureResultOf(h.shipper.restore("alice", destination), BrokenChain)
        self.assertIn("gap", str(failure.value))
        self.assertFalse(destination.child("db.sqlite").exists())

    def test_corruptLinkRefused(self) -> None:
        """
        A chain with a damaged record (a flipped bit, or a record replaced
        by another valid record) is refused with L{BrokenChain}.
        """
        h, name = self._shipped()
        data = bytearray(self.successResultOf(h.backend.read(name, 2)))
        data[len(data) // 2] ^= 0x10
        h.backend.corrupt(name, 2, bytes(data))
        destination = FilePath(self.mktemp())
        self.failureResultOf(h.shipper.restore("alice", destination), BrokenChain)
        self.assertFalse(destination.child("db.sqlite").exists())

    def test_noSnapshotRefused(self) -> None:
        """
        A chain whose snapshot is lost is refused.
        """
        h, name = self._shipped()
        h.backend.remove(name, 1)
        self.failureResultOf(h.shipper.restore("alice", FilePath(self.mktemp())), BrokenChain)


class ShipRestorePropertyTests(SynchronousTestCase):
    """
    Random transactions, shipped at random points, restore to exactly the
    content shipped last.
    """

    @settings(max_examples=15, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["write", "delete", "ship", "close"]),
                st.integers(0, 30),
                st.integers(0, 3000),
            ),
            min_size=1,
            max_size=25,
        ),
        st.integers(2, 6),
    )
    def test_restoreIsExact(self, operations: list[tuple[str, int, int]], maxChain: int) -> None:
        """
        After any sequence of writes, deletes, ships and reopenings, restoring
        gives the content of the store at the last ship.
        """
        h = _Harness(self, maxChain=maxChain)
        h.shipper.startService()
        store = h.open("prop")
        database = h.dbdir("prop").child("db.sqlite")
        shipped: list[str] | None = None
        for op, number, size in operations:
            if op == "write":
                write(store, number, "v" * size)
            elif op == "delete":
                delete(store, number)
            elif op == "ship":
                d = h.shipper.whenDurable("prop")
                h.clock.advance(0)
                self.successResultOf(d)
                shipped = dump(database)
            else:
                self.successResultOf(h.shipper.storeClosing("prop", store))
                store.close()
                shipped = dump(database)
                store = h.open("prop")
        self.addCleanup(h.shipper.stopService)
        if shipped is None:
            destination = FilePath(self.mktemp())
            self.assertFalse(self.successResultOf(h.shipper.restore("prop", destination)))
        else:
            self.assertEqual(h.restored("prop"), shipped)


class LogDeltaTests(SynchronousTestCase):
    """
    Deltas built from the write-ahead log stay exact through what can
    happen to a store's log between ships.
    """

    def test_logUpheavals(self) -> None:
        """
        Through random writes, deletes, vacuums, checkpoints of every mode,
        automatic checkpoints, switches out of WAL mode and back (with a new
        page size), transactions rolled back after spilling frames to the
        log, reopenings, ships refused by a backend that is down and
        compactions right after log deltas, and logs restarted by the
        shipper (from the second seed on) among all these, every ship
        restores to exactly the store's content.
        """
        for seed in range(3):
            self.patch(shipperModule, "_RESTART_FRAMES", 10**9 if seed == 0 else 24)
            h = _Harness(self, maxChain=8, compactBytes=64 * 1024)
            # No kept read connection: it would hold the lock that leaving
            # WAL mode needs.
            h.shipper._images.maxOpen = 0
            h.shipper.startService()
            self.addCleanup(h.shipper.stopService)
            key = f"upheaval{seed}"
            database = h.dbdir(key).child("db.sqlite")
            store = h.open(key)
            rng = random.Random(seed)
            ships = 0
            for step in range(200):
                sql = store._cursor
                choice = rng.random()
                if choice < 0.45:
                    write(store, rng.randint(0, 60), "v" * rng.randint(0, 5000))
                elif choice < 0.6:
                    delete(store, rng.randint(0, 60))
                elif choice < 0.63:
                    sql.execute("VACUUM").fetchall()
                elif choice < 0.67:
                    mode = rng.choice(["PASSIVE", "FULL", "RESTART", "TRUNCATE"])
                    sql.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
                elif choice < 0.69:
                    sql.execute("PRAGMA journal_mode=DELETE").fetchall()
                    write(store, rng.randint(0, 60), "d" * rng.randint(0, 3000))
                    size = rng.choice([1024, 2048, 8192, 4096])
                    sql.execute(f"PRAGMA page_size={size}").fetchall()
                    sql.execute("VACUUM").fetchall()
                    sql.execute("PRAGMA journal_mode=WAL").fetchall()
                elif choice < 0.73:
                    sql.execute("PRAGMA cache_size=2").fetchall()

                    def spill() -> None:
                        for number in range(30):
                            DurableTestNote(store=store, number=1000 + number, body="s" * 3000)
                        raise ValueError("rolled back")

                    self.assertRaises(ValueError, store.transact, spill)
                    sql.execute("PRAGMA cache_size=-2000").fetchall()
                elif choice < 0.75:
                    size = rng.choice([1, 5, 1000])
                    sql.execute(f"PRAGMA wal_autocheckpoint={size}").fetchall()
                elif choice < 0.77:
                    self.successResultOf(h.shipper.storeClosing(key, store))
                    store.close()
                    h.shipper.storeClosed(key, store)
                    store = h.open(key)
                elif choice < 0.8:
                    write(store, rng.randint(0, 60), "before down")
                    h.backend.available = False
                    d = h.shipper.whenDurable(key)
                    h.clock.advance(0)
                    self.assertNoResult(d)
                    write(store, rng.randint(0, 60), "while down")
                    h.backend.available = True
                    h.clock.advance(60)
                    self.successResultOf(d)
                if rng.random() < 0.35:
                    d = h.shipper.whenDurable(key)
                    h.clock.advance(0)
                    self.successResultOf(d)
                    ships += 1
                    self.assertEqual(h.restored(key), dump(database), f"seed {seed} step {step}")
            self.assertGreater(ships, 50)
        self.flushLoggedErrors()

    def test_sqliteLocksKept(self) -> None:
        """
        Shipping an open store, from its log or from its whole image, leaves
        its connection's locks on its WAL index in place, so that another
        process opening the database finds it in use.  Once the store is
        closed the shipper holds none of its files.
        """
        if not hasattr(fcntl, "F_OFD_SETLK"):
            raise SkipTest("needs open file description locks (Linux)")
        h = _Harness(self, maxChain=3)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        key = "locked"
        database = h.dbdir(key).child("db.sqlite").path
        store = h.open(key)
        # Snapshots, deltas from the log and a compaction.
        for number in range(6):
            write(store, number, "x" * 100)
            h.ship(key)
        self.assertEqual([r.isSnapshot for r in h.records(key)], [True, False])
        self.assertGreater(descriptorsOf(database + "-shm"), 1)
        self.assertTrue(indexInUse(database))
        # indexInUse dropped the lock; open the store again.
        self.successResultOf(h.shipper.storeClosing(key, store))
        store.close()
        h.shipper.storeClosed(key, store)
        self.assertEqual(descriptorsOf(database), 0)
        store = h.open(key)
        write(store, 10, "y")
        h.ship(key)
        self.assertTrue(indexInUse(database))
        self.assertEqual(h.restored(key), dump(FilePath(database)))

    def shippedOnce(self, key: str, restartFrames: int) -> tuple[_Harness, Any, list[str]]:
        """
        A started shipper that restarts logs of C{restartFrames} frames,
        with C{key}'s store open and shipped once, and the list of the whole
        images it reads from then on.
        """
        self.patch(shipperModule, "_RESTART_FRAMES", restartFrames)
        h = _Harness(self)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        store = h.open(key)
        write(store, 0, "first")
        h.ship(key)
        return h, store, h.countImageReads()

    def test_logRestartedWhenShipped(self) -> None:
        """
        Once a store's log is long and everything in it is shipped, the
        shipper restarts it (checkpointed and emptied), right after the
        answers of the ship go out: the records after it are still read
        from the log, never from the store's whole image, and restore
        exactly.
        """
        key = "restarted"
        h, store, reads = self.shippedOnce(key, 16)
        database = h.dbdir(key).child("db.sqlite")
        log = h.dbdir(key).child("db.sqlite-wal")
        restarts = 0
        for number in range(1, 40):
            write(store, number % 7, f"{number:04d}" * 75)
            h.ship(key)
            log.restat()
            if log.getsize() == 0:
                restarts += 1
            self.assertEqual(h.restored(key), dump(database), f"write {number}")
        self.assertGreater(restarts, 3)
        self.assertEqual(reads, [])

    def test_notRestartedWhenUnshipped(self) -> None:
        """
        A store that committed after the record that made its log long, and
        before the shipper came to restart it, keeps its log: those commits
        are not shipped yet.  The next ship restarts it.
        """
        key = "unshipped"
        h, store, reads = self.shippedOnce(key, 1)
        database = h.dbdir(key).child("db.sqlite")
        log = h.dbdir(key).child("db.sqlite-wal")
        write(store, 1, "second")
        # The ship's answer: a commit before the restart is due.
        h.shipper.whenDurable(key).addCallback(lambda _: write(store, 2, "third"))
        h.clock.advance(0)
        log.restat()
        self.assertGreater(log.getsize(), 0)
        h.ship(key)
        log.restat()
        self.assertEqual(log.getsize(), 0)
        self.assertEqual(h.restored(key), dump(database))
        self.assertEqual(reads, [])

    def test_fewRestartsATurn(self) -> None:
        """
        Stores whose logs come due together are restarted a few in each
        reactor turn, not all in one.
        """
        self.patch(shipperModule, "_RESTART_FRAMES", 1)
        h = _Harness(self)
        h.shipper.startService()
        self.addCleanup(h.shipper.stopService)
        turns: list[int] = []
        restartLogs = h.shipper._restartLogs
        restartLog = h.shipper._restartLog

        def countingTurn() -> None:
            turns.append(0)
            restartLogs()

        def countingRestart(state: Any) -> None:
            turns[-1] += 1
            restartLog(state)

        self.patch(h.shipper, "_restartLogs", countingTurn)
        self.patch(h.shipper, "_restartLog", countingRestart)
        keys = [f"alike{n}" for n in range(10)]
        stores = [h.open(key) for key in keys]
        for store in stores:
            write(store, 0, "x")
        waits = [h.shipper.whenDurable(key) for key in keys]
        h.clock.advance(0)
        for d in waits:
            self.successResultOf(d)
        self.assertEqual(turns, [4, 4, 2])
        for key in keys:
            log = h.dbdir(key).child("db.sqlite-wal")
            self.assertEqual(log.getsize(), 0)

class PatchedDigestsTests(SynchronousTestCase):
    """
    L{_PatchedDigests} reads as the list it describes, and brings its base
    up to date in place.
    """

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.binary(min_size=1, max_size=2), max_size=300),
        st.data(),
    )
    def test_view(self, base: list[bytes], data: st.DataObject) -> None:
        """
        Whatever the page count (shrunk or grown) and whichever pages
        changed (every grown page among them), indexing, slicing and
        iterating the view give the patched list, and L{applyTo} makes the
        base that list.
        """
        count = data.draw(st.integers(0, 300), label="count")
        changed = data.draw(
            st.dictionaries(st.integers(0, max(0, count - 1)), st.binary(min_size=3, max_size=3)),
            label="changed",
        ) if count else {}
        changed.update({i: b"new" for i in range(len(base), count) if i not in changed})
        expected = (base + [b""] * count)[:count]
        for i, digest in changed.items():
            expected[i] = digest
        view = _PatchedDigests(base, changed, count)
        self.assertEqual(len(view), count)
        self.assertEqual(list(view), expected)
        self.assertEqual([view[i] for i in range(count)], expected)
        self.assertEqual([view[-i] for i in range(1, count + 1)], expected[::-1])
        self.assertRaises(IndexError, lambda: view[count])
        for start, stop in [(0, count), (0, 128), (128, 256), (count // 2, count + 5), (5, 2)]:
            self.assertEqual(view[start:stop], expected[start:stop])
        self.assertEqual(view[::3], expected[::3])
        view.applyTo(base)
        self.assertEqual(base, expected)

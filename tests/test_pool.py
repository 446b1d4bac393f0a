"""
Tests for L{fractal.pool}: opening user stores on demand, with a bound on how
many are open, LRU and idle closing, and never closing a store in use.
"""

from __future__ import annotations

import gc
import resource
import sqlite3
from typing import Any

from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from fractal.durable.shipper import Shipper
from fractal.keys import InvalidUserKey, slotForKey, storeNameForKey
from fractal.pool import (
    FDS_PER_STORE,
    StoreLease,
    StorePool,
    UserKey,
    defaultMaxOpenStores,
)
from fractal.protocol import Overloaded, StoreUnavailable
from fractal.store import Item, Store, Time, TimedEvent, integer
from fractal.store.interfaces import IScheduler
from fractal.store.store import DEFAULT_PAGE_SIZE
from fractal.testing import ManualThreads, MemoryDurableBackend


class PoolTestCounter(Item):
    typeName = "test_pool_counter"
    value = integer(default=0)


def _prepare(store: Store) -> PoolTestCounter:
    """
    A pool's C{prepare}: make sure the store has a counter.
    """
    return store.findOrCreate(PoolTestCounter)


class DefaultMaxOpenStoresTests(SynchronousTestCase):
    """
    Tests for L{defaultMaxOpenStores}.
    """

    def test_fromSoftLimit(self) -> None:
        """
        The default leaves a quarter of the descriptors (at least 64) for
        everything else and divides the rest by the descriptors of one store.
        """
        self.assertEqual(defaultMaxOpenStores(lambda which: (1024, 4096)), 768 // FDS_PER_STORE)
        self.assertEqual(defaultMaxOpenStores(lambda which: (100, 100)), 36 // FDS_PER_STORE)
        self.assertEqual(defaultMaxOpenStores(lambda which: (65536, 65536)), 49152 // 3)

    def test_atLeastOne(self) -> None:
        """
        Even a tiny descriptor limit allows one store.
        """
        self.assertEqual(defaultMaxOpenStores(lambda which: (10, 10)), 1)

    def test_unlimited(self) -> None:
        """
        An unlimited soft limit gives a large, finite default.
        """
        result = defaultMaxOpenStores(lambda which: (resource.RLIM_INFINITY, -1))
        self.assertTrue(1000 < result < 1 << 20)

    def test_askedForDescriptors(self) -> None:
        """
        The limit consulted is C{RLIMIT_NOFILE}.
        """
        asked: list[int] = []

        def getrlimit(which: int) -> tuple[int, int]:
            asked.append(which)
            return (1024, 1024)

        defaultMaxOpenStores(getrlimit)
        self.assertEqual(asked, [resource.RLIMIT_NOFILE])


class StorePoolTests(SynchronousTestCase):
    """
    Tests for L{StorePool}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.root = FilePath(self.mktemp())
        self.dataDir = self.root.child("data")

    def makePool(self, **kw: Any) -> StorePool:
        """
        A pool over C{self.dataDir}, closed at the end of the test.
        """
        kw.setdefault("prepare", _prepare)
        pool = StorePool(self.clock, self.dataDir, **kw)
        self.addCleanup(pool.close)
        return pool

    def acquire(self, pool: StorePool, key: str) -> StoreLease:
        """
        Acquire C{key}'s store, which must be possible at once.
        """
        return self.successResultOf(pool.acquire(key))

    def test_pageSize(self) -> None:
        """
        The pool creates stores with its C{pageSize}, L{DEFAULT_PAGE_SIZE}
        unless told otherwise.
        """
        for kw, expected in [({}, DEFAULT_PAGE_SIZE), ({"pageSize": 8192}, 8192)]:
            self.dataDir = self.root.child(str(expected))
            pool = self.makePool(**kw)
            lease = self.acquire(pool, "alice")
            self.assertEqual(
                lease.store._cursor.execute("PRAGMA page_size").fetchone(), (expected,)
            )
            lease.release()

    def test_path(self) -> None:
        """
        A store lives at C{dataDir/stores/<2 hex>/<storeNameForKey(key)>}.
        """
        pool = self.makePool()
        name = storeNameForKey("alice")
        self.assertEqual(
            pool.pathForKey("alice"),
            self.dataDir.child("stores").child(name[:2]).child(name),
        )
        self.assertRaises(InvalidUserKey, pool.pathForKey, "")

    def test_createStoresKeyInside(self) -> None:
        """
        Opening a new user's store creates it at its path, records the raw
        key inside it and prepares it.
        """
        pool = self.makePool()
        lease = self.acquire(pool, "alice")
        self.assertEqual(lease.key, "alice")
        self.assertEqual(lease.store.dbdir, pool.pathForKey("alice"))
        self.assertEqual(lease.store.findUnique(UserKey).key, "alice")
        self.assertIsInstance(lease.prepared, PoolTestCounter)
        self.assertEqual(pool.openKeys(), ["alice"])
        lease.release()

    def test_hostileKeyStaysInside(self) -> None:
        """
        A key that looks like a path is only hashed: its store is under the
        data directory, no file appears outside it, and the key itself is
        stored inside the store.
        """
        pool = self.makePool()
        key = "../../etc/passwd"
        lease = self.acquire(pool, key)
        lease.release()
        self.assertEqual(self.root.listdir(), ["data"])
        self.assertTrue(pool.pathForKey(key).isdir())
        self.assertEqual(
            [p.basename() for p in self.dataDir.child("stores").walk() if "etc" in p.path], []
        )
        self.assertEqual(lease.store.findUnique(UserKey).key, key)

    def test_openIsSynchronousWhenOpen(self) -> None:
        """
        Acquiring an open store fires at once with the same store, and
        L{StorePool.tryAcquire} returns its lease without a Deferred.
        """
        pool = self.makePool()
        first = self.acquire(pool, "alice")
        second = pool.tryAcquire("alice")
        self.assertIs(second, first)
        self.assertIs(self.successResultOf(pool.openStore("alice")), first.store)
        self.assertIsNone(pool.tryAcquire("bob"))
        first.release()
        first.release()

    def test_reopenKeepsData(self) -> None:
        """
        A store closed by the pool and opened again has its data.
        """
        pool = self.makePool()
        lease = self.acquire(pool, "alice")
        lease.store.transact(lambda: setattr(lease.prepared, "value", 7))
        lease.release()
        self.successResultOf(pool.close())
        again = self.makePool()
        lease = self.acquire(again, "alice")
        self.assertEqual(lease.prepared.value, 7)
        self.assertEqual(lease.store.query(PoolTestCounter).count(), 1)
        lease.release()

    def test_storeOfAnotherKeyRefused(self) -> None:
        """
        A store found at a key's path that records a different key is not
        served: the call fails with L{StoreUnavailable} and the store is left
        as it was.
        """
        pool = self.makePool()
        self.acquire(pool, "alice").release()
        self.successResultOf(pool.close())
        pool.pathForKey("bob").parent().makedirs(ignoreExistingDirectory=True)
        pool.pathForKey("alice").moveTo(pool.pathForKey("bob"))
        pool = self.makePool()
        failure = self.failureResultOf(pool.acquire("bob"), StoreUnavailable)
        self.assertIn("another key", str(failure.value))
        self.assertEqual(pool.openKeys(), [])
        store = Store(pool.pathForKey("bob"))
        self.assertEqual(store.findUnique(UserKey).key, "alice")
        store.close()

    def test_damagedStoreRefused(self) -> None:
        """
        A store whose database is not SQLite fails with L{StoreUnavailable},
        logged, and its file is left untouched; other users are served.
        """
        pool = self.makePool()
        path = pool.pathForKey("mallory")
        path.makedirs()
        path.child("db.sqlite").setContent(b"not a database" * 100)
        self.failureResultOf(pool.acquire("mallory"), StoreUnavailable)
        self.assertTrue(self.flushLoggedErrors())
        self.assertEqual(path.child("db.sqlite").getContent(), b"not a database" * 100)
        self.acquire(pool, "alice").release()
        self.assertEqual(pool.openKeys(), ["alice"])

    def test_leastRecentlyUsedClosed(self) -> None:
        """
        At C{maxOpenStores}, opening another store closes the least recently
        used idle one.
        """
        pool = self.makePool(maxOpenStores=2)
        a = self.acquire(pool, "a")
        a.release()
        self.acquire(pool, "b").release()
        pool.tryAcquire("a").release()  # type: ignore[union-attr]
        self.acquire(pool, "c").release()
        self.assertEqual(pool.openKeys(), ["a", "c"])
        self.acquire(pool, "d").release()
        self.assertEqual(pool.openKeys(), ["c", "d"])
        self.assertEqual(pool.closedCount, 2)
        # A closed store object is not used again: reopening makes a new one.
        self.assertIsNot(self.acquire(pool, "a").store, a.store)

    def test_busyNeverClosed(self) -> None:
        """
        When every open store is held by a call, opening another is refused
        with the retryable L{Overloaded}, and nothing held is closed; once one
        is released the open succeeds.
        """
        pool = self.makePool(maxOpenStores=2)
        a = self.acquire(pool, "a")
        b = self.acquire(pool, "b")
        failure = self.failureResultOf(pool.acquire("c"), Overloaded)
        self.assertIn("2 open stores are in use", str(failure.value))
        self.assertEqual(pool.openKeys(), ["a", "b"])
        a.store.findUnique(UserKey)
        a.release()
        c = self.acquire(pool, "c")
        self.assertEqual(pool.openKeys(), ["b", "c"])
        b.store.findUnique(UserKey)
        b.release()
        c.release()

    def test_idleClosed(self) -> None:
        """
        A store unused for C{idleTimeout} seconds is closed; one used since is
        not; no timer is left when nothing is open.
        """
        pool = self.makePool(idleTimeout=10)
        self.acquire(pool, "a").release()
        self.clock.advance(6)
        self.acquire(pool, "b").release()
        self.clock.advance(4)
        self.assertEqual(pool.openKeys(), ["b"])
        self.clock.advance(5)
        self.assertEqual(pool.openKeys(), ["b"])
        self.clock.advance(1)
        self.assertEqual(pool.openKeys(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_heldStoreNotIdleClosed(self) -> None:
        """
        A store held by a call past the idle timeout stays open, and is closed
        an idle timeout after its release.
        """
        pool = self.makePool(idleTimeout=10)
        lease = self.acquire(pool, "a")
        self.clock.advance(30)
        self.assertEqual(pool.openKeys(), ["a"])
        lease.release()
        self.clock.advance(9)
        self.assertEqual(pool.openKeys(), ["a"])
        self.clock.advance(1)
        self.assertEqual(pool.openKeys(), [])

    def test_knownKeys(self) -> None:
        """
        L{StorePool.knownKeys} lists users with a store on disk, open or
        not, reading closed stores' keys from inside them, up to a limit.
        """
        pool = self.makePool(maxOpenStores=1)
        keys = ["alice", "bob", "../../etc/passwd", "ünïcode"]
        for key in keys:
            self.acquire(pool, key).release()
        self.assertEqual(pool.openKeys(), ["ünïcode"])
        self.assertEqual(sorted(pool.knownKeys()), sorted(keys))
        self.assertEqual(pool.knownKeys(limit=2)[0], "ünïcode")
        self.assertEqual(len(pool.knownKeys(limit=2)), 2)
        self.assertEqual(pool.openKeys(), ["ünïcode"])
        self.assertEqual(StorePool(self.clock, self.root.child("empty")).knownKeys(), [])

    def test_knownKeysNeverCreates(self) -> None:
        """
        A store directory that is gone by the time L{StorePool.knownKeys}
        reads its key (moved away since it was listed) is skipped, quietly,
        and never made again as an empty store that would pass for the
        user's.
        """
        pool = self.makePool()
        self.acquire(pool, "alice").release()
        [listed] = pool._storeDirectories()
        gone = listed.sibling(listed.basename() + "-moved")
        self.successResultOf(pool.close())
        self.patch(pool, "_storeDirectories", lambda: iter([listed]))
        listed.moveTo(gone)
        self.assertEqual(pool.knownKeys(), [])
        self.assertFalse(listed.exists())
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_close(self) -> None:
        """
        L{StorePool.close} closes idle stores at once and held ones when they
        are released, then fires; later acquisitions fail with
        L{StoreUnavailable}.
        """
        pool = self.makePool()
        self.acquire(pool, "a").release()
        held = self.acquire(pool, "b")
        d = pool.close()
        self.assertNoResult(d)
        self.assertEqual(pool.openKeys(), ["b"])
        held.store.findUnique(UserKey)
        held.release()
        self.successResultOf(d)
        self.assertEqual(pool.openKeys(), [])
        self.failureResultOf(pool.acquire("a"), StoreUnavailable)
        self.successResultOf(pool.close())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_descriptorLimit(self) -> None:
        """
        Under a real, low descriptor limit, the default pool size keeps the
        process clear of C{EMFILE}: holding ever more stores ends in the
        retryable L{Overloaded}, not in an C{OSError}, and the pool keeps
        working.
        """
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # Earlier tests' unreachable connections must release their
        # descriptors now, not in the middle of this test, where they would
        # widen the room it sets up.
        gc.collect()
        inUse = len(FilePath("/proc/self/fd").listdir())
        resource.setrlimit(resource.RLIMIT_NOFILE, (inUse + 120, hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        pool = self.makePool()
        self.assertEqual(pool.maxOpenStores, defaultMaxOpenStores())
        held = []
        for i in range(1000):
            d = pool.acquire(f"user{i}")
            result: list[Any] = []
            d.addBoth(result.append)
            if not isinstance(result[0], StoreLease):
                result[0].trap(Overloaded)
                break
            held.append(result[0])
        self.assertEqual(len(held), pool.maxOpenStores)
        for lease in held:
            lease.release()
        self.acquire(pool, "one more").release()

    def test_outOfDescriptors(self) -> None:
        """
        A pool configured beyond what the descriptor limit allows answers the
        retryable L{Overloaded}, not an error, when the process runs out of
        descriptors, and recovers once stores are closed.
        """
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # Earlier tests' unreachable connections must release their
        # descriptors now, not in the middle of this test, where they would
        # widen the room it sets up.
        gc.collect()
        inUse = len(FilePath("/proc/self/fd").listdir())
        resource.setrlimit(resource.RLIMIT_NOFILE, (inUse + 12, hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        pool = self.makePool(maxOpenStores=1000)
        held = []
        for i in range(20):
            result: list[Any] = []
            pool.acquire(f"user{i}").addBoth(result.append)
            if not isinstance(result[0], StoreLease):
                result[0].trap(Overloaded)
                break
            held.append(result[0])
        else:
            self.fail("20 stores opened under a limit of 12 more descriptors")
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertLess(len(held), 5)
        for lease in held:
            lease.release()
        self.successResultOf(pool.close())
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        self.acquire(self.makePool(), "user19").release()

    def test_forcedClose(self) -> None:
        """
        L{StorePool.close} with C{force} closes held stores too and fires at
        once; releasing such a lease later is harmless.
        """
        pool = self.makePool()
        held = self.acquire(pool, "a")
        self.successResultOf(pool.close(force=True))
        self.assertEqual(pool.openKeys(), [])
        held.release()
        self.assertEqual(pool.openKeys(), [])
        self.successResultOf(pool.close())

    def test_badLimits(self) -> None:
        """
        A limit or timeout that is not positive is refused.
        """
        self.assertRaises(ValueError, StorePool, self.clock, self.dataDir, maxOpenStores=0)
        self.assertRaises(ValueError, StorePool, self.clock, self.dataDir, idleTimeout=0)

    def test_badPageSize(self) -> None:
        """
        A page size SQLite does not support is refused when the pool is made,
        not by every open of a store after.
        """
        for bad in [3000, True]:
            self.assertRaises(ValueError, StorePool, self.clock, self.dataDir, pageSize=bad)


class CloseStoresOfTests(SynchronousTestCase):
    """
    Tests for L{StorePool.closeStoresOf}: closing the stores of chosen slots
    for a handoff.
    """

    slots = 4

    def setUp(self) -> None:
        self.clock = Clock()
        self.dataDir = FilePath(self.mktemp())
        self.keys = [f"user{i}" for i in range(16)]
        self.bySlot: dict[int, list[str]] = {}
        for key in self.keys:
            self.bySlot.setdefault(slotForKey(key, self.slots), []).append(key)
        self.threads = ManualThreads()

    def makePool(self, shipper: Any = None) -> StorePool:
        pool = StorePool(self.clock, self.dataDir, prepare=_prepare, shipper=shipper)
        self.addCleanup(lambda: self.threads.runAll() or pool.close())
        return pool

    def test_idleAndHeld(self) -> None:
        """
        Idle stores of the chosen slots close at once; a store held by a call
        is reported as held, stays open while the call runs and commits, and
        closes when the call releases it, with the call's commit in it; the
        returned Deferred fires then.  Stores of other slots stay open.
        """
        pool = self.makePool()
        chosen = self.bySlot[1]
        other = self.bySlot[2]
        for key in chosen + other:
            self.successResultOf(pool.acquire(key)).release()
        held = self.successResultOf(pool.acquire(chosen[0]))
        closing = pool.closeStoresOf({1}, self.slots)
        self.assertEqual(closing.held, [chosen[0]])
        self.assertEqual(closing.opening, [])
        self.assertNoResult(closing.closed)
        self.assertEqual(sorted(pool.openKeys()), sorted(other + [chosen[0]]))
        counter = held.prepared
        held.store.transact(lambda: setattr(counter, "value", 7))
        held.release()
        self.successResultOf(closing.closed)
        self.assertEqual(sorted(pool.openKeys()), sorted(other))
        lease = self.successResultOf(pool.acquire(chosen[0]))
        self.assertEqual(lease.prepared.value, 7)
        lease.release()

    def test_nothingToClose(self) -> None:
        """
        With no store of the chosen slots open, the Deferred has fired
        already and nothing is reported held.
        """
        pool = self.makePool()
        self.successResultOf(pool.acquire(self.bySlot[2][0])).release()
        closing = pool.closeStoresOf({1, 3}, self.slots)
        self.assertEqual((closing.held, closing.opening), ([], []))
        self.successResultOf(closing.closed)
        self.assertEqual(pool.openKeys(), [self.bySlot[2][0]])

    def test_beingOpened(self) -> None:
        """
        A store being opened (here, waiting for the shipper to look for a
        durable copy) is reported as opening; the calls waiting for it get
        it, and it closes, shipped, once they release it.
        """
        backend = MemoryDurableBackend()
        shipper = Shipper(
            backend,
            self.clock,
            runInThread=self.threads,
            storesDirectory=self.dataDir.child("stores"),
        )
        pool = self.makePool(shipper)
        key = self.bySlot[3][0]
        lease = self.successResultOf(pool.acquire(key))
        lease.store.transact(lambda: setattr(lease.prepared, "value", 3))
        lease.release()
        pool.closeStoresOf([3], self.slots)
        self.threads.runAll()
        shipped = self.successResultOf(backend.head(storeNameForKey(key)))
        assert shipped is not None
        # The local copy is lost: the store is restored on its next call.
        pool.pathForKey(key).remove()
        acquiring = pool.acquire(key)
        self.assertNoResult(acquiring)
        closing = pool.closeStoresOf([3], self.slots)
        self.assertEqual((closing.held, closing.opening), ([], [key]))
        self.threads.runAll()
        lease = self.successResultOf(acquiring)
        self.assertEqual(lease.prepared.value, 3)
        self.assertNoResult(closing.closed)
        lease.store.transact(lambda: setattr(lease.prepared, "value", 4))
        lease.release()
        self.threads.runAll()
        self.successResultOf(closing.closed)
        self.assertEqual(pool.openKeys(), [])
        head = self.successResultOf(backend.head(storeNameForKey(key)))
        assert head is not None
        self.assertGreater(head.seq, shipped.seq)

    def test_closingAlready(self) -> None:
        """
        A store of a chosen slot that is closing already (waiting for its
        ship) is waited for.
        """
        shipper = Shipper(
            MemoryDurableBackend(),
            self.clock,
            runInThread=self.threads,
            storesDirectory=self.dataDir.child("stores"),
        )
        pool = self.makePool(shipper)
        key = self.bySlot[0][0]
        acquiring = pool.acquire(key)
        self.threads.runAll()
        lease = self.successResultOf(acquiring)
        lease.store.transact(lambda: setattr(lease.prepared, "value", 1))
        lease.release()
        first = pool.closeStoresOf([0], self.slots)
        self.assertNoResult(first.closed)
        second = pool.closeStoresOf([0], self.slots)
        self.assertEqual((second.held, second.opening), ([], []))
        self.assertNoResult(second.closed)
        self.threads.runAll()
        self.successResultOf(first.closed)
        self.successResultOf(second.closed)


class _ClosedConnectionShipper(Shipper):
    """
    A shipper that notes, each time it is told a store closed, whether the
    store's SQLite connection really was closed by then.
    """

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.connections: dict[str, sqlite3.Connection] = {}
        self.closedAfter: list[bool] = []

    def storeOpened(self, key: str, store: Any) -> None:
        self.connections[key] = store._conn
        super().storeOpened(key, store)

    def storeClosed(self, key: str, store: Any) -> None:
        try:
            self.connections[key].execute("SELECT 1")
        except sqlite3.ProgrammingError:
            self.closedAfter.append(True)
        else:
            self.closedAfter.append(False)
        super().storeClosed(key, store)


class ClosedInThreadTests(SynchronousTestCase):
    """
    A pool given a C{runInThread} closes its stores' connections with it
    (SQLite checkpoints and syncs as the last connection to a store
    closes), and treats a store as closing until its connection is closed.
    """

    def test_closedInThread(self) -> None:
        """
        An idle store is shipped, then its connection closed by the runner;
        until then the pool has not counted it closed, and the shipper is
        not told it closed.
        """
        clock = Clock()
        threads = ManualThreads()
        shipper = _ClosedConnectionShipper(MemoryDurableBackend(), clock, runInThread=threads)
        pool = StorePool(
            clock,
            FilePath(self.mktemp()),
            prepare=_prepare,
            idleTimeout=5,
            shipper=shipper,
            runInThread=threads,
        )
        lease = self.successResultOf(pool.acquire("alice"))
        lease.store.transact(lambda: setattr(lease.prepared, "value", 3))
        lease.release()
        clock.advance(6)
        threads.runOne()  # the ship before the close
        while threads.pending:
            self.assertEqual(pool.closedCount, 0)
            self.assertEqual(shipper.closedAfter, [])
            threads.runOne()
        self.assertEqual(pool.closedCount, 1)
        self.assertEqual(shipper.closedAfter, [True])
        reopened = pool.acquire("alice")
        threads.runAll()
        lease = self.successResultOf(reopened)
        self.assertEqual(lease.prepared.value, 3)
        lease.release()
        closing = pool.close()
        threads.runAll()
        self.successResultOf(closing)
        self.assertEqual(shipper.closedAfter, [True, True])

    def test_acquireWaitsForClose(self) -> None:
        """
        An acquire of a user whose store is closing waits for the connection
        to be closed, then opens the store again: never two connections of
        two Store objects on one file.
        """
        clock = Clock()
        threads = ManualThreads()
        pool = StorePool(
            clock, FilePath(self.mktemp()), prepare=_prepare, idleTimeout=5, runInThread=threads
        )
        first = self.successResultOf(pool.acquire("alice"))
        first.release()
        clock.advance(6)
        [_] = threads.pending
        reacquiring = pool.acquire("alice")
        self.assertNoResult(reacquiring)
        threads.runAll()
        second = self.successResultOf(reacquiring)
        self.assertIsNot(second.store, first.store)
        second.release()
        closing = pool.close()
        threads.runAll()
        self.successResultOf(closing)


class ShippedFirstTests(SynchronousTestCase):
    """
    Tests for making room in a pool with a shipper: the idle stores the
    shipper has shipped already close first, since they close at once.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.dataDir = FilePath(self.mktemp())
        self.backend = MemoryDurableBackend()
        self.threads = ManualThreads()
        # "c" has a local copy, so opening it needs no worker thread.
        plain = StorePool(self.clock, self.dataDir, prepare=_prepare)
        self.successResultOf(plain.acquire("c")).release()
        self.successResultOf(plain.close())
        self.shipper = Shipper(self.backend, self.clock, runInThread=self.threads)
        self.pool = StorePool(
            self.clock, self.dataDir, prepare=_prepare, maxOpenStores=2, shipper=self.shipper
        )
        self.addCleanup(self.closePool)

    def closePool(self) -> None:
        """
        Close the pool, running the ships its closes queue, so that no store
        (and none of the files the shipper keeps open) outlives the test.
        """
        self.threads.runAll()
        closing = self.pool.close()
        self.threads.runAll()
        self.successResultOf(closing)

    def openShipped(self, *keys: str) -> dict[str, StoreLease]:
        """
        Open the stores of C{keys}, in order, and ship them all.
        """
        leases = {}
        for key in keys:
            acquiring = self.pool.acquire(key)
            self.threads.runAll()
            leases[key] = self.successResultOf(acquiring)
            leases[key].release()
        flushed = self.shipper.flush()
        self.threads.runAll()
        self.successResultOf(flushed)
        for key in keys:
            self.assertFalse(self.shipper.unshipped(key))
        return leases

    def commit(self, key: str, value: int) -> None:
        """
        Commit a change to C{key}'s open store in a call, leaving it idle.
        """
        lease = self.pool.tryAcquire(key)
        assert lease is not None
        lease.store.transact(lambda: setattr(lease.prepared, "value", value))
        lease.release()

    def test_shippedClosedFirst(self) -> None:
        """
        At the limit, with an idle unshipped store least recently used and
        an idle shipped one used since, a cold open closes the shipped one
        and completes at once, without waiting for (or starting) a ship; the
        unshipped store stays open.
        """
        self.openShipped("a", "b")
        self.commit("a", 1)
        self.pool.tryAcquire("b").release()  # type: ignore[union-attr]
        self.assertEqual(self.pool.openKeys(), ["a", "b"])
        self.assertTrue(self.shipper.unshipped("a"))
        shipped = self.successResultOf(self.backend.head(storeNameForKey("a")))
        lease = self.successResultOf(self.pool.acquire("c"))
        self.assertEqual(self.pool.openKeys(), ["a", "c"])
        self.assertEqual(self.pool._count(), 2)
        self.assertEqual(self.threads.pending, [])
        self.assertTrue(self.shipper.unshipped("a"))
        self.assertEqual(self.successResultOf(self.backend.head(storeNameForKey("a"))), shipped)
        lease.release()

    def test_unshippedClosedWhenNoOther(self) -> None:
        """
        When the only idle store is unshipped (a shipped one is held by a
        call), a cold open closes it, least recently used, and completes
        once it is shipped and closed; the held store stays open, and no
        more stores than the limit are ever open, opening or closing.
        """
        self.openShipped("a", "b")
        self.commit("a", 1)
        held = self.pool.tryAcquire("b")
        assert held is not None
        self.assertTrue(self.shipper.unshipped("a"))
        acquiring = self.pool.acquire("c")
        self.assertNoResult(acquiring)
        self.assertEqual(self.pool.openKeys(), ["b"])
        self.assertEqual(self.pool._count(), 2)
        self.threads.runAll()
        lease = self.successResultOf(acquiring)
        self.assertEqual(self.pool.openKeys(), ["b", "c"])
        self.assertEqual(self.pool._count(), 2)
        self.assertFalse(self.shipper.unshipped("a"))
        held.release()
        lease.release()
        reopened = self.successResultOf(self.pool.acquire("a"))
        self.assertEqual(reopened.prepared.value, 1)
        reopened.release()

    def test_oneCloseForOneOpen(self) -> None:
        """
        When every idle store is unshipped, a cold open closes one of them,
        the least recently used, and waits for it; the others stay open.
        """
        self.openShipped("a", "b")
        self.commit("a", 1)
        self.commit("b", 2)
        acquiring = self.pool.acquire("c")
        self.assertNoResult(acquiring)
        self.assertEqual(self.pool.openKeys(), ["b"])
        self.threads.runAll()
        lease = self.successResultOf(acquiring)
        self.assertEqual(self.pool.openKeys(), ["b", "c"])
        self.assertTrue(self.shipper.unshipped("b"))
        lease.release()

class PoolTestAlarm(Item):
    """
    A runnable for timed events: counts its runs.
    """

    typeName = "test_pool_alarm"
    runs = integer(default=0)

    def run(self) -> None:
        self.runs += 1


class SchedulerTests(SynchronousTestCase):
    """
    The pool runs the scheduler (C{IService(store)}) of every store it holds
    open, on its own clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.dataDir = FilePath(self.mktemp())

    def makePool(self, **kw: Any) -> StorePool:
        """
        A pool over C{self.dataDir} on C{self.clock}, closed at the end.
        """
        pool = StorePool(self.clock, self.dataDir, prepare=_prepare, **kw)
        self.addCleanup(pool.close)
        return pool

    def schedule(self, pool: StorePool, key: str, seconds: float) -> int:
        """
        In C{key}'s store, schedule a new alarm C{seconds} from now, through
        a lease that is released again.

        @return: the alarm's storeID.
        """
        lease = self.successResultOf(pool.acquire(key))

        def make() -> int:
            alarm = PoolTestAlarm(store=lease.store)
            when = Time.fromPOSIXTimestamp(self.clock.seconds() + seconds)
            IScheduler(lease.store).schedule(alarm, when)
            return alarm.storeID

        try:
            return lease.store.transact(make)
        finally:
            lease.release()

    def runs(self, pool: StorePool, key: str, storeID: int) -> int:
        """
        How many times the alarm C{storeID} in C{key}'s store has run.
        """
        store = self.successResultOf(pool.openStore(key))
        runs: int = store.getItemByID(storeID).runs
        return runs

    def test_eventsRunWhileOpen(self) -> None:
        """
        A timed event in a store the pool holds open runs when it comes due
        on the pool's clock, not before.
        """
        pool = self.makePool()
        alarm = self.schedule(pool, "alice", 10)
        self.clock.advance(9)
        self.assertEqual(self.runs(pool, "alice", alarm), 0)
        self.clock.advance(1)
        self.assertEqual(self.runs(pool, "alice", alarm), 1)
        self.clock.advance(100)
        self.assertEqual(self.runs(pool, "alice", alarm), 1)

    def test_closedStoreEventsRunWhenReopened(self) -> None:
        """
        Closing a store (here, idle) stops its scheduler: its pending event
        does not run while it is closed, stays in the store, and runs as soon
        as the store is opened again after it came due.
        """
        pool = self.makePool(idleTimeout=5)
        alarm = self.schedule(pool, "alice", 100)
        store = self.successResultOf(pool.openStore("alice"))
        scheduler = IScheduler(store)
        self.assertIs(scheduler.clock, self.clock)
        self.assertTrue(scheduler.running)
        self.clock.advance(5)
        self.assertEqual(pool.openKeys(), [])
        self.assertFalse(scheduler.running)
        self.assertIsNone(scheduler.timer)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])
        self.clock.advance(200)
        reopened = self.successResultOf(pool.openStore("alice"))
        self.assertIsNot(reopened, store)
        self.assertEqual(reopened.getItemByID(alarm).runs, 0)
        self.clock.advance(0)
        self.assertEqual(reopened.getItemByID(alarm).runs, 1)
        self.assertEqual(reopened.count(TimedEvent), 0)

    def test_poolCloseStopsSchedulers(self) -> None:
        """
        Closing the pool stops the scheduler of every store; a new pool over
        the same directory runs the events that came due meanwhile when it
        opens their stores, and not those of stores it does not open.
        """
        pool = StorePool(self.clock, self.dataDir, prepare=_prepare)
        alice = self.schedule(pool, "alice", 50)
        self.schedule(pool, "bob", 50)
        self.successResultOf(pool.close())
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])
        self.clock.advance(60)
        again = self.makePool()
        self.assertEqual(self.runs(again, "alice", alice), 0)
        self.clock.advance(0)
        self.assertEqual(self.runs(again, "alice", alice), 1)
        self.assertEqual(again.openKeys(), ["alice"])

    def test_noEventsNoTimer(self) -> None:
        """
        Opening a store without timed events arms no timer and runs no
        transaction on its behalf (its commit observers see nothing).
        """
        pool = self.makePool()
        store = self.successResultOf(pool.openStore("alice"))
        commits: list[int] = []
        store.addCommitObserver(lambda: commits.append(1))
        self.assertTrue(IScheduler(store).running)
        self.assertIsNone(IScheduler(store).timer)
        self.clock.advance(0)
        self.assertEqual(commits, [])

    def test_overdueEventsCommitSeenByShipper(self) -> None:
        """
        An overdue event that runs at open commits after the shipper started
        watching the store, so the store is shipped again.
        """
        backend = MemoryDurableBackend()
        threads = ManualThreads()
        shipper = Shipper(backend, self.clock, runInThread=threads)
        pool = self.makePool(shipper=shipper, idleTimeout=5)
        self.schedule(pool, "alice", 100)
        self.clock.advance(5)
        threads.runAll()
        self.assertEqual(pool.openKeys(), [])
        head = self.successResultOf(backend.head(storeNameForKey("alice")))
        assert head is not None
        self.clock.advance(200)
        acquiring = pool.openStore("alice")
        threads.runAll()
        store = self.successResultOf(acquiring)
        self.clock.advance(0)
        self.assertEqual(store.count(TimedEvent), 0)
        flushed = shipper.flush()
        threads.runAll()
        self.successResultOf(flushed)
        newer = self.successResultOf(backend.head(storeNameForKey("alice")))
        assert newer is not None
        self.assertGreater(newer.seq, head.seq)

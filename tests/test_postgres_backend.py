"""
Tests for L{fractal.postgres.backend}: the same conformance tests as every
durable backend, and fencing by slot ownership inside the write transaction,
against a real PostgreSQL server (see L{tests._postgres}).
"""

from __future__ import annotations

import threading
from typing import Any

from twisted.trial.unittest import SynchronousTestCase, TestCase

from fractal.durable._threads import reactorThreads
from fractal.durable.interfaces import IDurableBackend, StaleEpoch
from fractal.keys import slotForKey, storeNameForKey
from fractal.postgres.backend import PostgresBackend
from fractal.testing import DurableBackendTestsMixin, recordInfo
from tests._postgres import makeDatabase

_KEY = "alice@example.com"
_STORE = storeNameForKey(_KEY)
_SLOTS = 64


class PostgresBackendConformanceTests(DurableBackendTestsMixin, TestCase):
    """
    The PostgreSQL backend keeps the backend contract, its queries run
    synchronously.
    """

    def makeBackend(self) -> IDurableBackend:
        return PostgresBackend(makeDatabase(self))


class PostgresBackendThreadedConformanceTests(DurableBackendTestsMixin, TestCase):
    """
    The PostgreSQL backend keeps the backend contract with its queries in
    the reactor's thread pool, as a node runs it.
    """

    def makeBackend(self) -> IDurableBackend:
        return PostgresBackend(makeDatabase(self, runInThread=reactorThreads()))


def _ownSlot(database: Any, slot: int, epoch: int) -> None:
    """
    Make a cluster of C{_SLOTS} slots in which node C{n1} owns C{slot} at
    C{epoch}.
    """

    def own(cursor: Any) -> None:
        cursor.execute(
            "INSERT INTO cluster (id, slots) VALUES (1, %s) ON CONFLICT DO NOTHING", (_SLOTS,)
        )
        cursor.execute(
            "INSERT INTO nodes (node, client, incarnation, lease_expires, state) "
            "VALUES ('n1', 'tcp:host=127.0.0.1:port=1', 1, 0, 'live') ON CONFLICT DO NOTHING"
        )
        cursor.execute(
            "INSERT INTO slot_owners (slot, node, epoch) VALUES (%s, 'n1', %s) "
            "ON CONFLICT (slot) DO UPDATE SET epoch = excluded.epoch",
            (slot, epoch),
        )

    database.transactBlocking(own)


class _CountingDatabase:
    """
    A L{fractal.postgres.connection.Database} whose transactions count the
    statements they send (an C{executemany} counts once: it is pipelined).
    """

    def __init__(self, database: Any) -> None:
        self._database = database
        self.statements = 0

    def transact(self, f: Any) -> Any:
        counter = self

        class Cursor:
            def __init__(self, cursor: Any) -> None:
                self._cursor = cursor

            def execute(self, *a: Any, **kw: Any) -> Any:
                counter.statements += 1
                return self._cursor.execute(*a, **kw)

            def executemany(self, *a: Any, **kw: Any) -> Any:
                counter.statements += 1
                return self._cursor.executemany(*a, **kw)

            def __getattr__(self, name: str) -> Any:
                return getattr(self._cursor, name)

        return self._database.transact(lambda cursor: f(Cursor(cursor)))


class BatchTests(SynchronousTestCase):
    """
    A batch costs a few statements, however many records it holds.
    """

    def test_statementsPerBatch(self) -> None:
        """
        A batch of one record in each of 40 stores, in a cluster, sends as
        many statements as a batch of one record: each statement covers
        every store of the batch.
        """
        database = makeDatabase(self)
        counting = _CountingDatabase(database)
        backend = PostgresBackend(counting)  # type: ignore[arg-type]
        keys = [f"user{n}@example.com" for n in range(40)]
        for key in keys:
            _ownSlot(database, slotForKey(key, _SLOTS), 1)
        one = [(recordInfo(storeNameForKey(keys[0]), 1, 1, 0, b"r"), b"r")]
        self.assertEqual(self.successResultOf(backend.appendMany(one)), [None])
        single = counting.statements
        counting.statements = 0
        many = [(recordInfo(storeNameForKey(key), 1, 1, 0, b"r"), b"r") for key in keys[1:]]
        self.assertEqual(self.successResultOf(backend.appendMany(many)), [None] * 39)
        self.assertEqual(counting.statements, single)
        for key in keys:
            records = self.successResultOf(backend.records(storeNameForKey(key)))
            self.assertEqual([r.seq for r in records], [1])


class SlotFencingTests(SynchronousTestCase):
    """
    Durable writes are checked against the slot ownership table in the write
    transaction.
    """

    def test_movedSlotRefusesOldEpoch(self) -> None:
        """
        Once the store's slot is at epoch 2, a write at epoch 1 is refused
        with L{StaleEpoch} even though the store itself never saw epoch 2, and
        nothing is stored; a write at epoch 2 goes on.
        """
        database = makeDatabase(self)
        backend = PostgresBackend(database)
        slot = slotForKey(_KEY, _SLOTS)
        _ownSlot(database, slot, 1)
        self.successResultOf(backend.append(recordInfo(_STORE, 1, 1, 0, b"s"), b"s"))
        _ownSlot(database, slot, 2)
        error = self.failureResultOf(
            backend.append(recordInfo(_STORE, 1, 2, 1, b"late"), b"late"), StaleEpoch
        ).value
        self.assertEqual((error.epoch, error.current), (1, 2))
        self.assertEqual([r.seq for r in self.successResultOf(backend.records(_STORE))], [1])
        self.successResultOf(backend.append(recordInfo(_STORE, 2, 2, 1, b"new"), b"new"))
        self.assertEqual(self.successResultOf(backend.head(_STORE)).epoch, 2)  # type: ignore[union-attr]

    def test_otherSlotsUnaffected(self) -> None:
        """
        Moving one slot does not fence the stores of another.
        """
        database = makeDatabase(self)
        backend = PostgresBackend(database)
        slot = slotForKey(_KEY, _SLOTS)
        _ownSlot(database, (slot + 1) % _SLOTS, 9)
        _ownSlot(database, slot, 1)
        self.successResultOf(backend.append(recordInfo(_STORE, 1, 1, 0, b"s"), b"s"))

    def test_moveAndWriteSerialise(self) -> None:
        """
        A write at epoch 1 that starts while a transaction moving its slot
        to epoch 2 is open waits for that transaction, then sees the new
        epoch and is refused: a move and a write of the slot never both
        succeed with the old epoch.
        """
        database = makeDatabase(self)
        backend = PostgresBackend(database)
        slot = slotForKey(_KEY, _SLOTS)
        _ownSlot(database, slot, 1)
        self.successResultOf(backend.append(recordInfo(_STORE, 1, 1, 0, b"s"), b"s"))
        mover = database.connect()
        self.addCleanup(mover.close)
        mover.execute("BEGIN")
        mover.execute("UPDATE slot_owners SET epoch = 2 WHERE slot = %s", (slot,))
        results: list[Any] = []

        def write() -> None:
            d = backend.append(recordInfo(_STORE, 1, 2, 1, b"late"), b"late")
            d.addBoth(results.append)

        writer = threading.Thread(target=write)
        writer.start()
        waiting = False
        with database.connect() as watcher:
            for _ in range(1000):
                row = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE %s = ANY(pg_blocking_pids(pid))",
                    (mover.info.backend_pid,),
                ).fetchone()
                if row is not None and row[0] > 0:
                    waiting = True
                    break
                threading.Event().wait(0.01)
        self.assertTrue(waiting, "the write never waited for the move")
        self.assertEqual(results, [])
        mover.execute("COMMIT")
        writer.join(30)
        self.assertFalse(writer.is_alive())
        [result] = results
        result.trap(StaleEpoch)
        self.assertEqual(result.value.current, 2)
        self.assertEqual([r.seq for r in self.successResultOf(backend.records(_STORE))], [1])

    def test_badStoreNameNeverReachesSQL(self) -> None:
        """
        A malformed store name fails with L{ValueError} before any query, so
        the table never holds it.
        """
        database = makeDatabase(self)
        backend = PostgresBackend(database)
        for name in ["'; DROP TABLE records; --", "A" * 64]:
            self.failureResultOf(backend.fence(name, 1), ValueError)
            self.failureResultOf(backend.head(name), ValueError)
            self.failureResultOf(backend.read(name, 1), ValueError)
            self.failureResultOf(backend.prune(name, 1), ValueError)
        self.assertEqual(self.successResultOf(backend.stores()), [])

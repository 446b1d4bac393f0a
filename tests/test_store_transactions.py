"""
Tests for L{fractal.store.Store.transact}: commit, rollback, nesting, hooks
and commit observers.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from fractal.store import Item, Store, errors, inmemory, integer, reference, text


class Counter(Item):
    """
    Counts committed() and deleted() calls in memory.
    """

    value = integer(default=0)
    name = text()
    commits = inmemory()
    deletions = inmemory()
    mutateInCommitted = inmemory()

    def activate(self) -> None:
        self.commits = 0
        self.deletions = 0
        self.mutateInCommitted = False

    def committed(self) -> None:
        self.commits += 1
        if self.mutateInCommitted:
            self.mutateInCommitted = False
            self.value = 99

    def deleted(self) -> None:
        self.deletions += 1


class Quiet(Item):
    """
    An item without hooks.
    """

    value = integer(default=0)


class Boom(Exception):
    """
    Raised on purpose.
    """


class CommitTests(SynchronousTestCase):
    """
    Commits and their hooks.
    """

    def test_returnsResult(self) -> None:
        """
        transact returns the function's result and passes its arguments.
        """
        s = Store()
        self.assertEqual(s.transact(lambda a, b=0: a + b, 1, b=2), 3)

    def test_inTransaction(self) -> None:
        """
        inTransaction is true only inside transact.
        """
        s = Store()
        self.assertFalse(s.inTransaction)
        self.assertTrue(s.transact(lambda: s.inTransaction))
        self.assertFalse(s.inTransaction)

    def test_committedOncePerTouchedItem(self) -> None:
        """
        committed() runs once per touched item after the commit, however many
        times it was changed; under autocommit it runs after every write.
        """
        s = Store()
        c = Counter(store=s)
        self.assertEqual(c.commits, 1)
        c.value = 1
        self.assertEqual(c.commits, 2)

        def change() -> None:
            c.value = 2
            c.value = 3
            c.name = "x"
            self.assertEqual(c.commits, 2)

        s.transact(change)
        self.assertEqual(c.commits, 3)

    def test_deletedHook(self) -> None:
        """
        deleted() runs after the commit; then store is None and the values
        stay readable; a second delete raises AttributeError.
        """
        s = Store()
        c = Counter(store=s, value=5)

        def delete() -> None:
            c.deleteFromStore()
            self.assertEqual(c.deletions, 0)
            self.assertIs(c.store, s)

        s.transact(delete)
        self.assertEqual(c.deletions, 1)
        self.assertIsNone(c.store)
        self.assertEqual(c.value, 5)
        self.assertRaises(AttributeError, c.deleteFromStore)

    def test_changeRejected(self) -> None:
        """
        Changing the database inside committed() raises ChangeRejected.
        """
        s = Store()
        c = Counter(store=s)
        c.mutateInCommitted = True
        self.assertRaises(errors.ChangeRejected, setattr, c, "name", "y")
        self.assertEqual(c.name, "y")
        self.assertNotEqual(c.value, 99)

    def test_commitObserver(self) -> None:
        """
        A commit observer runs after each transaction commit and each
        autocommit write, not after a rollback; its remover removes it.
        """
        s = Store()
        calls: list[int] = []
        remove = s.addCommitObserver(lambda: calls.append(1))
        q = Quiet(store=s)
        self.assertEqual(len(calls), 1)
        s.transact(lambda: [Quiet(store=s) for _ in range(3)])
        self.assertEqual(len(calls), 2)

        def fail() -> None:
            q.value = 3
            raise Boom()

        self.assertRaises(Boom, s.transact, fail)
        self.assertEqual(len(calls), 2)
        remove()
        remove()
        q.value = 4
        self.assertEqual(len(calls), 2)

    def test_commitObserverNotForReads(self) -> None:
        """
        A transaction that wrote nothing (it only read) is not observed; one
        that changed an item, created one, ran raw SQL or deleted one is.
        """
        s = Store()
        q = Quiet(store=s)
        calls: list[int] = []
        s.addCommitObserver(lambda: calls.append(1))
        s.transact(lambda: list(s.query(Quiet)))
        s.transact(lambda: s.count(Quiet))
        s.transact(lambda: None)
        self.assertEqual(calls, [])
        s.transact(setattr, q, "value", 5)
        self.assertEqual(len(calls), 1)
        s.transact(lambda: Quiet(store=s))
        self.assertEqual(len(calls), 2)
        s.executeSQL("CREATE TABLE raw_only (x INTEGER)")
        self.assertEqual(len(calls), 3)
        s.transact(q.deleteFromStore)
        self.assertEqual(len(calls), 4)

    def test_commitObserverErrorLogged(self) -> None:
        """
        An observer's exception is logged, not raised into the writer.
        """
        s = Store()
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        def bad() -> None:
            raise Boom()

        s.addCommitObserver(bad)
        Quiet(store=s)
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)
        self.assertTrue(any("log_failure" in e for e in events))


class RollbackTests(SynchronousTestCase):
    """
    Rollbacks restore items and never reuse storeIDs.
    """

    def test_restoresAttribute(self) -> None:
        """
        A rolled-back change to a stored item is undone in memory and on disk;
        inmemory attributes are not restored.
        """
        s = Store()
        c = Counter(store=s, value=1)

        def change() -> None:
            c.value = 2
            c.commits = 100
            raise Boom()

        self.assertRaises(Boom, s.transact, change)
        self.assertEqual(c.value, 1)
        self.assertEqual(c.commits, 100)
        self.assertEqual(s.findUnique(Counter).value, 1)

    def test_createdItemDetached(self) -> None:
        """
        An item created in a rolled-back transaction is detached: no store, no
        storeID, and getItemByID of its old id raises ItemNotFound.  Setting
        its attributes then touches nothing.
        """
        s = Store()
        made: list[Quiet] = []

        def create() -> None:
            made.append(Quiet(store=s, value=1))
            raise Boom()

        self.assertRaises(Boom, s.transact, create)
        [zombie] = made
        self.assertIsNone(zombie.store)
        self.assertIsNone(zombie.storeID)
        self.assertRaises(errors.ItemNotFound, s.getItemByID, 1)
        zombie.value = 5
        self.assertEqual(s.count(Quiet), 0)

    def test_storeIDNotReused(self) -> None:
        """
        The storeID allocated in a rolled-back transaction is never given to
        another item.
        """
        s = Store()
        seen: list[int] = []

        def create() -> None:
            seen.append(Quiet(store=s).storeID)
            raise Boom()

        self.assertRaises(Boom, s.transact, create)
        self.assertGreater(Quiet(store=s).storeID, seen[0])

    def test_storeIDNotReusedAfterReopen(self) -> None:
        """
        Deleted and rolled-back storeIDs stay used after a reopen.
        """
        path = self.mktemp()
        s = Store(path)
        q = Quiet(store=s)
        first = q.storeID
        q.deleteFromStore()
        s.close()
        s = Store(path)
        self.assertGreater(Quiet(store=s).storeID, first)
        s.close()

    def test_rolledBackItemCanBeStoredAgain(self) -> None:
        """
        A detached item can be stored again, with a new storeID.
        """
        s = Store()
        made: list[Quiet] = []

        def create() -> None:
            made.append(Quiet(store=s, value=7))
            raise Boom()

        self.assertRaises(Boom, s.transact, create)
        made[0].store = s
        self.assertEqual(s.findUnique(Quiet).value, 7)

    def test_deleteRolledBack(self) -> None:
        """
        A rolled-back delete leaves the item in the store and in the cache.
        """
        s = Store()
        c = Counter(store=s, value=3)

        def delete() -> None:
            c.deleteFromStore()
            self.assertRaises(errors.ItemNotFound, s.getItemByID, c.storeID)
            raise Boom()

        self.assertRaises(Boom, s.transact, delete)
        self.assertIs(s.getItemByID(c.storeID), c)
        self.assertIs(c.store, s)
        c.deleteFromStore()
        self.assertIsNone(c.store)

    def test_tableCreationRolledBack(self) -> None:
        """
        A table created in a rolled-back transaction is forgotten, and made
        again later.
        """
        s = Store()

        def create() -> None:
            Quiet(store=s)
            raise Boom()

        self.assertRaises(Boom, s.transact, create)
        self.assertFalse(s._hasTable(Quiet))
        Quiet(store=s)
        self.assertEqual(s.count(Quiet), 1)


class NestingTests(SynchronousTestCase):
    """
    Nested transact calls and reads of pending changes.
    """

    def test_nestedIsPlainCall(self) -> None:
        """
        An inner transact whose exception is caught does not roll anything
        back: its changes commit with the outer transaction.
        """
        s = Store()

        def inner() -> None:
            Quiet(store=s, value=1)
            raise Boom()

        def outer() -> None:
            try:
                s.transact(inner)
            except Boom:
                pass

        s.transact(outer)
        self.assertEqual(s.count(Quiet), 1)

    def test_querySeesPending(self) -> None:
        """
        A query inside a transaction sees its uncommitted changes.
        """
        s = Store()
        q = Quiet(store=s)

        def change() -> Any:
            q.value = 42
            Quiet(store=s, value=43)
            return [x.value for x in s.query(Quiet, Quiet.value > 40, sort=Quiet.value.ascending)]

        self.assertEqual(s.transact(change), [42, 43])

    def test_gcDuringTransaction(self) -> None:
        """
        Touched items survive garbage collection within the transaction, so a
        rollback restores the object the caller may still see later.
        """
        s = Store()
        storeID = Quiet(store=s, value=1).storeID

        def change() -> None:
            s.getItemByID(storeID).value = 2
            gc.collect()
            self.assertEqual(s.getItemByID(storeID).value, 2)
            raise Boom()

        self.assertRaises(Boom, s.transact, change)
        self.assertEqual(s.getItemByID(storeID).value, 1)


class Pointing(Item):
    """
    Refers to a Quiet, for batching tests.
    """

    target = reference()


class BatchedInsertTests(SynchronousTestCase):
    """
    Within a transaction, rows of new items are written in batches; every
    read still sees them.
    """

    def test_readsSeeBatchedItems(self) -> None:
        """
        Items created after the first one in a transaction are visible to
        queries, raw SQL, references and deletes, with their latest values.
        """
        path = self.mktemp()
        s = Store(path)

        def work() -> list[int]:
            items = [Quiet(store=s, value=i) for i in range(5)]
            items[3].value = 30
            self.assertEqual(
                [q.value for q in s.query(Quiet, sort=Quiet.storeID.ascending)], [0, 1, 2, 30, 4]
            )
            more = [Quiet(store=s, value=i) for i in range(5, 8)]
            self.assertEqual(s.querySQL("SELECT COUNT(*) FROM %s" % (Quiet._fTable,)), [(8,)])
            pointer = Pointing(store=s, target=more[-1])
            Pointing(store=s, target=more[0])
            more[0].deleteFromStore()
            self.assertEqual(s.count(Pointing, Pointing.target == None), 1)  # noqa: E711
            self.assertIs(pointer.target, more[-1])
            more[1].value = 60
            return [q.storeID for q in items + more]

        ids = s.transact(work)
        self.assertEqual(len(set(ids)), len(ids))
        s.close()
        s = Store(path)
        self.assertEqual(
            sorted(q.value for q in s.query(Quiet)), [0, 1, 2, 4, 7, 30, 60]
        )
        s.close()

    def test_rollbackDiscardsBatch(self) -> None:
        """
        A rollback discards batched rows too, and none of their storeIDs is
        reused.
        """
        s = Store()
        made: list[Quiet] = []

        def work() -> None:
            made.extend(Quiet(store=s, value=i) for i in range(4))
            raise Boom()

        self.assertRaises(Boom, s.transact, work)
        self.assertEqual(s.count(Quiet), 0)
        self.assertTrue(all(q.storeID is None for q in made))
        self.assertGreater(Quiet(store=s).storeID, 4)

    def test_batchInsertBetween(self) -> None:
        """
        batchInsert in the middle of a transaction with batched items keeps
        storeIDs unique.
        """
        s = Store()

        def work() -> None:
            Quiet(store=s, value=1)
            Quiet(store=s, value=2)
            s.batchInsert(Quiet, [Quiet.value], [(3,), (4,)])
            Quiet(store=s, value=5)

        s.transact(work)
        self.assertEqual(sorted(s.query(Quiet).getColumn("value")), [1, 2, 3, 4, 5])
        self.assertEqual(len(set(s.query(Quiet).getColumn("storeID"))), 5)


class ChangedItemTests(SynchronousTestCase):
    """
    Within a transaction, the changed attributes of an existing item are
    written with one C{UPDATE} per item, before any statement that could see
    them and at commit.
    """

    def test_oneUpdatePerItem(self) -> None:
        """
        Several assignments to the attributes of two items in one transaction
        are written with one C{UPDATE} for each item, holding the last values.
        """
        path = self.mktemp()
        s = Store(path)
        a = Counter(store=s, value=1, name="a")
        b = Counter(store=s, value=2, name="b")
        statements: list[str] = []
        assert s._conn is not None
        s._conn.set_trace_callback(statements.append)

        def work() -> None:
            a.value = 10
            a.name = "aa"
            a.value = 11
            b.value = 20

        s.transact(work)
        s._conn.set_trace_callback(None)
        updates = [sql for sql in statements if sql.startswith("UPDATE")]
        self.assertEqual(len(updates), 2, statements)
        s.close()
        s = Store(path)
        self.assertEqual(
            [(c.name, c.value) for c in s.query(Counter, sort=Counter.storeID.ascending)],
            [("aa", 11), ("b", 20)],
        )
        s.close()

    def test_readsSeeChanges(self) -> None:
        """
        Queries, counts and raw SQL run later in the same transaction see the
        changed values.
        """
        s = Store()
        c = Counter(store=s, value=1, name="x")

        def work() -> None:
            c.value = 5
            self.assertEqual(s.count(Counter, Counter.value == 5), 1)
            c.name = "y"
            self.assertEqual(
                s.querySQL("SELECT %s FROM %s" % (Counter.name.columnName, Counter._fTable)),
                [("y",)],
            )
            c.value = 6
            self.assertEqual(list(s.query(Counter).getColumn("value")), [6])

        s.transact(work)
        self.assertEqual(s.findUnique(Counter).value, 6)

    def test_rollbackWritesNothing(self) -> None:
        """
        A rolled-back transaction restores the attributes and leaves the
        database as it was.
        """
        path = self.mktemp()
        s = Store(path)
        c = Counter(store=s, value=1, name="x")

        def work() -> None:
            c.value = 2
            c.name = "y"
            raise Boom()

        self.assertRaises(Boom, s.transact, work)
        self.assertEqual((c.value, c.name), (1, "x"))
        s.close()
        s = Store(path)
        self.assertEqual([(c.value, c.name) for c in s.query(Counter)], [(1, "x")])
        s.close()


class Grumpy(Item):
    """
    Overrides the hooks without calling up, and writes in deleted().
    """

    value = integer(default=0)
    writeOnDelete = inmemory()

    def activate(self) -> None:
        self.writeOnDelete = False

    def committed(self) -> None:
        pass

    def deleted(self) -> None:
        if self.writeOnDelete:
            Quiet(store=self.store)


class HookOverrideTests(SynchronousTestCase):
    """
    Hooks overridden without calling up.
    """

    def test_deletesAndRollbacksStillWork(self) -> None:
        """
        committed() overridden without calling up breaks neither rollbacks
        nor deletes (Axiom's bookkeeping lived in it).
        """
        s = Store()
        g = Grumpy(store=s, value=1)

        def fail() -> None:
            g.value = 2
            raise Boom()

        self.assertRaises(Boom, s.transact, fail)
        self.assertEqual(g.value, 1)
        g.deleteFromStore()
        self.assertIsNone(g.store)
        self.assertEqual(s.count(Grumpy), 0)

    def test_writeInDeletedRejected(self) -> None:
        """
        Writing from deleted() raises ChangeRejected; the delete itself is
        committed and the item is detached.
        """
        s = Store()
        g = Grumpy(store=s)
        g.writeOnDelete = True
        self.assertRaises(errors.ChangeRejected, g.deleteFromStore)
        self.assertIsNone(g.store)
        self.assertEqual(s.count(Grumpy), 0)
        self.assertEqual(s.count(Quiet), 0)

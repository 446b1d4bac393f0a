"""
Tests for references: deletion policies on the single and bulk paths,
cross-store checks and references to the store itself.
"""

from __future__ import annotations

import gc

from twisted.trial.unittest import SynchronousTestCase

from fractal.store import Item, Store, errors, integer, reference, text


class Target(Item):
    """
    Something referred to.
    """

    name = text()


class Nullifier(Item):
    """
    A NULLIFY reference (the default).
    """

    target = reference(reftype=Target)


class StrictNullifier(Item):
    """
    A NULLIFY reference that must not be None.
    """

    target = reference(reftype=Target, allowNone=False)


class Cascader(Item):
    """
    A CASCADE reference.
    """

    target = reference(reftype=Target, whenDeleted=reference.CASCADE)


class ChainLink(Item):
    """
    Cascades from a Cascader, to chain cascades.
    """

    link = reference(reftype=Cascader, whenDeleted=reference.CASCADE)


class Disallower(Item):
    """
    A DISALLOW reference.
    """

    target = reference(reftype=Target, whenDeleted=reference.DISALLOW)


class HookedCascader(Item):
    """
    A CASCADE reference on a class that overrides deleted(), so it is
    deleted one by one.
    """

    target = reference(reftype=Target, whenDeleted=reference.CASCADE)
    gone = integer(default=0)
    log: list[int] = []

    def deleted(self) -> None:
        HookedCascader.log.append(self.storeID)


class SelfRef(Item):
    """
    Refers to anything, including the store.
    """

    anything = reference()
    value = integer(default=0)


class NullifyTests(SynchronousTestCase):
    """
    NULLIFY writes NULL.
    """

    def test_single(self) -> None:
        """
        Deleting the target makes the reference read None and the column
        NULL, so C{ref == None} finds it.
        """
        s = Store()
        t = Target(store=s)
        n = Nullifier(store=s, target=t)
        t.deleteFromStore()
        self.assertIsNone(n.target)
        self.assertEqual(list(s.query(Nullifier, Nullifier.target == None)), [n])  # noqa: E711
        n2 = s._cursor.execute("SELECT [target] FROM %s" % (Nullifier._fTable,)).fetchone()[0]
        self.assertIsNone(n2)

    def test_bulk(self) -> None:
        """
        The bulk path nullifies too.
        """
        s = Store()
        ns = [Nullifier(store=s, target=Target(store=s)) for _ in range(3)]
        s.query(Target).deleteFromStore()
        self.assertEqual([n.target for n in ns], [None] * 3)
        self.assertEqual(s.count(Nullifier, Nullifier.target == None), 3)  # noqa: E711

    def test_notAllowNone(self) -> None:
        """
        A NULLIFY reference with allowNone=False still reads None once its
        target is gone (the column holds NULL).
        """
        s = Store()
        t = Target(store=s)
        n = StrictNullifier(store=s, target=t)
        t.deleteFromStore()
        self.assertIsNone(n.target)


class CascadeTests(SynchronousTestCase):
    """
    CASCADE deletes referrers.
    """

    def test_single(self) -> None:
        """
        Deleting the target deletes the referrer, and cascades chain.
        """
        s = Store()
        t = Target(store=s)
        c = Cascader(store=s, target=t)
        link = ChainLink(store=s, link=c)
        t.deleteFromStore()
        self.assertEqual(s.count(Cascader), 0)
        self.assertEqual(s.count(ChainLink), 0)
        self.assertIsNone(c.store)
        self.assertIsNone(link.store)

    def test_bulk(self) -> None:
        """
        The bulk path cascades too, through classes with hooks one by one.
        """
        s = Store()
        targets = [Target(store=s) for _ in range(3)]
        for t in targets:
            Cascader(store=s, target=t)
            HookedCascader(store=s, target=t)
        HookedCascader.log[:] = []
        s.query(Target).deleteFromStore()
        self.assertEqual(s.count(Cascader), 0)
        self.assertEqual(s.count(HookedCascader), 0)
        self.assertEqual(len(HookedCascader.log), 3)

    def test_brokenReference(self) -> None:
        """
        A CASCADE reference whose target row vanished behind the store's back
        raises BrokenReference when read.
        """
        s = Store()
        t = Target(store=s)
        c = Cascader(store=s, target=t)
        s._cursor.execute("DELETE FROM %s" % (Target._fTable,))
        s._cache.clear()
        del t
        gc.collect()
        self.assertRaises(errors.BrokenReference, getattr, c, "target")


class DisallowTests(SynchronousTestCase):
    """
    DISALLOW blocks deletion.
    """

    def test_single(self) -> None:
        """
        Deleting a target with a DISALLOW referrer raises DeletionDisallowed
        and changes nothing; after the referrer goes, it can be deleted.
        """
        s = Store()
        t = Target(store=s)
        d = Disallower(store=s, target=t)
        self.assertRaises(errors.DeletionDisallowed, t.deleteFromStore)
        self.assertIs(t.store, s)
        self.assertEqual(s.count(Target), 1)
        d.deleteFromStore()
        t.deleteFromStore()
        self.assertEqual(s.count(Target), 0)

    def test_bulk(self) -> None:
        """
        The bulk path checks DISALLOW and deletes nothing when it fails.
        """
        s = Store()
        t1, t2 = Target(store=s), Target(store=s)
        Disallower(store=s, target=t2)
        self.assertRaises(errors.DeletionDisallowed, s.query(Target).deleteFromStore)
        self.assertEqual(s.count(Target), 2)
        self.assertIs(t1.store, s)


class BulkDeleteTests(SynchronousTestCase):
    """
    query.deleteFromStore() tells cached objects.
    """

    def test_noStaleObjects(self) -> None:
        """
        After a bulk delete, cached items are detached and getItemByID raises
        ItemNotFound instead of returning them.
        """
        s = Store()
        targets = [Target(store=s, name="x") for _ in range(3)]
        ids = [t.storeID for t in targets]
        s.query(Target, Target.name == "x").deleteFromStore()
        for t, storeID in zip(targets, ids):
            self.assertIsNone(t.store)
            self.assertRaises(errors.ItemNotFound, s.getItemByID, storeID)

    def test_deletedRowsKeepObjectRow(self) -> None:
        """
        A deleted item's axiom_objects row stays, with type_id -1.
        """
        s = Store()
        t = Target(store=s)
        t.deleteFromStore()
        row = s._cursor.execute(
            "SELECT type_id FROM axiom_objects WHERE oid = ?", (t.storeID,)
        ).fetchone()
        self.assertEqual(row, (-1,))


class CrossStoreTests(SynchronousTestCase):
    """
    References never cross stores.
    """

    def test_setCrossStore(self) -> None:
        """
        Setting a reference on a stored item to an item of another store
        raises NoCrossStoreReferences.
        """
        s1, s2 = Store(), Store()
        n = Nullifier(store=s1)
        self.assertRaises(errors.NoCrossStoreReferences, setattr, n, "target", Target(store=s2))

    def test_insertCrossStore(self) -> None:
        """
        An unstored item referring to another store's item, or to an unstored
        item, fails at insertion.
        """
        s1, s2 = Store(), Store()
        n = Nullifier(target=Target(store=s2))
        self.assertRaises(errors.NoCrossStoreReferences, setattr, n, "store", s1)
        n2 = Nullifier(target=Target())
        self.assertRaises(errors.NoCrossStoreReferences, setattr, n2, "store", s1)

    def test_unstoredThenStored(self) -> None:
        """
        References between unstored items in the same store-to-be work once
        the target is stored first.
        """
        s = Store()
        t = Target()
        n = Nullifier(target=t)
        t.store = s
        n.store = s
        self.assertIs(n.target, t)

    def test_compareCrossStore(self) -> None:
        """
        Comparing a reference with an item from another store raises, instead
        of matching by bare storeID.
        """
        s1, s2 = Store(), Store()
        Target(store=s1)
        other = Target(store=s2)
        self.assertRaises(errors.NoCrossStoreReferences, s1.query, Nullifier, Nullifier.target == other)

    def test_compareWithInt(self) -> None:
        """
        Comparing a reference with an int raises TypeError.
        """
        s = Store()
        self.assertRaises(TypeError, s.query, Nullifier, Nullifier.target == 1)

    def test_notAnItem(self) -> None:
        """
        Setting a reference to a non-item raises ConstraintError.
        """
        self.assertRaises(errors.ConstraintError, Nullifier, target=3)


class StoreReferenceTests(SynchronousTestCase):
    """
    References to the store itself.
    """

    def test_selfStoreSurvivesReload(self) -> None:
        """
        A reference to the store is stored as -1 and reads back as the store.
        """
        path = self.mktemp()
        s = Store(path)
        SelfRef(store=s, anything=s, value=1)
        s.close()
        s = Store(path)
        self.assertIs(s.findUnique(SelfRef).anything, s)
        self.assertEqual(s.count(SelfRef, SelfRef.anything == s), 1)
        s.close()

    def test_storeProperties(self) -> None:
        """
        store.store is the store and its storeID is -1.
        """
        s = Store()
        self.assertIs(s.store, s)
        self.assertEqual(s.storeID, -1)
        self.assertIs(s.getItemByID(-1), s)

    def test_reftypeNotChecked(self) -> None:
        """
        reftype scopes deletion policies but does not check assignments.
        """
        s = Store()
        other = SelfRef(store=s)
        n = Nullifier(store=s, target=other)
        self.assertIs(n.target, other)
        other.deleteFromStore()
        self.assertIsNone(n.target)

"""
Tests for defining items (L{fractal.store.item}): type names, inheritance,
strictness, hooks and the identity map.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from fractal.store import (
    Item,
    Store,
    errors,
    inmemory,
    integer,
    reference,
    text,
    textlist,
    transacted,
)
from fractal.store.item import Placeholder


class Plain(Item):
    """
    An item with a few attributes.
    """

    name = text()
    count = integer(default=0)


class Empty(Item):
    """
    An item with no attributes at all.
    """


class Hooked(Item):
    """
    Records its hooks in an in-memory list.
    """

    typeName = "test_store_item_hooked"
    value = integer(default=0)
    calls = inmemory()
    initCalls: list[int] = []

    def __init__(self, **kw: Any) -> None:
        Hooked.initCalls.append(1)
        super().__init__(**kw)

    def activate(self) -> None:
        if not hasattr(self, "calls"):
            self.calls = []
        self.calls.append("activate")

    def stored(self) -> None:
        self.calls.append("stored")


class Required(Item):
    """
    An item with an attribute that must not be None.
    """

    name = text(allowNone=False)


class Listed(Item):
    """
    An item with a mutable default.
    """

    tags = textlist(default=[])


def _nextNumber() -> int:
    _nextNumber.n += 1  # type: ignore[attr-defined]
    return _nextNumber.n  # type: ignore[attr-defined, no-any-return]


_nextNumber.n = 0  # type: ignore[attr-defined]


class Factoried(Item):
    """
    An item with a default factory.
    """

    number = integer(defaultFactory=_nextNumber)


class Mixin:
    """
    A plain mixin.
    """

    def shout(self) -> str:
        return self.name.upper()  # type: ignore[attr-defined, no-any-return]

    @property
    def loud(self) -> str:
        return self.shout()


class WithMixin(Mixin, Item):
    """
    An item with a plain mixin.
    """

    name = text()
    _secret = 0

    @property
    def settable(self) -> int:
        return self.count * 2

    @settable.setter
    def settable(self, value: int) -> None:
        self.count = value // 2

    count = integer(default=0)


class Transacting(Item):
    """
    Uses L{transacted}.
    """

    value = integer(default=0)

    @transacted
    def bump(self, fail: bool) -> bool:
        self.value += 1
        if fail:
            raise ValueError("boom")
        return self.store.inTransaction  # type: ignore[no-any-return]


class Pointer(Item):
    """
    Refers to another item.
    """

    target = reference()


class TypeNameTests(SynchronousTestCase):
    """
    Type names, versions and inheritance.
    """

    def test_defaultTypeName(self) -> None:
        """
        The default typeName is the qualified class name, lowercased, with dots
        replaced by underscores; the default schemaVersion is 1.
        """
        self.assertEqual(Plain.typeName, "tests_test_store_item_plain")
        self.assertEqual(Plain.schemaVersion, 1)

    def test_duplicateTypeName(self) -> None:
        """
        Two classes with one typeName raise RuntimeError.
        """

        def define() -> None:
            class Again(Item):
                typeName = Plain.typeName
                x = integer()

        self.assertRaises(RuntimeError, define)

    def test_noInheritance(self) -> None:
        """
        Subclassing an Item subclass raises NoInheritance.
        """

        def define() -> None:
            class Sub(Plain):
                typeName = "test_store_item_sub"

        self.assertRaises(errors.NoInheritance, define)

    def test_mixin(self) -> None:
        """
        A plain mixin next to Item works, including its properties.
        """
        s = Store()
        w = WithMixin(store=s, name="abc")
        self.assertEqual(w.shout(), "ABC")
        self.assertEqual(w.loud, "ABC")

    def test_emptyItem(self) -> None:
        """
        An item with no attributes can be stored and loaded.
        """
        s = Store()
        e = Empty(store=s)
        self.assertEqual(list(s.query(Empty)), [e])
        self.assertEqual(Empty.getSchema(), [])

    def test_schemaSorted(self) -> None:
        """
        getSchema gives the attributes sorted by name.
        """
        self.assertEqual([n for n, _ in WithMixin.getSchema()], ["count", "name"])


class StrictnessTests(SynchronousTestCase):
    """
    Only declared names can be set.
    """

    def test_unknownAttribute(self) -> None:
        """
        Setting an undeclared name raises AttributeError.
        """
        p = Plain(name="x")
        self.assertRaises(AttributeError, setattr, p, "nope", 1)

    def test_unknownKeyword(self) -> None:
        """
        An undeclared constructor keyword raises AttributeError.
        """
        self.assertRaises(AttributeError, Plain, nope=1)

    def test_allowedNames(self) -> None:
        """
        inmemory attributes and properties with setters can be set.
        """
        w = WithMixin(name="a")
        w.settable = 10
        self.assertEqual(w.count, 5)
        h = Hooked()
        h.calls = ["x"]
        self.assertEqual(h.calls, ["x"])

    def test_propertyWithoutSetter(self) -> None:
        """
        A property without a setter cannot be set.
        """
        w = WithMixin(name="a")
        self.assertRaises(AttributeError, setattr, w, "loud", "x")

    def test_storeIDNotSettable(self) -> None:
        """
        storeID is None before insertion, then fixed; setting or passing it
        raises AttributeError.
        """
        p = Plain(name="a")
        self.assertIsNone(p.storeID)
        self.assertRaises(AttributeError, setattr, p, "storeID", 5)
        self.assertRaises(AttributeError, Plain, storeID=5)
        s = Store()
        p.store = s
        self.assertIsInstance(p.storeID, int)

    def test_storeOnce(self) -> None:
        """
        Setting store again to the same store does nothing; moving to another
        store raises AttributeError.
        """
        s1, s2 = Store(), Store()
        p = Plain(store=s1, name="a")
        p.store = s1
        self.assertRaises(AttributeError, setattr, p, "store", s2)
        self.assertIs(p.store, s1)

    def test_storeMustBeStore(self) -> None:
        """
        Setting store to something else raises TypeError.
        """
        self.assertRaises(TypeError, Plain, store=object())

    def test_inmemoryUnset(self) -> None:
        """
        Reading an inmemory attribute before it is set raises AttributeError.
        """
        self.assertRaises(AttributeError, getattr, Hooked.__new__(Hooked), "calls")


class ConstructionTests(SynchronousTestCase):
    """
    Defaults, required values and the order of insertion.
    """

    def test_defaults(self) -> None:
        """
        Missing attributes get their default or their factory's value.
        """
        p = Plain(name="a")
        self.assertEqual(p.count, 0)
        a, b = Factoried(), Factoried()
        self.assertEqual(b.number, a.number + 1)

    def test_defaultAndFactory(self) -> None:
        """
        Giving both default and defaultFactory raises ValueError.
        """
        self.assertRaises(ValueError, integer, default=1, defaultFactory=int)

    def test_requiredMissing(self) -> None:
        """
        allowNone=False with no value raises TypeError, even with no store;
        setting None later raises too.
        """
        self.assertRaises(TypeError, Required)
        r = Required(name="x")
        self.assertRaises(TypeError, setattr, r, "name", None)

    def test_mutableDefaultCopied(self) -> None:
        """
        A mutable default is not shared between items: changing the list read
        from one item changes neither that item nor another.
        """
        s = Store()
        a, b = Listed(store=s), Listed(store=s)
        a.tags.append("x")
        self.assertEqual(a.tags, [])
        a.tags = ["y"]
        self.assertEqual(b.tags, [])
        self.assertEqual(Listed(store=s).tags, [])

    def test_storeLast(self) -> None:
        """
        The store keyword is applied last: the row is inserted with every
        value, whatever the keyword order.
        """
        s = Store()
        p = Plain(store=s, name="first", count=3)
        gc.collect()
        self.assertEqual(s.findUnique(Plain, Plain.count == 3).name, "first")
        self.assertIs(s.findUnique(Plain, Plain.count == 3), p)


class HookTests(SynchronousTestCase):
    """
    activate, stored and loading.
    """

    def test_activateThenStored(self) -> None:
        """
        activate runs before stored at insertion; not before.
        """
        h = Hooked()
        self.assertRaises(AttributeError, getattr, h, "calls")
        h.store = Store()
        self.assertEqual(h.calls, ["activate", "stored"])

    def test_reloadAfterGC(self) -> None:
        """
        After the last reference goes, loading builds a new object and runs
        activate again, without __init__.
        """
        s = Store()
        h = Hooked(store=s, value=4)
        storeID = h.storeID
        del h
        gc.collect()
        before = len(Hooked.initCalls)
        again = s.getItemByID(storeID)
        self.assertEqual(again.calls, ["activate"])
        self.assertEqual(again.value, 4)
        self.assertEqual(len(Hooked.initCalls), before)

    def test_identity(self) -> None:
        """
        While an item is alive, getItemByID, queries and references return
        the same object.
        """

        s = Store()
        p = Plain(store=s, name="a")
        ptr = Pointer(store=s, target=p)
        self.assertIs(s.getItemByID(p.storeID), p)
        self.assertIs(list(s.query(Plain))[0], p)
        self.assertIs(ptr.target, p)

    def test_cachedNotRefreshed(self) -> None:
        """
        A cached item returned by a query is not refreshed from the row.
        """
        s = Store()
        p = Plain(store=s, name="a")
        s._cursor.execute("UPDATE %s SET [name] = 'b'" % (Plain._fTable,))
        self.assertEqual(list(s.query(Plain))[0].name, "a")
        del p
        gc.collect()
        self.assertEqual(list(s.query(Plain))[0].name, "b")


class HelperTests(SynchronousTestCase):
    """
    repr, persistentValues and transacted.
    """

    def test_repr(self) -> None:
        """
        repr shows the class, attributes and storeID.
        """
        s = Store()
        p = Plain(store=s, name="a")
        self.assertTrue(
            repr(p).startswith("Plain(count=0, name='a', storeID=%d)@0x" % (p.storeID,)), repr(p)
        )

    def test_persistentValues(self) -> None:
        """
        persistentValues gives every persistent attribute.
        """
        self.assertEqual(Plain(name="z").persistentValues(), {"name": "z", "count": 0})

    def test_transacted(self) -> None:
        """
        A transacted method runs in a transaction and rolls back on error.
        """
        s = Store()
        t = Transacting(store=s)
        self.assertTrue(t.bump(False))
        self.assertRaises(ValueError, t.bump, True)
        self.assertEqual(t.value, 1)

    def test_placeholderReexported(self) -> None:
        """
        Placeholder is importable from fractal.store.item.
        """
        self.assertEqual(repr(Placeholder(Plain)), "Placeholder(Plain)")


class _Marker:
    """
    A foreign descriptor, as other modules (dependsOn) may put in a class.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.owner = owner
        self.name = name

    def __get__(self, oself: object, cls: object = None) -> object:
        return self


class _SpecialReference(reference):
    """
    A reference subclass, as dependsOn returns.
    """


class Decorated(Item):
    """
    Holds a foreign descriptor and a reference subclass.
    """

    marker = _Marker()
    special = _SpecialReference()


class ForeignDescriptorTests(SynchronousTestCase):
    """
    The item class machinery keeps what it does not know.
    """

    def test_foreignDescriptorKept(self) -> None:
        """
        An unknown descriptor stays in the class, bound to it by
        __set_name__; a subclass of reference is a persistent attribute.
        """
        self.assertIs(Decorated.__dict__["marker"].owner, Decorated)
        self.assertEqual([n for n, _ in Decorated.getSchema()], ["special"])
        s = Store()
        p = Plain(store=s, name="x")
        d = Decorated(store=s, special=p)
        self.assertIs(d.special, p)


class CacheSizeTests(SynchronousTestCase):
    """
    The identity map does not keep dead entries without bound.
    """

    def test_bounded(self) -> None:
        """
        Loading many items a page at a time, dropping each page, leaves the
        map with a few thousand entries at most, not one per item ever
        loaded.
        """
        s = Store()
        s.batchInsert(Plain, [Plain.name], [("n%d" % i,) for i in range(20000)])
        for page in range(20):
            items = list(s.query(Plain, limit=1000, offset=page * 1000))
            self.assertEqual(len(items), 1000)
            del items
        self.assertLessEqual(len(s._cache), 4096)

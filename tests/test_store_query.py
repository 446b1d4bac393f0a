"""
Tests for queries: comparisons, sorting, limits, counting, attribute
queries, the find helpers, multi-class queries, placeholders, pagination
and L{fractal.store.queryutil}.
"""

from __future__ import annotations

from decimal import Decimal

from twisted.trial.unittest import SynchronousTestCase

from fractal.store import (
    AND,
    OR,
    Item,
    Store,
    Time,
    errors,
    integer,
    point2decimal,
    reference,
    text,
    timestamp,
)
from fractal.store.item import Placeholder
from fractal.store.queryutil import AttributeTuple, contains, overlapping


class Thing(Item):
    """
    Something to query.
    """

    name = text()
    size = integer(indexed=True)
    price = point2decimal()
    when = timestamp()


class Owner(Item):
    """
    Points at a Thing, for joins.
    """

    label = text()
    thing = reference()


class Span(Item):
    """
    A half-open range.
    """

    start = integer()
    end = integer()


class NeverStored(Item):
    """
    A type that is never stored, so it has no table.
    """

    value = integer()


class QueryTestsMixin:
    """
    A store with a few things.
    """

    def setUp(self) -> None:
        self.store = Store()
        self.things = [
            Thing(store=self.store, name=name, size=size, price=Decimal(size))
            for name, size in [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5)]
        ]


class ComparisonTests(QueryTestsMixin, SynchronousTestCase):
    """
    Comparisons and conjunctions.
    """

    def names(self, comparison: object, **kw: object) -> list[str]:
        return [t.name for t in self.store.query(Thing, comparison, sort=Thing.size.ascending, **kw)]

    def test_operators(self) -> None:
        """
        ==, !=, <, <=, >, >= compare with values.
        """
        self.assertEqual(self.names(Thing.size == 2), ["b"])
        self.assertEqual(self.names(Thing.size != 2), ["a", "c", "d", "e"])
        self.assertEqual(self.names(Thing.size < 2), ["a"])
        self.assertEqual(self.names(Thing.size <= 2), ["a", "b"])
        self.assertEqual(self.names(Thing.size > 4), ["e"])
        self.assertEqual(self.names(Thing.size >= 4), ["d", "e"])

    def test_none(self) -> None:
        """
        == None and != None use IS [NOT] NULL; other operators raise.
        """
        Thing(store=self.store, name="nosize")
        self.assertEqual(self.store.count(Thing, Thing.size == None), 1)  # noqa: E711
        self.assertEqual(self.store.count(Thing, Thing.size != None), 5)  # noqa: E711
        self.assertRaises(TypeError, lambda: Thing.size < None)

    def test_andOr(self) -> None:
        """
        AND and OR combine comparisons; with no argument they raise.
        """
        self.assertEqual(self.names(AND(Thing.size > 1, Thing.size < 4)), ["b", "c"])
        self.assertEqual(self.names(OR(Thing.size == 1, Thing.name == "e")), ["a", "e"])
        self.assertRaises(ValueError, AND)
        self.assertRaises(ValueError, OR)

    def test_valuesCheckedAtQuery(self) -> None:
        """
        A wrong value type raises when the query is built.
        """
        self.assertRaises(TypeError, self.store.query, Thing, Thing.size == "x")

    def test_storeIDColumn(self) -> None:
        """
        Cls.storeID compares like a column.
        """
        first = self.things[0]
        self.assertEqual(self.names(Thing.storeID == first.storeID), ["a"])

    def test_oneOf(self) -> None:
        """
        oneOf matches a set; [] matches nothing; notOneOf([]) matches all.
        """
        self.assertEqual(self.names(Thing.size.oneOf([1, 3])), ["a", "c"])
        self.assertEqual(self.names(Thing.size.oneOf([])), [])
        self.assertEqual(self.names(Thing.size.notOneOf([])), ["a", "b", "c", "d", "e"])
        self.assertEqual(self.names(Thing.size.notOneOf([1, 2, 3])), ["d", "e"])

    def test_oneOfSubselect(self) -> None:
        """
        oneOf accepts an attribute query, used as a sub-select.
        """
        Owner(store=self.store, label="x", thing=self.things[1])
        sub = self.store.query(Owner).getColumn("thing")
        self.assertEqual(self.names(Thing.storeID.oneOf(sub)), ["b"])

    def test_oneOfSubselectNoTable(self) -> None:
        """
        A sub-select on a type with no table matches nothing, creating
        nothing.
        """
        sub = self.store.query(NeverStored).getColumn("value")
        self.assertEqual(self.names(Thing.size.oneOf(sub)), [])
        self.assertFalse(self.store._hasTable(NeverStored))

    def test_like(self) -> None:
        """
        like joins its parts into a pattern with wildcards; notLike negates.
        """
        Thing(store=self.store, name="abc", size=10)
        self.assertEqual(self.names(Thing.name.like("a%")), ["a", "abc"])
        self.assertEqual(self.names(Thing.name.like("a", "_", "c")), ["abc"])
        self.assertEqual(self.names(Thing.name.notLike("%b%")), ["a", "c", "d", "e"])

    def test_startswithEscapes(self) -> None:
        """
        startswith and endswith take their argument literally: % and _ are
        not wildcards (Axiom's startswith('a_') matched 'ab').
        """
        Thing(store=self.store, name="ab", size=10)
        Thing(store=self.store, name="a_c", size=11)
        Thing(store=self.store, name="x%", size=12)
        self.assertEqual(self.names(Thing.name.startswith("a_")), ["a_c"])
        self.assertEqual(self.names(Thing.name.endswith("%")), ["x%"])
        self.assertEqual(self.names(Thing.name.startswith("A")), ["a", "ab", "a_c"])

    def test_twoColumns(self) -> None:
        """
        Comparing two columns makes a join.
        """
        Owner(store=self.store, label="x", thing=self.things[2])
        self.assertEqual(self.names(Owner.thing == Thing.storeID), ["c"])

    def test_comparisonMustMentionClass(self) -> None:
        """
        A comparison that does not mention the result class raises ValueError.
        """
        self.assertRaises(ValueError, self.store.query, Thing, Owner.label == "x")

    def test_noOperators(self) -> None:
        """
        There is no & or | on comparisons.
        """
        self.assertRaises(TypeError, lambda: (Thing.size == 1) & (Thing.size == 2))


class SortLimitTests(QueryTestsMixin, SynchronousTestCase):
    """
    Sorting, limit and offset.
    """

    def test_sortDirections(self) -> None:
        """
        ascending/descending and asc/desc sort; tuples sort by several columns.
        """
        q = self.store.query(Thing, sort=Thing.size.descending)
        self.assertEqual([t.size for t in q], [5, 4, 3, 2, 1])
        q = self.store.query(Thing, sort=Thing.size.asc)
        self.assertEqual([t.size for t in q], [1, 2, 3, 4, 5])
        Thing(store=self.store, name="a", size=0)
        q = self.store.query(Thing, sort=(Thing.name.asc, Thing.size.desc))
        self.assertEqual([(t.name, t.size) for t in q][:2], [("a", 1), ("a", 0)])

    def test_bareAttributeSort(self) -> None:
        """
        Sorting by a bare attribute raises AssertionError, as in Axiom.
        """
        self.assertRaises(AssertionError, self.store.query, Thing, sort=Thing.size)

    def test_sortOtherClass(self) -> None:
        """
        Sorting by a class not in the query raises ValueError.
        """
        self.assertRaises(ValueError, self.store.query, Thing, sort=Owner.label.ascending)

    def test_limitOffset(self) -> None:
        """
        limit and offset select a window; limit must be an int; offset works
        without limit.
        """
        q = self.store.query(Thing, sort=Thing.size.asc, limit=2, offset=1)
        self.assertEqual([t.size for t in q], [2, 3])
        self.assertRaises(TypeError, self.store.query, Thing, limit="2")
        q = self.store.query(Thing, sort=Thing.size.asc, offset=3)
        self.assertEqual([t.size for t in q], [4, 5])

    def test_countHonoursLimitOffset(self) -> None:
        """
        count() honours limit and offset (Axiom ignored limit and crashed with
        offset).
        """
        self.assertEqual(self.store.query(Thing, limit=3).count(), 3)
        self.assertEqual(self.store.query(Thing, limit=3, offset=4).count(), 1)
        self.assertEqual(self.store.query(Thing).distinct().count(), 5)

    def test_reiterationRerunsSQL(self) -> None:
        """
        Each iteration runs the query again and sees new rows.
        """
        q = self.store.query(Thing)
        self.assertEqual(len(list(q)), 5)
        Thing(store=self.store, name="f", size=6)
        self.assertEqual(len(list(q)), 6)

    def test_alwaysTrueNoLen(self) -> None:
        """
        A query is truthy even when empty and has no len().
        """
        q = self.store.query(Thing, Thing.size > 100)
        self.assertTrue(q)
        self.assertRaises(TypeError, len, q)

    def test_distinct(self) -> None:
        """
        distinct() removes duplicates from joins.
        """
        for _ in range(3):
            Owner(store=self.store, thing=self.things[0])
        q = self.store.query(Thing, Owner.thing == Thing.storeID)
        self.assertEqual(len(list(q)), 3)
        self.assertEqual(list(q.distinct()), [self.things[0]])

    def test_cloneQuery(self) -> None:
        """
        cloneQuery copies a query with a new limit or sort.
        """
        q = self.store.query(Thing, Thing.size > 1, sort=Thing.size.asc)
        self.assertEqual([t.size for t in q.cloneQuery(limit=2)], [2, 3])
        self.assertEqual([t.size for t in q.cloneQuery(sort=Thing.size.desc)], [5, 4, 3, 2])

    def test_explain(self) -> None:
        """
        explain() describes the plan, which uses the index.
        """
        plan = self.store.query(Thing, Thing.size == 3).explain()
        self.assertIn("axiomidx_", plan)


class NoTableTests(SynchronousTestCase):
    """
    Reads never write.
    """

    def test_queryWithoutTable(self) -> None:
        """
        A query (and count, getColumn, findFirst) on a type with no table
        returns nothing and creates no table.
        """
        s = Store()
        self.assertEqual(list(s.query(NeverStored)), [])
        self.assertEqual(s.count(NeverStored), 0)
        self.assertEqual(list(s.query(NeverStored).getColumn("value")), [])
        self.assertEqual(s.sum(NeverStored.value), 0)
        self.assertIsNone(s.findFirst(NeverStored))
        tables = [r[0] for r in s._cursor.execute("SELECT name FROM sqlite_master")]
        self.assertFalse([t for t in tables if "neverstored" in t])


class AttributeQueryTests(QueryTestsMixin, SynchronousTestCase):
    """
    getColumn and aggregates.
    """

    def test_values(self) -> None:
        """
        Iterating gives converted values.
        """
        q = self.store.query(Thing, sort=Thing.size.asc).getColumn("price")
        self.assertEqual(list(q), [Decimal(n) for n in range(1, 6)])

    def test_aggregates(self) -> None:
        """
        count counts non-NULL values; sum, average, max and min work.
        """
        Thing(store=self.store, name="nosize")
        col = self.store.query(Thing).getColumn("size")
        self.assertEqual(col.count(), 5)
        self.assertEqual(col.sum(), 15)
        self.assertEqual(col.average(), 3.0)
        self.assertEqual(col.max(), 5)
        self.assertEqual(col.min(), 1)
        self.assertEqual(self.store.sum(Thing.price), Decimal("15.00"))

    def test_empty(self) -> None:
        """
        sum of nothing is 0 (Decimal 0 for decimals), average None; max and
        min raise ValueError without a default.
        """
        q = self.store.query(Thing, Thing.size > 100)
        self.assertEqual(q.getColumn("size").sum(), 0)
        self.assertEqual(q.getColumn("price").sum(), Decimal("0"))
        self.assertIsNone(q.getColumn("size").average())
        self.assertRaises(ValueError, q.getColumn("size").max)
        self.assertRaises(ValueError, q.getColumn("size").min)
        self.assertEqual(q.getColumn("size").max(default=7), 7)

    def test_distinctValues(self) -> None:
        """
        distinct() gives each value once.
        """
        Thing(store=self.store, name="a", size=9)
        self.assertEqual(sorted(self.store.query(Thing).getColumn("name").distinct()), ["a", "b", "c", "d", "e"])

    def test_timestampMax(self) -> None:
        """
        max of a timestamp column is a Time.
        """
        s = Store()
        Thing(store=s, when=Time.fromMicroseconds(5))
        Thing(store=s, when=Time.fromMicroseconds(9))
        self.assertEqual(s.query(Thing).getColumn("when").max(), Time.fromMicroseconds(9))


class FindTests(QueryTestsMixin, SynchronousTestCase):
    """
    findUnique, findFirst, findOrCreate, getItemByID.
    """

    def test_findUnique(self) -> None:
        """
        findUnique gives the one match; none → ItemNotFound unless a default;
        several → DuplicateUniqueItem.  Both are KeyErrors.
        """
        self.assertIs(self.store.findUnique(Thing, Thing.name == "a"), self.things[0])
        self.assertRaises(errors.ItemNotFound, self.store.findUnique, Thing, Thing.name == "z")
        self.assertIsNone(self.store.findUnique(Thing, Thing.name == "z", None))
        self.assertRaises(errors.DuplicateUniqueItem, self.store.findUnique, Thing, Thing.size > 1)
        self.assertTrue(issubclass(errors.ItemNotFound, KeyError))
        self.assertTrue(issubclass(errors.DuplicateUniqueItem, KeyError))

    def test_findFirst(self) -> None:
        """
        findFirst gives the first by sort, or the default.
        """
        self.assertIs(self.store.findFirst(Thing, sort=Thing.size.desc), self.things[-1])
        self.assertIs(self.store.findFirst(Thing, sort=Thing.size.asc, offset=1), self.things[1])
        self.assertEqual(self.store.findFirst(Thing, Thing.size > 9, default=3), 3)

    def test_findOrCreate(self) -> None:
        """
        findOrCreate returns a match, else creates and calls ifNew.  Text
        matching ignores ASCII case.
        """
        created: list[Thing] = []
        self.assertIs(self.store.findOrCreate(Thing, created.append, name="a", size=1), self.things[0])
        self.assertEqual(created, [])
        self.assertIs(self.store.findOrCreate(Thing, created.append, name="A", size=1), self.things[0])
        new = self.store.findOrCreate(Thing, created.append, name="new", size=9)
        self.assertEqual(created, [new])
        self.assertEqual(new.storeID, self.store.findUnique(Thing, Thing.name == "new").storeID)

    def test_getItemByID(self) -> None:
        """
        getItemByID: a non-int → TypeError; missing → ItemNotFound or default.
        """
        self.assertRaises(TypeError, self.store.getItemByID, "1")
        self.assertRaises(errors.ItemNotFound, self.store.getItemByID, 999)
        self.assertEqual(self.store.getItemByID(999, default="d"), "d")

    def test_getItemByIDOutOfRange(self) -> None:
        """
        A storeID that no SQLite row can have (beyond 64-bit signed integers)
        is an item that does not exist: ItemNotFound (a KeyError) or the
        default, not OverflowError.
        """
        for storeID in [2**63, 2**63 + 1, 2**100, -(2**63) - 1, -(2**80)]:
            error = self.assertRaises(errors.ItemNotFound, self.store.getItemByID, storeID)
            self.assertIsInstance(error, KeyError)
            self.assertEqual(error.args, (storeID,))
            self.assertEqual(self.store.getItemByID(storeID, default="d"), "d")
        self.assertIs(self.store.getItemByID(self.things[0].storeID), self.things[0])


class MultipleTests(QueryTestsMixin, SynchronousTestCase):
    """
    Multi-class queries and placeholders.
    """

    def test_tuples(self) -> None:
        """
        A tuple of classes gives tuples of items; count works.
        """
        o = Owner(store=self.store, label="x", thing=self.things[3])
        q = self.store.query((Owner, Thing), Owner.thing == Thing.storeID)
        self.assertEqual(list(q), [(o, self.things[3])])
        self.assertEqual(q.count(), 1)

    def test_mustMentionEveryClass(self) -> None:
        """
        The comparison must mention every class.
        """
        self.assertRaises(ValueError, self.store.query, (Owner, Thing), Owner.label == "x")

    def test_placeholder(self) -> None:
        """
        A placeholder joins a class with itself.
        """
        bigger = Placeholder(Thing)
        q = self.store.query(Thing, AND(bigger.size > Thing.size, bigger.name == "c"))
        self.assertEqual(sorted(t.name for t in q), ["a", "b"])

    def test_placeholderResult(self) -> None:
        """
        A placeholder can be the result class.
        """
        p = Placeholder(Thing)
        q = self.store.query(p, p.size == 2)
        self.assertEqual([t.name for t in q], ["b"])


class PaginateTests(QueryTestsMixin, SynchronousTestCase):
    """
    paginate.
    """

    def test_allInOrder(self) -> None:
        """
        paginate yields every result in sort order across pages.
        """
        for i in range(20):
            Thing(store=self.store, name="p", size=3)
        q = self.store.query(Thing, sort=Thing.size.desc)
        pages = [t.storeID for t in q.paginate(pagesize=4)]
        self.assertEqual(pages, [t.storeID for t in q.cloneQuery(sort=(Thing.size.desc, Thing.storeID.desc))])
        self.assertEqual(len(pages), 25)

    def test_default(self) -> None:
        """
        Without a sort, paginate goes by storeID.
        """
        self.assertEqual(list(self.store.query(Thing).paginate(2)), self.things)

    def test_twoColumnSort(self) -> None:
        """
        Sorting by two columns raises RuntimeError.
        """
        q = self.store.query(Thing, sort=(Thing.size.asc, Thing.name.asc))
        self.assertRaises(RuntimeError, list, q.paginate())


class QueryUtilTests(QueryTestsMixin, SynchronousTestCase):
    """
    contains, overlapping and AttributeTuple.
    """

    def test_contains(self) -> None:
        """
        contains is half-open.
        """
        s = self.store
        Span(store=s, start=1, end=5)
        self.assertEqual(s.count(Span, contains(Span.start, Span.end, 1)), 1)
        self.assertEqual(s.count(Span, contains(Span.start, Span.end, 5)), 0)

    def test_overlapping(self) -> None:
        """
        overlapping finds ranges overlapping [a, b).
        """
        s = self.store
        Span(store=s, start=1, end=5)
        self.assertEqual(s.count(Span, overlapping(Span.start, Span.end, 4, 9)), 1)
        self.assertEqual(s.count(Span, overlapping(Span.start, Span.end, 5, 9)), 0)

    def test_attributeTuple(self) -> None:
        """
        AttributeTuple compares lexicographically, for keyset paging.
        """
        Thing(store=self.store, name="b", size=9)
        t = AttributeTuple(Thing.name, Thing.size)
        self.assertEqual(
            sorted((x.name, x.size) for x in self.store.query(Thing, t > ("b", 2))),
            [("b", 9), ("c", 3), ("d", 4), ("e", 5)],
        )
        self.assertEqual(self.store.count(Thing, t == ("b", 2)), 1)
        self.assertEqual(self.store.count(Thing, t <= ("b", 2)), 2)

# -*- test-case-name: tests.test_store_query -*-
"""
Query objects returned by L{fractal.store.Store.query}.

A query is lazy: its SQL and arguments are prepared (and its values checked)
when it is built, and each iteration runs it again.  A query on a type whose
table does not exist yet returns nothing and creates nothing.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any, Callable, Iterator, Self

from zope.interface import implementer

from fractal.store.attributes import (
    AND,
    OR,
    AbstractFixedPointDecimal,
    Placeholder,
    SimpleOrdering,
    _orderingsOf,
    _ValueComparison,
)
from fractal.store.errors import ItemClassesOnly
from fractal.store.interfaces import IComparison, IQuery

if TYPE_CHECKING:
    from fractal.store.store import Store

__all__ = ["AttributeQuery", "ItemQuery", "MultipleItemQuery"]

_UNSET: Any = object()


def _isItemClass(cls: Any) -> bool:
    return isinstance(cls, type) and getattr(cls, "_fKind", None) == "item"


def _source(source: Any) -> tuple[Any, str]:
    """
    The item class behind a query source and its FROM-clause text.
    """
    if isinstance(source, Placeholder):
        cls = source._placeholderItemClass
        return cls, "%s AS %s" % (cls._fTable, source._alias)
    return source, source._fTable


def _columnsOf(source: Any) -> str:
    if isinstance(source, Placeholder):
        cls = source._placeholderItemClass
        alias = source._alias
        return ", ".join([alias + ".oid"] + ["%s.%s" % (alias, a.columnName) for a in cls._fAttrs])
    return str(source._fSelectColumns)


class _RawComparison(_ValueComparison):
    """
    A comparison with a value already in database form (for pagination).
    """

    def getArgs(self, store: Store) -> list[object]:
        return [self.value]


class _BaseQuery:
    """
    What item, multiple-item and attribute queries share.
    """

    def __init__(
        self,
        store: Store,
        sources: tuple[Any, ...],
        comparison: Any,
        limit: int | None,
        offset: int | None,
        sort: Any,
    ) -> None:
        for s in sources:
            if not (_isItemClass(s) or isinstance(s, Placeholder)):
                raise ItemClassesOnly("%r is not an Item subclass" % (s,))
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise TypeError("limit must be an int, not %r" % (limit,))
        if offset is not None and (not isinstance(offset, int) or isinstance(offset, bool)):
            raise TypeError("offset must be an int, not %r" % (offset,))
        if comparison is not None and not IComparison.providedBy(comparison):
            raise TypeError("%r is not a comparison" % (comparison,))
        self.store = store
        self._sources = sources
        self.comparison = comparison
        self.limit = limit
        self.offset = offset
        self.sort = sort
        involved: list[Any] = []
        if comparison is not None:
            involved = list(comparison.getInvolvedTables())
            for s in sources:
                if not any(s is t for t in involved):
                    raise ValueError(
                        "The comparison %r does not mention %r, a class of the query"
                        % (comparison, s)
                    )
        tables = list(sources)
        for t in involved:
            if not any(t is s for s in tables):
                tables.append(t)
        self._orderings = _orderingsOf(sort)
        for ordering in self._orderings:
            t = ordering.attribute.type
            if not any(t is s for s in tables):
                raise ValueError("Cannot sort by %r: its class is not in the query" % (ordering.attribute,))
        self._tables = tables
        self._classes = [_source(t)[0] for t in tables]
        self._from = ", ".join(_source(t)[1] for t in tables)
        self._where = comparison.getQuery(store) if comparison is not None else ""
        self._args: list[Any] = comparison.getArgs(store) if comparison is not None else []
        self._order = ", ".join(
            "%s %s" % (o.attribute.getColumnName(store), o.direction) for o in self._orderings
        )

    def _tail(self) -> tuple[str, list[Any]]:
        sql = ""
        args = list(self._args)
        if self._where:
            sql += " WHERE " + self._where
        if self._order:
            sql += " ORDER BY " + self._order
        if self.limit is not None or self.offset is not None:
            sql += " LIMIT ?"
            args.append(self.limit if self.limit is not None else -1)
            if self.offset is not None:
                sql += " OFFSET ?"
                args.append(self.offset)
        return sql, args

    def _select(self, columns: str, distinct: bool = False) -> tuple[str, list[Any]]:
        tail, args = self._tail()
        return (
            "SELECT %s%s FROM %s%s" % ("DISTINCT " if distinct else "", columns, self._from, tail),
            args,
        )

    def _tablesExist(self) -> bool:
        store = self.store
        store._checkOpen()
        return all(store._hasTable(c) for c in self._classes)

    def _run(self, sql: str, args: list[Any]) -> list[Any]:
        store = self.store
        if store._unflushed:
            store._flush()
        rows: list[Any] = store._cursor.execute(sql, args).fetchall()
        return rows

    def explain(self) -> str:
        """
        SQLite's query plan for this query, one step per line.
        """
        sql, args = self._selectSQL()
        if not self._tablesExist():
            return "(no table yet: the query returns nothing)\n" + sql
        rows = self._run("EXPLAIN QUERY PLAN " + sql, args)
        return "\n".join(str(row[-1]) for row in rows)

    def _selectSQL(self) -> tuple[str, list[Any]]:
        raise NotImplementedError()


class _ItemsQuery(_BaseQuery):
    """
    What item and multiple-item queries share: results that are items (or
    tuples of them), counted by a subquery, optionally C{DISTINCT}.

    @ivar tableClass: the class (or classes) of the results.
    """

    tableClass: Any
    _distinct: bool

    def count(self) -> int:
        """
        The number of results (items, or tuples of items), honouring
        C{limit} and C{offset}.
        """
        if not self._tablesExist():
            return 0
        sql, args = self._selectSQL()
        return int(self._run("SELECT COUNT(*) FROM (%s)" % (sql,), args)[0][0])

    def _copy(self, limit: Any, sort: Any, distinct: bool) -> Self:
        """
        A query of this one's class and conditions, with C{limit}, C{sort}
        and C{distinct} as given.
        """
        make: Callable[..., Self] = type(self)
        return make(self.store, self.tableClass, self.comparison, limit, self.offset, sort, distinct)

    def distinct(self) -> Self:
        """
        This query without duplicate results (joins can repeat items).
        """
        return self._copy(self.limit, self.sort, True)

    def cloneQuery(self, limit: Any = _UNSET, sort: Any = _UNSET) -> Self:
        """
        A copy of this query, with a new C{limit} or C{sort} if given.
        """
        return self._copy(
            self.limit if limit is _UNSET else limit,
            self.sort if sort is _UNSET else sort,
            self._distinct,
        )


@implementer(IQuery)
class ItemQuery(_ItemsQuery):
    """
    A query for items of one class.  It has no C{len()} and is always true,
    even when empty: use L{count} or C{store.findFirst}.

    @ivar tableClass: the class (or placeholder) of the results.
    """

    def __init__(
        self,
        store: Store,
        tableClass: Any,
        comparison: Any = None,
        limit: int | None = None,
        offset: int | None = None,
        sort: Any = None,
        distinct: bool = False,
    ) -> None:
        _BaseQuery.__init__(self, store, (tableClass,), comparison, limit, offset, sort)
        self.tableClass = tableClass
        self._distinct = distinct
        self._resultClass = _source(tableClass)[0]

    def _selectSQL(self) -> tuple[str, list[Any]]:
        return self._select(_columnsOf(self.tableClass), self._distinct)

    def __iter__(self) -> Iterator[Any]:
        if not self._tablesExist():
            return iter(())
        sql, args = self._selectSQL()
        return iter(self.store._loadRows(self._resultClass, self._run(sql, args)))

    def getColumn(self, attributeName: str, raw: bool = False) -> AttributeQuery:
        """
        An L{AttributeQuery} for one attribute of the results.
        """
        attribute = getattr(self.tableClass, attributeName)
        return AttributeQuery(
            self.store,
            self.tableClass,
            self.comparison,
            self.limit,
            self.offset,
            self.sort,
            attribute,
            raw=raw,
        )

    def deleteFromStore(self) -> None:
        """
        Delete every result, in one transaction, with the same checks as
        C{item.deleteFromStore()}.  Classes overriding C{deleteFromStore()}
        or C{deleted()} are deleted one by one; others in bulk.  Either way,
        cached item objects are told (their C{store} becomes C{None} after
        the commit).
        """
        self.store.transact(self._deleteFromStore)

    def _deleteFromStore(self) -> None:
        if not self._tablesExist():
            return
        cls = self._resultClass
        if cls._fOverridesDelete:
            for item in list(self):
                if item.store is not None and not item.__dict__.get("_fdeleting"):
                    item.deleteFromStore()
            return
        alias = self.tableClass._alias if isinstance(self.tableClass, Placeholder) else cls._fTable
        sql, args = self._select(alias + ".oid", True)
        ids = [row[0] for row in self._run(sql, args)]
        self.store._deleteIDs(cls, ids)

    def paginate(self, pagesize: int = 20) -> Iterator[Any]:
        """
        Iterate all results, fetching C{pagesize} at a time, with keyset
        paging on the sort column and storeID, so concurrent inserts and
        deletes do not repeat or skip results.

        @raise RuntimeError: if the query sorts by more than one column.
        """
        if len(self._orderings) > 1:
            raise RuntimeError("paginate() supports sorting by at most one column")
        if self._orderings:
            ordering = self._orderings[0]
        else:
            ordering = SimpleOrdering(self._resultClass.storeID, "ASC")
        column = ordering.attribute
        storeIDColumn = self.tableClass.storeID
        descending = ordering.isDescending
        sort = (SimpleOrdering(column, ordering.direction), SimpleOrdering(storeIDColumn, ordering.direction))
        beyond = "<" if descending else ">"
        last: tuple[Any, int] | None = None
        while True:
            comparison = self.comparison
            if last is not None:
                value, lastID = last
                if column is storeIDColumn:
                    keyset: Any = _RawComparison(storeIDColumn, beyond, lastID)
                else:
                    keyset = OR(
                        _RawComparison(column, beyond, value),
                        AND(
                            _RawComparison(column, "=", value),
                            _RawComparison(storeIDColumn, beyond, lastID),
                        ),
                    )
                comparison = keyset if comparison is None else AND(comparison, keyset)
            page = list(ItemQuery(self.store, self.tableClass, comparison, pagesize, None, sort))
            yield from page
            if len(page) < pagesize:
                return
            final = page[-1]
            if column is storeIDColumn:
                last = (final.storeID, final.storeID)
            else:
                last = (final.__dict__[column.hidden], final.storeID)


@implementer(IQuery)
class MultipleItemQuery(_ItemsQuery):
    """
    A query yielding tuples of items, one per class in C{tableClass}.
    """

    def __init__(
        self,
        store: Store,
        tableClass: tuple[Any, ...],
        comparison: Any = None,
        limit: int | None = None,
        offset: int | None = None,
        sort: Any = None,
        distinct: bool = False,
    ) -> None:
        _BaseQuery.__init__(self, store, tuple(tableClass), comparison, limit, offset, sort)
        self.tableClass = tuple(tableClass)
        self._distinct = distinct

    def _selectSQL(self) -> tuple[str, list[Any]]:
        return self._select(", ".join(_columnsOf(t) for t in self.tableClass), self._distinct)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        if not self._tablesExist():
            return iter(())
        sql, args = self._selectSQL()
        rows = self._run(sql, args)
        classes = [_source(t)[0] for t in self.tableClass]
        widths = [len(c._fAttrs) + 1 for c in classes]
        parts: list[list[Any]] = []
        start = 0
        for cls, width in zip(classes, widths):
            parts.append(self.store._loadRows(cls, [row[start : start + width] for row in rows]))
            start += width
        return iter(list(zip(*parts)))


@implementer(IQuery)
class AttributeQuery(_BaseQuery):
    """
    The values of one attribute of the items a query matches.
    """

    def __init__(
        self,
        store: Store,
        tableClass: Any,
        comparison: Any = None,
        limit: int | None = None,
        offset: int | None = None,
        sort: Any = None,
        attribute: Any = None,
        raw: bool = False,
        distinct: bool = False,
    ) -> None:
        _BaseQuery.__init__(self, store, (tableClass,), comparison, limit, offset, sort)
        self.tableClass = tableClass
        self.attribute = attribute
        self.raw = raw
        self._distinct = distinct

    def _selectSQL(self) -> tuple[str, list[Any]]:
        return self._select(self.attribute.getColumnName(self.store), self._distinct)

    def _subselect(self) -> tuple[str, list[Any]]:
        if not self._tablesExist():
            return "SELECT NULL WHERE 0", []
        return self._selectSQL()

    def _convert(self, value: Any) -> Any:
        if self.raw:
            return value
        return self.attribute._fromColumn(value, self.store)

    def __iter__(self) -> Iterator[Any]:
        if not self._tablesExist():
            return iter(())
        sql, args = self._selectSQL()
        return iter([self._convert(row[0]) for row in self._run(sql, args)])

    def _aggregate(self, function: str) -> Any:
        if not self._tablesExist():
            return None
        sql, args = self._select(self.attribute.getColumnName(self.store) + " AS v", self._distinct)
        return self._run("SELECT %s(v) FROM (%s)" % (function, sql), args)[0][0]

    def count(self) -> int:
        """
        The number of non-NULL values.
        """
        result = self._aggregate("COUNT")
        return int(result or 0)

    def _places(self) -> int | None:
        attr = getattr(self.attribute, "attribute", self.attribute)
        if isinstance(attr, AbstractFixedPointDecimal):
            return attr.decimalPlaces
        return None

    def sum(self) -> Any:
        """
        The sum of the values: 0 (or C{Decimal("0")} for decimals) when
        there are none.
        """
        result = self._aggregate("SUM")
        places = self._places()
        if places is not None:
            return Decimal(result or 0).scaleb(-places)
        return result if result is not None else 0

    def average(self) -> float | None:
        """
        The mean of the values as a float, or C{None} when there are none.
        """
        result = self._aggregate("AVG")
        if result is None:
            return None
        places = self._places()
        if places is not None:
            return float(result) / float(10**places)
        return float(result)

    def _extreme(self, function: str, default: Any) -> Any:
        result = self._aggregate(function)
        if result is None:
            if default is _UNSET:
                raise ValueError("%s() of no values" % (function.lower(),))
            return default
        return self._convert(result)

    def max(self, default: Any = _UNSET) -> Any:
        """
        The largest value.

        @raise ValueError: if there are none and no C{default} is given.
        """
        return self._extreme("MAX", default)

    def min(self, default: Any = _UNSET) -> Any:
        """
        The smallest value.

        @raise ValueError: if there are none and no C{default} is given.
        """
        return self._extreme("MIN", default)

    def distinct(self) -> AttributeQuery:
        """
        The distinct values.
        """
        return AttributeQuery(
            self.store,
            self.tableClass,
            self.comparison,
            self.limit,
            self.offset,
            self.sort,
            self.attribute,
            self.raw,
            True,
        )

    def cloneQuery(self, limit: Any = _UNSET, sort: Any = _UNSET) -> AttributeQuery:
        """
        A copy of this query, with a new C{limit} or C{sort} if given.
        """
        return AttributeQuery(
            self.store,
            self.tableClass,
            self.comparison,
            self.limit if limit is _UNSET else limit,
            self.offset,
            self.sort if sort is _UNSET else sort,
            self.attribute,
            self.raw,
            self._distinct,
        )

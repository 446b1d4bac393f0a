# -*- test-case-name: tests.test_store_attributes -*-
"""
Attribute types for L{fractal.store.Item} classes, and the comparisons,
sort orders and conjunctions used to query them.

Every persistent attribute is a descriptor in the item's class.  An item keeps
the I{database form} of each value (the value exactly as it is written to its
column), so inserting and loading rows needs no per-attribute conversion;
types whose Python form differs (decimals, timestamps, booleans, references,
paths, text lists) convert when the attribute is read.  Values are checked and
converted when they are set, which is also when fixed-point decimals are
rounded.
"""

from __future__ import annotations

import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from epsilon import extime
from twisted.python.filepath import FilePath
from zope.interface import implementer

from fractal.store.errors import (
    BrokenReference,
    ConstraintError,
    InvalidPathError,
    NoCrossStoreReferences,
)
from fractal.store.interfaces import IColumn, IComparison, IOrdering

if TYPE_CHECKING:
    from fractal.store.store import Store

__all__ = [
    "AND",
    "OR",
    "AbstractFixedPointDecimal",
    "ConstraintError",
    "InvalidPathError",
    "LARGEST_NEGATIVE",
    "LARGEST_POSITIVE",
    "Placeholder",
    "SQLAttribute",
    "SimpleOrdering",
    "CompoundOrdering",
    "Time",
    "boolean",
    "bytes",
    "compoundIndex",
    "ieee754_double",
    "inmemory",
    "integer",
    "money",
    "path",
    "point1decimal",
    "point2decimal",
    "point3decimal",
    "point4decimal",
    "point5decimal",
    "point6decimal",
    "point7decimal",
    "point8decimal",
    "point9decimal",
    "point10decimal",
    "reference",
    "text",
    "textlist",
    "timestamp",
]

_builtinBytes = bytes

LARGEST_POSITIVE = (2**63) - 1
"""
The largest value an C{integer} column holds.
"""

LARGEST_NEGATIVE = -(2**63)
"""
The smallest value an C{integer} column holds.
"""

_EPOCH = datetime.datetime(1970, 1, 1)
_EPOCH_AWARE = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_MICROSECOND = datetime.timedelta(microseconds=1)
_ZERO = datetime.timedelta()


class Time(extime.Time):  # type: ignore[misc]
    """
    An L{epsilon.extime.Time} that can be hashed and ordered.

    C{epsilon.extime.Time} defines only equality, so it cannot be a dict key
    or be sorted.  This subclass orders and hashes by the instant it
    represents (ignoring C{resolution}, as equality does).  Arithmetic with
    C{timedelta} returns this subclass.  C{timestamp} attributes return it.
    """

    def __hash__(self) -> int:
        return hash(self._time)

    def __lt__(self, other: object) -> bool:
        if isinstance(other, extime.Time):
            return bool(self._time < other._time)
        return NotImplemented

    def __le__(self, other: object) -> bool:
        if isinstance(other, extime.Time):
            return bool(self._time <= other._time)
        return NotImplemented

    def __gt__(self, other: object) -> bool:
        if isinstance(other, extime.Time):
            return bool(self._time > other._time)
        return NotImplemented

    def __ge__(self, other: object) -> bool:
        if isinstance(other, extime.Time):
            return bool(self._time >= other._time)
        return NotImplemented

    def __add__(self, addend: datetime.timedelta) -> Time:
        if not isinstance(addend, datetime.timedelta):
            raise TypeError("expected a datetime.timedelta instance")
        result: Time = Time.fromDatetime(self._time + addend)
        return result

    def __sub__(self, other: Any) -> Any:
        if isinstance(other, extime.Time):
            return self._time - other._time
        if isinstance(other, datetime.timedelta):
            return Time.fromDatetime(self._time - other)
        return NotImplemented

    @classmethod
    def fromMicroseconds(cls, microseconds: int) -> Time:
        """
        The time C{microseconds} after the POSIX epoch, exactly.

        @param microseconds: microseconds since 1970-01-01T00:00:00 UTC.
        """
        self = cls.__new__(cls)
        self._time = _EPOCH + datetime.timedelta(microseconds=microseconds)
        self.resolution = _ZERO
        result: Time = self
        return result

    @classmethod
    def fromTime(cls, other: extime.Time) -> Time:
        """
        Convert any L{epsilon.extime.Time} to this class.
        """
        self = cls.__new__(cls)
        self._time = other._time
        self.resolution = other.resolution
        return self

    def asMicroseconds(self) -> int:
        """
        Microseconds since the POSIX epoch, exactly.
        """
        return (self._time - _EPOCH) // _MICROSECOND  # type: ignore[no-any-return]


def _storeOf(item: Any) -> Any:
    return item.__dict__.get("_fstore")


# ---------------------------------------------------------------------------
# Comparisons


def _sqlValueFor(column: Any, value: object, store: Store) -> object:
    return column._queryValue(value, store)


class _Comparable:
    """
    The query operators shared by attributes, C{Cls.storeID} and placeholder
    columns.  Subclasses have C{type}, C{attrname}, C{getColumnName} and
    C{_queryValue}.
    """

    def _compare(self, other: object, op: str) -> Any:
        if IColumn.providedBy(other):
            return _TwoColumnComparison(self, op, other)
        if other is None:
            if op == "=":
                return _NullComparison(self, False)
            if op == "!=":
                return _NullComparison(self, True)
            raise TypeError("None/NULL does not work with %s comparison" % (op,))
        return _ValueComparison(self, op, other)

    def __eq__(self, other: object) -> Any:
        return self._compare(other, "=")

    def __ne__(self, other: object) -> Any:
        return self._compare(other, "!=")

    def __lt__(self, other: object) -> Any:
        return self._compare(other, "<")

    def __le__(self, other: object) -> Any:
        return self._compare(other, "<=")

    def __gt__(self, other: object) -> Any:
        return self._compare(other, ">")

    def __ge__(self, other: object) -> Any:
        return self._compare(other, ">=")

    __hash__ = object.__hash__

    def oneOf(self, seq: Any, negate: bool = False) -> Any:
        """
        Match items whose value is one of C{seq}: a sequence of values, or an
        attribute query (used as a sub-select).  An empty sequence matches
        nothing (everything when C{negate}).
        """
        return _SequenceComparison(self, seq, negate)

    def notOneOf(self, seq: Any) -> Any:
        """
        The negation of L{oneOf}.
        """
        return _SequenceComparison(self, seq, True)

    def like(self, *parts: object) -> Any:
        """
        Match with SQL C{LIKE}: the parts (strings or columns) are
        concatenated into one pattern, in which C{%} and C{_} are wildcards.
        """
        return _LikeComparison(self, False, parts, escaped=False)

    def notLike(self, *parts: object) -> Any:
        """
        The negation of L{like}.
        """
        return _LikeComparison(self, True, parts, escaped=False)

    def startswith(self, prefix: str) -> Any:
        """
        Match values that begin with C{prefix}, taken literally: C{%} and
        C{_} in it are not wildcards.  Case is folded for ASCII as SQLite's
        C{LIKE} does.
        """
        return _LikeComparison(self, False, (_escapeLike(prefix), "%"), escaped=True)

    def endswith(self, suffix: str) -> Any:
        """
        Match values that end with C{suffix}, taken literally.
        """
        return _LikeComparison(self, False, ("%", _escapeLike(suffix)), escaped=True)

    @property
    def ascending(self) -> SimpleOrdering:
        """
        Sort by this column, smallest first.
        """
        return SimpleOrdering(self, "ASC")

    @property
    def descending(self) -> SimpleOrdering:
        """
        Sort by this column, largest first.
        """
        return SimpleOrdering(self, "DESC")

    asc = ascending
    desc = descending


def _escapeLike(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("LIKE patterns must be str, not %s" % (type(value).__name__,))
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _tablesOf(*columns: Any) -> list[Any]:
    result: list[Any] = []
    for c in columns:
        t = c.type
        if not any(t is r for r in result):
            result.append(t)
    return result


@implementer(IComparison)
class _ValueComparison:
    def __init__(self, column: Any, op: str, value: object) -> None:
        self.column = column
        self.op = op
        self.value = value

    def getQuery(self, store: Store) -> str:
        return "(%s %s ?)" % (self.column.getColumnName(store), self.op)

    def getArgs(self, store: Store) -> list[object]:
        return [self.column._queryValue(self.value, store)]

    def getInvolvedTables(self) -> list[Any]:
        return [self.column.type]

    def __repr__(self) -> str:
        return "(%r %s %r)" % (self.column, self.op, self.value)


def _precision(column: Any) -> object:
    attr = getattr(column, "attribute", column)
    if isinstance(attr, AbstractFixedPointDecimal):
        return ("decimal", attr.decimalPlaces)
    if isinstance(attr, integer) and not isinstance(attr, (timestamp, reference)):
        return ("decimal", 0)
    return None


@implementer(IComparison)
class _TwoColumnComparison:
    def __init__(self, left: Any, op: str, right: Any) -> None:
        lp, rp = _precision(left), _precision(right)
        if lp != rp and (
            isinstance(getattr(left, "attribute", left), AbstractFixedPointDecimal)
            or isinstance(getattr(right, "attribute", right), AbstractFixedPointDecimal)
        ):
            raise TypeError(
                "Cannot compare %r with %r: their decimal precision differs" % (left, right)
            )
        self.left = left
        self.op = op
        self.right = right

    def getQuery(self, store: Store) -> str:
        return "(%s %s %s)" % (
            self.left.getColumnName(store),
            self.op,
            self.right.getColumnName(store),
        )

    def getArgs(self, store: Store) -> list[object]:
        return []

    def getInvolvedTables(self) -> list[Any]:
        return _tablesOf(self.left, self.right)

    def __repr__(self) -> str:
        return "(%r %s %r)" % (self.left, self.op, self.right)


@implementer(IComparison)
class _NullComparison:
    def __init__(self, column: Any, negate: bool) -> None:
        self.column = column
        self.negate = negate

    def getQuery(self, store: Store) -> str:
        return "(%s IS %sNULL)" % (self.column.getColumnName(store), "NOT " if self.negate else "")

    def getArgs(self, store: Store) -> list[object]:
        return []

    def getInvolvedTables(self) -> list[Any]:
        return [self.column.type]


@implementer(IComparison)
class _SequenceComparison:
    def __init__(self, column: Any, seq: Any, negate: bool) -> None:
        self.column = column
        self.negate = negate
        self.subquery = None
        self.values: list[object] = []
        if hasattr(seq, "_subselect"):
            self.subquery = seq
        elif IColumn.providedBy(seq) or isinstance(seq, (str, _builtinBytes)):
            raise TypeError("oneOf takes a sequence of values or an attribute query")
        else:
            self.values = list(seq)

    def getQuery(self, store: Store) -> str:
        op = "NOT IN" if self.negate else "IN"
        col = self.column.getColumnName(store)
        if self.subquery is not None:
            sql, _ = self.subquery._subselect()
            return "(%s %s (%s))" % (col, op, sql)
        if not self.values:
            return "(1)" if self.negate else "(0)"
        return "(%s %s (%s))" % (col, op, ", ".join(["?"] * len(self.values)))

    def getArgs(self, store: Store) -> list[object]:
        if self.subquery is not None:
            return list(self.subquery._subselect()[1])
        return [self.column._queryValue(v, store) for v in self.values]

    def getInvolvedTables(self) -> list[Any]:
        return [self.column.type]


@implementer(IComparison)
class _LikeComparison:
    def __init__(
        self, column: Any, negate: bool, parts: Sequence[object], escaped: bool
    ) -> None:
        if not parts:
            raise ValueError("like() needs at least one part")
        self.column = column
        self.negate = negate
        self.parts = list(parts)
        self.escaped = escaped
        for p in self.parts:
            if not (p is None or isinstance(p, str) or IColumn.providedBy(p)):
                raise TypeError("LIKE parts must be str, None or columns, not %r" % (p,))

    def getQuery(self, store: Store) -> str:
        pieces = []
        for p in self.parts:
            if IColumn.providedBy(p):
                pieces.append(p.getColumnName(store))  # type: ignore[union-attr,unused-ignore]
            elif p is None:
                pieces.append("NULL")
            else:
                pieces.append("?")
        return "(%s %sLIKE (%s)%s)" % (
            self.column.getColumnName(store),
            "NOT " if self.negate else "",
            " || ".join(pieces),
            " ESCAPE '\\'" if self.escaped else "",
        )

    def getArgs(self, store: Store) -> list[object]:
        return [p for p in self.parts if isinstance(p, str)]

    def getInvolvedTables(self) -> list[Any]:
        return _tablesOf(self.column, *[p for p in self.parts if IColumn.providedBy(p)])


@implementer(IComparison)
class _Conjunction:
    joiner = ""

    def __init__(self, *conditions: Any) -> None:
        if not conditions:
            raise ValueError("%s needs at least one condition" % (type(self).__name__,))
        for c in conditions:
            if not IComparison.providedBy(c):
                raise TypeError("%r is not a comparison" % (c,))
        self.conditions = conditions

    def getQuery(self, store: Store) -> str:
        return "(" + self.joiner.join(c.getQuery(store) for c in self.conditions) + ")"

    def getArgs(self, store: Store) -> list[object]:
        args: list[object] = []
        for c in self.conditions:
            args.extend(c.getArgs(store))
        return args

    def getInvolvedTables(self) -> list[Any]:
        result: list[Any] = []
        for c in self.conditions:
            for t in c.getInvolvedTables():
                if not any(t is r for r in result):
                    result.append(t)
        return result


class AND(_Conjunction):
    """
    All of the given comparisons hold.

    @raise ValueError: if no comparison is given.
    """

    joiner = " AND "


class OR(_Conjunction):
    """
    At least one of the given comparisons holds.

    @raise ValueError: if no comparison is given.
    """

    joiner = " OR "


@implementer(IOrdering)
class SimpleOrdering:
    """
    Sort by one column in one direction (C{Cls.attr.ascending}).

    @ivar attribute: the column.
    @ivar direction: C{"ASC"} or C{"DESC"}.
    """

    def __init__(self, attribute: Any, direction: str) -> None:
        self.attribute = attribute
        self.direction = direction

    @property
    def isDescending(self) -> bool:
        return self.direction == "DESC"

    @property
    def isAscending(self) -> bool:
        return self.direction == "ASC"

    def orderColumns(self) -> list[tuple[Any, str]]:
        return [(self.attribute, self.direction)]

    def __add__(self, other: object) -> CompoundOrdering:
        return CompoundOrdering([self]) + other

    def __repr__(self) -> str:
        return "%r.%s" % (self.attribute, "descending" if self.isDescending else "ascending")


@implementer(IOrdering)
class CompoundOrdering:
    """
    Sort by several columns, the first one first.
    """

    def __init__(self, orderings: Iterable[Any]) -> None:
        self.simpleOrderings: list[SimpleOrdering] = []
        for o in orderings:
            self.simpleOrderings.extend(_orderingsOf(o))

    def orderColumns(self) -> list[tuple[Any, str]]:
        return [(o.attribute, o.direction) for o in self.simpleOrderings]

    def __add__(self, other: object) -> CompoundOrdering:
        return CompoundOrdering(self.simpleOrderings + _orderingsOf(other))


def _orderingsOf(sort: object) -> list[SimpleOrdering]:
    if sort is None:
        return []
    if isinstance(sort, SimpleOrdering):
        return [sort]
    if isinstance(sort, CompoundOrdering):
        return list(sort.simpleOrderings)
    if IColumn.providedBy(sort):
        raise AssertionError(
            "Sort by %r.ascending or %r.descending, not by the bare attribute" % (sort, sort)
        )
    if isinstance(sort, (list, tuple)):
        result: list[SimpleOrdering] = []
        for s in sort:
            result.extend(_orderingsOf(s))
        return result
    raise TypeError("%r is not a sort order" % (sort,))


def compoundIndex(*columns: SQLAttribute) -> None:
    """
    Declare, in an item class body, one index over several attributes, in
    the order given.  The index is named
    C{axiomidx_<typeName>_v<N>_<attr1>_<attr2>...}.
    """
    for c in columns:
        c.compoundIndexes.append(columns)


# ---------------------------------------------------------------------------
# Attributes


class inmemory:
    """
    An attribute that is not persisted.  It is lost when the item is
    garbage-collected or reloaded, and it is not restored by a rollback; set
    it in C{activate()}.  Reading it before it is set raises
    C{AttributeError}.
    """

    attrname = "?"

    def __init__(self, doc: str = "") -> None:
        self.doc = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.attrname = name

    def __get__(self, oself: object, cls: object = None) -> Any:
        if oself is None:
            return self
        raise AttributeError(
            "%s.%s (an inmemory attribute) has not been set" % (type(oself).__name__, self.attrname)
        )


class SQLAttribute(_Comparable, property):
    """
    The base of persistent attribute types.

    @ivar attrname: the attribute's name in its class.
    @ivar type: the item class it belongs to.
    @ivar sqltype: the SQL type of its column.
    @ivar indexed: whether the column is indexed.
    @ivar allowNone: whether C{None} may be set.
    @ivar default: the value new items get when none is given.
    @ivar defaultFactory: a callable giving that value instead.
    @ivar compoundIndexes: the L{compoundIndex} declarations naming it.
    """

    sqltype = ""
    _identity = True
    _late = False

    attrname: str
    type: Any
    hidden: str
    columnName: str
    _sqlName: str
    _updateSQL: str

    def __init__(
        self,
        doc: str = "",
        indexed: bool = False,
        default: Any = None,
        allowNone: bool = True,
        defaultFactory: Callable[[], Any] | None = None,
    ) -> None:
        property.__init__(self)
        if default is not None and defaultFactory is not None:
            raise ValueError("Give only one of default and defaultFactory, not both")
        self.doc = doc
        self.indexed = indexed
        self.default = default
        self.allowNone = allowNone
        self.defaultFactory = defaultFactory
        self.compoundIndexes: list[tuple[SQLAttribute, ...]] = []
        self.attrname = "?"
        self.type = None

    def __set_name__(self, owner: type, name: str) -> None:
        self.attrname = name
        self.type = owner
        self.hidden = "_fv_" + name
        self.columnName = "[" + name + "]"
        fget = attrgetter(self.hidden) if self._identity else self._get
        property.__init__(self, fget, self._set, None, self.doc or None)

    def _finish(self, tableName: str) -> None:
        """
        Called by the item class once its table name is known.
        """
        self._sqlName = tableName + "." + self.columnName
        self._updateSQL = "UPDATE %s SET %s = ? WHERE oid = ?" % (tableName, self.columnName)

    def __repr__(self) -> str:
        owner = getattr(self.type, "__name__", "?")
        return "<%s %s.%s>" % (type(self).__name__, owner, self.attrname)

    def __str__(self) -> str:
        owner = getattr(self.type, "__name__", "?")
        return "%s.%s = %s()" % (owner, self.attrname, type(self).__name__)

    # Axiom's introspection names.
    @property
    def classname(self) -> str:
        return getattr(self.type, "__name__", "?")

    def fullyQualifiedName(self) -> str:
        """
        C{module.Class.attribute}.
        """
        return "%s.%s.%s" % (self.type.__module__, self.type.__name__, self.attrname)

    def getShortColumnName(self, store: object = None) -> str:
        """
        The column name, bracket-quoted, as Axiom spells it.
        """
        return self.columnName

    def getColumnName(self, store: object = None) -> str:
        """
        The column name qualified by its table name.
        """
        return self._sqlName

    def computeDefault(self) -> Any:
        """
        The Python default for a new item: C{defaultFactory()} or C{default}.
        """
        if self.defaultFactory is not None:
            return self.defaultFactory()
        return self.default

    def _defaultDB(self) -> Any:
        value = self.computeDefault()
        if value is None:
            return None
        return self.infilter(value, None, None)

    def infilter(self, pyval: Any, oself: Any, store: Any) -> Any:
        """
        Check a Python value and return its database form.

        @raise ConstraintError: if the value is not acceptable.
        """
        raise NotImplementedError()

    def outfilter(self, dbval: Any, oself: Any) -> Any:
        """
        Turn a database value into the Python value.
        """
        return dbval

    def _get(self, oself: Any) -> Any:
        return self.outfilter(oself.__dict__[self.hidden], oself)

    def _set(self, oself: Any, value: Any) -> None:
        d = oself.__dict__
        store = d.get("_fstore")
        if value is None:
            if not self.allowNone:
                raise TypeError("attribute [%s] must not be None" % (self,))
            dbval = None
        else:
            dbval = self.infilter(value, oself, store)
        if store is None:
            d[self.hidden] = dbval
        elif store._txn:
            storeID = d["_fstoreID"]
            touched = store._touched
            if storeID not in touched:
                touched[storeID] = (oself, {k: d[k] for k in oself._fHidden})
            pendingFrom = store._pendingFrom
            if pendingFrom is None or storeID < pendingFrom:
                # The store writes the item's changes with one UPDATE
                # before its next statement (see Store._flush).
                changed = store._dirty.get(storeID)
                if changed is None:
                    store._dirty[storeID] = (oself, {self.hidden: self})
                    store._unflushed = True
                else:
                    changed[1][self.hidden] = self
            d[self.hidden] = dbval
        else:
            store._writeAttribute(oself, self, dbval)

    def _queryValue(self, value: Any, store: Any) -> Any:
        if value is None:
            return None
        return self.infilter(value, None, store)

    def _fromColumn(self, dbval: Any, store: Any) -> Any:
        """
        Convert a value read by an attribute query (no item involved).
        """
        return self.outfilter(dbval, None)


class integer(SQLAttribute):
    """
    A 64-bit signed integer (C{INTEGER}).  C{bool} is accepted and stored
    as 0 or 1; C{float} is rejected.
    """

    sqltype = "INTEGER"

    def infilter(self, pyval: Any, oself: Any, store: Any) -> Any:
        if type(pyval) is int:
            if LARGEST_NEGATIVE <= pyval <= LARGEST_POSITIVE:
                return pyval
        elif isinstance(pyval, int):
            return self.infilter(int(pyval), oself, store)
        raise ConstraintError(
            self, "integer between %d and %d" % (LARGEST_NEGATIVE, LARGEST_POSITIVE), pyval
        )


class text(SQLAttribute):
    """
    A Unicode string with no NUL character.

    With C{caseSensitive=False} (the default, as in Axiom) the column is
    C{TEXT COLLATE NOCASE}: equality, sorting and C{findOrCreate} ignore the
    case of ASCII letters only.  C{caseSensitive=True} gives a plain C{TEXT}
    column with exact matching.
    """

    def __init__(self, caseSensitive: bool = False, **kw: Any) -> None:
        SQLAttribute.__init__(self, **kw)
        self.caseSensitive = caseSensitive
        self.sqltype = "TEXT" if caseSensitive else "TEXT COLLATE NOCASE"

    def infilter(self, pyval: Any, oself: Any, store: Any) -> Any:
        if isinstance(pyval, str) and "\0" not in pyval:
            return str(pyval)
        raise ConstraintError(self, "str without NUL characters", pyval)


class bytes(SQLAttribute):
    """
    A byte string (C{BLOB}).  C{str} is rejected.
    """

    sqltype = "BLOB"

    def infilter(self, pyval: Any, oself: Any, store: Any) -> Any:
        if isinstance(pyval, _builtinBytes):
            return _builtinBytes(pyval)  # type: ignore[call-arg,arg-type,unused-ignore]
        raise ConstraintError(self, "bytes", pyval)


class boolean(SQLAttribute):
    """
    C{True} or C{False} (or C{None}), stored as 1 or 0.  Other values,
    including 1 and 0, are rejected.
    """

    sqltype = "BOOLEAN"
    _identity = False

    def infilter(self, pyval: Any, oself: Any, store: Any) -> Any:
        if pyval is True:
            return 1
        if pyval is False:
            return 0
        raise ConstraintError(self, "True or False", pyval)

    def outfilter(self, dbval: Any, oself: Any) -> Any:
        if dbval is None:
            return None
        return bool(dbval)


class ieee754_double(SQLAttribute):
    """
    A binary floating point number (C{REAL}).  Only C{float} is accepted.
    SQLite stores NaN as NULL, so a NaN reloads as C{None}.
    """

    sqltype = "REAL"

    def infilter(self, pyval: Any, oself: Any, store: Any) -> Any:
        if isinstance(pyval, float):
            return float(pyval)
        raise ConstraintError(self, "float", pyval)


class AbstractFixedPointDecimal(integer):
    """
    A C{Decimal} with a fixed number of places, stored as an integer holding
    the value times 10**C{decimalPlaces}.  Values are rounded half-to-even to
    that many places when set, so the item holds exactly what the database
    holds.  C{int} and C{Decimal} are accepted; C{float} is rejected.
    """

    decimalPlaces = 0
    _identity = False

    def infilter(self, pyval: Any, oself: Any, store: Any) -> Any:
        if isinstance(pyval, bool) or not isinstance(pyval, (int, Decimal)):
            raise ConstraintError(self, "Decimal or int", pyval)
        scaled = Decimal(pyval).scaleb(self.decimalPlaces)
        try:
            value = int(scaled.to_integral_value(rounding=ROUND_HALF_EVEN))
        except (ValueError, ArithmeticError):
            raise ConstraintError(self, "a finite Decimal", pyval)
        if not LARGEST_NEGATIVE <= value <= LARGEST_POSITIVE:
            raise ConstraintError(self, "Decimal within the 64-bit scaled range", pyval)
        return value

    def outfilter(self, dbval: Any, oself: Any) -> Any:
        if dbval is None:
            return None
        return Decimal(dbval).scaleb(-self.decimalPlaces)


class point1decimal(AbstractFixedPointDecimal):
    """
    A C{Decimal} with 1 decimal place.
    """

    decimalPlaces = 1


class point2decimal(AbstractFixedPointDecimal):
    """
    A C{Decimal} with 2 decimal places.
    """

    decimalPlaces = 2


class point3decimal(AbstractFixedPointDecimal):
    """
    A C{Decimal} with 3 decimal places.
    """

    decimalPlaces = 3


class point4decimal(AbstractFixedPointDecimal):
    """
    A C{Decimal} with 4 decimal places.
    """

    decimalPlaces = 4


class point5decimal(AbstractFixedPointDecimal):
    """
    A C{Decimal} with 5 decimal places.
    """

    decimalPlaces = 5


class point6decimal(AbstractFixedPointDecimal):
    """
    A C{Decimal} with 6 decimal places.
    """

    decimalPlaces = 6


class point7decimal(AbstractFixedPointDecimal):
    """
    A C{Decimal} with 7 decimal places.
    """

    decimalPlaces = 7


class point8decimal(AbstractFixedPointDecimal):
    """
    A C{Decimal} with 8 decimal places.
    """

    decimalPlaces = 8


class point9decimal(AbstractFixedPointDecimal):
    """
    A C{Decimal} with 9 decimal places.
    """

    decimalPlaces = 9


class point10decimal(AbstractFixedPointDecimal):
    """
    A C{Decimal} with 10 decimal places.
    """

    decimalPlaces = 10


class money(point4decimal):
    """
    An amount of money: a C{Decimal} with 4 decimal places.
    """


class timestamp(integer):
    """
    A point in time, stored as microseconds since the POSIX epoch (UTC).

    Reading gives a L{Time} (an L{epsilon.extime.Time} that is also hashable
    and ordered).  Any C{epsilon.extime.Time} and any timezone-aware
    C{datetime} are accepted; a naive C{datetime} is rejected, because its
    timezone is unknown.
    """

    _identity = False

    def infilter(self, pyval: Any, oself: Any, store: Any) -> Any:
        if isinstance(pyval, extime.Time):
            value = (pyval._time - _EPOCH) // _MICROSECOND
        elif isinstance(pyval, datetime.datetime):
            if pyval.tzinfo is None or pyval.utcoffset() is None:
                raise ConstraintError(self, "Time or timezone-aware datetime", pyval)
            value = (pyval - _EPOCH_AWARE) // _MICROSECOND
        else:
            raise ConstraintError(self, "Time or timezone-aware datetime", pyval)
        return integer.infilter(self, value, oself, store)

    def outfilter(self, dbval: Any, oself: Any) -> Any:
        if dbval is None:
            return None
        return Time.fromMicroseconds(dbval)


class reference(integer):
    """
    A reference to another item in the same store (or to the store itself),
    stored as its storeID.

    C{whenDeleted} says what happens to this item when the referenced item
    is deleted: L{NULLIFY} (the column is set to NULL), L{CASCADE} (this
    item is deleted too) or L{DISALLOW} (the deletion fails with
    L{fractal.store.errors.DeletionDisallowed}).  C{reftype} limits which
    deletions C{CASCADE}/C{DISALLOW}/C{NULLIFY} react to; it does not check
    what is assigned.
    """

    NULLIFY = "NULLIFY"
    CASCADE = "CASCADE"
    DISALLOW = "DISALLOW"

    _identity = False
    _late = True

    def __init__(
        self,
        doc: str = "",
        indexed: bool = True,
        allowNone: bool = True,
        reftype: Any = None,
        whenDeleted: Any = NULLIFY,
    ) -> None:
        integer.__init__(self, doc=doc, indexed=indexed, default=None, allowNone=allowNone)
        if whenDeleted not in (reference.NULLIFY, reference.CASCADE, reference.DISALLOW):
            raise ValueError(
                "whenDeleted must be reference.NULLIFY, reference.CASCADE or reference.DISALLOW"
            )
        self.reftype = reftype
        self.whenDeleted = whenDeleted

    def appliesTo(self, cls: Any) -> bool:
        """
        Whether deleting an item of class C{cls} concerns this reference.
        """
        rt = self.reftype
        if rt is None or rt is cls:
            return True
        return bool(getattr(rt, "typeName", rt) == getattr(cls, "typeName", None))

    def infilter(self, pyval: Any, oself: Any, store: Any) -> Any:
        kind = getattr(type(pyval), "_fKind", None)
        if kind is None:
            raise ConstraintError(self, "Item or Store", pyval)
        if store is None:
            return pyval
        if kind == "store":
            if pyval is not store:
                raise NoCrossStoreReferences(
                    "%s cannot refer to another store (%r)" % (self, pyval)
                )
            return -1
        if pyval.__dict__.get("_fstore") is not store:
            raise NoCrossStoreReferences(
                "%s cannot refer to %r, which is not in the same store" % (self, pyval)
            )
        return pyval.__dict__["_fstoreID"]

    def _queryValue(self, value: Any, store: Any) -> Any:
        if value is None:
            return None
        kind = getattr(type(value), "_fKind", None)
        if kind is None:
            raise ConstraintError(self, "Item or Store", value)
        return self.infilter(value, None, store)

    def _get(self, oself: Any) -> Any:
        d = oself.__dict__
        v = d[self.hidden]
        if v is None:
            return None
        if type(v) is not int:
            return v
        store = d.get("_fstore")
        if store is None:
            return None
        if v == -1:
            return store
        found = store._itemOrNone(v, not oself.__legacy__)
        if found is None and self.whenDeleted is not reference.NULLIFY:
            raise BrokenReference("%s: the item with storeID %d is gone" % (self, v))
        return found

    def _fromColumn(self, dbval: Any, store: Any) -> Any:
        if dbval is None:
            return None
        if dbval == -1:
            return store
        return store._itemOrNone(dbval, True)

    def outfilter(self, dbval: Any, oself: Any) -> Any:
        return dbval


class path(text):
    """
    A L{FilePath}.  With C{relative=True} (the default) it must lie inside
    the store's files directory and is stored relative to it, '/'-separated,
    so it moves with the store; with C{relative=False} the absolute path is
    stored.
    """

    _identity = False
    _late = True

    def __init__(self, relative: bool = True, **kw: Any) -> None:
        text.__init__(self, **kw)
        self.relative = relative

    def infilter(self, pyval: Any, oself: Any, store: Any) -> Any:
        if not isinstance(pyval, FilePath):
            raise ConstraintError(self, "FilePath", pyval)
        if not self.relative:
            return text.infilter(self, pyval.path, oself, store)
        if store is None:
            return pyval
        filesdir = store.filesdir
        if filesdir is None:
            raise InvalidPathError("%s: store %r has no files directory" % (self, store))
        try:
            segments = pyval.segmentsFrom(filesdir)
        except ValueError:
            raise InvalidPathError("%s: %s is not inside %s" % (self, pyval.path, filesdir.path))
        if not segments:
            raise InvalidPathError("%s: %s is the files directory itself" % (self, pyval.path))
        return text.infilter(self, "/".join(segments), oself, store)

    def _get(self, oself: Any) -> Any:
        v = oself.__dict__[self.hidden]
        if v is None or not isinstance(v, str):
            return v
        return self._convert(v, oself.__dict__.get("_fstore"))

    def _convert(self, v: str, store: Any) -> Any:
        if not self.relative:
            return FilePath(v)
        if store is None or store.filesdir is None:
            return None
        fp = store.filesdir
        for segment in v.split("/"):
            fp = fp.child(segment)
        return fp

    def _fromColumn(self, dbval: Any, store: Any) -> Any:
        if dbval is None:
            return None
        return self._convert(dbval, store)


class textlist(text):
    """
    A list of strings, stored as one C{TEXT} value.  Reading returns a new
    list each time: changing it changes nothing; assign a new list instead.
    Elements must not contain U+001F or U+0002.
    """

    _identity = False
    _delimiter = "\x1f"
    _guard = "\x02"

    def infilter(self, pyval: Any, oself: Any, store: Any) -> Any:
        if isinstance(pyval, (str, _builtinBytes)) or not isinstance(pyval, (list, tuple)):
            raise ConstraintError(self, "list of str", pyval)
        for element in pyval:
            if not isinstance(element, str):
                raise ConstraintError(self, "list of str", element)
            if self._delimiter in element or self._guard in element:
                raise ConstraintError(self, "str without U+001F or U+0002", element)
        return text.infilter(self, self._delimiter.join([self._guard] + list(pyval)), oself, store)

    def outfilter(self, dbval: Any, oself: Any) -> Any:
        if dbval is None:
            return None
        values = dbval.split(self._delimiter)
        if values[:1] == [self._guard]:
            del values[:1]
        return values


@implementer(IColumn)
class _StoreIDColumn(_Comparable, property):
    """
    C{Cls.storeID}: the storeID of items, as a query column.
    """

    attrname = "storeID"
    columnName = "oid"

    def __init__(self, cls: Any, tableName: str) -> None:
        property.__init__(self, attrgetter("_fstoreID"), _refuseStoreID, None, "The storeID.")
        self.type = cls
        self._sqlName = tableName + ".oid"

    def getColumnName(self, store: object = None) -> str:
        return self._sqlName

    def getShortColumnName(self, store: object = None) -> str:
        return "oid"

    def _queryValue(self, value: Any, store: Any) -> Any:
        if type(value) is not int:
            raise ConstraintError(self, "int", value)
        return value

    def outfilter(self, dbval: Any, oself: Any) -> Any:
        return dbval

    def _fromColumn(self, dbval: Any, store: Any) -> Any:
        return dbval

    def __repr__(self) -> str:
        return "<storeID %s>" % (getattr(self.type, "__name__", "?"),)


def _refuseStoreID(oself: Any, value: Any) -> None:
    raise AttributeError("storeID is assigned by the store and cannot be set")


implementer(IColumn)(SQLAttribute)


@implementer(IColumn)
class _PlaceholderColumn(_Comparable):
    """
    An attribute seen through a L{Placeholder}.
    """

    def __init__(self, placeholder: Placeholder, attribute: Any) -> None:
        self.type = placeholder
        self.attribute = attribute
        self.attrname = attribute.attrname

    def getColumnName(self, store: object = None) -> str:
        short = "oid" if isinstance(self.attribute, _StoreIDColumn) else self.attribute.columnName
        return "%s.%s" % (self.type._alias, short)

    def _queryValue(self, value: Any, store: Any) -> Any:
        return self.attribute._queryValue(value, store)

    def _fromColumn(self, dbval: Any, store: Any) -> Any:
        return self.attribute._fromColumn(dbval, store)

    def __repr__(self) -> str:
        return "<%r of %r>" % (self.attribute, self.type)


class Placeholder:
    """
    A stand-in for an item class in a query, to join a class with itself:
    C{p = Placeholder(Person); store.query(Person, Person.boss == p.storeID)}
    with conditions on C{p.name} and so on.  A placeholder can also be the
    result class of a query.
    """

    _counter = 0

    def __init__(self, itemClass: Any) -> None:
        Placeholder._counter += 1
        self._placeholderItemClass = itemClass
        self._alias = "placeholder_%d" % (Placeholder._counter,)
        self._columns: dict[str, _PlaceholderColumn] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self._placeholderItemClass, name)
        if not IColumn.providedBy(attr):
            raise AttributeError("%s is not a persistent attribute" % (name,))
        col = self._columns.get(name)
        if col is None:
            col = self._columns[name] = _PlaceholderColumn(self, attr)
        return col

    def __repr__(self) -> str:
        return "Placeholder(%s)" % (self._placeholderItemClass.__name__,)

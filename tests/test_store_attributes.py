"""
Tests for the attribute types of L{fractal.store.attributes}: one class per
type, with what each accepts, rejects and reloads as.
"""

from __future__ import annotations

import datetime
import gc
from decimal import Decimal

from epsilon import extime
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from fractal.store import (
    ConstraintError,
    Item,
    Store,
    Time,
    boolean,
    bytes,
    ieee754_double,
    inmemory,
    integer,
    money,
    path,
    point1decimal,
    point2decimal,
    point10decimal,
    text,
    textlist,
    timestamp,
)
from fractal.store.errors import InvalidPathError


class Everything(Item):
    """
    One attribute of every type.
    """

    t = text()
    exact = text(caseSensitive=True)
    b = bytes()
    i = integer()
    flag = boolean()
    d = ieee754_double()
    p1 = point1decimal()
    p2 = point2decimal()
    p10 = point10decimal()
    m = money()
    ts = timestamp()
    fp = path()
    absolute = path(relative=False)
    tl = textlist()
    scratch = inmemory()


def reload(store: Store, item: Item) -> Everything:
    """
    Load C{item} again from the database, as a new object (as if it had been
    garbage-collected).
    """
    storeID = item.storeID
    store._cache.pop(storeID)
    gc.collect()
    loaded: Everything = store.getItemByID(storeID)
    assert loaded is not item
    return loaded


class SQLTypeTests(SynchronousTestCase):
    """
    The SQL column types, as Axiom spells them.
    """

    def test_sqltypes(self) -> None:
        """
        Every type has Axiom's SQL column type.
        """
        self.assertEqual(
            {name: attr.sqltype for name, attr in Everything.getSchema()},
            {
                "t": "TEXT COLLATE NOCASE",
                "exact": "TEXT",
                "b": "BLOB",
                "i": "INTEGER",
                "flag": "BOOLEAN",
                "d": "REAL",
                "p1": "INTEGER",
                "p2": "INTEGER",
                "p10": "INTEGER",
                "m": "INTEGER",
                "ts": "INTEGER",
                "fp": "TEXT COLLATE NOCASE",
                "absolute": "TEXT COLLATE NOCASE",
                "tl": "TEXT COLLATE NOCASE",
            },
        )

    def test_inmemoryNotPersisted(self) -> None:
        """
        An inmemory attribute has no column and is lost on reload.
        """
        s = Store()
        e = Everything(store=s)
        e.scratch = 5
        self.assertNotIn("scratch", dict(Everything.getSchema()))
        self.assertRaises(AttributeError, getattr, reload(s, e), "scratch")


class TextTests(SynchronousTestCase):
    """
    text and bytes.
    """

    def test_text(self) -> None:
        """
        str round-trips; bytes, NUL and non-strings are rejected.
        """
        s = Store()
        e = Everything(store=s, t="héllo")
        self.assertEqual(reload(s, e).t, "héllo")
        self.assertRaises(ConstraintError, Everything, t=b"x")
        self.assertRaises(ConstraintError, Everything, t="a\0b")
        self.assertRaises(TypeError, Everything, t=1)

    def test_caseFoldingASCIIOnly(self) -> None:
        """
        A default text column matches ASCII case-insensitively but not other
        letters; caseSensitive=True matches exactly.
        """
        s = Store()
        Everything(store=s, t="hello", exact="hello")
        Everything(store=s, t="école", exact="école")
        self.assertEqual(s.count(Everything, Everything.t == "HELLO"), 1)
        self.assertEqual(s.count(Everything, Everything.t == "École"), 0)
        self.assertEqual(s.count(Everything, Everything.exact == "HELLO"), 0)

    def test_bytes(self) -> None:
        """
        bytes round-trip; str is rejected.
        """
        s = Store()
        e = Everything(store=s, b=b"\x00\xff")
        self.assertEqual(reload(s, e).b, b"\x00\xff")
        self.assertRaises(ConstraintError, Everything, b="x")


class NumberTests(SynchronousTestCase):
    """
    integer, boolean and ieee754_double.
    """

    def test_integerRange(self) -> None:
        """
        64-bit signed integers are accepted, larger ones and floats rejected.
        """
        s = Store()
        e = Everything(store=s, i=2**63 - 1)
        self.assertEqual(reload(s, e).i, 2**63 - 1)
        Everything(i=-(2**63))
        self.assertRaises(ConstraintError, Everything, i=2**63)
        self.assertRaises(ConstraintError, Everything, i=-(2**63) - 1)
        self.assertRaises(ConstraintError, Everything, i=1.0)

    def test_integerBool(self) -> None:
        """
        A bool is accepted by integer and stored as an int.
        """
        s = Store()
        e = Everything(store=s, i=True)
        loaded = reload(s, e)
        self.assertEqual(loaded.i, 1)
        self.assertIs(type(loaded.i), int)

    def test_boolean(self) -> None:
        """
        Only True, False and None are accepted; they reload as bools.
        """
        s = Store()
        e = Everything(store=s, flag=True)
        self.assertIs(reload(s, e).flag, True)
        e2 = Everything(store=s, flag=False)
        self.assertIs(reload(s, e2).flag, False)
        self.assertIsNone(Everything().flag)
        self.assertRaises(ConstraintError, Everything, flag=1)
        self.assertRaises(ConstraintError, Everything, flag=0)

    def test_double(self) -> None:
        """
        Floats round-trip; ints are rejected; NaN reloads as None.
        """
        s = Store()
        e = Everything(store=s, d=1.5)
        self.assertEqual(reload(s, e).d, 1.5)
        self.assertRaises(ConstraintError, Everything, d=1)
        nan = Everything(store=s, d=float("nan"))
        self.assertIsNone(reload(s, nan).d)


class DecimalTests(SynchronousTestCase):
    """
    Fixed-point decimals.
    """

    def test_roundTrip(self) -> None:
        """
        A Decimal with the right places round-trips exactly, as a Decimal.
        """
        s = Store()
        e = Everything(store=s, p2=Decimal("12.34"), p10=Decimal("0.0000000001"), m=Decimal("9.9999"))
        loaded = reload(s, e)
        self.assertEqual(loaded.p2, Decimal("12.34"))
        self.assertEqual(loaded.p10, Decimal("0.0000000001"))
        self.assertEqual(loaded.m, Decimal("9.9999"))
        self.assertIsInstance(loaded.m, Decimal)

    def test_roundedOnSet(self) -> None:
        """
        Values are rounded half-to-even when set, so the item holds exactly
        what the database holds (Axiom kept the unrounded value until reload).
        """
        e = Everything(p1=Decimal("0.25"))
        self.assertEqual(e.p1, Decimal("0.2"))
        e.p1 = Decimal("0.35")
        self.assertEqual(e.p1, Decimal("0.4"))
        e.p2 = Decimal("-1.005")
        self.assertEqual(e.p2, Decimal("-1.00"))
        s = Store()
        e.store = s
        self.assertEqual(reload(s, e).p2, Decimal("-1.00"))

    def test_intAcceptedFloatRejected(self) -> None:
        """
        An int is accepted; a float or a bool is rejected.
        """
        self.assertEqual(Everything(p2=3).p2, Decimal("3.00"))
        self.assertRaises(ConstraintError, Everything, p2=1.5)
        self.assertRaises(ConstraintError, Everything, p2=True)

    def test_compareWithFloat(self) -> None:
        """
        Comparing a decimal attribute with a float, or with a decimal of
        other precision, raises TypeError.
        """
        s = Store()
        self.assertRaises(TypeError, s.query, Everything, Everything.p2 == 1.5)
        self.assertRaises(TypeError, lambda: Everything.p2 == Everything.p1)
        self.assertRaises(TypeError, lambda: Everything.p2 > Everything.i)

    def test_queryByDecimal(self) -> None:
        """
        Queries convert decimals to the scaled column value.
        """
        s = Store()
        Everything(store=s, p2=Decimal("1.50"))
        self.assertEqual(s.count(Everything, Everything.p2 == Decimal("1.5")), 1)
        self.assertEqual(s.count(Everything, Everything.p2 > 1), 1)


class TimestampTests(SynchronousTestCase):
    """
    timestamp and L{Time}.
    """

    def test_microseconds(self) -> None:
        """
        A Time round-trips to the microsecond and is stored as µs since the
        epoch.
        """
        s = Store()
        t = extime.Time.fromPOSIXTimestamp(1234567890.123456)
        e = Everything(store=s, ts=t)
        loaded = reload(s, e)
        self.assertEqual(loaded.ts, t)
        self.assertIsInstance(loaded.ts, Time)
        raw = s._cursor.execute("SELECT [ts] FROM %s" % (Everything._fTable,)).fetchone()[0]
        self.assertEqual(raw, 1234567890123456)

    def test_awareDatetime(self) -> None:
        """
        An aware datetime is accepted; a naive one is rejected.
        """
        dt = datetime.datetime(2020, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
        e = Everything(ts=dt)
        self.assertEqual(e.ts.asDatetime(), dt)
        self.assertRaises(ConstraintError, Everything, ts=datetime.datetime(2020, 1, 1))
        self.assertRaises(ConstraintError, Everything, ts=12)

    def test_timeHashableOrdered(self) -> None:
        """
        L{Time} hashes and orders by instant; arithmetic keeps the class.
        """
        a = Time.fromMicroseconds(10)
        b = Time.fromMicroseconds(20)
        self.assertTrue(a < b <= b and b > a >= a)
        self.assertEqual(sorted([b, a]), [a, b])
        self.assertEqual(len({a, Time.fromMicroseconds(10)}), 1)
        later = a + datetime.timedelta(microseconds=10)
        self.assertIsInstance(later, Time)
        self.assertEqual(later, b)
        self.assertEqual(b - a, datetime.timedelta(microseconds=10))
        self.assertIsInstance(b - datetime.timedelta(seconds=1), Time)
        self.assertIsInstance(a, extime.Time)

    def test_queryByTime(self) -> None:
        """
        Timestamps compare in queries, and sort.
        """
        s = Store()
        for us in (30, 10, 20):
            Everything(store=s, ts=Time.fromMicroseconds(us))
        self.assertEqual(
            [e.ts for e in s.query(Everything, Everything.ts > Time.fromMicroseconds(10), sort=Everything.ts.ascending)],
            [Time.fromMicroseconds(20), Time.fromMicroseconds(30)],
        )


class PathTests(SynchronousTestCase):
    """
    path.
    """

    def test_relative(self) -> None:
        """
        A path inside the files directory is stored relative, '/'-separated,
        and reloads under the files directory.
        """
        s = Store(self.mktemp())
        fp = s.newFilePath("a", "b.txt")
        e = Everything(store=s, fp=fp)
        raw = s._cursor.execute("SELECT [fp] FROM %s" % (Everything._fTable,)).fetchone()[0]
        self.assertEqual(raw, "a/b.txt")
        self.assertEqual(reload(s, e).fp, fp)

    def test_setBeforeStore(self) -> None:
        """
        A path set before the item is stored is checked at insertion.
        """
        s = Store(self.mktemp())
        e = Everything(fp=FilePath("/elsewhere"))
        self.assertRaises(InvalidPathError, setattr, e, "store", s)

    def test_outside(self) -> None:
        """
        A path outside the files directory raises InvalidPathError.
        """
        s = Store(self.mktemp())
        e = Everything(store=s)
        self.assertRaises(InvalidPathError, setattr, e, "fp", FilePath("/tmp"))
        self.assertRaises(InvalidPathError, setattr, e, "fp", s.filesdir)

    def test_noFilesdir(self) -> None:
        """
        In an in-memory store without a files directory, a relative path is
        rejected with InvalidPathError.
        """
        s = Store()
        e = Everything(store=s)
        self.assertRaises(InvalidPathError, setattr, e, "fp", FilePath("/tmp/x"))

    def test_absolute(self) -> None:
        """
        relative=False stores the absolute path as is.
        """
        s = Store()
        e = Everything(store=s, absolute=FilePath("/var/x"))
        self.assertEqual(reload(s, e).absolute, FilePath("/var/x"))

    def test_notAFilePath(self) -> None:
        """
        A str is rejected.
        """
        self.assertRaises(ConstraintError, Everything, fp="/tmp/x")


class TextListTests(SynchronousTestCase):
    """
    textlist.
    """

    def encoded(self, value: list[str]) -> str:
        s = Store()
        Everything(store=s, tl=value)
        raw: str = s._cursor.execute("SELECT [tl] FROM %s" % (Everything._fTable,)).fetchone()[0]
        return raw

    def test_encodings(self) -> None:
        """
        The on-disk encodings are Axiom's.
        """
        self.assertEqual(self.encoded([]), "\x02")
        self.assertEqual(self.encoded([""]), "\x02\x1f")
        self.assertEqual(self.encoded(["a", "b"]), "\x02\x1fa\x1fb")

    def test_roundTrip(self) -> None:
        """
        Lists round-trip, including [] and [''].
        """
        s = Store()
        for value in ([], [""], ["a", "b"]):
            e = Everything(store=s, tl=value)
            self.assertEqual(reload(s, e).tl, value)

    def test_oldEncoding(self) -> None:
        """
        Rows written without the leading U+0002 still parse.
        """
        self.assertEqual(textlist().outfilter("a\x1fb", None), ["a", "b"])

    def test_freshList(self) -> None:
        """
        Reading returns a new list each time; a tuple reads back as a list.
        """
        e = Everything(tl=("a",))
        self.assertEqual(e.tl, ["a"])
        e.tl.append("b")
        self.assertEqual(e.tl, ["a"])

    def test_rejected(self) -> None:
        """
        Separator characters, non-str elements and non-lists are rejected.
        """
        self.assertRaises(ConstraintError, Everything, tl=["a\x1f"])
        self.assertRaises(ConstraintError, Everything, tl=["\x02"])
        self.assertRaises(ConstraintError, Everything, tl=[1])
        self.assertRaises(ConstraintError, Everything, tl="ab")

"""
On-disk compatibility with Axiom: a database built with raw SQL exactly as
Axiom lays it out opens, its items and powerups load, its old items upgrade,
and what fractal writes has the same layout.
"""

from __future__ import annotations

import sqlite3
from typing import Sequence

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface, implementer

from fractal.store import (
    AND,
    Item,
    Store,
    Time,
    compoundIndex,
    integer,
    reference,
    registerUpgrader,
    text,
    textlist,
    timestamp,
)
from fractal.store.item import _PowerupConnector

# Axiom's schema, as its store module creates it (twisted/axiom _schema.py).
AXIOM_BASE_SCHEMA = [
    """
CREATE TABLE "axiom_objects" (
    "oid" INTEGER PRIMARY KEY AUTOINCREMENT,
    "type_id" INTEGER NOT NULL
        CONSTRAINT "fk_type_id" REFERENCES "axiom_types"("oid")
)
""",
    """
CREATE INDEX "axiom_objects_type_idx"
    ON "axiom_objects"("type_id");
""",
    """
CREATE TABLE "axiom_types" (
    "oid" INTEGER PRIMARY KEY AUTOINCREMENT,
    "typename" VARCHAR,
    "module" VARCHAR,
    "version" INTEGER
)
""",
    """
CREATE TABLE "axiom_attributes" (
    "type_id" INTEGER,
    "row_offset" INTEGER,
    "indexed" BOOLEAN,
    "sqltype" VARCHAR,
    "allow_none" BOOLEAN,
    "pythontype" VARCHAR,
    "attribute" VARCHAR,
    "docstring" TEXT
)
""",
]

AttributeSpec = tuple[str, str, str, bool]


def axiomStore(
    dbdir: FilePath[str],
    types: Sequence[tuple[str, str, int, Sequence[AttributeSpec]]],
    objects: Sequence[tuple[int | None, int, Sequence[object]]],
    withIndexes: bool = True,
    implicitRowid: bool = False,
) -> None:
    """
    Write an Axiom store directory with raw SQL.

    @param types: C{(typeName, module, version, [(attribute, sqltype,
        pythontype, indexed), ...])}, attributes in column (sorted) order.
    @param implicitRowid: lay item tables out as Axiom did before 0.8.0,
        without an explicit C{oid} column.
    @param objects: C{(typeIndex or None for a deleted item, storeID-order
        placeholder, row values)}: one C{axiom_objects} row each, in order;
        C{typeIndex} indexes C{types}.
    """
    dbdir.makedirs()
    for name in ("files", "temp", "run"):
        dbdir.child(name).makedirs()
    conn = sqlite3.connect(dbdir.child("db.sqlite").path, isolation_level=None)
    for sql in AXIOM_BASE_SCHEMA:
        conn.execute(sql)
    typeIDs = []
    for typeName, module, version, attrs in types:
        table = "item_%s_v%d" % (typeName, version)
        columns = ([] if implicitRowid else ["oid INTEGER PRIMARY KEY"]) + [
            "\n[%s] %s" % (a[0], a[1]) for a in attrs
        ]
        conn.execute("CREATE TABLE main.%s (%s)" % (table, ", ".join(columns)))
        cur = conn.execute(
            'INSERT INTO "main"."axiom_types" ("typename", "module", "version") VALUES (?, ?, ?)',
            (typeName, module, version),
        )
        typeID = cur.lastrowid
        typeIDs.append(typeID)
        if withIndexes:
            for a in attrs:
                if a[3]:
                    conn.execute(
                        "CREATE INDEX main.axiomidx_%s_v%d_%s ON %s([%s])"
                        % (typeName, version, a[0], table, a[0])
                    )
        for offset, (name, sqltype, pythontype, indexed) in enumerate(attrs):
            conn.execute(
                'INSERT INTO "main"."axiom_attributes" ("type_id", "row_offset", "indexed", '
                '"sqltype", "allow_none", "attribute", "docstring", "pythontype") '
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (typeID, offset, indexed, sqltype, True, name, "", pythontype),
            )
    for typeIndex, _, values in objects:
        if typeIndex is None:
            conn.execute('INSERT INTO "main"."axiom_objects" ("type_id") VALUES (-1)')
            continue
        cur = conn.execute(
            'INSERT INTO "main"."axiom_objects" ("type_id") VALUES (?)', (typeIDs[typeIndex],)
        )
        typeName, _, version, attrs = types[typeIndex]
        conn.execute(
            "INSERT INTO main.item_%s_v%d (oid, %s) VALUES (?, %s)"
            % (typeName, version, ", ".join("[%s]" % a[0] for a in attrs), ", ".join("?" * len(attrs))),
            (cur.lastrowid, *values),
        )
    conn.close()


CONNECTOR_TYPE = (
    "axiom_powerup_connector",
    "axiom.item",
    1,
    [
        ("interface", "TEXT COLLATE NOCASE", "text", False),
        ("item", "INTEGER", "reference", True),
        ("powerup", "INTEGER", "reference", True),
        ("priority", "INTEGER", "integer", False),
    ],
)


class ICompat(Interface):
    """
    Installed by the Axiom-written data.
    """


@implementer(ICompat)
class CompatNote(Item):
    """
    The current version of an item written by Axiom.
    """

    typeName = "test_compat_note"
    body = text()
    count = integer(indexed=True)
    tags = textlist()
    when = timestamp()
    other = reference()


class CompatUpgraded(Item):
    """
    Version 2 of an item Axiom wrote at version 1.
    """

    typeName = "test_compat_upgraded"
    schemaVersion = 2
    title = text()
    length = integer()


def _upgradeCompat(old: Item) -> Item:
    return old.upgradeVersion(
        "test_compat_upgraded", 1, 2, title=old.title, length=len(old.title)  # type: ignore[attr-defined]
    )


registerUpgrader(_upgradeCompat, "test_compat_upgraded", 1, 2)

NOTE_TYPE = (
    "test_compat_note",
    "tests.test_store_compat",
    1,
    [
        ("body", "TEXT COLLATE NOCASE", "text", False),
        ("count", "INTEGER", "integer", True),
        ("other", "INTEGER", "reference", True),
        ("tags", "TEXT COLLATE NOCASE", "textlist", False),
        ("when", "INTEGER", "timestamp", False),
    ],
)
OLD_TYPE = (
    "test_compat_upgraded",
    "tests.test_store_compat",
    1,
    [("title", "TEXT COLLATE NOCASE", "text", False)],
)


class AxiomDataTests(SynchronousTestCase):
    """
    Opening a store written by Axiom.
    """

    def setUp(self) -> None:
        self.path = FilePath(self.mktemp())
        axiomStore(
            self.path,
            [NOTE_TYPE, CONNECTOR_TYPE, OLD_TYPE],
            [
                (0, 1, ["first", 7, None, "\x02\x1fa\x1fb", 1234567890123456]),  # storeID 1
                (None, 2, []),  # storeID 2: deleted
                (0, 3, ["second", 8, 1, "a", None]),  # storeID 3, old textlist encoding
                (1, 4, ["tests.test_store_compat.ICompat", -1, 1, 0]),  # storeID 4
                (2, 5, ["hello"]),  # storeID 5: version 1
            ],
        )
        self.store = Store(self.path)
        # Whichever store the test leaves there (test_reopen opens another).
        self.addCleanup(lambda: self.store.close())

    def test_items(self) -> None:
        """
        Items and every encoding load.
        """
        s = self.store
        first = s.getItemByID(1)
        self.assertEqual((first.body, first.count, first.tags), ("first", 7, ["a", "b"]))
        self.assertEqual(first.when, Time.fromMicroseconds(1234567890123456))
        second = s.getItemByID(3)
        self.assertIs(second.other, first)
        self.assertEqual(second.tags, ["a"])
        self.assertEqual(s.count(CompatNote, CompatNote.count > 6), 2)

    def test_deletedRow(self) -> None:
        """
        A deleted item's row (type_id -1) reads as missing, and its storeID
        is not reused.
        """
        self.assertIsNone(self.store.getItemByID(2, None))
        self.assertEqual(CompatNote(store=self.store).storeID, 6)

    def test_powerup(self) -> None:
        """
        A powerup Axiom installed on the store adapts.
        """
        self.assertIs(ICompat(self.store), self.store.getItemByID(1))
        self.assertEqual(self.store.count(_PowerupConnector), 1)

    def test_upgradedAtOpen(self) -> None:
        """
        The version-1 item was upgraded when the store opened, keeping its
        storeID, and queries see it.
        """
        s = self.store
        self.assertEqual(s.count(CompatUpgraded), 1)
        item = s.getItemByID(5)
        self.assertIsInstance(item, CompatUpgraded)
        self.assertEqual((item.title, item.length), ("hello", 5))
        rows = s._cursor.execute("SELECT COUNT(*) FROM item_test_compat_upgraded_v1").fetchone()
        self.assertEqual(rows, (0,))

    def test_reopen(self) -> None:
        """
        The store reopens after being written by fractal.
        """
        CompatNote(store=self.store, body="third")
        self.store.close()
        s = Store(self.path)
        self.assertEqual(s.count(CompatNote), 3)
        s.close()
        self.store = Store(self.path)


class LayoutTests(SynchronousTestCase):
    """
    What fractal writes is laid out as Axiom lays it out.
    """

    def test_tables(self) -> None:
        """
        The system tables, item tables, attribute rows and index names are
        Axiom's.
        """
        path = FilePath(self.mktemp())
        s = Store(path)
        CompatNote(store=s, body="x", count=1)
        cur = s._cursor
        types = cur.execute("SELECT typename, module, version FROM axiom_types").fetchall()
        self.assertEqual(types, [("test_compat_note", "tests.test_store_compat", 1)])
        attrs = cur.execute(
            "SELECT row_offset, indexed, sqltype, allow_none, pythontype, attribute FROM axiom_attributes"
        ).fetchall()
        self.assertEqual(
            attrs,
            [
                (0, 0, "TEXT COLLATE NOCASE", 1, "text", "body"),
                (1, 1, "INTEGER", 1, "integer", "count"),
                (2, 1, "INTEGER", 1, "reference", "other"),
                (3, 0, "TEXT COLLATE NOCASE", 1, "textlist", "tags"),
                (4, 0, "INTEGER", 1, "timestamp", "when"),
            ],
        )
        columns = [row[1:3] for row in cur.execute("PRAGMA table_info(item_test_compat_note_v1)")]
        self.assertEqual(
            columns,
            [
                ("oid", "INTEGER"),
                ("body", "TEXT"),
                ("count", "INTEGER"),
                ("other", "INTEGER"),
                ("tags", "TEXT"),
                ("when", "INTEGER"),
            ],
        )
        ddl = cur.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'item_test_compat_note_v1'"
        ).fetchone()[0]
        self.assertIn("[body] TEXT COLLATE NOCASE", ddl)
        self.assertIn("oid INTEGER PRIMARY KEY", ddl)
        indexes = {r[0] for r in cur.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        self.assertTrue(
            {"axiom_objects_type_idx", "axiomidx_test_compat_note_v1_count", "axiomidx_test_compat_note_v1_other"}
            <= indexes
        )
        s.close()


class UnknownTypeTests(SynchronousTestCase):
    """
    Types whose code is missing.
    """

    def test_unknownType(self) -> None:
        """
        A stored type whose module cannot be imported does not stop the store
        from opening (a warning is logged); loading one of its items raises
        UnknownItemType, and other items still load.
        """
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        from fractal.store.errors import UnknownItemType

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        path = FilePath(self.mktemp())
        axiomStore(
            path,
            [
                ("test_compat_gone", "no_such_module_anywhere", 1, [("x", "INTEGER", "integer", False)]),
                NOTE_TYPE,
            ],
            [(0, 1, [1]), (1, 2, ["still here", 1, None, "\x02", None])],
        )
        s = Store(path)
        self.assertRaises(UnknownItemType, s.getItemByID, 1)
        self.assertEqual(s.getItemByID(2).body, "still here")
        self.assertTrue(any(e.get("typeName") == "test_compat_gone" for e in events))
        s.close()


class Paired(Item):
    """
    Has a compound index.
    """

    typeName = "test_compat_paired"
    first = text()
    second = integer()
    compoundIndex(first, second)


class CompoundIndexTests(SynchronousTestCase):
    """
    compoundIndex.
    """

    def test_named(self) -> None:
        """
        A compound index is named after its columns, in order, and queries
        use it.
        """
        s = Store()
        Paired(store=s, first="a", second=1)
        names = {r[0] for r in s.querySQL("SELECT name FROM sqlite_master WHERE type='index'")}
        self.assertIn("axiomidx_test_compat_paired_v1_first_second", names)
        plan = s.query(Paired, AND(Paired.first == "a", Paired.second == 1)).explain()
        self.assertIn("axiomidx_test_compat_paired_v1_first_second", plan)


class RawSQLTests(SynchronousTestCase):
    """
    querySQL and executeSQL.
    """

    def test_rawSQL(self) -> None:
        """
        executeSQL writes in a transaction and returns the rowid; querySQL
        reads rows.
        """
        s = Store()
        s.executeSQL("CREATE TABLE extra (x INTEGER)")
        rowid = s.executeSQL("INSERT INTO extra (x) VALUES (?)", [5])
        self.assertEqual(rowid, 1)
        self.assertEqual(s.querySQL("SELECT x FROM extra"), [(5,)])


class OldLayoutTests(SynchronousTestCase):
    """
    Item tables from before Axiom 0.8.0 (an implicit rowid, no oid column).
    """

    def test_implicitRowid(self) -> None:
        """
        Items load, change, and new ones are added, in a table with only an
        implicit rowid.
        """
        path = FilePath(self.mktemp())
        axiomStore(
            path, [NOTE_TYPE], [(None, 1, []), (0, 2, ["old", 3, None, "\x02", None])], implicitRowid=True
        )
        s = Store(path)
        note = s.getItemByID(2)
        self.assertEqual(note.body, "old")
        note.count = 4
        new = CompatNote(store=s, body="new")
        s.close()
        s = Store(path)
        self.assertEqual(sorted((n.storeID, n.body, n.count) for n in s.query(CompatNote)), [(2, "old", 4), (new.storeID, "new", None)])
        s.close()

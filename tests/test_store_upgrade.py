"""
Tests for upgraders (L{fractal.store.upgrade}): chains, schema checks at
open, attribute copying, deletion, references and recursion.

Old versions are written with raw SQL, laid out as Axiom lays them out (see
L{tests.test_store_compat.axiomStore}), then opened with the current code.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from fractal.store import (
    Item,
    Store,
    declareLegacyItem,
    errors,
    integer,
    reference,
    registerAttributeCopyingUpgrader,
    registerDeletionUpgrader,
    registerUpgrader,
    text,
)
from tests.test_store_compat import axiomStore

MODULE = "tests.test_store_upgrade"


class Chained(Item):
    """
    Version 3; version 2 is declared as legacy; 1 → 2 → 3.
    """

    typeName = "test_upgrade_chained"
    schemaVersion = 3
    name = text()
    extra = integer(default=0)
    steps = text(default="")


declareLegacyItem("test_upgrade_chained", 2, {"name": text(), "extra": integer()})


def chained1to2(old: Any) -> Any:
    return old.upgradeVersion("test_upgrade_chained", 1, 2, name=old.name, extra=1)


def chained2to3(old: Any) -> Any:
    return old.upgradeVersion(
        "test_upgrade_chained", 2, 3, name=old.name, extra=old.extra + 1, steps="1,2"
    )


registerUpgrader(chained1to2, "test_upgrade_chained", 1, 2)
registerUpgrader(chained2to3, "test_upgrade_chained", 2, 3)


class NoPath(Item):
    """
    Version 2 with no upgrader from 1.
    """

    typeName = "test_upgrade_nopath"
    schemaVersion = 2
    value = integer()


class NeedsSchema(Item):
    """
    Version 3, with upgraders 1 → 2 → 3 but no declared schema for 2.
    """

    typeName = "test_upgrade_needsschema"
    schemaVersion = 3
    value = integer()


registerUpgrader(lambda old: None, "test_upgrade_needsschema", 1, 2)
registerUpgrader(lambda old: None, "test_upgrade_needsschema", 2, 3)


class OlderCode(Item):
    """
    Version 1 in code; the database holds version 2.
    """

    typeName = "test_upgrade_oldercode"
    value = integer()


class Drifted(Item):
    """
    Version 1 whose column type changed without a bump.
    """

    typeName = "test_upgrade_drifted"
    value = text()


class Indexed(Item):
    """
    Version 1 that gained an index without a bump.
    """

    typeName = "test_upgrade_indexed"
    value = integer(indexed=True)


class Copied(Item):
    """
    Version 2, copied from version 1 plus a new attribute.
    """

    typeName = "test_upgrade_copied"
    schemaVersion = 2
    value = integer()
    added = integer(default=9)


registerAttributeCopyingUpgrader(Copied, 1, 2, postCopy=lambda new: setattr(new, "added", new.value * 2))


class Shrunk(Item):
    """
    Version 2, without an attribute that version 1 had.
    """

    typeName = "test_upgrade_shrunk"
    schemaVersion = 2
    value = integer()


registerAttributeCopyingUpgrader(Shrunk, 1, 2)


class Doomed(Item):
    """
    Version 2; version 1 items are deleted.
    """

    typeName = "test_upgrade_doomed"
    schemaVersion = 2
    value = integer()


registerDeletionUpgrader(Doomed, 1, 2)


class Holder(Item):
    """
    Current version 1, refers to a Target written at version 1.
    """

    typeName = "test_upgrade_holder"
    target = reference()


class Target(Item):
    """
    Version 2 of a referred-to item.
    """

    typeName = "test_upgrade_target"
    schemaVersion = 2
    name = text()
    made = reference()


class Made(Item):
    """
    Created by the Target upgrader.
    """

    typeName = "test_upgrade_made"
    label = text()


def target1to2(old: Any) -> Any:
    made = Made(store=old.store, label="made for " + old.name)
    return old.upgradeVersion("test_upgrade_target", 1, 2, name=old.name, made=made)


registerUpgrader(target1to2, "test_upgrade_target", 1, 2)


class Recursive(Item):
    """
    Version 2 whose upgrader asks for the item being upgraded.
    """

    typeName = "test_upgrade_recursive"
    schemaVersion = 2
    value = integer()


def recursive1to2(old: Any) -> Any:
    old.store.getItemByID(old.storeID)
    return old.upgradeVersion("test_upgrade_recursive", 1, 2, value=old.value)


registerUpgrader(recursive1to2, "test_upgrade_recursive", 1, 2)


class Asking(Item):
    """
    Version 2 whose upgrader asks for another legacy item explicitly.
    """

    typeName = "test_upgrade_asking"
    schemaVersion = 2
    other = integer()
    otherType = text()


def asking1to2(old: Any) -> Any:
    other = old.store.getItemByID(old.other)
    return old.upgradeVersion(
        "test_upgrade_asking", 1, 2, other=old.other, otherType=type(other).__name__
    )


registerUpgrader(asking1to2, "test_upgrade_asking", 1, 2)


def intAttr(name: str, indexed: bool = False) -> tuple[str, str, str, bool]:
    return (name, "INTEGER", "integer", indexed)


def textAttr(name: str) -> tuple[str, str, str, bool]:
    return (name, "TEXT COLLATE NOCASE", "text", False)


class UpgradeTests(SynchronousTestCase):
    """
    Upgrades run when the store opens.
    """

    def open(self, types: Any, objects: Any, **kw: Any) -> Store:
        path = FilePath(self.mktemp())
        axiomStore(path, types, objects, **kw)
        s = Store(path)
        self.addCleanup(s.close)
        return s

    def test_chain(self) -> None:
        """
        1 → 2 → 3 chains through the declared legacy schema, keeping
        storeIDs; queries see every item at once.
        """
        s = self.open(
            [("test_upgrade_chained", MODULE, 1, [textAttr("name")])],
            [(0, 1, ["a"]), (0, 2, ["b"])],
        )
        items = list(s.query(Chained, sort=Chained.storeID.ascending))
        self.assertEqual([(i.storeID, i.name, i.extra, i.steps) for i in items], [(1, "a", 2, "1,2"), (2, "b", 2, "1,2")])
        self.assertEqual(s.count(Chained), 2)
        self.successResultOf(s.whenFullyUpgraded())

    def test_midChain(self) -> None:
        """
        Items already at an intermediate version on disk finish the chain.
        """
        s = self.open(
            [("test_upgrade_chained", MODULE, 2, [intAttr("extra"), textAttr("name")])],
            [(0, 1, [5, "mid"])],
        )
        item = s.findUnique(Chained)
        self.assertEqual((item.name, item.extra, item.steps), ("mid", 6, "1,2"))

    def test_noUpgrader(self) -> None:
        """
        An old version with items and no upgrader fails at open with
        NoUpgradePathAvailable.
        """
        path = FilePath(self.mktemp())
        axiomStore(path, [("test_upgrade_nopath", MODULE, 1, [intAttr("value")])], [(0, 1, [1])])
        self.assertRaises(errors.NoUpgradePathAvailable, Store, path)

    def test_emptyOldTable(self) -> None:
        """
        An old version with no items needs no upgrader.
        """
        s = self.open([("test_upgrade_nopath", MODULE, 1, [intAttr("value")])], [])
        self.assertEqual(s.count(NoPath), 0)

    def test_schemaRequired(self) -> None:
        """
        An intermediate version with no declared schema fails at open.
        """
        path = FilePath(self.mktemp())
        axiomStore(path, [("test_upgrade_needsschema", MODULE, 1, [intAttr("value")])], [(0, 1, [1])])
        self.assertRaises(errors.NoUpgradePathAvailable, Store, path)

    def test_newerDatabase(self) -> None:
        """
        A database newer than the code fails at open with RuntimeError.
        """
        path = FilePath(self.mktemp())
        axiomStore(path, [("test_upgrade_oldercode", MODULE, 2, [intAttr("value")])], [])
        self.assertRaises(RuntimeError, Store, path)

    def test_schemaDrift(self) -> None:
        """
        A schema change without a version bump fails at open, showing both
        schemas.
        """
        path = FilePath(self.mktemp())
        axiomStore(path, [("test_upgrade_drifted", MODULE, 1, [intAttr("value")])], [])
        e = self.assertRaises(RuntimeError, Store, path)
        self.assertIn("on disk", str(e))
        self.assertIn("TEXT COLLATE NOCASE", str(e))

    def test_newIndex(self) -> None:
        """
        An index added without a version bump is created at open.
        """
        s = self.open(
            [("test_upgrade_indexed", MODULE, 1, [intAttr("value", True)])], [(0, 1, [3])], withIndexes=False
        )
        names = {r[0] for r in s._cursor.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        self.assertIn("axiomidx_test_upgrade_indexed_v1_value", names)

    def test_attributeCopying(self) -> None:
        """
        The attribute-copying upgrader copies by name and runs postCopy.
        """
        s = self.open([("test_upgrade_copied", MODULE, 1, [intAttr("value")])], [(0, 1, [4])])
        item = s.findUnique(Copied)
        self.assertEqual((item.storeID, item.value, item.added), (1, 4, 8))

    def test_attributeRemoved(self) -> None:
        """
        Copying an attribute the new version lacks fails (AttributeError,
        wrapped in ItemUpgradeError) and the store does not open.
        """
        path = FilePath(self.mktemp())
        axiomStore(
            path, [("test_upgrade_shrunk", MODULE, 1, [intAttr("gone"), intAttr("value")])], [(0, 1, [1, 2])]
        )
        e = self.assertRaises(errors.ItemUpgradeError, Store, path)
        self.assertIsInstance(e.originalFailure.value, AttributeError)

    def test_deletion(self) -> None:
        """
        The deletion upgrader deletes old items.
        """
        s = self.open([("test_upgrade_doomed", MODULE, 1, [intAttr("value")])], [(0, 1, [1]), (0, 2, [2])])
        self.assertEqual(s.count(Doomed), 0)
        self.assertIsNone(s.getItemByID(1, None))
        self.assertGreater(Doomed(store=s).storeID, 2)

    def test_referencesAndCreatedItems(self) -> None:
        """
        A reference to an upgraded item reads the new version; references to
        items created inside an upgrader survive.
        """
        s = self.open(
            [
                ("test_upgrade_holder", MODULE, 1, [("target", "INTEGER", "reference", True)]),
                ("test_upgrade_target", MODULE, 1, [textAttr("name")]),
            ],
            [(1, 1, ["t"]), (0, 2, [1])],
        )
        holder = s.findUnique(Holder)
        self.assertIsInstance(holder.target, Target)
        self.assertEqual(holder.target.storeID, 1)
        self.assertEqual(holder.target.made.label, "made for t")

    def test_explicitLoadUpgrades(self) -> None:
        """
        An upgrader that loads another legacy item gets it upgraded.
        """
        s = self.open(
            [
                ("test_upgrade_asking", MODULE, 1, [intAttr("other")]),
                ("test_upgrade_target", MODULE, 1, [textAttr("name")]),
            ],
            [(0, 1, [2]), (1, 2, ["x"])],
        )
        self.assertEqual(s.findUnique(Asking).otherType, "Target")

    def test_recursion(self) -> None:
        """
        An upgrader that asks for its own item raises UpgraderRecursion.
        """
        path = FilePath(self.mktemp())
        axiomStore(path, [("test_upgrade_recursive", MODULE, 1, [intAttr("value")])], [(0, 1, [1])])
        self.assertRaises(errors.UpgraderRecursion, Store, path)

    def test_failedOpenLeavesDataAlone(self) -> None:
        """
        A failed upgrade at open rolls everything back and releases the file.
        """
        path = FilePath(self.mktemp())
        axiomStore(path, [("test_upgrade_recursive", MODULE, 1, [intAttr("value")])], [(0, 1, [1])])
        self.assertRaises(errors.UpgraderRecursion, Store, path)
        self.assertRaises(errors.UpgraderRecursion, Store, path)
        conn = sqlite3.connect(path.child("db.sqlite").path)
        self.assertEqual(conn.execute("SELECT value FROM item_test_upgrade_recursive_v1").fetchall(), [(1,)])
        conn.close()


class OldNote(Item):
    """
    Version 2 of a note whose version 1 is written by the fixture harness.
    """

    typeName = "test_upgrade_fixture_note"
    schemaVersion = 2
    title = text()
    shouted = text()
    parent = reference()


_OldNoteV1 = declareLegacyItem(
    "test_upgrade_fixture_note", 1, {"title": text(), "parent": reference()}
)
registerUpgrader(
    lambda old: old.upgradeVersion(
        "test_upgrade_fixture_note", 1, 2, title=old.title, shouted=old.title.upper(), parent=old.parent
    ),
    "test_upgrade_fixture_note",
    1,
    2,
)


class FixtureHarnessTests(SynchronousTestCase):
    """
    L{fractal.testing.writeAxiomStore} writes stores at old versions.
    """

    def test_fixture(self) -> None:
        """
        Items written at version 1 (with a deleted row and references) are
        upgraded when the store opens, keeping storeIDs and references.
        """
        from fractal.store._fixtures import writeAxiomStore

        path = FilePath(self.mktemp())
        ids = writeAxiomStore(
            path,
            [(_OldNoteV1, {"title": "root"}), (None, {}), (_OldNoteV1, {"title": "child", "parent": 1})],
        )
        self.assertEqual(ids, [1, None, 3])
        s = Store(path)
        self.addCleanup(s.close)
        child = s.getItemByID(3)
        self.assertEqual((child.title, child.shouted), ("child", "CHILD"))
        self.assertIs(child.parent, s.getItemByID(1))
        self.assertIsNone(s.getItemByID(2, None))

    def test_unknownAttribute(self) -> None:
        """
        A value for an attribute the class lacks is refused.
        """
        from fractal.store._fixtures import writeAxiomStore

        self.assertRaises(
            AttributeError, writeAxiomStore, FilePath(self.mktemp()), [(_OldNoteV1, {"nope": 1})]
        )

# -*- test-case-name: tests.test_store_compat -*-
"""
Fixture stores for testing upgraders: write, with raw SQL, a store directory
holding items of old schema versions, laid out exactly as Axiom lays it out.

Axiom shipped tarballs of old stores for this; here the old schema is
described with L{fractal.store.item.declareLegacyItem} classes (or current
classes) and written directly::

    OldNote = declareLegacyItem("myapp_note", 1, {"title": text()})
    writeAxiomStore(FilePath(self.mktemp()), [(OldNote, {"title": "hello"})])
    store = Store(path)          # upgrades to the current version
"""

from __future__ import annotations

import sqlite3
from typing import Any, Sequence

from twisted.python.filepath import FilePath

from fractal.store.item import Item, _typeNameToMostRecentClass
from fractal.store.store import _BASE_SCHEMA, _indexesFor

__all__ = ["writeAxiomStore"]


def writeAxiomStore(
    dbdir: FilePath[str], items: Sequence[tuple[type[Item] | None, dict[str, Any]]]
) -> list[int | None]:
    """
    Write a new store directory at C{dbdir} holding the given items.

    @param items: C{(itemClass, values)} pairs, in storeID order (the first
        gets storeID 1).  C{itemClass} may be a legacy class from
        C{declareLegacyItem}; C{None} writes a deleted item's row.  Values are
        Python values, except that a reference is given as a storeID
        (C{int}, -1 for the store).  Missing attributes get their defaults.
    @return: the storeIDs, C{None} for deleted rows.
    @raise FileExistsError: if C{dbdir} exists.
    """
    if dbdir.exists():
        raise FileExistsError(dbdir.path)
    dbdir.makedirs()
    for name in ("files", "temp", "run"):
        dbdir.child(name).makedirs()
    conn = sqlite3.connect(dbdir.child("db.sqlite").path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        for sql in _BASE_SCHEMA:
            conn.execute(sql)
        typeIDs: dict[tuple[str, int], int] = {}
        storeIDs: list[int | None] = []
        for cls, values in items:
            if cls is None:
                conn.execute('INSERT INTO "axiom_objects" ("type_id") VALUES (-1)')
                storeIDs.append(None)
                continue
            key = (cls.typeName, cls.schemaVersion)
            typeID = typeIDs.get(key)
            if typeID is None:
                typeID = typeIDs[key] = _createType(conn, cls)
            row = []
            for name, attr in cls.getSchema():
                if name in values:
                    value = values[name]
                    if value is None or (attr._late and isinstance(value, int)):
                        row.append(value)
                    else:
                        row.append(attr.infilter(value, None, None))
                else:
                    row.append(attr._defaultDB())
            unknown = set(values) - {name for name, _ in cls.getSchema()}
            if unknown:
                raise AttributeError("%s has no attributes %s" % (cls.__name__, sorted(unknown)))
            cur = conn.execute('INSERT INTO "axiom_objects" ("type_id") VALUES (?)', (typeID,))
            storeID = cur.lastrowid
            conn.execute(cls._fInsertSQL, (storeID, *row))  # type: ignore[attr-defined]
            storeIDs.append(storeID)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return storeIDs


def _createType(conn: sqlite3.Connection, cls: type[Item]) -> int:
    columns = ["oid INTEGER PRIMARY KEY"] + [
        "\n%s %s" % (attr.columnName, attr.sqltype) for _, attr in cls.getSchema()
    ]
    conn.execute("CREATE TABLE %s (%s)" % (cls._fTable, ", ".join(columns)))
    module = cls.__module__
    if cls.__legacy__:
        current = _typeNameToMostRecentClass.get(cls.typeName)
        if current is not None:
            module = current.__module__
    cur = conn.execute(
        'INSERT INTO "axiom_types" ("typename", "module", "version") VALUES (?, ?, ?)',
        (cls.typeName, module, cls.schemaVersion),
    )
    typeID = cur.lastrowid
    assert typeID is not None
    for _, sql in _indexesFor(cls):
        conn.execute(sql)
    for offset, (name, attr) in enumerate(cls.getSchema()):
        conn.execute(
            'INSERT INTO "axiom_attributes" ("type_id", "row_offset", "indexed", "sqltype", '
            '"allow_none", "attribute", "docstring", "pythontype") VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
            (typeID, offset, attr.indexed, attr.sqltype, attr.allowNone, name, attr.doc, type(attr).__name__),
        )
    return typeID

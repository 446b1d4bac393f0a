"""
A helper for tests: store directories written the way Axiom lays them out,
with raw SQL and nothing from L{fractal.store}.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.python.filepath import FilePath

__all__ = ["_AxiomDatabase"]

_AXIOM_BASE = [
    "CREATE TABLE axiom_objects (oid INTEGER PRIMARY KEY AUTOINCREMENT, type_id INTEGER NOT NULL)",
    "CREATE INDEX axiom_objects_type_idx ON axiom_objects(type_id)",
    "CREATE TABLE axiom_types (oid INTEGER PRIMARY KEY AUTOINCREMENT, typename VARCHAR, "
    "module VARCHAR, version INTEGER)",
    "CREATE TABLE axiom_attributes (type_id INTEGER, row_offset INTEGER, indexed BOOLEAN, "
    "sqltype VARCHAR, allow_none BOOLEAN, pythontype VARCHAR, attribute VARCHAR, docstring TEXT)",
]


class _AxiomDatabase:
    """
    Writes a store directory the way Axiom lays it out, with raw SQL.
    """

    def __init__(self, dbdir: FilePath[str]) -> None:
        for name in "files", "temp", "run":
            dbdir.child(name).makedirs()
        self.db = sqlite3.connect(dbdir.child("db.sqlite").path)
        for sql in _AXIOM_BASE:
            self.db.execute(sql)
        self.types: dict[str, tuple[int, str, list[str]]] = {}

    def declare(
        self, typeName: str, module: str, version: int, attrs: list[tuple[str, str, str]]
    ) -> None:
        """
        Declare a type with (name, sqltype, pythontype) attributes, sorted by
        name.
        """
        typeID = self.db.execute(
            "INSERT INTO axiom_types (typename, module, version) VALUES (?, ?, ?)",
            (typeName, module, version),
        ).lastrowid
        assert typeID is not None
        table = f"item_{typeName}_v{version}"
        columns = ", ".join(["oid INTEGER PRIMARY KEY"] + [f"[{n}] {t}" for n, t, _ in attrs])
        self.db.execute(f"CREATE TABLE {table} ({columns})")
        for offset, (name, sqltype, pythontype) in enumerate(attrs):
            self.db.execute(
                "INSERT INTO axiom_attributes VALUES (?, ?, 0, ?, 1, ?, ?, '')",
                (typeID, offset, sqltype, pythontype, name),
            )
        self.types[typeName] = (typeID, table, [n for n, _, _ in attrs])

    def insert(self, typeName: str, **values: Any) -> int:
        """
        Insert an item; return its storeID.
        """
        typeID, table, names = self.types[typeName]
        oid = self.db.execute("INSERT INTO axiom_objects (type_id) VALUES (?)", (typeID,)).lastrowid
        assert oid is not None
        self.db.execute(
            f"INSERT INTO {table} VALUES ({', '.join('?' * (len(names) + 1))})",
            (oid, *[values[n] for n in names]),
        )
        return oid

    def close(self) -> None:
        self.db.commit()
        self.db.close()

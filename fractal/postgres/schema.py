# -*- test-case-name: tests.test_postgres_schema -*-
"""
The cluster's tables in PostgreSQL, versioned, and C{fractal db init}.

The schema holds:

    - C{schema_version}: one row per applied version of this schema;
    - C{cluster}: one row, the cluster's slot count and the version of its
      shard map, bumped by every change of ownership;
    - C{nodes}: every node that ever registered: its addresses, its
      incarnation (bumped at each registration), the end of its lease on the
      clock of the cluster, and its state (C{live}, C{dead} once its lease
      ran out, C{gone} after a graceful stop);
    - C{slot_owners}: for every slot, the owning node, the epoch of the
      ownership and, during a handoff, the node it is being handed to;
    - C{store_fences}: for every store, the highest epoch stored or fenced;
    - C{records}: the durable records, one row each.

L{initSchema} creates what is missing and records the version; running it
again changes nothing.  A database whose schema is newer than this code is
refused rather than touched.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import psycopg
from psycopg import sql
from twisted.python import usage

from fractal._cli import CommandOptions
from fractal.postgres.connection import DEFAULT_SCHEMA, Database, checkSchemaName

__all__ = [
    "SCHEMA_VERSION",
    "SchemaError",
    "initSchema",
    "schemaVersion",
    "requireSchema",
    "DbOptions",
]


class SchemaError(Exception):
    """
    The database's schema cannot be used by this version of txfractal.
    """


_MIGRATIONS: Sequence[tuple[int, Sequence[str]]] = [
    (
        1,
        [
            """
            CREATE TABLE cluster (
                id integer PRIMARY KEY CHECK (id = 1),
                slots integer NOT NULL CHECK (slots > 0),
                map_version bigint NOT NULL DEFAULT 0
            )
            """,
            """
            CREATE TABLE nodes (
                node text PRIMARY KEY,
                client text NOT NULL,
                peer text,
                incarnation bigint NOT NULL,
                lease_expires double precision NOT NULL,
                state text NOT NULL CHECK (state IN ('live', 'dead', 'gone'))
            )
            """,
            """
            CREATE TABLE slot_owners (
                slot integer PRIMARY KEY CHECK (slot >= 0),
                node text NOT NULL REFERENCES nodes (node),
                epoch bigint NOT NULL CHECK (epoch >= 1),
                target text REFERENCES nodes (node)
            )
            """,
            """
            CREATE TABLE store_fences (
                store text PRIMARY KEY CHECK (store ~ '^[0-9a-f]{64}$'),
                epoch bigint NOT NULL CHECK (epoch >= 0)
            )
            """,
            """
            CREATE TABLE records (
                store text NOT NULL REFERENCES store_fences (store),
                seq bigint NOT NULL CHECK (seq >= 1),
                base_seq bigint NOT NULL CHECK (base_seq >= 0 AND base_seq < seq),
                epoch bigint NOT NULL CHECK (epoch >= 0),
                digest bytea NOT NULL,
                data bytea NOT NULL,
                PRIMARY KEY (store, seq)
            )
            """,
        ],
    ),
]
"""
Each version of the schema and the statements that bring the version before
it up to it.  Never edit a published version: add the next one.
"""

SCHEMA_VERSION = _MIGRATIONS[-1][0]
"""
The schema version this code reads and writes.
"""


def _exists(cursor: psycopg.Cursor[Any], schema: str) -> bool:
    cursor.execute(
        "SELECT 1 FROM information_schema.tables "
        "WHERE table_schema = %s AND table_name = 'schema_version'",
        (schema,),
    )
    return cursor.fetchone() is not None


def schemaVersion(database: Database) -> int:
    """
    The version of the schema in the database, C{0} if it has none.
    Blocking.
    """

    def read(cursor: psycopg.Cursor[Any]) -> int:
        if not _exists(cursor, database.schema):
            return 0
        cursor.execute("SELECT coalesce(max(version), 0) FROM schema_version")
        row = cursor.fetchone()
        return int(row[0]) if row else 0

    return database.transactBlocking(read)


def requireSchema(database: Database) -> None:
    """
    Check that the database holds exactly the schema this code uses.
    Blocking.

    @raise SchemaError: if it does not, saying what to do.
    """
    version = schemaVersion(database)
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"the PostgreSQL schema {database.schema!r} is at version {version}, "
            f"this txfractal needs version {SCHEMA_VERSION}; "
            f"run 'fractal db init --postgres DSN --schema {database.schema}'"
            if version < SCHEMA_VERSION
            else f"the PostgreSQL schema {database.schema!r} is at version {version}, "
            f"newer than this txfractal's {SCHEMA_VERSION}; upgrade txfractal"
        )


def initSchema(database: Database) -> list[int]:
    """
    Create or upgrade the schema, in one transaction.  Blocking.

    Concurrent calls (several nodes' operators at once) are serialised by an
    advisory lock; the second finds nothing to do.

    @return: the versions applied now, empty if the schema was current.
    @raise SchemaError: if the database's schema is newer than this code.
    """

    def init(cursor: psycopg.Cursor[Any]) -> list[int]:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (database.advisoryKey("schema"),))
        cursor.execute(
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(database.schema))
        )
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cursor.execute("SELECT coalesce(max(version), 0) FROM schema_version")
        row = cursor.fetchone()
        current = int(row[0]) if row else 0
        if current > SCHEMA_VERSION:
            raise SchemaError(
                f"the PostgreSQL schema {database.schema!r} is at version {current}, "
                f"newer than this txfractal's {SCHEMA_VERSION}; upgrade txfractal"
            )
        applied = []
        for version, statements in _MIGRATIONS:
            if version <= current:
                continue
            for statement in statements:
                cursor.execute(statement)
            cursor.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
            applied.append(version)
        return applied

    return database.transactBlocking(init)


class _InitOptions(usage.Options):
    """
    C{fractal db init}: create or upgrade the cluster's tables.
    """

    synopsis = "--postgres DSN [--schema NAME]"
    longdesc = (
        "Create the tables of a self-running cluster in the schema, or upgrade them "
        "to this version's; run again, it changes nothing."
    )

    optParameters = [
        ["postgres", None, None, "The libpq connection string of the database."],
        ["schema", None, DEFAULT_SCHEMA, "The PostgreSQL schema to hold the tables."],
    ]

    def postOptions(self) -> None:
        if not self["postgres"]:
            raise usage.UsageError("--postgres DSN is required")
        try:
            checkSchemaName(self["schema"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def run(self) -> int:
        """
        Initialise the schema and say what was done.

        @return: the exit status.
        """
        database = Database(self["postgres"], self["schema"])
        try:
            applied = initSchema(database)
        except (psycopg.Error, SchemaError) as e:
            print(f"fractal db init: {e}", file=sys.stderr)
            return 1
        finally:
            database.close()
        if applied:
            versions = ", ".join(str(v) for v in applied)
            print(f"schema {database.schema!r}: applied version {versions}")
        else:
            print(f"schema {database.schema!r}: already at version {SCHEMA_VERSION}")
        return 0


class DbOptions(CommandOptions):
    """
    C{fractal db}: the PostgreSQL database of a self-running cluster.
    """

    synopsis = "init --postgres DSN [--schema NAME]"
    subCommands = [
        ["init", None, _InitOptions, "Create or upgrade the cluster's tables (idempotent)."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("a command is required: init")

    def run(self) -> int:
        """
        Run the chosen command.

        @return: its exit status.
        """
        status: int = self.subOptions.run()
        return status

"""
Tests for L{fractal.postgres.schema} and L{fractal.postgres.connection},
against a real PostgreSQL server (see L{tests._postgres}).
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

import psycopg
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from fractal._cli import main
from fractal.durable._threads import runSynchronously
from fractal.postgres.connection import Database, checkSchemaName
from fractal.postgres.schema import (
    SCHEMA_VERSION,
    SchemaError,
    initSchema,
    requireSchema,
    schemaVersion,
)
from tests._postgres import makeDatabase, postgresDSN


class SchemaTests(SynchronousTestCase):
    """
    Creating and checking the cluster's tables.
    """

    def test_initIdempotent(self) -> None:
        """
        The first L{initSchema} applies every version and creates the tables;
        a second applies nothing and leaves one row per version.
        """
        database = makeDatabase(self, init=False)
        self.assertEqual(schemaVersion(database), 0)
        self.assertEqual(initSchema(database), list(range(1, SCHEMA_VERSION + 1)))
        self.assertEqual(initSchema(database), [])
        self.assertEqual(schemaVersion(database), SCHEMA_VERSION)

        def tables(cursor: Any) -> list[str]:
            cursor.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = %s ORDER BY table_name",
                (database.schema,),
            )
            return [row[0] for row in cursor.fetchall()]

        self.assertEqual(
            database.transactBlocking(tables),
            ["cluster", "nodes", "records", "schema_version", "slot_owners", "store_fences"],
        )

        def versions(cursor: Any) -> list[int]:
            cursor.execute("SELECT version FROM schema_version ORDER BY version")
            return [row[0] for row in cursor.fetchall()]

        self.assertEqual(database.transactBlocking(versions), list(range(1, SCHEMA_VERSION + 1)))

    def test_requireSchema(self) -> None:
        """
        L{requireSchema} refuses a database without the schema, naming the
        command that creates it, and accepts it once initialised.
        """
        database = makeDatabase(self, init=False)
        error = self.assertRaises(SchemaError, requireSchema, database)
        self.assertIn("fractal db init", str(error))
        initSchema(database)
        requireSchema(database)

    def test_newerRefused(self) -> None:
        """
        A schema newer than the code is refused by both L{initSchema} and
        L{requireSchema}, and left as it is.
        """
        database = makeDatabase(self)
        database.transactBlocking(
            lambda c: c.execute(
                "INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,)
            )
        )
        self.assertIn("upgrade txfractal", str(self.assertRaises(SchemaError, initSchema, database)))
        self.assertRaises(SchemaError, requireSchema, database)
        self.assertEqual(schemaVersion(database), SCHEMA_VERSION + 1)

    def test_schemasIsolated(self) -> None:
        """
        Two schemas in one database each have their own tables.
        """
        one = makeDatabase(self)
        two = makeDatabase(self, init=False)
        self.assertEqual(schemaVersion(one), SCHEMA_VERSION)
        self.assertEqual(schemaVersion(two), 0)

    def test_commandInit(self) -> None:
        """
        C{fractal db init --postgres DSN --schema NAME} creates the schema and
        exits 0, and says so; run again, it says the schema is current.
        """
        database = makeDatabase(self, init=False)
        argv = ["db", "init", "--postgres", postgresDSN(), "--schema", database.schema]
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(main(argv), 0)
        self.assertIn("applied version", out.getvalue())
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(main(argv), 0)
        self.assertIn(f"already at version {SCHEMA_VERSION}", out.getvalue())
        self.assertEqual(schemaVersion(database), SCHEMA_VERSION)

    def test_commandErrors(self) -> None:
        """
        C{fractal db init} without a DSN, or with a bad schema name, is a
        usage error (status 2); an unreachable server is status 1 with the
        reason.
        """
        err = io.StringIO()
        with redirect_stderr(err):
            self.assertEqual(main(["db", "init"]), 2)
            self.assertEqual(
                main(["db", "init", "--postgres", "dbname=x", "--schema", "Bad;Name"]), 2
            )
            self.assertEqual(
                main(
                    ["db", "init", "--postgres",
                     "host=127.0.0.1 port=1 dbname=x user=x connect_timeout=1"]
                ),
                1,
            )
        self.assertIn("fractal db init:", err.getvalue())


class DatabaseTests(SynchronousTestCase):
    """
    The connection layer.
    """

    def test_schemaName(self) -> None:
        """
        Schema names are plain identifiers; anything else is a L{ValueError}.
        """
        self.assertEqual(checkSchemaName("fractal_1"), "fractal_1")
        for bad in ["", "Fractal", "1x", "a-b", 'x"; drop', "a" * 41, None]:
            self.assertRaises(ValueError, checkSchemaName, bad)
            self.assertRaises(ValueError, Database, "dbname=x", bad)  # type: ignore[arg-type]

    def test_rollbackOnError(self) -> None:
        """
        A transaction whose function raises is rolled back and its error
        delivered; the connection is reused afterwards.
        """
        database = makeDatabase(self)

        def insertThenFail(cursor: Any) -> None:
            cursor.execute("INSERT INTO store_fences (store, epoch) VALUES (%s, 1)", ("a" * 64,))
            raise KeyError("boom")

        self.failureResultOf(database.transact(insertThenFail), KeyError)

        def count(cursor: Any) -> int:
            cursor.execute("SELECT count(*) FROM store_fences")
            return int(cursor.fetchone()[0])

        self.assertEqual(self.successResultOf(database.transact(count)), 0)

    def test_sqlErrorDelivered(self) -> None:
        """
        A failing statement fails the L{Deferred} with psycopg's error and
        leaves the layer usable.
        """
        database = makeDatabase(self)
        d: Deferred[Any] = database.transact(lambda c: c.execute("SELECT * FROM no_such_table"))
        self.failureResultOf(d, psycopg.errors.UndefinedTable)
        self.assertEqual(
            self.successResultOf(database.transact(lambda c: c.execute("SELECT 1").fetchone())),
            (1,),
        )

    def test_pausedTransactionEnded(self) -> None:
        """
        With C{idleTransactionTimeout}, a session that waits inside a
        transaction longer than that (its process paused) is ended by the
        server: its row lock, which another session waits for, is released
        and its uncommitted write discarded.
        """
        database = makeDatabase(self)
        paused = Database(
            postgresDSN(), database.schema, runSynchronously, idleTransactionTimeout=0.5
        )
        self.addCleanup(paused.close)
        database.transactBlocking(
            lambda c: c.execute(
                "INSERT INTO store_fences (store, epoch) VALUES (%s, 1)", ("a" * 64,)
            )
        )
        held = paused.connect()
        self.addCleanup(held.close)
        held.execute("BEGIN")
        held.execute("UPDATE store_fences SET epoch = 7 WHERE store = %s", ("a" * 64,))
        waiter = database.connect()
        self.addCleanup(waiter.close)
        # Without the timeout this would wait out the lock timeout and fail.
        waiter.execute("SET lock_timeout = '60s'")
        row = waiter.execute(
            "SELECT epoch FROM store_fences WHERE store = %s FOR UPDATE", ("a" * 64,)
        ).fetchone()
        self.assertEqual(row, (1,))
        self.assertRaises(
            psycopg.errors.IdleInTransactionSessionTimeout, held.execute, "SELECT 1"
        )
        self.assertTrue(held.closed)

    def test_unreachable(self) -> None:
        """
        A server that cannot be reached fails the L{Deferred} with
        L{psycopg.OperationalError}.
        """
        database = Database(
            "host=127.0.0.1 port=1 dbname=x user=x", "x", runSynchronously, connectTimeout=1
        )
        self.failureResultOf(database.transact(lambda c: None), psycopg.OperationalError)

    def test_advisoryKeyPerSchema(self) -> None:
        """
        Advisory lock keys differ between schemas and purposes, and fit in a
        signed 64-bit integer.
        """
        a = Database("dbname=x", "a", runSynchronously)
        b = Database("dbname=x", "b", runSynchronously)
        keys = {a.advisoryKey("x"), a.advisoryKey("y"), b.advisoryKey("x")}
        self.assertEqual(len(keys), 3)
        for key in keys:
            self.assertTrue(-(2**63) <= key < 2**63)

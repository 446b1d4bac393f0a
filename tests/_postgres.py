"""
Finding a real PostgreSQL server for the tests, and giving each test a schema
of its own.

In order: the DSN in C{FRACTAL_TEST_POSTGRES}; the machine's server at
C{host=127.0.0.1 port=5432 dbname=test user=postgres}; a private throwaway
server started with C{initdb}/C{pg_ctl} in a temporary directory (stopped when
the test process exits).  With none of these, the tests skip and say why.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from typing import Any, Callable

from twisted.trial.unittest import SkipTest

from tests._ports import freePort

__all__ = ["postgresDSN", "makeDatabase", "dropSchema"]

_MACHINE_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres connect_timeout=3"

_found: tuple[str | None, str] | None = None


def _connects(dsn: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def _privateServer() -> tuple[str | None, str]:
    initdb, pgctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is None or pgctl is None:
        return None, "no PostgreSQL: FRACTAL_TEST_POSTGRES is unset, 127.0.0.1:5432 " \
            "does not answer, and initdb/pg_ctl are not on PATH"
    base = tempfile.mkdtemp(prefix="fractal-pg-")
    data = os.path.join(base, "data")
    run: Callable[[list[str]], Any] = lambda argv: subprocess.run(  # noqa: E731
        argv, check=True, capture_output=True, timeout=120
    )
    if os.geteuid() == 0:
        # initdb refuses to run as root: run the server as an ordinary user.
        try:
            user = pwd.getpwnam("postgres").pw_name
        except KeyError:
            return None, "no PostgreSQL: running as root and there is no 'postgres' user"
        os.chown(base, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        wrap = ["runuser", "-u", user, "--"]
    else:
        wrap = []
    port = freePort()
    try:
        run(wrap + [initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        run(
            wrap
            + [
                pgctl, "-D", data, "-l", os.path.join(base, "log"), "-w", "-o",
                f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off",
                "start",
            ]
        )
    except (subprocess.SubprocessError, OSError) as e:
        return None, f"no PostgreSQL: starting a private server failed: {e}"

    def stop() -> None:
        subprocess.run(wrap + [pgctl, "-D", data, "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)

    atexit.register(stop)
    dsn = f"host=127.0.0.1 port={port} dbname=postgres user=postgres"
    return dsn, "private server"


def postgresDSN() -> str:
    """
    The DSN of a PostgreSQL server for the tests.

    @raise SkipTest: if there is none, saying why.
    """
    global _found
    if _found is None:
        env = os.environ.get("FRACTAL_TEST_POSTGRES")
        if env:
            _found = (env, "FRACTAL_TEST_POSTGRES")
        elif _connects(_MACHINE_DSN):
            _found = (_MACHINE_DSN, "machine server")
        else:
            _found = _privateServer()
    dsn, reason = _found
    if dsn is None:
        raise SkipTest(reason)
    return dsn


def dropSchema(dsn: str, schema: str) -> None:
    """
    Drop C{schema} and everything in it.
    """
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def makeDatabase(testCase: Any, runInThread: Any = None, init: bool = True) -> Any:
    """
    A L{fractal.postgres.connection.Database} on a fresh schema of its own,
    initialised unless C{init} is false, dropped when C{testCase} ends.

    @param testCase: the running test, for its cleanups.
    @param runInThread: the runner; synchronous by default.
    """
    from fractal.durable._threads import runSynchronously
    from fractal.postgres.connection import Database
    from fractal.postgres.schema import initSchema

    dsn = postgresDSN()
    schema = "t_" + uuid.uuid4().hex[:24]
    database = Database(dsn, schema, runInThread if runInThread is not None else runSynchronously)
    testCase.addCleanup(dropSchema, dsn, schema)
    testCase.addCleanup(database.close)
    if init:
        initSchema(database)
    return database

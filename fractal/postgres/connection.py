# -*- test-case-name: tests.test_postgres_schema -*-
"""
The one connection layer to PostgreSQL, on one DSN.

Every query runs in a transaction of its own, in a thread of an injected
runner (the reactor's thread pool through
L{twisted.internet.threads.deferToThreadPool} by default), on a connection
taken from a small pool of idle connections; the reactor thread never waits
for the database.  Tests inject a synchronous runner, so the same code runs
deterministically, one step at a time, against a real server.

All of a cluster's tables live in one PostgreSQL schema (C{fractal} by
default); every connection's C{search_path} is set to it, so several clusters,
or several test runs, can share one database without seeing each other.

Notifications (C{LISTEN}/C{NOTIFY}) come in on a dedicated connection whose
socket the reactor watches (L{NotificationListener}); reading them never
blocks.
"""

from __future__ import annotations

import hashlib
import re
import threading
from typing import Any, Callable, TypeVar

import psycopg
from psycopg import sql
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from fractal.durable._threads import RunInThread, reactorThreads

__all__ = [
    "DEFAULT_SCHEMA",
    "Database",
    "NotificationListener",
    "checkSchemaName",
]

T = TypeVar("T")

DEFAULT_SCHEMA = "fractal"
"""
The PostgreSQL schema a cluster's tables live in unless told otherwise.
"""

_SCHEMA_NAME = re.compile(r"\A[a-z_][a-z0-9_]{0,39}\Z")


def checkSchemaName(name: object) -> str:
    """
    Check that C{name} can name a cluster's schema: 1 to 40 lowercase ASCII
    letters, digits or C{_}, not starting with a digit (so the notification
    channel derived from it stays a plain identifier).

    @return: C{name}.
    @raise ValueError: if it cannot.
    """
    if not isinstance(name, str) or _SCHEMA_NAME.match(name) is None:
        raise ValueError(
            f"schema name {name!r:.60} is not 1-40 lowercase letters, digits or '_' "
            "starting with a letter or '_'"
        )
    return name


class Database:
    """
    Transactions on one PostgreSQL database and schema, run off the reactor
    thread.

    @ivar dsn: the libpq connection string.
    @ivar schema: the schema holding the cluster's tables.
    """

    log = Logger()

    def __init__(
        self,
        dsn: str,
        schema: str = DEFAULT_SCHEMA,
        runInThread: RunInThread | None = None,
        maxIdle: int = 4,
        connectTimeout: float = 5.0,
        idleTransactionTimeout: float | None = None,
    ) -> None:
        """
        @param dsn: a libpq connection string, for example
            C{"host=127.0.0.1 dbname=fractal user=fractal"}.
        @param schema: the schema holding the tables (see L{checkSchemaName}).
        @param runInThread: runs each blocking transaction; the global
            reactor's thread pool by default.
        @param maxIdle: the most idle connections kept for reuse.
        @param connectTimeout: seconds a new connection may take.
        @param idleTransactionTimeout: when given, the server ends a session
            of this layer that waits this many seconds inside a transaction
            (C{idle_in_transaction_session_timeout}), so that a client process
            paused or hung mid-transaction (SIGSTOP, a frozen VM) does not
            keep its row locks, and with them the rest of the cluster,
            waiting for it; L{None} for the server's setting.
        @raise ValueError: for a malformed schema name.
        """
        self.dsn = dsn
        self.schema = checkSchemaName(schema)
        self._run = runInThread if runInThread is not None else reactorThreads()
        self._maxIdle = maxIdle
        self._connectTimeout = connectTimeout
        self._idleTransactionTimeout = idleTransactionTimeout
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def channel(self) -> str:
        """
        The notification channel of this schema's shard map changes.
        """
        return f"{self.schema}_map"

    def advisoryKey(self, purpose: str) -> int:
        """
        A 64-bit advisory lock key for C{purpose}, distinct per schema (advisory
        locks are shared by the whole database).
        """
        digest = hashlib.sha256(f"fractal\x00{self.schema}\x00{purpose}".encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True)

    def connect(self) -> psycopg.Connection[Any]:
        """
        Open a new connection in autocommit mode with the schema on its
        C{search_path}.  Blocking: call it only from a worker thread.
        """
        connection = psycopg.connect(
            self.dsn, autocommit=True, connect_timeout=max(1, int(self._connectTimeout))
        )
        try:
            connection.execute(
                sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema))
            )
            if self._idleTransactionTimeout is not None:
                connection.execute(
                    sql.SQL("SET idle_in_transaction_session_timeout = {}").format(
                        sql.Literal(max(1, int(self._idleTransactionTimeout * 1000)))
                    )
                )
        except BaseException:
            connection.close()
            raise
        return connection

    def _take(self) -> psycopg.Connection[Any]:
        with self._lock:
            while self._idle:
                connection = self._idle.pop()
                if not connection.closed:
                    return connection
        return self.connect()

    def _give(self, connection: psycopg.Connection[Any]) -> None:
        healthy = (
            not connection.closed
            and connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        )
        with self._lock:
            if healthy and not self._closed and len(self._idle) < self._maxIdle:
                self._idle.append(connection)
                return
        connection.close()

    def transactBlocking(self, f: Callable[[psycopg.Cursor[Any]], T]) -> T:
        """
        Run C{f(cursor)} in one transaction, in the calling thread: committed
        if C{f} returns, rolled back if it raises.  Only for worker threads,
        offline tools and set-up before the reactor runs.

        @return: what C{f} returned.
        """
        connection = self._take()
        try:
            with connection.transaction():
                with connection.cursor() as cursor:
                    result = f(cursor)
        except (
            psycopg.OperationalError,
            psycopg.InterfaceError,
            psycopg.errors.IdleInTransactionSessionTimeout,
        ):
            connection.close()
            raise
        except BaseException:
            self._give(connection)
            raise
        self._give(connection)
        return result

    def transact(self, f: Callable[[psycopg.Cursor[Any]], T]) -> Deferred[T]:
        """
        Run C{f(cursor)} in one transaction in a worker thread.

        @return: fires with what C{f} returned once committed; fails with what
            it raised (after a rollback), or with a L{psycopg.Error}.
        """
        d: Deferred[T] = self._run(lambda: self.transactBlocking(f))
        return d

    def listen(
        self, reactor: IReactorFDSet, callback: Callable[[str], None]
    ) -> Deferred[NotificationListener]:
        """
        Listen on this schema's L{channel} with a dedicated connection.

        @param reactor: the reactor that watches the connection's socket.
        @param callback: called in the reactor thread with each notification's
            payload.
        @return: fires with the listening L{NotificationListener}, already
            added to C{reactor}'s readers.
        """

        def connect() -> psycopg.Connection[Any]:
            connection = self.connect()
            try:
                connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            except BaseException:
                connection.close()
                raise
            return connection

        def listening(connection: psycopg.Connection[Any]) -> NotificationListener:
            listener = NotificationListener(reactor, connection, callback)
            reactor.addReader(listener)
            return listener

        d: Deferred[psycopg.Connection[Any]] = self._run(connect)
        return d.addCallback(listening)

    def closeIdle(self) -> None:
        """
        Close the idle connections; later transactions open new ones.
        """
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def close(self) -> None:
        """
        Close the idle connections, and connections in use when they are
        given back.
        """
        with self._lock:
            self._closed = True
        self.closeIdle()


@implementer(IReadDescriptor)
class NotificationListener:
    """
    A connection that has run C{LISTEN}, watched by the reactor: each
    notification's payload goes to a callback.

    @ivar lost: whether the connection has failed or been stopped; a lost
        listener delivers nothing more.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorFDSet,
        connection: psycopg.Connection[Any],
        callback: Callable[[str], None],
    ) -> None:
        self._reactor = reactor
        self._connection = connection
        self._callback = callback
        self._fileno = connection.fileno()
        self.lost = False

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return "PostgresNotificationListener"

    def doRead(self) -> None:
        """
        Take in what the server sent and deliver every complete notification.
        """
        if self.lost:
            return
        pgconn = self._connection.pgconn
        try:
            pgconn.consume_input()
        except psycopg.Error as e:
            self.log.warn("Lost the notification connection: {error}", error=str(e))
            self.stop()
            return
        while True:
            notification = pgconn.notifies()
            if notification is None:
                break
            try:
                self._callback(notification.extra.decode("utf-8", "replace"))
            except Exception:
                self.log.failure("Notification callback failed")

    def connectionLost(self, reason: Failure) -> None:
        self.stop()

    def stop(self) -> None:
        """
        Stop watching the socket and close the connection.
        """
        if self.lost:
            return
        self.lost = True
        self._reactor.removeReader(self)
        self._connection.close()

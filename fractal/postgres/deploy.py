# -*- test-case-name: tests.test_postgres_deploy -*-
"""
Running a node on PostgreSQL: the topology and the durable backend on one
DSN, and the glue between them and the node's store pool and shipper.

    - L{openCluster} checks the schema and registers the node (blocking, at
      start-up, before the reactor runs), so the node has its shard map before
      it serves anything.
    - L{servePostgres} makes the topology a service of the node and gives it
      the node's hooks: before a slot is given up (its calls go elsewhere
      already), the calls running on its stores finish, then its stores are
      closed, each shipped first, and only then does the slot move; before a
      gained slot is served, the node's old local copies of its stores are
      moved aside into C{DATA/stale/}, so the stores are restored from their
      durable chains on their first call.  Stale stores are deleted once
      older than C{staleKeep} or beyond the newest C{staleMax}
      (L{pruneStale}), at start-up and after each set-aside.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool

from fractal.durable._threads import RunInThread, reactorThreads
from fractal.keys import DEFAULT_SLOTS, storeNameForKey
from fractal.postgres.backend import PostgresBackend, slotOfStore
from fractal.postgres.connection import DEFAULT_SCHEMA, Database
from fractal.postgres.schema import requireSchema
from fractal.postgres.topology import DEFAULT_LEASE, PostgresTopology
from fractal.routing.interfaces import NodeAddress

__all__ = [
    "DEFAULT_HANDOFF_DRAIN",
    "DEFAULT_STALE_KEEP",
    "DEFAULT_STALE_MAX",
    "HandoffNotDrained",
    "POSTGRES_THREADS",
    "PostgresCluster",
    "openCluster",
    "pruneStale",
    "servePostgres",
    "setAsideStores",
]

_log = Logger(namespace="fractal.postgres.deploy")


@frozen
class PostgresCluster:
    """
    A node's view of a cluster that runs on PostgreSQL.

    @ivar database: the topology's connection layer on the cluster's DSN
        (the backend has its own, C{backend.database}).
    @ivar topology: the node's L{PostgresTopology}, registered.
    @ivar backend: the L{PostgresBackend} for the node's shipper.
    """

    database: Database
    topology: PostgresTopology
    backend: PostgresBackend


def openCluster(
    reactor: Any,
    dsn: str,
    address: NodeAddress,
    schema: str = DEFAULT_SCHEMA,
    slots: int = DEFAULT_SLOTS,
    lease: float = DEFAULT_LEASE,
    runInThread: RunInThread | None = None,
) -> PostgresCluster:
    """
    Check the cluster's schema and register this node.  Blocking: call it
    before the reactor runs.

    @param reactor: the reactor: thread pool, clock and notifications.
    @param dsn: the database's libpq connection string.
    @param address: this node's id and addresses.
    @param schema: the PostgreSQL schema of the cluster.
    @param slots: the cluster's slot count.
    @param lease: seconds a membership lasts without a heartbeat.
    @param runInThread: runs the transactions; by default two thread pools
        of their own, started and stopped with the reactor: two threads for
        the topology (so a heartbeat always finds one free) and
        L{POSTGRES_THREADS} for the durable records, so that heartbeats never
        wait behind durable writes or the node's other blocking work.
    @raise fractal.postgres.schema.SchemaError: if the schema is missing or
        of another version.
    @raise psycopg.Error: if the database cannot be reached.
    @raise fractal.routing.topology.TopologyError: for a node that does not
        fit the cluster.
    """
    # Membership and the durable records each get their own connections and
    # threads: a heartbeat never waits behind a burst of durable writes.
    # A transaction left idle longer than a lease is a node not running (its
    # membership runs out meanwhile): the server ends it, so that its locks
    # never hold up the failover of its slots.
    database = Database(
        dsn,
        schema,
        runInThread if runInThread is not None else _ownThreads(reactor, 2),
        idleTransactionTimeout=lease,
    )
    records = Database(
        dsn,
        schema,
        runInThread if runInThread is not None else _ownThreads(reactor, POSTGRES_THREADS),
        idleTransactionTimeout=lease,
    )
    requireSchema(database)
    topology = PostgresTopology(
        database, address, reactor, reactor=reactor, slots=slots, lease=lease
    )
    topology.registerBlocking()
    # Connections opened before the reactor runs (and perhaps before twistd
    # forks) are not reused.
    database.closeIdle()
    return PostgresCluster(database, topology, PostgresBackend(records))


POSTGRES_THREADS = 4
"""
The size of the thread pool of a node's durable writes to PostgreSQL.
"""


def _ownThreads(reactor: Any, size: int) -> RunInThread:
    """
    A runner on a thread pool of its own, started when C{reactor} runs and
    stopped when it shuts down (after the node's services have stopped).
    """
    pool = ThreadPool(1, size, "fractal-postgres")
    reactor.callWhenRunning(pool.start)
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)

    def run(f: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(reactor, pool, f)

    return run


DEFAULT_HANDOFF_DRAIN = 10.0
"""
Seconds a handoff waits for the calls running on its slots to finish.  If
they have not by then, the handoff fails: the node serves the slots again
and hands them off at a later round, so a commit is never left behind the
final ship.
"""

DEFAULT_STALE_KEEP = 7 * 24 * 3600.0
"""
Seconds a set-aside stale store is kept in C{DATA/stale/} for inspection.
"""

DEFAULT_STALE_MAX = 1000
"""
The most set-aside stale stores kept in C{DATA/stale/}; the oldest go first.
"""


class HandoffNotDrained(Exception):
    """
    The calls running on slots being handed off did not finish in time; the
    handoff is abandoned and tried again later.
    """


def setAsideStores(
    storesDir: FilePath[str],
    staleDir: FilePath[str],
    slots: Iterable[int],
    slotCount: int,
    keep: Iterable[str] = (),
    now: Callable[[], float] = time.time,
) -> list[str]:
    """
    Move the local copies of the stores of C{slots} out of C{storesDir} into
    C{staleDir}, so they are never served and can still be inspected.
    Blocking.

    @param storesDir: the pool's directory of stores
        (C{DATA/stores/<2 digits>/<store name>}).
    @param staleDir: where they go, as C{<store name>-<time>}.
    @param slots: the slots whose stores go.
    @param slotCount: the cluster's slot count.
    @param keep: store names not to move (stores open now).
    @param now: the wall clock, for the names.
    @return: the names of the stores moved.
    """
    wanted = set(slots)
    kept = set(keep)
    moved: list[str] = []
    if not storesDir.isdir():
        return moved
    stamp = f"{now():.6f}"
    for prefix in storesDir.children():
        if not prefix.isdir():
            continue
        for store in prefix.children():
            name = store.basename()
            try:
                slot = slotOfStore(name, slotCount)
            except ValueError:
                continue
            if slot not in wanted or name in kept:
                continue
            staleDir.makedirs(ignoreExistingDirectory=True)
            os.replace(store.path, staleDir.child(f"{name}-{stamp}").path)
            moved.append(name)
    return moved


def _staleTime(name: str) -> float | None:
    """
    When the stale store C{name} (C{<store name>-<time>}) was set aside.
    """
    _, dash, stamp = name.rpartition("-")
    if not dash:
        return None
    try:
        return float(stamp)
    except ValueError:
        return None


def pruneStale(staleDir: FilePath[str], now: float, keep: float, maxCount: int) -> list[str]:
    """
    Delete the stale stores of C{staleDir} set aside more than C{keep}
    seconds before C{now}, and the oldest beyond the C{maxCount} newest.
    Entries whose names are not C{<store name>-<time>} are left alone.
    Blocking.

    @param staleDir: C{DATA/stale}.
    @param now: the time now, in seconds since the epoch.
    @param keep: seconds a stale store is kept.
    @param maxCount: the most stale stores kept.
    @return: the names deleted.
    """
    if not staleDir.isdir():
        return []
    entries: list[tuple[float, FilePath[str]]] = []
    for child in staleDir.children():
        stamp = _staleTime(child.basename())
        if stamp is not None:
            entries.append((stamp, child))
    entries.sort(key=lambda e: e[0], reverse=True)
    removed: list[str] = []
    for index, (stamp, child) in enumerate(entries):
        if index >= maxCount or now - stamp > keep:
            child.remove()
            removed.append(child.basename())
    return removed


def servePostgres(
    node: Any,
    cluster: PostgresCluster,
    shipper: Any = None,
    runInThread: RunInThread | None = None,
    handoffDrain: float = DEFAULT_HANDOFF_DRAIN,
    staleKeep: float = DEFAULT_STALE_KEEP,
    staleMax: int = DEFAULT_STALE_MAX,
    now: Callable[[], float] = time.time,
) -> None:
    """
    Run C{cluster}'s topology as a service of C{node} (a
    L{fractal.node.FractalNode} built with that topology) and connect it to
    the node's store pool and shipper.

    The shipper should have been built with
    C{epochForKey=cluster.topology.epochForKey} and C{cluster.backend}; it
    is made a service of the node here when it is not one yet.

    @param node: the node.
    @param cluster: from L{openCluster}.
    @param shipper: the node's L{fractal.durable.shipper.Shipper}, or L{None}.
    @param runInThread: runs the blocking file moves; the node's reactor's
        thread pool by default.
    @param handoffDrain: see L{DEFAULT_HANDOFF_DRAIN}.
    @param staleKeep: see L{DEFAULT_STALE_KEEP}.
    @param staleMax: see L{DEFAULT_STALE_MAX}.
    @param now: the wall clock, for the names and ages of stale stores.
    """
    topology = cluster.topology
    pool = node.pool
    slotCount = topology.currentMap().slots
    run = runInThread if runInThread is not None else reactorThreads(node.reactor)
    stale = node.dataDir.child("stale")

    def prune() -> Deferred[Any]:
        def report(removed: list[str]) -> None:
            if removed:
                _log.info(
                    "Deleted {count} stale stores set aside more than {keep:g}s ago "
                    "or beyond the newest {most} in {where}",
                    count=len(removed),
                    keep=staleKeep,
                    most=staleMax,
                    where=stale.path,
                )

        def failed(failure: Failure) -> None:
            _log.failure("Cannot prune the stale stores in {where}", failure, where=stale.path)

        return run(lambda: pruneStale(stale, now(), staleKeep, staleMax)).addCallbacks(
            report, failed
        )

    def release(slots: list[int]) -> Deferred[Any]:
        # The map shows these slots elsewhere already, so no new call starts
        # on them here.  Each of their stores closes once the calls running
        # on it are done, and is shipped as it closes: the final ship holds
        # every commit made here.  Only then may the slots move.
        closing = pool.closeStoresOf(slots, slotCount)
        if closing.held or closing.opening:
            _log.info(
                "Handing off {count} slots: waiting for the calls on {held} stores",
                count=len(slots),
                held=len(closing.held) + len(closing.opening),
            )
        done: Deferred[Any] = closing.closed
        if node.running:
            done.addTimeout(handoffDrain, node.reactor, onTimeoutCancel=_notDrained(handoffDrain))
        elif shipper is not None:
            # The node is stopping: its pool is closed; ship whatever its
            # closing stores left unshipped before the slots move.
            done.addCallback(lambda _: shipper.flush())
        return done

    def gained(slots: list[int]) -> Deferred[Any]:
        chosen = set(slots)
        # A stale store held by a call (one that began when this node owned
        # the slot before) closes once the call is done; the slots are not
        # served until then.
        d: Deferred[Any] = pool.closeStoresOf(chosen, slotCount).closed

        def setAside(_: object) -> Deferred[Any]:
            busy = [storeNameForKey(key) for key in pool.openKeys()]
            return run(lambda: setAsideStores(pool.storesDir, stale, chosen, slotCount, busy, now))

        def report(moved: list[str]) -> Deferred[Any]:
            if moved:
                _log.info(
                    "Set aside {count} stale local stores of gained slots into {where}",
                    count=len(moved),
                    where=stale.path,
                )
            return prune()

        d.addCallback(setAside).addCallback(report)
        return d

    topology.releaseSlots = release
    topology.slotsGained = gained
    if shipper is not None:
        # A store fenced at a newer epoch: the node (which observes its
        # shipper) stops serving the slot and has the topology reload the map.
        if shipper.parent is None:
            shipper.setServiceParent(node)
    topology.setServiceParent(node)  # type: ignore[no-untyped-call]
    node.reactor.callWhenRunning(prune)


def _notDrained(seconds: float) -> Callable[[Any, float], Any]:
    """
    The C{onTimeoutCancel} of a handoff's wait for its calls.
    """

    def timedOut(result: Any, timeout: float) -> Any:
        if isinstance(result, Failure) and result.check(CancelledError):  # type: ignore[no-untyped-call]
            return Failure(  # type: ignore[no-untyped-call]
                HandoffNotDrained(
                    f"calls on the slots still running after {seconds:g}s; "
                    "the slots are served here again and handed off later"
                )
            )
        return result

    return timedOut

# -*- test-case-name: tests.test_postgres_deploy -*-
"""
Running a node on PostgreSQL: the topology and the durable backend on one
DSN, and the glue between them and the node's store pool and shipper.

    - L{openCluster} checks the schema and registers the node (blocking, at
      start-up, before the reactor runs), so the node has its shard map before
      it serves anything.
    - L{servePostgres} makes the topology a service of the node and gives it
      the node's hooks: before a slot is given up, its open stores are closed
      (each shipped first) and everything dirty is shipped; before a gained
      slot is served, the node's old local copies of its stores are moved
      aside into C{DATA/stale/}, so the stores are restored from their durable
      chains on their first call.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable

from attrs import frozen
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool

from fractal.durable._threads import RunInThread, reactorThreads
from fractal.keys import DEFAULT_SLOTS, slotForKey
from fractal.postgres.backend import PostgresBackend, slotOfStore
from fractal.postgres.connection import DEFAULT_SCHEMA, Database
from fractal.postgres.schema import requireSchema
from fractal.postgres.topology import DEFAULT_LEASE, PostgresTopology
from fractal.routing.interfaces import NodeAddress

__all__ = ["POSTGRES_THREADS", "PostgresCluster", "openCluster", "servePostgres", "setAsideStores"]

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


_STALE_POLL = 0.1
"""
Seconds between looks for the release of stale stores held by calls.
"""


def _closeStoresOf(pool: Any, slots: set[int], slotCount: int) -> Deferred[Any]:
    """
    Close the idle open stores of C{pool} whose keys are in C{slots}, each
    shipped first by the pool's shipper, and wait for those closing already.

    The store pool has no public way yet to close chosen stores; this reaches
    into it, and is the one place to change when it has one.
    """
    waits: list[Deferred[None]] = []
    for key, lease in list(pool._open.items()):
        if slotForKey(key, slotCount) in slots and lease._busy == 0:
            d: Deferred[None] = Deferred()
            lease._whenClosed.append(d)
            pool._closeLease(lease)
            waits.append(d)
    for key, lease in list(pool._closing.items()):
        if slotForKey(key, slotCount) in slots:
            d = Deferred()
            lease._whenClosed.append(d)
            waits.append(d)
    return DeferredList(waits, consumeErrors=True) if waits else succeed(None)


def setAsideStores(
    storesDir: FilePath[str],
    staleDir: FilePath[str],
    slots: Iterable[int],
    slotCount: int,
    keep: Iterable[str] = (),
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
    @return: the names of the stores moved.
    """
    wanted = set(slots)
    kept = set(keep)
    moved: list[str] = []
    if not storesDir.isdir():
        return moved
    stamp = f"{time.time():.6f}"
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


def servePostgres(
    node: Any,
    cluster: PostgresCluster,
    shipper: Any = None,
    runInThread: RunInThread | None = None,
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
    """
    topology = cluster.topology
    pool = node.pool
    slotCount = topology.currentMap().slots
    run = runInThread if runInThread is not None else reactorThreads(node.reactor)
    stale = node.dataDir.child("stale")

    def release(slots: list[int]) -> Deferred[Any]:
        chosen = set(slots)
        # Idle stores are closed, and each is shipped before it closes;
        # stores still held by a call are shipped as they are now.
        d = _closeStoresOf(pool, chosen, slotCount)
        if shipper is None:
            return d
        held = [k for k in pool.openKeys() if slotForKey(k, slotCount) in chosen]
        done = DeferredList([d] + [shipper.whenDurable(k) for k in held], consumeErrors=True)
        if not node.running:
            # The node is stopping: its pool is closed; ship whatever its
            # closing stores left unshipped before the slots move.
            done.addCallback(lambda _: shipper.flush())
        return done

    def gained(slots: list[int]) -> Deferred[Any]:
        chosen = set(slots)

        def closeStale() -> Deferred[Any]:
            # A stale store held by a call (one that began when this node
            # owned the slot before) closes once the call is done; the
            # slots are not served until then.
            def again(_: object) -> Deferred[Any] | None:
                if any(slotForKey(k, slotCount) in chosen for k in pool.openKeys()):
                    return deferLater(node.reactor, _STALE_POLL, closeStale)
                return None

            return _closeStoresOf(pool, chosen, slotCount).addCallback(again)

        d = closeStale()

        def setAside(_: object) -> Deferred[Any]:
            from fractal.keys import storeNameForKey

            busy = [storeNameForKey(key) for key in pool.openKeys()]
            return run(lambda: setAsideStores(pool.storesDir, stale, chosen, slotCount, busy))

        def report(moved: list[str]) -> None:
            if moved:
                _log.info(
                    "Set aside {count} stale local stores of gained slots into {where}",
                    count=len(moved),
                    where=stale.path,
                )

        return d.addCallback(setAside).addCallback(report)

    topology.releaseSlots = release
    topology.slotsGained = gained
    if shipper is not None:
        shipper.addFencedObserver(lambda key, error: topology.refresh())
        if shipper.parent is None:
            shipper.setServiceParent(node)
    topology.setServiceParent(node)  # type: ignore[no-untyped-call]

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
      gained slot is served, the node prepares it
      (L{fractal.node.FractalNode.prepareSlots}, the same for every
      topology): its old local copies of the slot's stores are set aside
      into C{DATA/stale/}, so the stores are restored from their durable
      chains on their first call.
"""

from __future__ import annotations

from typing import Any, Callable

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from fractal.durable._threads import RunInThread
from fractal.keys import DEFAULT_SLOTS
from fractal.postgres.backend import PostgresBackend
from fractal.postgres.connection import DEFAULT_SCHEMA, Database
from fractal.postgres.schema import requireSchema
from fractal.postgres.topology import DEFAULT_LEASE, PostgresTopology
from fractal.routing.interfaces import NodeAddress

__all__ = [
    "DEFAULT_HANDOFF_DRAIN",
    "HandoffNotDrained",
    "POSTGRES_THREADS",
    "PostgresCluster",
    "openCluster",
    "servePostgres",
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

    A shutdown that comes before the reactor ever ran (a test runner fires
    C{shutdown} on the global reactor after each test it runs in a worker)
    also withdraws the pending start: a stopped pool cannot start again, and
    a later start-up would fail with L{twisted._threads.AlreadyQuit}.
    """
    pool = ThreadPool(1, size, "fractal-postgres")
    starting = reactor.callWhenRunning(pool.start)

    def stop() -> None:
        if starting is not None and not pool.started:
            try:
                reactor.removeSystemEventTrigger(starting)
            except ValueError:
                pass  # already fired or withdrawn
        pool.stop()

    reactor.addSystemEventTrigger("during", "shutdown", stop)

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


class HandoffNotDrained(Exception):
    """
    The calls running on slots being handed off did not finish in time; the
    handoff is abandoned and tried again later.
    """


def servePostgres(
    node: Any,
    cluster: PostgresCluster,
    shipper: Any = None,
    handoffDrain: float = DEFAULT_HANDOFF_DRAIN,
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
    @param handoffDrain: see L{DEFAULT_HANDOFF_DRAIN}.
    """
    topology = cluster.topology
    pool = node.pool
    slotCount = topology.currentMap().slots

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

    topology.releaseSlots = release
    # The topology tells the node of the slots it gains before its map shows
    # them as the node's (so their calls still go to the previous owner, and
    # its epochForKey refuses their stores, until the node is ready).
    topology.slotsGained = lambda slots: node.prepareSlots(
        slots, {slot: topology.slotEpoch(slot) for slot in slots}
    )
    node.gainsAnnounced = True
    if shipper is not None:
        # A store fenced at a newer epoch: the node (which observes its
        # shipper) stops serving the slot and has the topology reload the map.
        if shipper.parent is None:
            shipper.setServiceParent(node)
    topology.setServiceParent(node)  # type: ignore[no-untyped-call]


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

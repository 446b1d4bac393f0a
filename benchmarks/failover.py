# -*- test-case-name: tests.test_postgres_integration -*-
"""
Failover and rebalancing of a cluster that runs on PostgreSQL.

In one run on this machine, with real C{twistd -n fractal} node processes on
loopback and the mailbox acknowledging every C{Deliver} durably:

    1. steady state: one node's durable C{Deliver} throughput and p50/p99 at
       50 outstanding, with the filesystem backend (the baseline) and with
       C{--postgres};
    2. failover: three nodes; one is killed with SIGKILL; for every user it
       owned, the time from the kill to the first successful durable write
       (p50/p99), calls retried every 50 ms through the survivors;
    3. rebalancing: a fourth node joins while each of 100 users is called
       again half a second after each success (a load below saturation);
       for the users whose slot moves, the longest wait for a call, from
       when it was due to its success, retries included (p50/p99), beside
       the same figure for users that did not move.

PostgreSQL: C{FRACTAL_BENCH_POSTGRES} as a DSN, else the machine's
C{host=127.0.0.1 port=5432 dbname=test user=postgres}; a schema of its own is
created and dropped.  Every phase is bounded in calls and seconds.  Run:
C{python3 benchmarks/failover.py} (C{--quick} for a shorter run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, task

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.node import (  # noqa: E402
    Child,
    Result,
    _percentile,
    connectAMP,
    drive,
    fractalNode,
    freePort,
)

__all__ = ["main"]

APP = "benchmarks._durablemailbox:application"
LOCAL_POSTGRES = "host=127.0.0.1 port=5432 dbname=test user=postgres"
LEASE = 3.0
PERIOD = 0.5
"""
Seconds each user waits between its successful calls during rebalancing.
"""


def _deliver(connection: Any, user: str) -> Any:
    from examples.mailbox import Deliver

    return connection.callRemote(
        Deliver, user=user, sender="bench@example.com", subject="s", body="b" * 100
    )


def _postgres() -> str | None:
    import psycopg

    dsn = os.environ.get("FRACTAL_BENCH_POSTGRES") or LOCAL_POSTGRES
    try:
        with psycopg.connect(dsn, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error:
        return None
    return dsn


class Cluster:
    """
    Node processes on one PostgreSQL schema.
    """

    def __init__(self, workdir: str, dsn: str, schema: str) -> None:
        self.workdir = workdir
        self.dsn = dsn
        self.schema = schema
        self.nodes: dict[str, Child] = {}

    def start(self, name: str) -> Child:
        data = os.path.join(self.workdir, name)
        child = fractalNode(
            data,
            data + ".log",
            "--app", APP,
            "--node", name,
            "--postgres", self.dsn,
            "--postgres-schema", self.schema,
            "--peer-listen", f"tcp:{freePort()}:interface=127.0.0.1",
            "--lease", str(LEASE),
            "--ship-interval", "0.2",
        )
        self.nodes[name] = child
        return child

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as connection:
            connection.execute(f'SET search_path TO "{self.schema}"')
            return list(connection.execute(sql, args).fetchall())

    def owners(self) -> list[str]:
        return [row[0] for row in self.query("SELECT node FROM slot_owners ORDER BY slot")]

    async def settled(self, reactor: Any, members: set[str], seconds: float) -> float:
        from fractal.keys import DEFAULT_SLOTS
        from fractal.routing.rendezvous import rendezvousOwners

        desired = list(rendezvousOwners(members, DEFAULT_SLOTS))
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            moving = self.query("SELECT count(*) FROM slot_owners WHERE target IS NOT NULL")
            if moving[0][0] == 0 and self.owners() == desired:
                return time.monotonic() - started
            await task.deferLater(reactor, 0.1, lambda: None)
        state = self.query(
            "SELECT node, target, count(*) FROM slot_owners GROUP BY node, target ORDER BY 1, 2"
        )
        nodes = self.query("SELECT node, incarnation, state FROM nodes ORDER BY node")
        raise RuntimeError(
            f"the cluster did not settle on {sorted(members)} in {seconds}s: "
            f"slots {state}, nodes {nodes}"
        )

    def stop(self) -> None:
        for child in self.nodes.values():
            if child.process.poll() is None:
                os.kill(child.process.pid, signal.SIGCONT)
            child.stop()


async def steadyState(
    reactor: Any, workdir: str, dsn: str, schema: str, seconds: float
) -> dict[str, Result]:
    """
    One node, filesystem backend then PostgreSQL, 50 outstanding durable
    C{Deliver}s over 200 users.
    """
    results = {}
    for label in ["filesystem", "postgres"]:
        data = os.path.join(workdir, f"steady-{label}")
        if label == "filesystem":
            child = fractalNode(data, data + ".log", "--app", APP, "--ship-interval", "0.2")
        else:
            cluster = Cluster(workdir, dsn, schema + "_steady")
            _initSchema(dsn, cluster.schema)
            child = fractalNode(
                data, data + ".log", "--app", APP, "--postgres", dsn,
                "--postgres-schema", cluster.schema,
                "--peer-listen", f"tcp:{freePort()}:interface=127.0.0.1",
                "--ship-interval", "0.2",
            )
        try:
            await child.ready(reactor)
            connection = await connectAMP(reactor, child.port)

            def call(n: int) -> Any:
                return _deliver(connection, f"user{n % 200}@example.com")

            await drive(reactor, call, 20, 30, 200)
            results[label] = await drive(reactor, call, 50, seconds, 200_000)
            connection.transport.loseConnection()
        finally:
            child.stop()
            if label == "postgres":
                _dropSchema(dsn, schema + "_steady")
    return results


async def _untilWritten(
    reactor: Any, connections: list[Any], user: str, seconds: float, since: float | None = None
) -> float:
    """
    Call C{user} every 50 ms, through each connection in turn, until a call
    succeeds; the seconds from C{since} (now by default) to that success.
    """
    started = time.monotonic() if since is None else since
    attempt = 0
    while time.monotonic() - started < seconds:
        try:
            await _deliver(connections[attempt % len(connections)], user)
            return time.monotonic() - started
        except Exception:
            attempt += 1
            await task.deferLater(reactor, 0.05, lambda: None)
    return float("inf")


async def failover(reactor: Any, cluster: Cluster, users: list[str]) -> tuple[list[float], int]:
    """
    Kill n3; for each of its users, seconds from the kill to the first
    successful write.
    """
    from fractal.keys import DEFAULT_SLOTS, slotForKey

    owners = cluster.owners()
    moved = [u for u in users if owners[slotForKey(u, DEFAULT_SLOTS)] == "n3"]
    survivors = [await connectAMP(reactor, cluster.nodes[n].port) for n in ["n1", "n2"]]
    killed = time.monotonic()
    os.kill(cluster.nodes["n3"].process.pid, signal.SIGKILL)
    cluster.nodes["n3"].process.wait()
    waits = await defer.gatherResults(
        [
            defer.ensureDeferred(_untilWritten(reactor, survivors, u, 60.0, killed))
            for u in moved
        ]
    )
    for connection in survivors:
        connection.transport.loseConnection()
    return sorted(waits), len(moved)


async def rebalance(
    reactor: Any, cluster: Cluster, users: list[str], seconds: float
) -> tuple[list[float], list[float], float, dict[str, int]]:
    """
    Call every user in a loop while n4 joins; the longest wait of each user
    for a call, from when it was due (L{PERIOD} after the last success) to
    its success, retries included, for users that moved and users that did
    not, and the errors the clients saw, by type.
    """
    from fractal.keys import DEFAULT_SLOTS, slotForKey

    before = cluster.owners()
    connections = [await connectAMP(reactor, cluster.nodes[n].port) for n in ["n1", "n2"]]
    worst = {u: 0.0 for u in users}
    errors: dict[str, int] = {}
    running = True

    async def loop(user: str, index: int) -> None:
        attempt = index
        due = time.monotonic()
        while running:
            try:
                await _deliver(connections[attempt % len(connections)], user)
                worst[user] = max(worst[user], time.monotonic() - due)
                # A steady load below saturation, so that the wait of a
                # moved user is its handoff, not a queue.
                await task.deferLater(reactor, PERIOD, lambda: None)
                due = time.monotonic()
            except Exception as e:
                if running:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                attempt += 1
                await task.deferLater(reactor, 0.02, lambda: None)

    loops = [defer.ensureDeferred(loop(u, i)) for i, u in enumerate(users)]
    await task.deferLater(reactor, 1.0, lambda: None)
    for u in users:
        worst[u] = 0.0
    started = time.monotonic()
    child = cluster.start("n4")
    await child.ready(reactor)
    await cluster.settled(reactor, {"n1", "n2", "n4"}, seconds)
    took = time.monotonic() - started
    running = False
    await defer.gatherResults(loops)
    after = cluster.owners()
    for connection in connections:
        connection.transport.loseConnection()
    moved = [
        u for u in users
        if before[slotForKey(u, DEFAULT_SLOTS)] != after[slotForKey(u, DEFAULT_SLOTS)]
    ]
    stayed = [u for u in users if u not in moved]
    return sorted(worst[u] for u in moved), sorted(worst[u] for u in stayed), took, errors


def _initSchema(dsn: str, schema: str) -> None:
    from fractal.postgres.connection import Database
    from fractal.postgres.schema import initSchema

    database = Database(dsn, schema)
    try:
        initSchema(database)
    finally:
        database.close()


def _dropSchema(dsn: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _ms(values: list[float], p: float) -> str:
    value = _percentile(values, p)
    return "-" if value != value else f"{value * 1000:8.0f} ms"


async def run(reactor: Any, options: argparse.Namespace) -> None:
    dsn = _postgres()
    if dsn is None:
        print("PostgreSQL is not reachable (set FRACTAL_BENCH_POSTGRES): skipped")
        return
    workdir = tempfile.mkdtemp(prefix="fractal-failover-")
    schema = f"bench_failover_{os.getpid()}"
    seconds = 3.0 if options.quick else 8.0
    userCount = 150 if options.quick else 300
    users = [f"user{i}@example.com" for i in range(userCount)]
    cluster = Cluster(workdir, dsn, schema)
    try:
        print(f"steady state: durable Deliver at 50 outstanding, {seconds:.0f}s per backend")
        steady = await steadyState(reactor, workdir, dsn, schema, seconds)
        for label, result in steady.items():
            print(
                f"  {label:10s} {result.rate:8.0f} calls/s   p50 {result.p50:6.1f} ms"
                f"   p99 {result.p99:6.1f} ms"
            )
        ratio = steady["postgres"].rate / steady["filesystem"].rate
        print(f"  postgres / filesystem throughput: {ratio:.2f}")

        _initSchema(dsn, schema)
        for name in ["n1", "n2", "n3"]:
            await cluster.start(name).ready(reactor)
        await cluster.settled(reactor, {"n1", "n2", "n3"}, 120)
        connection = await connectAMP(reactor, cluster.nodes["n1"].port)
        await defer.gatherResults(
            [defer.ensureDeferred(_untilWritten(reactor, [connection], u, 30)) for u in users]
        )
        connection.transport.loseConnection()

        waits, moved = await failover(reactor, cluster, users)
        print(f"failover: SIGKILL of 1 of 3 nodes, lease {LEASE:.0f}s, {moved} of its users")
        print(
            f"  kill -> first durable write:  p50 {_ms(waits, 50)}   p99 {_ms(waits, 99)}"
            f"   max {_ms(waits, 100)}"
        )
        await cluster.settled(reactor, {"n1", "n2"}, 60)

        movedPauses, stayedPauses, took, errors = await rebalance(
            reactor, cluster, users[:100], 180
        )
        print(f"rebalancing: a node joins 2 under load; settled in {took:.1f}s")
        print(f"  errors the clients saw (each call retried): {errors or 'none'}")
        print(
            f"  longest wait for a call, {len(movedPauses):3d} moved users:  "
            f"p50 {_ms(movedPauses, 50)}"
            f"   p99 {_ms(movedPauses, 99)}"
        )
        print(
            f"  longest wait for a call, {len(stayedPauses):3d} other users:  "
            f"p50 {_ms(stayedPauses, 50)}"
            f"   p99 {_ms(stayedPauses, 99)}"
        )
    finally:
        cluster.stop()
        _dropSchema(dsn, schema)
        if options.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="shorter phases")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    options = parser.parse_args(argv)
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, options)))


if __name__ == "__main__":
    main()

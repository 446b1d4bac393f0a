# -*- test-case-name: tests.test_benchmarks_node -*-
"""
One fractal node against its floor and against the standard stack.

In one run on this machine, a client (this process) drives a server (a child
process) over loopback, at 1 and at 50 outstanding calls, and reports the
throughput and p50/p99 latency of:

    1. a bare AMP echo server (the floor);
    2. a bare AMP server doing one SQLite insert per call (WAL,
       synchronous=NORMAL, the page size of a fractal store): the limit for
       a fractal write;
    3. a fractal node (C{twistd -n fractal --app examples.mailbox:application})
       answering the mailbox C{Deliver};
    4. the standard stack: a stateless AMP server storing the same message in
       PostgreSQL through C{twisted.enterprise.adbapi} (psycopg 3).

All four answer the same box (C{Deliver}: user, sender, subject, body ->
messageID), sent by the same plain AMP client.  Then the cold-open latency:
the node is restarted (so no store is open) and each of a few hundred
existing users is called once.

PostgreSQL: C{FRACTAL_BENCH_POSTGRES} as a DSN, else the machine's
C{host=127.0.0.1 port=5432 dbname=test user=postgres} if it answers, else a
throwaway server made with C{initdb}/C{pg_ctl} if they exist; otherwise row 4
is reported as skipped.

All servers run at once and the rows take turns, a short phase each per
round, so that other work on the machine weighs on every row alike.  Every
phase is bounded in calls and in seconds; the whole run takes well under
three minutes.  Run: C{python3 benchmarks/node.py} (C{--quick} for a shorter
run).  C{--cold-only} runs the cold-open phase alone, with and without the
durable shipper, and C{--cold-only --against TREE} also runs it with the code
of another source tree (say, C{git archive} of an older commit unpacked
somewhere), taking turns, for a before/after in one run.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from typing import Any, Awaitable, Callable

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.protocols import amp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

__all__ = ["main"]

LOCAL_POSTGRES = "host=127.0.0.1 port=5432 dbname=test user=postgres"
CONCURRENCY = (1, 50)
USERS = 100
COLD_USERS = 300
SUBJECT = "Quarterly report, draft 3"
BODY = "Hello,\n\nplease find the figures below. " + "x" * 160 + "\n\n-- bob\n"


class BenchDeliver(amp.Command):
    """
    The mailbox C{Deliver} box, as the baseline servers answer it.
    """

    commandName = b"Deliver"
    arguments = [
        (b"user", amp.Unicode()),
        (b"sender", amp.Unicode()),
        (b"subject", amp.Unicode()),
        (b"body", amp.Unicode()),
    ]
    response = [(b"messageID", amp.Integer())]


# ---------------------------------------------------------------------------
# Servers (run in child processes with --serve)


class EchoServer(amp.AMP):
    """
    (1) Answers without doing anything.
    """

    @BenchDeliver.responder
    def deliver(self, user: str, sender: str, subject: str, body: str) -> dict[str, int]:
        return {"messageID": 1}


class SQLiteServer(amp.AMP):
    """
    (2) One insert and one commit per call, on the reactor thread.
    """

    connection: sqlite3.Connection

    @BenchDeliver.responder
    def deliver(self, user: str, sender: str, subject: str, body: str) -> dict[str, int]:
        cursor = self.connection.execute(
            "INSERT INTO messages (user, sender, subject, body, received) "
            "VALUES (?, ?, ?, ?, ?)",
            (user, sender, subject, body, time.time()),
        )
        self.connection.commit()
        return {"messageID": cursor.lastrowid or 0}


class PostgresServer(amp.AMP):
    """
    (4) A stateless server: one INSERT per call through an adbapi pool.
    """

    pool: Any

    @BenchDeliver.responder
    def deliver(self, user: str, sender: str, subject: str, body: str) -> Any:
        d = self.pool.runQuery(
            "INSERT INTO fractal_bench_messages (userkey, sender, subject, body) "
            "VALUES (%s, %s, %s, %s) RETURNING id",
            (user, sender, subject, body),
        )
        return d.addCallback(lambda rows: {"messageID": rows[0][0]})


def serve(kind: str, port: int, argument: str) -> None:
    """
    Run one baseline server until SIGTERM.
    """
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    protocol: type[amp.AMP]
    if kind == "echo":
        protocol = EchoServer
    elif kind == "sqlite":
        from fractal.store.store import DEFAULT_PAGE_SIZE

        connection = sqlite3.connect(argument, isolation_level=None)
        # The page size of a fractal store, so rows 2 and 3 write alike.
        connection.execute(f"PRAGMA page_size={DEFAULT_PAGE_SIZE}")
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute(
            "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, user TEXT, "
            "sender TEXT, subject TEXT, body TEXT, received REAL)"
        )
        connection.isolation_level = ""  # implicit BEGIN before the insert
        SQLiteServer.connection = connection
        protocol = SQLiteServer
    elif kind == "postgres":
        from twisted.enterprise import adbapi

        PostgresServer.pool = adbapi.ConnectionPool(
            "psycopg", argument, cp_min=4, cp_max=10, cp_noisy=False
        )
        protocol = PostgresServer
    else:
        raise SystemExit(f"unknown server kind {kind!r}")
    reactor.listenTCP(port, Factory.forProtocol(protocol), interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# Processes


def freePort() -> int:
    """
    A TCP port on loopback that was free a moment ago.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Child:
    """
    A server child process, its port and its log.
    """

    def __init__(
        self, argv: list[str], port: int, log: str, cwd: str = ROOT, env: dict[str, str] | None = None
    ) -> None:
        self.port = port
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    async def ready(self, reactor: Any, seconds: float = 20.0) -> None:
        """
        Wait until the child accepts connections.
        """
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                await task.deferLater(reactor, 0.05, lambda: None)
        with open(self.log, errors="replace") as f:
            tail = f.read()[-2000:]
        self.stop()
        raise RuntimeError(f"server on port {self.port} did not start:\n{tail}")

    def stop(self, seconds: float = 20.0) -> int | None:
        """
        SIGTERM the child and wait for it (SIGKILL after C{seconds}).
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(seconds)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def baselineServer(kind: str, argument: str, log: str) -> Child:
    port = freePort()
    argv = [sys.executable, os.path.abspath(__file__), "--serve", kind, str(port), argument]
    return Child(argv, port, log)


def twistdCommand() -> list[str]:
    """
    The command that runs C{twistd} under this interpreter: the C{twistd}
    script beside it if there is one, else Twisted's entry point via C{-c}.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(script, os.X_OK):
        return [sys.executable, script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def fractalNode(data: str, log: str, *extra: str, tree: str | None = None) -> Child:
    """
    Start a reference mailbox node on a free loopback port, with its data
    under C{data}, its output in C{log} and C{extra} arguments after the
    rest; with the code of the source tree C{tree} (another checkout, for a
    before/after comparison) instead of this one's if given.
    """
    port = freePort()
    argv = twistdCommand() + [
        "-n",
        "--pidfile=",
        "fractal",
        "--app",
        "examples.mailbox:application",
        "--data",
        data,
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        *extra,
    ]
    # This tree's code unless told otherwise: not whichever C{fractal} the
    # interpreter would import (an installed or editable copy elsewhere).
    tree = ROOT if tree is None else os.path.abspath(tree)
    return Child(argv, port, log, cwd=tree, env=dict(os.environ, PYTHONPATH=tree))


# ---------------------------------------------------------------------------
# Load


class Result:
    """
    The figures of one measured phase.
    """

    cpu: float | None = None
    """
    The server's CPU time per call, in microseconds, when known.
    """

    def __init__(
        self, latencies: list[float], seconds: float, cpuTotal: float | None = None
    ) -> None:
        self.latencies = latencies
        self.calls = len(latencies)
        self.seconds = seconds
        self.cpuTotal = cpuTotal
        ordered = sorted(latencies)
        self.rate = self.calls / seconds if seconds else 0.0
        self.p50 = _percentile(ordered, 50) * 1000
        self.p99 = _percentile(ordered, 99) * 1000
        if cpuTotal is not None and self.calls:
            self.cpu = cpuTotal / self.calls * 1e6

    @classmethod
    def merge(cls, results: list[Result]) -> Result:
        """
        One result for several phases of the same kind.
        """
        cpus = [r.cpuTotal for r in results]
        return cls(
            [latency for r in results for latency in r.latencies],
            sum(r.seconds for r in results),
            None if None in cpus else sum(c for c in cpus if c is not None),
        )


def cpuSeconds(pid: int) -> float | None:
    """
    The CPU time (user and system, all threads) process C{pid} has used.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(ordered: list[float], p: float) -> float:
    if not ordered:
        return float("nan")
    # Nearest rank: the smallest value with at least p% of values at or below it.
    index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[index]


async def connectAMP(reactor: Any, port: int) -> amp.AMP:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    protocol: amp.AMP = await connectProtocol(endpoint, amp.AMP())
    return protocol


async def drive(
    reactor: Any,
    call: Callable[[int], Awaitable[object]],
    outstanding: int,
    seconds: float,
    maxCalls: int,
) -> Result:
    """
    Keep C{outstanding} calls in flight for C{seconds} or C{maxCalls} calls,
    whichever ends first, and time each call.
    """
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    counter = iter(range(maxCalls))
    clock = time.perf_counter

    async def worker() -> None:
        for n in counter:
            if clock() > deadline:
                return
            started = clock()
            await call(n)
            latencies.append(clock() - started)

    started = clock()
    await defer.gatherResults(
        [defer.ensureDeferred(worker()) for _ in range(outstanding)], consumeErrors=True
    )
    return Result(latencies, clock() - started)


class Target:
    """
    One server under load: its process, the command it answers and a client
    connection to it.
    """

    def __init__(self, server: Child, command: type[amp.Command]) -> None:
        self.server = server
        self.command = command
        self.connection: amp.AMP | None = None
        self.results: dict[int, list[Result]] = {n: [] for n in CONCURRENCY}

    async def connect(self, reactor: Any) -> None:
        await self.server.ready(reactor)
        self.connection = await connectAMP(reactor, self.server.port)

    def call(self, n: int) -> Awaitable[object]:
        assert self.connection is not None
        result: Awaitable[object] = self.connection.callRemote(
            self.command,
            user=f"user{n % USERS}@example.com",
            sender="bob@example.com",
            subject=SUBJECT,
            body=BODY,
        )
        return result

    async def warm(self, reactor: Any) -> None:
        """
        Call every user once (so a fractal node has created and opened every
        store; creating one is measured apart), then a little more.
        """
        await drive(reactor, self.call, 10, 30, USERS)
        await drive(reactor, self.call, 10, 0.3, 1000)

    async def phase(self, reactor: Any, outstanding: int, seconds: float, maxCalls: int) -> None:
        before = cpuSeconds(self.server.process.pid)
        result = await drive(reactor, self.call, outstanding, seconds, maxCalls)
        after = cpuSeconds(self.server.process.pid)
        if before is not None and after is not None:
            result = Result(result.latencies, result.seconds, after - before)
        self.results[outstanding].append(result)

    def merged(self) -> dict[int, Result]:
        return {n: Result.merge(results) for n, results in self.results.items()}

    def close(self) -> None:
        if self.connection is not None and self.connection.transport is not None:
            self.connection.transport.loseConnection()
        self.server.stop()


async def coldOpen(
    reactor: Any, data: str, log: str, users: int, *extra: str, tree: str | None = None
) -> tuple[Result, Result, Result]:
    """
    Create C{users} stores (timing the first hundred, one at a time), restart
    the node so none is open, call each user once (cold), then once more
    (warm).  C{extra} arguments go to the node's command line; C{tree} is
    the source tree it runs from (see L{fractalNode}).
    """
    from examples.mailbox import Deliver, Stats

    node = fractalNode(data, log, *extra, tree=tree)
    try:
        await node.ready(reactor)
        connection = await connectAMP(reactor, node.port)

        async def create(n: int) -> object:
            result: object = await connection.callRemote(
                Deliver, user=f"cold{n}", sender="s", subject="t", body="b"
            )
            return result

        first = min(100, users)
        created = await drive(reactor, create, 1, 60, first)

        async def createRest(n: int) -> object:
            return await create(first + n)

        await drive(reactor, createRest, 20, 60, users - first)
    finally:
        node.stop()
    node = fractalNode(data, log, *extra, tree=tree)
    try:
        await node.ready(reactor)
        connection = await connectAMP(reactor, node.port)

        async def stats(n: int) -> object:
            result: object = await connection.callRemote(Stats, user=f"cold{n % users}")
            return result

        cold = await drive(reactor, stats, 1, 60, users)
        warm = await drive(reactor, stats, 1, 60, users)
        connection.transport.loseConnection()
        return created, cold, warm
    finally:
        node.stop()


# ---------------------------------------------------------------------------
# PostgreSQL


def _tryPostgres(dsn: str) -> str | None:
    try:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"


def postgresDSN(workdir: str) -> tuple[str | None, str, Callable[[], None]]:
    """
    Find a PostgreSQL to measure against.

    @return: a DSN or L{None}, a description of where it came from (or why
        there is none), and a function that stops anything started.
    """
    explicit = os.environ.get("FRACTAL_BENCH_POSTGRES")
    if explicit:
        problem = _tryPostgres(explicit)
        if problem is None:
            return explicit, "FRACTAL_BENCH_POSTGRES", lambda: None
        return None, f"FRACTAL_BENCH_POSTGRES does not connect ({problem})", lambda: None
    if _tryPostgres(LOCAL_POSTGRES) is None:
        return LOCAL_POSTGRES, "the machine's PostgreSQL on 127.0.0.1:5432", lambda: None
    initdb, pgctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pgctl):
        return None, "no PostgreSQL reachable and no initdb/pg_ctl", lambda: None
    cluster = os.path.join(workdir, "pg")
    prefix: list[str] = []
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root.
        runuser = shutil.which("runuser")
        if runuser is None:
            return None, "running as root without runuser for initdb", lambda: None
        prefix = [runuser, "-u", "postgres", "--"]
        os.chmod(workdir, 0o777)
    port = freePort()
    try:
        subprocess.run(
            prefix + [initdb, "-D", cluster, "-A", "trust", "-U", "postgres"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        subprocess.run(
            prefix
            + [
                pgctl,
                "-D",
                cluster,
                "-w",
                "-l",
                os.path.join(cluster, "log"),
                "-o",
                f"-p {port} -k {cluster} -c listen_addresses=127.0.0.1",
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (subprocess.SubprocessError, OSError) as e:
        return None, f"could not start a throwaway PostgreSQL ({e})", lambda: None

    def stop() -> None:
        subprocess.run(prefix + [pgctl, "-D", cluster, "-m", "fast", "stop"], capture_output=True)

    dsn = f"host=127.0.0.1 port={port} dbname=postgres user=postgres"
    return dsn, "a throwaway PostgreSQL (initdb)", stop


def preparePostgres(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn) as connection:
        connection.execute("DROP TABLE IF EXISTS fractal_bench_messages")
        connection.execute(
            "CREATE TABLE fractal_bench_messages (id BIGSERIAL PRIMARY KEY, userkey TEXT, "
            "sender TEXT, subject TEXT, body TEXT, received TIMESTAMPTZ DEFAULT now())"
        )


def dropPostgres(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn) as connection:
        connection.execute("DROP TABLE IF EXISTS fractal_bench_messages")


# ---------------------------------------------------------------------------
# Report


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def verdict(value: float | None, target: float, atLeast: bool) -> str:
    if value is None:
        return "n/a"
    ok = value >= target if atLeast else value <= target
    return "meets" if ok else "MISSES"


def printVerdicts(checks: list[tuple[str, float | None, float, bool]], width: int) -> None:
    """
    Print a table of targets: each label, its measured value, its target and
    whether the value meets it (see L{verdict}).

    @param checks: C{(label, value, target, atLeast)} for each target.
    @param width: the width of the label column.
    """
    print()
    print(f"{'target':{width}} {'measured':>9} {'target':>8}  verdict")
    for label, value, target, atLeast in checks:
        shown = "n/a" if value is None else f"{value:.2f}"
        bound = ("≥ " if atLeast else "≤ ") + f"{target:g}"
        print(f"{label:{width}} {shown:>9} {bound:>8}  {verdict(value, target, atLeast)}")


async def runColdOnly(reactor: Any, options: argparse.Namespace) -> None:
    """
    Only the cold-open phase, C{rounds} times, alternating a node with the
    default durable shipper and one with C{--durable none}, so the share of
    the shipper's work in a cold open shows; with C{--against TREE}, the same
    two from that source tree too (a checkout of the code before a change),
    all taking turns.
    """
    rounds = 2 if options.quick else 4
    users = 100 if options.quick else COLD_USERS
    workdir = tempfile.mkdtemp(prefix="fractal-bench-")
    kinds: dict[str, tuple[str, ...]] = {
        "default (durable: local directory)": (),
        "--durable none": ("--durable", "none"),
    }
    variants: dict[str, tuple[tuple[str, ...], str | None]] = {
        name: (extra, None) for name, extra in kinds.items()
    }
    if options.against:
        for name, extra in kinds.items():
            variants[f"{name}, --against"] = (extra, options.against)
    results: dict[str, list[Result]] = {name: [] for name in variants}
    loadBefore = os.getloadavg()[0]
    began = time.monotonic()
    try:
        for round in range(rounds):
            for n, (name, (extra, tree)) in enumerate(variants.items()):
                where = os.path.join(workdir, f"cold-{round}-{n}")
                _, cold, _ = await coldOpen(
                    reactor, where + "-data", where + ".log", users, *extra, tree=tree
                )
                results[name].append(cold)
    finally:
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(
        f"txfractal cold open: {rounds} rounds of {users} users each, variants taking "
        f"turns; load average {loadBefore:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    if options.against:
        print(f"--against: {os.path.abspath(options.against)}")
    print(f"{'node':50} {'p50 ms':>8} {'p99 ms':>8} {'calls':>7}")
    merged = {name: Result.merge(found) for name, found in results.items()}
    for name, result in merged.items():
        print(f"{name:50} {result.p50:>8.2f} {result.p99:>8.2f} {result.calls:>7}")
    printVerdicts(
        [("cold open p99, ms", merged["default (durable: local directory)"].p99, 5.0, False)],
        32,
    )
    print(f"\n(whole run: {time.monotonic() - began:.0f} s)")


async def run(reactor: Any, options: argparse.Namespace) -> None:
    from examples.mailbox import Deliver

    rounds = options.rounds or (2 if options.quick else 8)
    seconds = 0.5 if options.quick else 0.8
    maxCalls = 4000 if options.quick else 12000
    coldUsers = 100 if options.quick else COLD_USERS
    workdir = tempfile.mkdtemp(prefix="fractal-bench-")
    rows: dict[str, dict[int, Result] | str] = {}
    began = time.monotonic()
    loadBefore = os.getloadavg()[0]
    targets: dict[str, Target] = {}
    dsn, source, stopPostgres = postgresDSN(workdir)
    try:
        targets["1"] = Target(
            baselineServer("echo", "-", os.path.join(workdir, "echo.log")), BenchDeliver
        )
        targets["2"] = Target(
            baselineServer(
                "sqlite",
                os.path.join(workdir, "baseline.sqlite"),
                os.path.join(workdir, "sqlite.log"),
            ),
            BenchDeliver,
        )
        for key, extra in [("3", ()), ("3n", ("--durable", "none"))]:
            targets[key] = Target(
                fractalNode(
                    os.path.join(workdir, f"node-data-{key}"),
                    os.path.join(workdir, f"node-{key}.log"),
                    *extra,
                ),
                Deliver,
            )
        if dsn is None:
            rows["4"] = f"skipped: {source}"
        else:
            preparePostgres(dsn)
            targets["4"] = Target(
                baselineServer("postgres", dsn, os.path.join(workdir, "postgres.log")), BenchDeliver
            )
        for target in targets.values():
            await target.connect(reactor)
        for target in targets.values():
            await target.warm(reactor)
        # Rows take turns, a short phase each per round, so that whatever
        # else runs on the machine weighs on every row alike.
        for round in range(rounds):
            for key, target in targets.items():
                for outstanding in CONCURRENCY:
                    await target.phase(reactor, outstanding, seconds, maxCalls)
                if target.command is Deliver:
                    # Let the node's ship cycle for this phase's writes run
                    # now rather than during the next row's phase.
                    await task.deferLater(reactor, 1.2, lambda: None)
        for key, target in targets.items():
            rows[key] = target.merged()
    finally:
        for target in targets.values():
            target.close()
        if dsn is not None:
            try:
                dropPostgres(dsn)
            except Exception:
                pass
        stopPostgres()
    try:
        created, cold, warm = await coldOpen(
            reactor, os.path.join(workdir, "cold-data"), os.path.join(workdir, "cold.log"), coldUsers
        )
    finally:
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - began

    from fractal.store.store import DEFAULT_PAGE_SIZE

    names = {
        "1": "(1) bare AMP echo",
        "2": f"(2) AMP + SQLite insert, {DEFAULT_PAGE_SIZE} B pages",
        "3": "(3) fractal node, mailbox Deliver",
        "3n": "    the same, --durable none",
        "4": "(4) AMP + adbapi + PostgreSQL",
    }
    print()
    print(
        f"txfractal node benchmark: loopback, {os.cpu_count()} CPUs, Python "
        f"{sys.version.split()[0]}; rows take turns, {rounds} rounds of {seconds:g} s "
        "per row and concurrency"
    )
    print(
        f"load average {loadBefore:.1f} before, {os.getloadavg()[0]:.1f} after: other "
        "work on the machine shows as noise, most in p99"
    )
    if isinstance(rows.get("4"), dict):
        print(f"PostgreSQL: {source}")
    print()
    print(
        f"{'server':40} {'outst.':>6} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'calls':>7} {'cpu us':>7}"
    )
    for key, name in names.items():
        row = rows.get(key)
        if not isinstance(row, dict):
            print(f"{name:40} {row}")
            continue
        for outstanding, result in row.items():
            cpu = "" if result.cpu is None else f"{result.cpu:.0f}"
            print(
                f"{name:40} {outstanding:>6} {result.rate:>9.0f} {result.p50:>8.2f} "
                f"{result.p99:>8.2f} {result.calls:>7} {cpu:>7}"
            )
    for label, result in [
        ("new user: Deliver creates the store", created),
        ("cold open: Stats after a restart", cold),
        ("the same users again, warm", warm),
    ]:
        print(
            f"{label:40} {1:>6} {result.rate:>9.0f} "
            f"{result.p50:>8.2f} {result.p99:>8.2f} {result.calls:>7}"
        )

    def get(key: str, outstanding: int, attribute: str) -> float | None:
        row = rows.get(key)
        if not isinstance(row, dict):
            return None
        value: float = getattr(row[outstanding], attribute)
        return value

    checks = [
        ("(3)/(2) throughput at 1", ratio(get("3", 1, "rate"), get("2", 1, "rate")), 0.75, True),
        ("(3)/(2) throughput at 50", ratio(get("3", 50, "rate"), get("2", 50, "rate")), 0.6, True),
        ("(3)/(4) throughput at 50", ratio(get("3", 50, "rate"), get("4", 50, "rate")), 2.0, True),
        ("(3)/(4) p50 latency at 1", ratio(get("3", 1, "p50"), get("4", 1, "p50")), 0.5, False),
        ("cold open p99, ms", cold.p99, 5.0, False),
    ]
    printVerdicts(checks, 32)
    print(f"\n(whole run: {elapsed:.0f} s)")


def main(argv: list[str] | None = None) -> None:
    """
    Run the benchmark, or (with C{--serve}) one of its servers.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="shorter phases")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of phases, the rows taking turns (default 8; 2 with --quick): more "
        "rounds average out more of what else the machine does",
    )
    parser.add_argument(
        "--cold-only",
        action="store_true",
        help="only the cold-open phase, with and without the durable shipper",
    )
    parser.add_argument(
        "--against",
        metavar="TREE",
        help="with --cold-only: also run nodes from this source tree, for a before/after",
    )
    parser.add_argument("--serve", nargs=3, metavar=("KIND", "PORT", "ARG"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.serve:
        kind, port, argument = options.serve
        serve(kind, int(port), argument)
        return
    runner = runColdOnly if options.cold_only else run
    task.react(lambda reactor: defer.ensureDeferred(runner(reactor, options)))


if __name__ == "__main__":
    main()

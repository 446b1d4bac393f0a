# -*- test-case-name: tests.test_integration_cluster -*-
"""
A three-node cluster against a single node, in one run on this machine.

Three C{twistd -n fractal} node processes on loopback, from one generated
config (plain TCP between nodes, as loopback allows), and one single node for
reference, all serving the mailbox; a client in this process sends the
mailbox C{Deliver} for a few hundred users, at 1 and at 50 outstanding calls,
and reports throughput and p50/p99 latency for:

    1. the single node (plain client);
    2. the cluster through the smart client, each call sent straight to its
       user's owner (L{fractal.routing.smart.ClusterClient});
    3. the cluster through a plain client connected to one fixed node, so
       two thirds of the calls are forwarded one hop to their owner.

Targets: (3) p50 at most 2.0x (2) p50 (the cost of one hop); (2) throughput
per node at least 0.9x (1).  All nodes run with C{--durable none}, so the
figures are about routing, not shipping.  On a machine with fewer cores than
processes (three nodes and a client), the per-node throughput is bounded by
CPU sharing, so the report also gives each row's node CPU time per call (from
C{/proc}), and compares calls per node CPU-second: what a node does per call
when it has a core to itself.

All four nodes run throughout, and the rows take turns over several rounds
(C{--rounds}, 3 by default), each row reporting its median round, so that
load from elsewhere on the machine falls on every row alike.  Every phase is
bounded in calls and in seconds.  Run: C{python3 benchmarks/cluster.py}
(C{--quick} for one short round).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Awaitable

from twisted.internet import defer, task

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from node import (  # noqa: E402  (benchmarks/node.py, beside this file)
    BODY,
    SUBJECT,
    Child,
    Result,
    drive,
    fractalNode,
    freePort,
    printVerdicts,
    ratio,
    twistdCommand,
)

__all__ = ["main"]

CONCURRENCY = (1, 50)
USERS = 300
NODES = ("n1", "n2", "n3")


def startCluster(workdir: str) -> dict[str, Child]:
    """
    Write a three-node config with free ports and start the nodes.
    """
    ports = {node: (freePort(), freePort()) for node in NODES}
    lines = ['app = "examples.mailbox:application"', 'durable = "none"']
    for node, (client, peer) in ports.items():
        lines += [
            "[[node]]",
            f'id = "{node}"',
            f'listen = "tcp:{client}:interface=127.0.0.1"',
            f'peer = "tcp:host=127.0.0.1:port={peer}"',
            f'data = "{os.path.join(workdir, node)}"',
        ]
    config = os.path.join(workdir, "cluster.toml")
    with open(config, "w") as f:
        f.write("\n".join(lines) + "\n")
    children = {}
    for node, (client, _) in ports.items():
        argv = twistdCommand() + ["-n", "--pidfile=", "fractal", "--config", config, "--node", node]
        children[node] = Child(argv, client, os.path.join(workdir, f"{node}.log"))
    return children


def startSingle(workdir: str) -> Child:
    """
    Start the reference single node.
    """
    return fractalNode(
        os.path.join(workdir, "single"), os.path.join(workdir, "single.log"), "--durable", "none"
    )


def cpuSeconds(children: list[Child]) -> float:
    """
    The CPU time (user and system) the children have used so far.
    """
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for child in children:
        try:
            with open(f"/proc/{child.process.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


async def measure(
    reactor: Any, client: Any, seconds: float, maxCalls: int, servers: list[Child]
) -> dict[int, tuple[Result, float]]:
    """
    Warm up (every user's store created), then measure at each concurrency,
    with the servers' CPU time per call.
    """
    from examples.mailbox import Deliver

    def call(n: int) -> Awaitable[object]:
        result: Awaitable[object] = client.callRemote(
            Deliver,
            user=f"user{n % USERS}@example.com",
            sender="bob@example.com",
            subject=SUBJECT,
            body=BODY,
        )
        return result

    await drive(reactor, call, 20, 30, USERS)
    await drive(reactor, call, 10, min(0.5, seconds / 4), 2000)
    results = {}
    for outstanding in CONCURRENCY:
        before = cpuSeconds(servers)
        result = await drive(reactor, call, outstanding, seconds, maxCalls)
        used = cpuSeconds(servers) - before
        results[outstanding] = (result, used / result.calls if result.calls else float("nan"))
    return results


async def linked(reactor: Any, client: Any, deadline: float = 30.0) -> None:
    """
    Wait until calls for every user go through (peer links up).
    """
    from examples.mailbox import Stats

    end = time.monotonic() + deadline
    while True:
        try:
            await defer.gatherResults(
                [client.callRemote(Stats, user=f"probe{i}") for i in range(30)],
                consumeErrors=True,
            )
            return
        except Exception:
            if time.monotonic() > end:
                raise
            await task.deferLater(reactor, 0.1, lambda: None)


def _median(runs: list[tuple[Result, float]]) -> tuple[Result, float]:
    """
    The run with the median throughput.
    """
    return sorted(runs, key=lambda run: run[0].rate)[len(runs) // 2]


async def run(reactor: Any, options: argparse.Namespace) -> None:
    from fractal.client import connect
    from fractal.routing.smart import connectCluster

    seconds = 1.5 if options.quick else 3.0
    maxCalls = 6000 if options.quick else 30000
    rounds = 1 if options.quick else options.rounds
    workdir = tempfile.mkdtemp(prefix="fractal-cluster-bench-")
    runs: dict[str, dict[int, list[tuple[Result, float]]]] = {
        key: {n: [] for n in CONCURRENCY} for key in ("1", "2", "3")
    }
    began = time.monotonic()
    children: list[Child] = []
    clients: list[Any] = []
    try:
        # All four nodes run for the whole benchmark, and the rounds take
        # turns, so that load from elsewhere on the machine falls on every
        # row alike; each row reports its median round.
        single = startSingle(workdir)
        nodes = startCluster(workdir)
        children = [single, *nodes.values()]
        for child in children:
            await child.ready(reactor)
        direct = connect(reactor, f"tcp:host=127.0.0.1:port={single.port}")
        seed = f"tcp:host=127.0.0.1:port={nodes['n1'].port}"
        plain = connect(reactor, seed)
        smart = connectCluster(reactor, seed)
        clients = [direct, plain, smart]
        for client in clients:
            await linked(reactor, client)
        setups = [
            ("1", direct, [single]),
            ("2", smart, list(nodes.values())),
            ("3", plain, list(nodes.values())),
        ]
        for _ in range(rounds):
            for key, client, servers in setups:
                measured = await measure(reactor, client, seconds, maxCalls, servers)
                for outstanding, figures in measured.items():
                    runs[key][outstanding].append(figures)
    finally:
        for client in clients:
            await client.disconnect()
        for child in children:
            child.stop()
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - began
    rows = {key: {n: _median(each) for n, each in byLevel.items()} for key, byLevel in runs.items()}

    names = {
        "1": "(1) single node, plain client",
        "2": "(2) 3 nodes, smart client (direct)",
        "3": "(3) 3 nodes, plain client via n1",
    }
    print()
    print(
        f"txfractal cluster benchmark: loopback, {os.cpu_count()} CPUs, Python "
        f"{sys.version.split()[0]}; mailbox Deliver, {USERS} users; "
        f"each row the median of {rounds} rounds of up to {seconds:g} s or {maxCalls} calls"
    )
    print()
    print(
        f"{'setup':40} {'outst.':>6} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'calls':>7} {'node CPU ms/call':>17}"
    )
    for key, name in names.items():
        for outstanding, (result, cpu) in rows[key].items():
            print(
                f"{name:40} {outstanding:>6} {result.rate:>9.0f} {result.p50:>8.2f} "
                f"{result.p99:>8.2f} {result.calls:>7} {cpu * 1000:>17.3f}"
            )

    def get(key: str, outstanding: int, attribute: str) -> float:
        value: float = getattr(rows[key][outstanding][0], attribute)
        return value

    def cpuRatio(outstanding: int) -> float | None:
        # Calls per node CPU-second, smart cluster over single node.
        return ratio(rows["1"][outstanding][1], rows["2"][outstanding][1])

    def perNode(outstanding: int) -> float | None:
        return ratio(get("2", outstanding, "rate") / len(NODES), get("1", outstanding, "rate"))

    checks = [
        ("(3)/(2) p50 at 1", ratio(get("3", 1, "p50"), get("2", 1, "p50")), 2.0, False),
        ("(3)/(2) p50 at 50", ratio(get("3", 50, "p50"), get("2", 50, "p50")), 2.0, False),
        ("(2) per node / (1), rate at 1", perNode(1), 0.9, True),
        ("(2) per node / (1), rate at 50", perNode(50), 0.9, True),
        ("(2)/(1) calls per node CPU-s at 1", cpuRatio(1), 0.9, True),
        ("(2)/(1) calls per node CPU-s at 50", cpuRatio(50), 0.9, True),
    ]
    printVerdicts(checks, 36)
    print(
        f"(for scale: (2) total / (1) at 50 = "
        f"{get('2', 50, 'rate') / get('1', 50, 'rate'):.2f}; "
        f"{len(NODES)} nodes and this client share {os.cpu_count()} CPUs)"
    )
    print(f"\n(whole run: {elapsed:.0f} s)")


def main(argv: list[str] | None = None) -> None:
    """
    Run the benchmark.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="shorter phases")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of every row (the median is reported)"
    )
    options = parser.parse_args(argv)
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, options)))


if __name__ == "__main__":
    main()

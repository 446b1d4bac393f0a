# -*- test-case-name: tests.test_integration_cluster -*-
"""
A three-node cluster against a single node, in one run on this machine.

Three C{twistd -n fractal} node processes on loopback, from one generated
config (plain TCP between nodes, as loopback allows), one single node for
reference and, for scale, three more single nodes that know nothing of each
other, all serving the mailbox; a client in this process sends the mailbox
C{Deliver} for a few hundred users, at 1 and at 50 outstanding calls, and
reports throughput and p50/p99 latency for:

    1. the single node (plain client);
    2. the cluster through the smart client, each call sent straight to its
       user's owner (L{fractal.routing.smart.ClusterClient});
    3. the cluster through a plain client connected to one fixed node, so
       two thirds of the calls are forwarded one hop to their owner;
    4. three separate single nodes, each user's calls sent to the node the
       cluster's map would give it (one plain client per node): no cluster
       code at all, only three node processes sharing the machine: what
       (2) is to be compared with to see what the cluster code itself costs.

Targets: (3) p50 at most 2.0x (2) p50 (the cost of one hop); (2) throughput
per node at least 0.9x (1).  All nodes run with C{--durable none}, so the
figures are about routing, not shipping.

Throughput per node is reported twice.  I{Raw}: calls per second divided by
the number of nodes.  On a machine with fewer cores than processes (three
nodes and this client are four processes; the development machine has two
cores) the raw figure is bounded by CPU sharing, not by what a node does per
call, so the report also gives I{CPU-normalised} figures: the CPU time
(user and system, from C{/proc/<pid>/stat}) of each node process and of this
client during each phase, the cores the nodes kept busy, and calls per
node CPU-second, which is what one node would serve with a core to itself.

All nodes run throughout, and the rows take turns over several rounds
(C{--rounds}, 3 by default), each row reporting its median round, so that
load from elsewhere on the machine falls on every row alike.  Every phase is
bounded in calls and in seconds.  Run: C{python3 benchmarks/cluster.py}
(C{--quick} for one short round, too short to be more than a smoke test on
a shared machine).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Awaitable, Callable

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
from node import cpuSeconds as nodeCPUSeconds  # noqa: E402

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
        argv = twistdCommand() + [
            "-n",
            "--pidfile=",
            "fractal",
            "--config",
            config,
            "--node",
            node,
        ]
        children[node] = Child(argv, client, os.path.join(workdir, f"{node}.log"))
    return children


def startSingle(workdir: str, name: str = "single") -> Child:
    """
    Start a reference single node, its data and log named C{name}.
    """
    return fractalNode(
        os.path.join(workdir, name), os.path.join(workdir, f"{name}.log"), "--durable", "none"
    )


def cpuSeconds(children: list[Child]) -> list[float]:
    """
    The CPU time (user and system) each child has used so far, from
    C{/proc/<pid>/stat}.
    """
    return [nodeCPUSeconds(child.process.pid) or 0.0 for child in children]


class Phase:
    """
    One measured phase: its calls and latencies, and the CPU seconds each
    server process and this client used meanwhile.
    """

    def __init__(self, result: Result, servers: list[float], client: float) -> None:
        self.result = result
        self.servers = servers
        self.client = client
        self.serverTotal = sum(servers)

    @classmethod
    def pooled(cls, phases: list[Phase]) -> Phase:
        """
        One phase for all of C{phases}: their calls, seconds and CPU time
        added up.
        """
        return cls(
            Result.merge([phase.result for phase in phases]),
            [sum(each) for each in zip(*(phase.servers for phase in phases))],
            sum(phase.client for phase in phases),
        )

    @property
    def perCallMicroseconds(self) -> float:
        """
        Server CPU time per call, all servers together, in microseconds.
        """
        return self.serverTotal / self.result.calls * 1e6 if self.result.calls else math.nan

    @property
    def clientMicroseconds(self) -> float:
        """
        This client's CPU time per call, in microseconds.
        """
        return self.client / self.result.calls * 1e6 if self.result.calls else math.nan

    @property
    def callsPerServerCPUSecond(self) -> float | None:
        """
        Calls per CPU-second of server time: what one server process would
        serve per second with a core to itself.
        """
        return self.result.calls / self.serverTotal if self.serverTotal else None

    @property
    def cores(self) -> float:
        """
        How many cores the servers kept busy, together.
        """
        return self.serverTotal / self.result.seconds if self.result.seconds else math.nan


Call = Callable[[int], Awaitable[object]]


def deliverer(client: Any, chosen: dict[str, Any] | None = None) -> Call:
    """
    A function that sends the mailbox C{Deliver} for user C{n % USERS}
    through C{client}, or through C{chosen[user]} when given.
    """
    from examples.mailbox import Deliver

    users = [f"user{n}@example.com" for n in range(USERS)]
    clientOf = [client if chosen is None else chosen[user] for user in users]

    def call(n: int) -> Awaitable[object]:
        index = n % USERS
        result: Awaitable[object] = clientOf[index].callRemote(
            Deliver, user=users[index], sender="bob@example.com", subject=SUBJECT, body=BODY
        )
        return result

    return call


async def warm(reactor: Any, call: Call, seconds: float) -> None:
    """
    Create every user's store, then run briefly at 10 outstanding.
    """
    await drive(reactor, call, 20, 30, USERS)
    await drive(reactor, call, 10, min(0.5, seconds / 4), 2000)


async def measure(
    reactor: Any, call: Call, outstanding: int, seconds: float, maxCalls: int, servers: list[Child]
) -> Phase:
    """
    Measure one phase at C{outstanding}, with the CPU time of each server
    and of this client.
    """
    before = cpuSeconds(servers)
    clientBefore = time.process_time()
    result = await drive(reactor, call, outstanding, seconds, maxCalls)
    client = time.process_time() - clientBefore
    used = [after - b for after, b in zip(cpuSeconds(servers), before)]
    return Phase(result, used, client)


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


def _median(runs: list[Phase]) -> Phase:
    """
    The phase with the median throughput.
    """
    return sorted(runs, key=lambda run: run.result.rate)[len(runs) // 2]


NAMES = {
    "1": "(1) single node, plain client",
    "2": "(2) 3 nodes, smart client (direct)",
    "3": "(3) 3 nodes, plain client via n1",
    "4": "(4) 3 separate single nodes",
}
"""
The rows of the report.
"""

NODE_COUNT = {"1": 1, "2": len(NODES), "3": len(NODES), "4": len(NODES)}
"""
The number of node processes serving each row.
"""


def report(
    runs: dict[str, dict[int, list[Phase]]], rounds: int, seconds: float, maxCalls: int
) -> None:
    """
    Print the figures of every row, raw and CPU-normalised, and the targets.

    Raw figures are those of each row's median round (by throughput); CPU
    figures pool every round of the row (all its calls over all the CPU
    time its nodes used), which the machine's other work disturbs less.
    """
    rows = {
        key: {n: _median(each) for n, each in byLevel.items()} for key, byLevel in runs.items()
    }
    cpuRows = {
        key: {n: Phase.pooled(each) for n, each in byLevel.items()}
        for key, byLevel in runs.items()
    }
    cpus = os.cpu_count() or 1
    processes = len(NODES) + 1
    print()
    print(
        f"txfractal cluster benchmark: loopback, {cpus} CPUs, Python "
        f"{sys.version.split()[0]}; mailbox Deliver, {USERS} users; "
        f"each row the median of {rounds} rounds of up to {seconds:g} s or {maxCalls} calls"
    )
    print()
    print("Raw: what the client saw (each row's median round).")
    print(
        f"{'setup':36} {'outst.':>6} {'calls/s':>8} {'per node':>9} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'calls':>6}"
    )
    for key, name in NAMES.items():
        for outstanding, phase in rows[key].items():
            r = phase.result
            print(
                f"{name:36} {outstanding:>6} {r.rate:>8.0f} {r.rate / NODE_COUNT[key]:>9.0f} "
                f"{r.p50:>7.2f} {r.p99:>7.2f} {r.calls:>6}"
            )
    print()
    print("CPU: each node process's CPU seconds during the phase (user+system, /proc/<pid>/stat),")
    print("the cores the nodes kept busy together, node and client CPU per call, and calls per")
    print(
        "node CPU-second (what one node serves per second with a core to itself); "
        f"all {rounds} rounds pooled."
    )
    print(
        f"{'setup':36} {'outst.':>6} {'node CPU s (each)':>20} {'cores':>6} "
        f"{'node us/call':>12} {'client us/call':>14} {'calls/node-CPU-s':>16}"
    )
    for key, name in NAMES.items():
        for outstanding, phase in cpuRows[key].items():
            each = " ".join(f"{c:.2f}" for c in phase.servers)
            perSecond = phase.callsPerServerCPUSecond
            shown = "n/a" if perSecond is None else f"{perSecond:.0f}"
            print(
                f"{name:36} {outstanding:>6} {each:>20} {phase.cores:>6.2f} "
                f"{phase.perCallMicroseconds:>12.1f} {phase.clientMicroseconds:>14.1f} "
                f"{shown:>16}"
            )

    def rate(key: str, outstanding: int) -> float:
        return rows[key][outstanding].result.rate

    def p50(key: str, outstanding: int) -> float:
        return rows[key][outstanding].result.p50

    def perNode(key: str, outstanding: int) -> float | None:
        return ratio(rate(key, outstanding) / NODE_COUNT[key], rate("1", outstanding))

    def perCPU(key: str, outstanding: int) -> float | None:
        return ratio(
            cpuRows[key][outstanding].callsPerServerCPUSecond,
            cpuRows["1"][outstanding].callsPerServerCPUSecond,
        )

    checks = [
        ("(3)/(2) p50 at 1", ratio(p50("3", 1), p50("2", 1)), 2.0, False),
        ("(3)/(2) p50 at 50", ratio(p50("3", 50), p50("2", 50)), 2.0, False),
        ("(2) per node / (1), raw rate at 1", perNode("2", 1), 0.9, True),
        ("(2) per node / (1), raw rate at 50", perNode("2", 50), 0.9, True),
        ("(2)/(1) calls per node CPU-s at 1", perCPU("2", 1), 0.9, True),
        ("(2)/(1) calls per node CPU-s at 50", perCPU("2", 50), 0.9, True),
    ]
    printVerdicts(checks, 38)
    print()
    print(
        f"{processes} processes ({len(NODES)} nodes and this client) share {cpus} CPUs, so "
        f"the {len(NODES)} nodes of (2)"
    )
    print(
        f"kept {cpuRows['2'][50].cores:.2f} cores busy together at 50 outstanding, "
        f"{cpuRows['2'][50].cores / len(NODES):.2f} each, where (1)'s one node kept "
        f"{cpuRows['1'][50].cores:.2f};"
    )
    print(
        "the raw per-node ratio is bounded by that sharing, the CPU-normalised one "
        "is what a node does per call."
    )
    for outstanding in CONCURRENCY:
        raw = perNode("4", outstanding)
        cpu = perCPU("4", outstanding)
        both = perCPU("2", outstanding)
        ceiling = ratio(both, cpu)
        print(
            f"For scale at {outstanding}: (4), no cluster code, per node / (1) = "
            f"{'n/a' if raw is None else f'{raw:.2f}'} raw, "
            f"{'n/a' if cpu is None else f'{cpu:.2f}'} per node CPU-s; "
            f"(2)/(4) per node CPU-s = {'n/a' if ceiling is None else f'{ceiling:.2f}'}"
        )


async def run(reactor: Any, options: argparse.Namespace) -> None:
    from fractal.client import connect
    from fractal.keys import slotForKey
    from fractal.routing.smart import connectCluster

    seconds = 1.5 if options.quick else 3.0
    maxCalls = 6000 if options.quick else 30000
    rounds = 1 if options.quick else options.rounds
    workdir = tempfile.mkdtemp(prefix="fractal-cluster-bench-")
    runs: dict[str, dict[int, list[Phase]]] = {key: {n: [] for n in CONCURRENCY} for key in NAMES}
    began = time.monotonic()
    children: list[Child] = []
    clients: list[Any] = []
    try:
        # All nodes run for the whole benchmark, and the rounds take turns,
        # so that load from elsewhere on the machine falls on every row
        # alike; each row reports its median round.
        single = startSingle(workdir)
        nodes = startCluster(workdir)
        separate = [startSingle(workdir, f"separate{i}") for i in range(len(NODES))]
        children = [single, *nodes.values(), *separate]
        for child in children:
            await child.ready(reactor)
        direct = connect(reactor, f"tcp:host=127.0.0.1:port={single.port}")
        seed = f"tcp:host=127.0.0.1:port={nodes['n1'].port}"
        plain = connect(reactor, seed)
        smart = connectCluster(reactor, seed)
        each = [connect(reactor, f"tcp:host=127.0.0.1:port={c.port}") for c in separate]
        clients = [direct, plain, smart, *each]
        for client in clients:
            await linked(reactor, client)
        # (4) sends each user to the separate node with the index of its
        # owner in the cluster's map, so every node gets the same users as
        # in (2).
        shardMap = smart.shardMap
        index = {node: i for i, node in enumerate(NODES)}
        chosen = {
            f"user{n}@example.com": each[
                index[shardMap.owners[slotForKey(f"user{n}@example.com", shardMap.slots)].node]
            ]
            for n in range(USERS)
        }
        setups = [
            ("1", deliverer(direct), [single]),
            ("2", deliverer(smart), list(nodes.values())),
            ("3", deliverer(plain), list(nodes.values())),
            ("4", deliverer(None, chosen), separate),
        ]
        for _, call, _ in setups:
            await warm(reactor, call, seconds)
        for _ in range(rounds):
            for key, call, servers in setups:
                for outstanding in CONCURRENCY:
                    phase = await measure(reactor, call, outstanding, seconds, maxCalls, servers)
                    runs[key][outstanding].append(phase)
    finally:
        for client in clients:
            await client.disconnect()
        for child in children:
            child.stop()
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - began
    report(runs, rounds, seconds, maxCalls)
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

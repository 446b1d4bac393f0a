# -*- test-case-name: tests.test_durable_benchmark -*-
"""
The mailbox C{Deliver} through a real node process, acknowledged locally and
durably, at 1 and 50 outstanding calls; part of C{benchmarks/durable.py}.

It drives the two nodes with the load machinery of C{benchmarks/node.py}, in
interleaved rounds, so both see the same machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet import defer, task

from benchmarks import node as nodebench

__all__ = ["main"]


async def run(reactor: Any, quick: bool) -> None:
    from examples.mailbox import Deliver

    rounds = 2 if quick else 3
    seconds = 1.0 if quick else 2.0
    maxCalls = 20000
    workdir = tempfile.mkdtemp(prefix="fractal-bench-durable-node-")
    targets: dict[str, Any] = {}
    try:
        for label, extra in [
            ("local", ()),
            ("durable", ("--app", "benchmarks._durablemailbox:application")),
        ]:
            data = os.path.join(workdir, f"{label}-data")
            child = nodebench.fractalNode(data, os.path.join(workdir, f"{label}.log"), *extra)
            targets[label] = nodebench.Target(child, Deliver)
        for target in targets.values():
            await target.connect(reactor)
            await target.warm(reactor)
        for _ in range(rounds):
            for outstanding in nodebench.CONCURRENCY:
                for target in targets.values():
                    await target.phase(reactor, outstanding, seconds, maxCalls)
                    # Let the node ship this phase's writes now (the local
                    # one ships them at its next interval) rather than
                    # during the other node's phase, as benchmarks/node.py
                    # does between rows.
                    await task.deferLater(reactor, 1.2, lambda: None)
    finally:
        for target in targets.values():
            target.close()
        shutil.rmtree(workdir, ignore_errors=True)
    merged = {label: target.merged() for label, target in targets.items()}
    print("4. mailbox Deliver through a node process (shipping to DATA/durable every 1 s)")
    print(f"   {'ack':8} {'outstanding':>11} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'server CPU us/call':>19}")
    for label in ("local", "durable"):
        for outstanding, result in merged[label].items():
            cpu = f"{result.cpu:.0f}" if result.cpu is not None else "?"
            print(f"   {label:8} {outstanding:>11} {result.rate:>9.0f} {result.p50:>8.2f} "
                  f"{result.p99:>8.2f} {cpu:>19}")
    for outstanding in nodebench.CONCURRENCY:
        ratio = merged["durable"][outstanding].rate / merged["local"][outstanding].rate
        target = ""
        if outstanding == 50:
            target = "  (target >= 0.5: " + ("ok" if ratio >= 0.5 else "MISSED") + ")"
        # Each round's pair of phases ran back to back: their ratios show how
        # much of the figure is the machine's noise.
        rounds = " ".join(
            f"{durable.rate / local.rate:.2f}"
            for durable, local in zip(
                targets["durable"].results[outstanding], targets["local"].results[outstanding]
            )
        )
        print(f"   durable/local throughput at {outstanding}: {ratio:.2f}x{target}"
              f"  (round by round: {rounds})")


def main(quick: bool = False) -> None:
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, quick)))

"""
The mailbox C{Deliver} through a real node process, acknowledged locally and
durably, at 1 and 50 outstanding calls; part of C{benchmarks/durable.py}.
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

    seconds = 2.0 if quick else 5.0
    maxCalls = 20000 if quick else 60000
    workdir = tempfile.mkdtemp(prefix="fractal-bench-durable-node-")
    rows = {}
    try:
        for label, extra in [
            ("local", ()),
            ("durable", ("--app", "benchmarks._durablemailbox:application")),
        ]:
            data = os.path.join(workdir, f"{label}-data")
            child = nodebench.fractalNode(data, os.path.join(workdir, f"{label}.log"), *extra)
            try:
                await child.ready(reactor)
                rows[label] = await nodebench.measure(reactor, child, Deliver, seconds, maxCalls)
            finally:
                child.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("4. mailbox Deliver through a node process (shipping to DATA/durable every 1 s)")
    print(f"   {'ack':8} {'outstanding':>11} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for label in ("local", "durable"):
        for outstanding, result in rows[label].items():
            print(f"   {label:8} {outstanding:>11} {result.rate:>9.0f} {result.p50:>8.2f} "
                  f"{result.p99:>8.2f}")
    for outstanding in nodebench.CONCURRENCY:
        ratio = rows["durable"][outstanding].rate / rows["local"][outstanding].rate
        target = "  (target >= 0.5: " + ("ok" if ratio >= 0.5 else "MISSED") + ")" if outstanding == 50 else ""
        print(f"   durable/local throughput at {outstanding}: {ratio:.2f}x{target}")


def main(quick: bool = False) -> None:
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, quick)))

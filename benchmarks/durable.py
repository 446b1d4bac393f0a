# -*- test-case-name: tests.test_durable_benchmark -*-
"""
Durable shipping: bytes per update, ship and restore throughput.

In one run on this machine, with real stores on disk and the filesystem
backend (fsync and all) in a temporary directory:

    1. bytes shipped per single-row update on a 1 MB and a 10 MB store,
       beside the size of a full copy of the store (the file, and the file
       compressed as a snapshot record): target <= 16 KiB per update;
    2. ship throughput: a 10 MB snapshot (MB/s), and single-row delta ships
       per second;
    3. restore throughput: restoring the 10 MB store from its chain (MB/s),
       beside a plain file copy of the same store.
    4. with C{--node}: the mailbox C{Deliver} through a real node process at
       1 and 50 outstanding calls, acknowledged locally vs durably (see
       C{benchmarks/node.py}); target: durable >= 0.5x local at 50.

The shipper runs its blocking work synchronously here, so the figures are
the work itself, without thread hand-offs.  Every phase is bounded in count.
Run: C{python3 benchmarks/durable.py} (C{--quick} for a shorter run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from twisted.internet.task import Clock  # noqa: E402
from twisted.python.filepath import FilePath  # noqa: E402

from fractal.durable._threads import runSynchronously  # noqa: E402
from fractal.durable.filesystem import FilesystemBackend  # noqa: E402
from fractal.durable.shipper import Shipper  # noqa: E402
from fractal.keys import storeNameForKey  # noqa: E402
from fractal.store import Item, Store, integer, text  # noqa: E402

__all__ = ["main"]


class BenchRow(Item):
    typeName = "bench_durable_row"
    number = integer()
    body = text()


def _result(d: Any) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError("did not finish synchronously")
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def fillStore(store: Store, megabytes: float) -> int:
    """
    Add rows of 492 random hexadecimal digits (which compress about as well
    as text does) until the database is about C{megabytes}.

    @return: the number of rows.
    """
    database = store.dbdir.child("db.sqlite")  # type: ignore[union-attr]
    rows = 0
    target = megabytes * 1024 * 1024
    while True:
        def batch(start: int) -> None:
            for i in range(start, start + 500):
                BenchRow(store=store, number=i, body=os.urandom(246).hex())

        store.transact(batch, rows)
        rows += 500
        connection = sqlite3.connect(database.path)
        try:
            [(pages,)] = connection.execute("PRAGMA page_count").fetchall()
            [(pageSize,)] = connection.execute("PRAGMA page_size").fetchall()
        finally:
            connection.close()
        if pages * pageSize >= target:
            return rows


class _Setup:
    def __init__(self, workdir: str) -> None:
        self.root = FilePath(workdir)
        self.clock = Clock()
        self.backend = FilesystemBackend(self.root.child("durable"), runSynchronously)
        self.shipper = Shipper(self.backend, self.clock, runInThread=runSynchronously)
        self.shipper.startService()

    def open(self, key: str) -> Store:
        name = storeNameForKey(key)
        store = Store(self.root.child("stores").child(name[:2]).child(name))
        return store

    def ship(self, key: str) -> None:
        d = self.shipper.whenDurable(key)
        self.clock.advance(0)
        _result(d)

    def records(self, key: str) -> list[Any]:
        return list(_result(self.backend.records(storeNameForKey(key))))


def bytesPerUpdate(setup: _Setup, megabytes: float, updates: int) -> dict[str, Any]:
    key = f"bytes-{megabytes}"
    store = setup.open(key)
    rows = fillStore(store, megabytes)
    setup.shipper.storeOpened(key, store)
    started = time.perf_counter()
    setup.ship(key)
    snapshotSeconds = time.perf_counter() - started
    [snapshot] = setup.records(key)
    sizes = []
    snapshots = 0
    shipSeconds = []
    shipped = 0
    for i in range(updates):
        number = (i * 7919) % rows
        row = store.findFirst(BenchRow, BenchRow.number == number)
        body = os.urandom(246).hex()
        store.transact(lambda: setattr(row, "body", body))
        started = time.perf_counter()
        setup.ship(key)
        shipSeconds.append(time.perf_counter() - started)
        newest = setup.records(key)[-1]
        if newest.isSnapshot:
            snapshots += 1
        else:
            sizes.append(newest.size)
        shipped += newest.size
    # As the pool does: the shipper lets go of the store before it closes.
    _result(setup.shipper.storeClosing(key, store))
    store.close()
    fileSize = store.dbdir.child("db.sqlite").getsize()  # type: ignore[union-attr]
    return {
        "key": key,
        "megabytes": megabytes,
        "fileSize": fileSize,
        "snapshotSize": snapshot.size,
        "snapshotSeconds": snapshotSeconds,
        "median": statistics.median(sizes),
        "max": max(sizes),
        "perUpdate": shipped / updates,
        "compactions": snapshots,
        "shipsPerSecond": len(shipSeconds) / sum(shipSeconds),
        "shipP50": statistics.median(shipSeconds),
    }


def restoreThroughput(setup: _Setup, key: str, repeats: int) -> dict[str, Any]:
    source = setup.open(key)
    fileSize = source.dbdir.child("db.sqlite").getsize()  # type: ignore[union-attr]
    sourcePath = source.dbdir.child("db.sqlite").path  # type: ignore[union-attr]
    source.close()
    restoreTimes = []
    copyTimes = []
    for i in range(repeats):
        destination = setup.root.child(f"restored-{i}")
        other = Shipper(setup.backend, Clock(), runInThread=runSynchronously)
        started = time.perf_counter()
        if not _result(other.restore(key, destination)):
            raise RuntimeError("nothing restored")
        restoreTimes.append(time.perf_counter() - started)
        started = time.perf_counter()
        copy = setup.root.child(f"copy-{i}")
        with open(sourcePath, "rb") as f, open(copy.path, "wb") as g:
            shutil.copyfileobj(f, g)
            g.flush()
            os.fsync(g.fileno())
        copyTimes.append(time.perf_counter() - started)
    return {
        "fileSize": fileSize,
        "chain": len(setup.records(key)),
        "restore": statistics.median(restoreTimes),
        "copy": statistics.median(copyTimes),
    }


def _mb(n: float) -> str:
    return f"{n / 1024 / 1024:.2f} MB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--quick", action="store_true", help="fewer updates and repeats")
    parser.add_argument(
        "--node", action="store_true", help="also run Deliver through a node, ack local vs durable"
    )
    options = parser.parse_args(argv)
    updates = 20 if options.quick else 100
    repeats = 1 if options.quick else 3
    workdir = tempfile.mkdtemp(prefix="fractal-bench-durable-")
    try:
        setup = _Setup(workdir)
        print("1. bytes shipped per single-row update (filesystem backend)")
        print(f"   {'store':>8} {'file (full copy)':>17} {'snapshot record':>16} "
              f"{'delta p50':>10} {'delta max':>10} {'all/update':>11} {'target':>8}")
        results = []
        for megabytes in (1, 10):
            r = bytesPerUpdate(setup, megabytes, updates)
            results.append(r)
            verdict = "ok" if r["max"] <= 16384 else "MISSED"
            print(f"   {megabytes:>6}MB {r['fileSize']:>17,} {r['snapshotSize']:>16,} "
                  f"{r['median']:>10,.0f} {r['max']:>10,} {r['perUpdate']:>11,.0f} "
                  f"{'<=16KiB ' + verdict:>8}")
        print(f"   ({updates} updates each; 'all/update' counts every byte shipped, "
              "compaction snapshots included)")
        print("2. ship throughput")
        big = results[-1]
        print(f"   snapshot of the {_mb(big['fileSize'])} store: {big['snapshotSeconds'] * 1000:.0f} ms, "
              f"{big['fileSize'] / big['snapshotSeconds'] / 1024 / 1024:.1f} MB/s")
        for r in results:
            print(f"   single-row delta ships on the {r['megabytes']} MB store: "
                  f"{r['shipsPerSecond']:.0f}/s (p50 {r['shipP50'] * 1000:.2f} ms, "
                  "log read + diff + compress + fsync'd write)")
        print("3. restore throughput")
        r = restoreThroughput(setup, big["key"], repeats)
        print(f"   restore of the {_mb(r['fileSize'])} store from a chain of {r['chain']} records: "
              f"{r['restore'] * 1000:.0f} ms, {r['fileSize'] / r['restore'] / 1024 / 1024:.1f} MB/s "
              f"(verified, quick_check, fsync)")
        print(f"   baseline, plain fsync'd file copy of the same store: {r['copy'] * 1000:.0f} ms, "
              f"{r['fileSize'] / r['copy'] / 1024 / 1024:.1f} MB/s")
        setup.shipper.stopService()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if options.node:
        from benchmarks import _durablenode

        _durablenode.main(quick=options.quick)


if __name__ == "__main__":
    main()

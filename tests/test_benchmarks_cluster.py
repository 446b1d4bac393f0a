# -*- test-case-name: tests.test_benchmarks_cluster -*-
"""
Tests for the arithmetic and the report of C{benchmarks/cluster.py}: raw and
CPU-normalised throughput per node (the measurements themselves are the
benchmark's business).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from types import ModuleType

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase


def _loadBenchmark() -> ModuleType:
    path = FilePath(__file__).parent().parent().descendant(["benchmarks", "cluster.py"])
    spec = importlib.util.spec_from_file_location("_benchmark_cluster", path.path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _loadBenchmark()


def phase(calls: int, seconds: float, servers: list[float], client: float) -> object:
    """
    A phase of C{calls} calls of 1 ms each over C{seconds}, with the given
    CPU seconds of each server and of the client.
    """
    return bench.Phase(bench.Result([0.001] * calls, seconds), servers, client)


class PhaseTests(SynchronousTestCase):
    """
    Tests for L{bench.Phase}.
    """

    def test_figures(self) -> None:
        """
        A phase gives the servers' CPU per call, the client's, calls per
        server CPU-second and the cores the servers kept busy.
        """
        p = bench.Phase(bench.Result([0.001] * 100, 2.0), [0.05, 0.05, 0.1], 0.02)
        self.assertAlmostEqual(p.perCallMicroseconds, 2000.0)
        self.assertAlmostEqual(p.clientMicroseconds, 200.0)
        self.assertAlmostEqual(p.callsPerServerCPUSecond, 500.0)
        self.assertAlmostEqual(p.cores, 0.1)

    def test_noCPU(self) -> None:
        """
        With no server CPU time measured, calls per CPU-second is unknown.
        """
        p = bench.Phase(bench.Result([0.001] * 10, 1.0), [0.0], 0.0)
        self.assertIsNone(p.callsPerServerCPUSecond)

    def test_pooled(self) -> None:
        """
        Pooling phases adds their calls, seconds and each server's CPU time.
        """
        pooled = bench.Phase.pooled(
            [
                bench.Phase(bench.Result([0.001] * 100, 1.0), [0.1, 0.2], 0.05),
                bench.Phase(bench.Result([0.002] * 300, 3.0), [0.3, 0.4], 0.15),
            ]
        )
        self.assertEqual(pooled.result.calls, 400)
        self.assertAlmostEqual(pooled.result.seconds, 4.0)
        self.assertEqual([round(s, 6) for s in pooled.servers], [0.4, 0.6])
        self.assertAlmostEqual(pooled.client, 0.2)
        self.assertAlmostEqual(pooled.callsPerServerCPUSecond, 400.0)


class ReportTests(SynchronousTestCase):
    """
    Tests for L{bench.report}.
    """

    def test_rawAndNormalised(self) -> None:
        """
        The report gives throughput per node raw and per node CPU-second,
        says how many processes share how many CPUs, and compares each
        with the single node.
        """
        # (1): 1000 calls/s on 0.5 s of CPU per second of run: 2000 calls
        # per CPU-second.  (2): 1500 calls/s over 3 nodes (500 each) on
        # 1.0 s of CPU: 1500 calls per CPU-second, 0.75x.
        runs = {
            "1": {n: [phase(3000, 3.0, [1.5], 0.3)] for n in (1, 50)},
            "2": {n: [phase(4500, 3.0, [1.0, 1.0, 1.0], 0.3)] for n in (1, 50)},
            "3": {n: [phase(3000, 3.0, [1.0, 1.0, 1.0], 0.3)] for n in (1, 50)},
            "4": {n: [phase(4500, 3.0, [1.0, 1.0, 1.0], 0.3)] for n in (1, 50)},
        }
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            bench.report(runs, 1, 3.0, 30000)
        text = out.getvalue()
        self.assertIn("(2) per node / (1), raw rate at 50", text)
        raw = next(line for line in text.splitlines() if "raw rate at 50" in line)
        self.assertIn("0.50", raw)
        self.assertIn("MISSES", raw)
        normalised = next(line for line in text.splitlines() if "node CPU-s at 50" in line)
        self.assertIn("0.75", normalised)
        self.assertIn("share", text)
        self.assertIn("4 processes (3 nodes and this client)", text)
        self.assertIn("(2)/(4) per node CPU-s = 1.00", text)

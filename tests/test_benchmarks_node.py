# -*- test-case-name: tests.test_benchmarks_node -*-
"""
Tests for the arithmetic of C{benchmarks/node.py}: percentiles, ratios and
verdicts (the measurements themselves are the benchmark's business).
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase


def _loadBenchmark() -> ModuleType:
    path = FilePath(__file__).parent().parent().descendant(["benchmarks", "node.py"])
    spec = importlib.util.spec_from_file_location("_benchmark_node", path.path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _loadBenchmark()


class ArithmeticTests(SynchronousTestCase):
    """
    Tests for the figures the benchmark prints.
    """

    def test_percentiles(self) -> None:
        """
        A result's p50 and p99 are nearest-rank percentiles, in milliseconds,
        and its rate is calls per second.
        """
        result = bench.Result([n / 1000 for n in range(1, 101)], 2.0)
        self.assertEqual(result.calls, 100)
        self.assertEqual(result.rate, 50.0)
        self.assertAlmostEqual(result.p50, 50.0)
        self.assertAlmostEqual(result.p99, 99.0)
        single = bench.Result([0.004], 1.0)
        self.assertAlmostEqual(single.p50, 4.0)
        self.assertAlmostEqual(single.p99, 4.0)

    def test_ratioAndVerdict(self) -> None:
        """
        A missing figure makes the ratio and the verdict "n/a"; otherwise the
        verdict compares with the target in the stated direction.
        """
        self.assertIsNone(bench.ratio(None, 2.0))
        self.assertIsNone(bench.ratio(1.0, 0.0))
        self.assertEqual(bench.ratio(3.0, 2.0), 1.5)
        self.assertEqual(bench.verdict(None, 1.0, True), "n/a")
        self.assertEqual(bench.verdict(0.75, 0.75, True), "meets")
        self.assertEqual(bench.verdict(0.7, 0.75, True), "MISSES")
        self.assertEqual(bench.verdict(5.0, 5.0, False), "meets")
        self.assertEqual(bench.verdict(5.1, 5.0, False), "MISSES")

    def test_cpuSeconds(self) -> None:
        """
        The CPU time of a live process is a non-negative number where
        C{/proc} exists, and L{None} for a process that does not exist.
        """
        if not os.path.exists("/proc/self/stat"):
            raise self.skipTest("needs /proc")
        self.assertGreaterEqual(bench.cpuSeconds(os.getpid()), 0.0)
        self.assertIsNone(bench.cpuSeconds(2**22 + 12345))

"""
The store benchmark runs (its figures are not checked: speed is measured by
running C{benchmarks/store.py}, never asserted in tests).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os

from twisted.trial.unittest import SynchronousTestCase

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "store.py")


class BenchmarkSmokeTests(SynchronousTestCase):
    """
    A tiny run of C{benchmarks/store.py}.
    """

    def test_runs(self) -> None:
        """
        Every workload runs and prints a raw figure, a fractal figure and a
        ratio.
        """
        spec = importlib.util.spec_from_file_location("_fractal_store_benchmark", _PATH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(module.main(["--smoke"]), 0)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 7)
        for line in lines[1:]:
            raw, fractal, ratio = line.split()[-3:]
            self.assertGreater(float(raw), 0)
            self.assertGreater(float(fractal), 0)
            self.assertGreater(float(ratio), 0)

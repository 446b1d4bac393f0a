# -*- test-case-name: tests.test_durable_benchmark -*-
"""
The byte figures of C{benchmarks/durable.py}, held as a test: a single-row
update of a 1 MB store ships at most 16 KiB (bytes, never time, are
asserted).
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase


def _loadBenchmark() -> ModuleType:
    path = FilePath(__file__).parent().parent().descendant(["benchmarks", "durable.py"])
    spec = importlib.util.spec_from_file_location("_benchmark_durable", path.path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _loadBenchmark()


class BytesPerUpdateTests(SynchronousTestCase):
    """
    Bytes shipped per single-row update.
    """

    def test_oneMegabyteStore(self) -> None:
        """
        On a 1 MB store, each single-row update ships one delta of at most
        16 KiB, a small fraction of a full copy, counting every byte shipped.
        """
        setup = bench._Setup(FilePath(self.mktemp()).path)
        self.addCleanup(setup.backend.close)
        self.addCleanup(setup.shipper.stopService)
        result = bench.bytesPerUpdate(setup, 1, 5)
        self.assertGreaterEqual(result["fileSize"], 1024 * 1024)
        self.assertLessEqual(result["max"], 16 * 1024)
        self.assertLessEqual(result["perUpdate"], 16 * 1024)
        self.assertLess(result["max"] * 50, result["fileSize"])
        self.assertEqual(result["compactions"], 0)

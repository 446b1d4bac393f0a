# -*- test-case-name: tests.test_testing -*-
"""
Public test doubles for applications built on txfractal, and the ones
txfractal's own tests use.

Everything here implements the same interface as the real part it stands in
for, and is checked against it by the same conformance tests, so a test that
passes against a fake says something about the real thing.
"""

from __future__ import annotations

from fractal.durable._conformance import DurableBackendTestsMixin, recordInfo
from fractal.durable._memory import BackendUnavailable, MemoryDurableBackend
from fractal.durable._threads import ManualThreads
from fractal.routing._conformance import TopologyTestsMixin
from fractal.routing.harness import SimulatedCluster
from fractal.routing.simulation import SimulatedNetwork
from fractal.routing.topology import ManualTopology, StaticTopology, reassign
from fractal.store._fixtures import writeAxiomStore

__all__: list[str] = [
    "BackendUnavailable",
    "DurableBackendTestsMixin",
    "ManualThreads",
    "MemoryDurableBackend",
    "recordInfo",
    "SimulatedCluster",
    "SimulatedNetwork",
    "StaticTopology",
    "ManualTopology",
    "reassign",
    "TopologyTestsMixin",
    "writeAxiomStore",
]

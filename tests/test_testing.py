"""
Tests for L{fractal.testing}, the public home of txfractal's test doubles.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import fractal.testing
from fractal.durable.interfaces import IDurableBackend
from fractal.routing.interfaces import ITopology
from fractal.routing.topology import SingleNodeTopology
from fractal.testing import ManualThreads, ManualTopology, MemoryDurableBackend


class ExportTests(SynchronousTestCase):
    """
    L{fractal.testing} exports what its C{__all__} names.
    """

    def test_allExported(self) -> None:
        """
        Every name in C{__all__} is an attribute of the module, and each is
        defined in a txfractal module (re-exported, not copied).
        """
        for name in fractal.testing.__all__:
            value = getattr(fractal.testing, name)
            self.assertTrue(value.__module__.startswith("fractal."), name)


class FakeConformanceTests(SynchronousTestCase):
    """
    The fakes provide the interfaces of the parts they stand in for.
    """

    def test_memoryBackend(self) -> None:
        """
        L{MemoryDurableBackend} provides L{IDurableBackend}.
        """
        self.assertTrue(verifyObject(IDurableBackend, MemoryDurableBackend()))

    def test_manualTopology(self) -> None:
        """
        L{ManualTopology} provides L{ITopology}.
        """
        initial = SingleNodeTopology("n1", "tcp:host=127.0.0.1:port=1", slots=4).currentMap()
        self.assertTrue(verifyObject(ITopology, ManualTopology("n1", initial)))


class ManualThreadsTests(SynchronousTestCase):
    """
    L{ManualThreads} runs the work handed to it when the test says so.
    """

    def test_runOne(self) -> None:
        """
        Work waits until L{ManualThreads.runOne}, oldest first; each
        L{Deferred} fires with its work's result or fails with what it
        raised.
        """
        threads = ManualThreads()
        first = threads(lambda: 1)
        second = threads(lambda: 1 // 0)
        self.assertEqual(len(threads.pending), 2)
        self.assertNoResult(first)
        threads.runOne()
        self.assertEqual(self.successResultOf(first), 1)
        self.assertNoResult(second)
        threads.runOne()
        self.failureResultOf(second, ZeroDivisionError)
        self.assertRaises(IndexError, threads.runOne)

    def test_runAll(self) -> None:
        """
        L{ManualThreads.runAll} also runs the work handed over while it
        runs.
        """
        threads = ManualThreads()
        ran = []
        threads(lambda: ran.append("first")).addCallback(
            lambda _: threads(lambda: ran.append("then"))
        )
        threads.runAll()
        self.assertEqual(ran, ["first", "then"])
        self.assertEqual(threads.pending, [])

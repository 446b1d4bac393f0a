# -*- test-case-name: tests.test_durable_shipper -*-
"""
Running blocking work off the reactor thread, through an injected runner so
tests can run it synchronously.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool

__all__ = ["ManualThreads", "RunInThread", "reactorThreads", "runSynchronously"]

T = TypeVar("T")

RunInThread = Callable[[Callable[[], Any]], "Deferred[Any]"]
"""
A callable that runs a blocking zero-argument callable somewhere and returns a
L{Deferred} of its result.
"""


def reactorThreads(reactor: Any = None) -> RunInThread:
    """
    A runner that uses C{reactor}'s thread pool; the global reactor, resolved
    when first used, if C{reactor} is L{None}.
    """

    def run(f: Callable[[], Any]) -> Deferred[Any]:
        nonlocal reactor
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        return deferToThreadPool(reactor, reactor.getThreadPool(), f)

    return run


def runSynchronously(f: Callable[[], Any]) -> Deferred[Any]:
    """
    A runner that runs C{f} at once, in the calling thread; for tests and
    offline tools.
    """
    return maybeDeferred(f)


class ManualThreads:
    """
    A runner (L{RunInThread}) that queues the work handed to it until the
    test runs it, as a busy thread pool would run it later: for tests of
    code that hands work to threads, to see what happens before the work
    runs and after.

    @ivar pending: the work not run yet, oldest first, with the L{Deferred}
        returned for each.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, f: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((f, d))
        return d

    def runOne(self) -> None:
        """
        Run the oldest work pending: its L{Deferred} fires with its result,
        or fails with what it raised.

        @raise IndexError: if no work is pending.
        """
        f, d = self.pending.pop(0)
        maybeDeferred(f).chainDeferred(d)

    def runAll(self) -> None:
        """
        Run the work pending, and the work handed over meanwhile, until none
        is left.
        """
        while self.pending:
            self.runOne()

# -*- test-case-name: tests.test_durable_shipper -*-
"""
Running blocking work off the reactor thread, through an injected runner so
tests can run it synchronously.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool

__all__ = ["RunInThread", "reactorThreads", "runSynchronously"]

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

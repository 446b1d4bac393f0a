# -*- test-case-name: tests.test_node_stale -*-
"""
Stale local copies of user stores, set aside.

A node may serve its local copy of a store only if nobody else can have
written the store since the copy was last shipped.  When a slot comes to a
node (or back to it, at a newer epoch), its local copies of the slot's stores
are stale: the node moves them out of C{DATA/stores/} into C{DATA/stale/}
(L{setAsideStores}), where they are never served or shipped but can still be
inspected, and restores the stores from their durable chains on their first
call.  Stale stores are deleted once older than a bound or beyond a count
(L{pruneStale}).

L{fractal.node.FractalNode} does this for every topology whose map can
change.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable

from twisted.python.filepath import FilePath

from fractal.keys import slotOfStoreName

__all__ = [
    "DEFAULT_STALE_KEEP",
    "DEFAULT_STALE_MAX",
    "pruneStale",
    "setAsideStores",
]

DEFAULT_STALE_KEEP = 7 * 24 * 3600.0
"""
Seconds a set-aside stale store is kept in C{DATA/stale/} for inspection.
"""

DEFAULT_STALE_MAX = 1000
"""
The most set-aside stale stores kept in C{DATA/stale/}; the oldest go first.
"""


def setAsideStores(
    storesDir: FilePath[str],
    staleDir: FilePath[str],
    slots: Iterable[int],
    slotCount: int,
    keep: Iterable[str] = (),
    now: Callable[[], float] = time.time,
) -> list[str]:
    """
    Move the local copies of the stores of C{slots} out of C{storesDir} into
    C{staleDir}, so they are never served and can still be inspected.
    Blocking.

    @param storesDir: the pool's directory of stores
        (C{DATA/stores/<2 digits>/<store name>}).
    @param staleDir: where they go, as C{<store name>-<time>}.
    @param slots: the slots whose stores go.
    @param slotCount: the cluster's slot count.
    @param keep: store names not to move (stores open now).
    @param now: the wall clock, for the names.
    @return: the names of the stores moved.
    """
    wanted = set(slots)
    kept = set(keep)
    moved: list[str] = []
    if not storesDir.isdir():
        return moved
    stamp = f"{now():.6f}"
    for prefix in storesDir.children():
        if not prefix.isdir():
            continue
        for store in prefix.children():
            name = store.basename()
            try:
                slot = slotOfStoreName(name, slotCount)
            except ValueError:
                continue
            if slot not in wanted or name in kept:
                continue
            staleDir.makedirs(ignoreExistingDirectory=True)
            os.replace(store.path, staleDir.child(f"{name}-{stamp}").path)
            moved.append(name)
    return moved


def _staleTime(name: str) -> float | None:
    """
    When the stale store C{name} (C{<store name>-<time>}) was set aside.
    """
    _, dash, stamp = name.rpartition("-")
    if not dash:
        return None
    try:
        return float(stamp)
    except ValueError:
        return None


def pruneStale(staleDir: FilePath[str], now: float, keep: float, maxCount: int) -> list[str]:
    """
    Delete the stale stores of C{staleDir} set aside more than C{keep}
    seconds before C{now}, and the oldest beyond the C{maxCount} newest.
    Entries whose names are not C{<store name>-<time>} are left alone.
    Blocking.

    @param staleDir: C{DATA/stale}.
    @param now: the time now, in seconds since the epoch.
    @param keep: seconds a stale store is kept.
    @param maxCount: the most stale stores kept.
    @return: the names deleted.
    """
    if not staleDir.isdir():
        return []
    entries: list[tuple[float, FilePath[str]]] = []
    for child in staleDir.children():
        stamp = _staleTime(child.basename())
        if stamp is not None:
            entries.append((stamp, child))
    entries.sort(key=lambda e: e[0], reverse=True)
    removed: list[str] = []
    for index, (stamp, child) in enumerate(entries):
        if index >= maxCount or now - stamp > keep:
            child.remove()
            removed.append(child.basename())
    return removed

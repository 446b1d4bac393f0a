# -*- test-case-name: tests.test_routing_rendezvous -*-
"""
Slot assignment by rendezvous (highest random weight) hashing.

Every (node, slot) pair gets a weight from a stable hash (SHA-256, the same in
every process and on every platform); a slot belongs to the node with the
highest weight for it.  Adding a node moves only the slots the new node now
wins, about C{1/(N+1)} of them, and removing a node moves only that node's
slots; every other slot keeps its owner.  Each node can compute the same
assignment from the member list alone, with no coordination.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

__all__ = ["slotWeight", "rendezvousOwners"]


def slotWeight(node: str, slot: int) -> int:
    """
    The rendezvous weight of C{node} for C{slot}: a 64-bit integer derived
    from a SHA-256 of both.

    @param node: a node id.
    @param slot: a slot number, non-negative.
    @return: the weight; higher wins.
    """
    digest = hashlib.sha256(
        b"fractal-slot\x00" + node.encode("utf-8") + b"\x00" + slot.to_bytes(8, "big")
    ).digest()
    return int.from_bytes(digest[:8], "big")


def rendezvousOwners(nodes: Iterable[str], slots: int) -> tuple[str, ...]:
    """
    Assign each of C{slots} slots to one of C{nodes}.

    @param nodes: the member node ids, in any order (the result does not
        depend on it).
    @param slots: the number of slots, positive.
    @return: the owning node id of each slot; slot C{i} is item C{i}.
    @raise ValueError: if there is no node, a node id repeats, or C{slots}
        is not positive.
    """
    members = sorted(nodes)
    if not members:
        raise ValueError("rendezvous hashing needs at least one node")
    if len(set(members)) != len(members):
        raise ValueError(f"node ids repeat in {members!r}")
    if slots < 1:
        raise ValueError(f"slot count must be positive, not {slots!r}")
    # Ties (astronomically unlikely) go to the greater node id, so the result
    # is still a pure function of the member set.
    return tuple(
        max(members, key=lambda node: (slotWeight(node, slot), node))
        for slot in range(slots)
    )

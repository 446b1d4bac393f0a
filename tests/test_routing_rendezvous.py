"""
Tests for L{fractal.routing.rendezvous}.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fractal.routing.rendezvous import rendezvousOwners, slotWeight

PINNED = ("n2", "n1", "n2", "n1", "n2", "n3", "n1", "n1")


class RendezvousOwnersTests(SynchronousTestCase):
    """
    Tests for L{rendezvousOwners}.
    """

    slots = 4096

    def test_stableWeights(self) -> None:
        """
        Weights come from a stable hash: the same in every process, so every
        node computes the same map.  A known value pins the function.
        """
        self.assertEqual(slotWeight("n1", 0), slotWeight("n1", 0))
        self.assertNotEqual(slotWeight("n1", 0), slotWeight("n2", 0))
        self.assertNotEqual(slotWeight("n1", 0), slotWeight("n1", 1))
        self.assertEqual(slotWeight("n1", 7), 0xf1a5b7bae610b997)
        self.assertEqual(rendezvousOwners(["a", "b", "c"], 8), rendezvousOwners(["c", "a", "b"], 8))

    def test_knownAssignment(self) -> None:
        """
        The assignment of a small cluster is pinned, so a change to the hash,
        which would move every user, fails this test.
        """
        self.assertEqual(rendezvousOwners(["n1", "n2", "n3"], 8), PINNED)

    def test_balanced(self) -> None:
        """
        Each of N nodes gets about 1/N of the slots.
        """
        for n in (2, 3, 5, 8):
            nodes = [f"n{i}" for i in range(n)]
            counts = Counter(rendezvousOwners(nodes, self.slots))
            self.assertEqual(set(counts), set(nodes))
            for node, count in counts.items():
                self.assertLess(abs(count - self.slots / n), 0.2 * self.slots / n, (n, node))

    def test_addingMovesOnlyToNewNode(self) -> None:
        """
        Adding one node to N moves about 1/(N+1) of the slots, every moved
        slot goes to the new node, and nothing else moves.
        """
        for n in (1, 2, 3, 4, 9):
            before = rendezvousOwners([f"n{i}" for i in range(n)], self.slots)
            after = rendezvousOwners([f"n{i}" for i in range(n + 1)], self.slots)
            moved = [slot for slot in range(self.slots) if before[slot] != after[slot]]
            self.assertEqual({after[slot] for slot in moved}, {f"n{n}"})
            expected = self.slots / (n + 1)
            self.assertLess(abs(len(moved) - expected), 0.15 * expected, n)

    def test_removingMovesOnlyRemovedNodesSlots(self) -> None:
        """
        Removing one node moves exactly that node's slots, spread over the
        others, and no other slot.
        """
        nodes = ["a", "b", "c", "d"]
        before = rendezvousOwners(nodes, self.slots)
        after = rendezvousOwners(["a", "b", "d"], self.slots)
        for slot in range(self.slots):
            if before[slot] == "c":
                self.assertIn(after[slot], {"a", "b", "d"})
            else:
                self.assertEqual(after[slot], before[slot])
        movedTo = Counter(after[slot] for slot in range(self.slots) if before[slot] == "c")
        self.assertEqual(set(movedTo), {"a", "b", "d"})

    def test_badInput(self) -> None:
        """
        No nodes, a repeated node or a non-positive slot count is refused.
        """
        self.assertRaises(ValueError, rendezvousOwners, [], 4)
        self.assertRaises(ValueError, rendezvousOwners, ["a", "a"], 4)
        self.assertRaises(ValueError, rendezvousOwners, ["a"], 0)


class RendezvousPropertyTests(SynchronousTestCase):
    """
    Properties of L{rendezvousOwners} over arbitrary member sets.
    """

    @settings(max_examples=30, deadline=None)
    @given(
        members=st.sets(st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True), min_size=1, max_size=6),
        newcomer=st.from_regex(r"[A-Z][a-z0-9]{0,6}", fullmatch=True),
    )
    def test_onlyTheNewcomerGains(self, members: set[str], newcomer: str) -> None:
        """
        Whatever the members, adding one node moves slots only to it, and
        removing one member moves only that member's slots.
        """
        before = rendezvousOwners(members, 256)
        after = rendezvousOwners(members | {newcomer}, 256)
        for slot in range(256):
            self.assertIn(after[slot], {before[slot], newcomer})
        gone = min(members)
        if len(members) > 1:
            fewer = rendezvousOwners(members - {gone}, 256)
            for slot in range(256):
                if before[slot] != gone:
                    self.assertEqual(fewer[slot], before[slot])

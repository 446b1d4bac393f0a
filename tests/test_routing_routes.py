"""
Tests for L{fractal.routing._routes}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from fractal.keys import InvalidUserKey
from fractal.routing._routes import RouteMemo
from fractal.routing.interfaces import NodeAddress, ShardMap, SlotOwner


def _map(owner: str) -> ShardMap:
    """
    A one-slot map whose slot C{owner} owns.
    """
    return ShardMap(
        owners=(SlotOwner(owner, 1),),
        nodes={owner: NodeAddress(owner, "tcp:host=127.0.0.1:port=1")},
    )


class RouteMemoTests(SynchronousTestCase):
    """
    Tests for L{RouteMemo}.
    """

    def setUp(self) -> None:
        self.calls: list[str] = []

        def route(shardMap: ShardMap, key: str) -> str:
            self.calls.append(key)
            return shardMap.ownerOfKey(key).node

        self.memo: RouteMemo[str, str] = RouteMemo(route, kept=2)

    def test_remembered(self) -> None:
        """
        A key's route is computed once while the map is the same object.
        """
        shardMap = _map("n1")
        self.assertEqual(self.memo.lookup(shardMap, "alice"), "n1")
        self.assertEqual(self.memo.lookup(shardMap, "alice"), "n1")
        self.assertEqual(self.calls, ["alice"])

    def test_newMap(self) -> None:
        """
        A new map forgets every remembered route.
        """
        self.memo.lookup(_map("n1"), "alice")
        self.assertEqual(self.memo.lookup(_map("n2"), "alice"), "n2")
        self.assertEqual(self.calls, ["alice", "alice"])

    def test_bounded(self) -> None:
        """
        Once C{kept} keys are remembered, a new key makes the memo forget
        them all before remembering it.
        """
        shardMap = _map("n1")
        for key in ("a", "b", "c", "a", "c"):
            self.memo.lookup(shardMap, key)
        self.assertEqual(self.calls, ["a", "b", "c", "a"])

    def test_errorNotRemembered(self) -> None:
        """
        What the routing function raises reaches the caller, every time.
        """
        shardMap = _map("n1")
        self.assertRaises(InvalidUserKey, self.memo.lookup, shardMap, "")
        self.assertRaises(InvalidUserKey, self.memo.lookup, shardMap, "")
        self.assertEqual(self.calls, ["", ""])

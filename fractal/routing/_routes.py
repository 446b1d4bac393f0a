# -*- test-case-name: tests.test_routing_routes,tests.test_server,tests.test_client -*-
"""
Remembering where user keys are routed, for as long as the shard map holds.

Both the node (L{fractal.server.FractalServer}) and the smart client
(L{fractal.routing.smart.ClusterClient}) route every call by its user key;
validating and hashing the key on every call of a busy user costs more than
looking its answer up.
"""

from __future__ import annotations

from typing import Callable, Generic, Hashable, TypeVar

from fractal.routing.interfaces import ShardMap

__all__ = ["ROUTES_KEPT", "RouteMemo"]

ROUTES_KEPT = 1 << 16
"""
The most user keys whose routing a L{RouteMemo} remembers by default.
"""

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class RouteMemo(Generic[K, V]):
    """
    The answers of a routing function of a map and a key, remembered per
    key while the map is the same object (a L{ShardMap} is immutable, and a
    new map is a new object), and all forgotten when the map changes or
    more than C{kept} keys are remembered.
    """

    def __init__(self, route: Callable[[ShardMap, K], V], kept: int = ROUTES_KEPT) -> None:
        """
        @param route: the routing function; what it raises is raised to the
            caller and nothing is remembered.
        @param kept: the most keys remembered.
        """
        self._route = route
        self._kept = kept
        self._map: ShardMap | None = None
        self._answers: dict[K, V] = {}

    def lookup(self, shardMap: ShardMap, key: K) -> V:
        """
        C{route(shardMap, key)}, remembered.
        """
        if shardMap is not self._map:
            self._map = shardMap
            self._answers.clear()
        answers = self._answers
        answer = answers.get(key)
        if answer is None:
            answer = self._route(shardMap, key)
            if len(answers) >= self._kept:
                answers.clear()
            answers[key] = answer
        return answer

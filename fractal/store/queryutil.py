# -*- test-case-name: tests.test_store_query -*-
"""
Query helpers: ranges and tuple comparisons, as in Axiom's
C{axiom.queryutil}.
"""

from __future__ import annotations

from typing import Any

from fractal.store.attributes import AND, OR

__all__ = ["AttributeTuple", "contains", "overlapping"]


def contains(startAttribute: Any, endAttribute: Any, value: Any) -> Any:
    """
    The half-open range [start, end) contains C{value}.
    """
    return AND(startAttribute <= value, endAttribute > value)


def overlapping(startAttribute: Any, endAttribute: Any, startValue: Any, endValue: Any) -> Any:
    """
    The half-open range [start, end) of the item overlaps the half-open
    range [startValue, endValue).
    """
    return AND(startAttribute < endValue, endAttribute > startValue)


class AttributeTuple:
    """
    Several attributes compared as one tuple, lexicographically, e.g. for
    keyset paging: C{AttributeTuple(C.a, C.b) > (1, 2)}.
    """

    def __init__(self, *attributes: Any) -> None:
        if not attributes:
            raise ValueError("AttributeTuple needs at least one attribute")
        self.attributes = attributes

    def _check(self, other: Any) -> tuple[Any, ...]:
        if not isinstance(other, tuple) or len(other) != len(self.attributes):
            raise ValueError("compare with a tuple of %d values" % (len(self.attributes),))
        return other

    def __eq__(self, other: Any) -> Any:
        other = self._check(other)
        return AND(*[a == v for a, v in zip(self.attributes, other)])

    def __ne__(self, other: Any) -> Any:
        other = self._check(other)
        return OR(*[a != v for a, v in zip(self.attributes, other)])

    def _lexicographic(self, other: Any, strict: str, inclusive: bool) -> Any:
        other = self._check(other)
        alternatives = []
        for i in range(len(self.attributes)):
            equal = [a == v for a, v in zip(self.attributes[:i], other[:i])]
            last = self.attributes[i]._compare(other[i], strict)
            alternatives.append(AND(*(equal + [last])))
        if inclusive:
            alternatives.append(self == other)
        return OR(*alternatives)

    def __gt__(self, other: Any) -> Any:
        return self._lexicographic(other, ">", False)

    def __ge__(self, other: Any) -> Any:
        return self._lexicographic(other, ">", True)

    def __lt__(self, other: Any) -> Any:
        return self._lexicographic(other, "<", False)

    def __le__(self, other: Any) -> Any:
        return self._lexicographic(other, "<", True)

    __hash__ = object.__hash__

"""
Property tests (Hypothesis) for value encodings and LIKE escaping.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fractal.store import Item, Store, Time, point3decimal, text, textlist, timestamp


class Valued(Item):
    """
    One attribute per encoding under test.
    """

    words = textlist()
    amount = point3decimal()
    when = timestamp()
    name = text()


_element = st.text(alphabet=st.characters(blacklist_characters="\x00\x1f\x02", blacklist_categories=("Cs",)))


def _reloaded(store: Store, item: Valued) -> Valued:
    store._cache.pop(item.storeID)
    loaded: Valued = store.getItemByID(item.storeID)
    return loaded


class RoundTripTests(SynchronousTestCase):
    """
    Values survive the database unchanged (or rounded as documented).
    """

    @settings(max_examples=60, deadline=None)
    @given(st.lists(_element, max_size=5))
    def test_textlist(self, words: list[str]) -> None:
        """
        Any list of strings without the separators round-trips.
        """
        s = Store()
        self.assertEqual(_reloaded(s, Valued(store=s, words=words)).words, words)

    @settings(max_examples=60, deadline=None)
    @given(st.decimals(min_value=-(10**12), max_value=10**12, allow_nan=False, allow_infinity=False))
    def test_decimal(self, value: Decimal) -> None:
        """
        A decimal is rounded half-to-even to 3 places on set, and reloads as
        exactly that.
        """
        expected = value.quantize(Decimal("0.001"), rounding=ROUND_HALF_EVEN)
        s = Store()
        item = Valued(store=s, amount=value)
        self.assertEqual(item.amount, expected)
        self.assertEqual(_reloaded(s, item).amount, expected)

    @settings(max_examples=60, deadline=None)
    @given(st.integers(min_value=-(2**62), max_value=2**62 // 1000))
    def test_timestamp(self, microseconds: int) -> None:
        """
        Timestamps round-trip to the microsecond.
        """
        try:
            when = Time.fromMicroseconds(microseconds)
        except OverflowError:
            return
        s = Store()
        self.assertEqual(_reloaded(s, Valued(store=s, when=when)).when, when)


class LikeEscapingTests(SynchronousTestCase):
    """
    startswith/endswith agree with Python on ASCII-folded strings.
    """

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(st.text(alphabet="ab_%\\", max_size=4), min_size=1, max_size=6, unique=True),
        st.text(alphabet="ab_%\\", max_size=3),
    )
    def test_startsEnds(self, names: list[str], fix: str) -> None:
        """
        startswith(x) finds exactly the names that start with x; endswith
        likewise, whatever wildcard characters they contain.
        """
        s = Store()
        for n in names:
            Valued(store=s, name=n)
        starts = sorted(v.name for v in s.query(Valued, Valued.name.startswith(fix)))
        ends = sorted(v.name for v in s.query(Valued, Valued.name.endswith(fix)))
        self.assertEqual(starts, sorted(n for n in names if n.startswith(fix)))
        self.assertEqual(ends, sorted(n for n in names if n.endswith(fix)))

"""
Model-based tests for L{fractal.store}: a store on disk is driven through
random creates, updates, deletes, committed and rolled-back transactions and
close/reopen cycles, and checked after every step against a plain dict.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from fractal.store.attributes import integer, reference, text
from fractal.store.errors import ItemNotFound
from fractal.store.item import Item
from fractal.store.store import Store


class ModelRow(Item):
    """
    The item type the model test stores.
    """

    label = text(caseSensitive=True)
    number = integer()
    other = reference(doc="Another row, or None; nullified when that row is deleted.")


_texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)
_ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_values = st.tuples(_texts, _ints)

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("create"), _values),
        st.tuples(st.just("update"), st.integers(min_value=0), _values),
        st.tuples(st.just("delete"), st.integers(min_value=0)),
        st.tuples(st.just("link"), st.integers(min_value=0), st.integers(min_value=0)),
    ),
    max_size=6,
)


class _Rollback(Exception):
    """
    Raised to roll a transaction back on purpose.
    """


class StoreModel(RuleBasedStateMachine):
    """
    A store on disk and the dict of C{storeID -> (label, number, other)} it
    should hold, C{other} being the storeID of the referenced row or
    L{None}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tempdir = FilePath(tempfile.mkdtemp())
        self.dbdir = self.tempdir.child("model.axiom")
        self.store = Store(self.dbdir)
        self.model: dict[int, tuple[str, int, int | None]] = {}
        self.gone: set[int] = set()

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.tempdir.path)

    def _apply(self, model: dict[int, tuple[str, int, int | None]], gone: set[int], op: Any) -> None:
        """
        Apply one operation to the store and to C{model}.
        """
        if op[0] == "create":
            label, number = op[1]
            row = ModelRow(store=self.store, label=label, number=number)
            model[row.storeID] = (label, number, None)
            gone.discard(row.storeID)
            return
        if not model:
            return
        ids = sorted(model)
        storeID = ids[op[1] % len(ids)]
        row = self.store.getItemByID(storeID)
        if op[0] == "update":
            row.label, row.number = op[2]
            model[storeID] = (*op[2], model[storeID][2])
        elif op[0] == "link":
            otherID = ids[op[2] % len(ids)]
            row.other = self.store.getItemByID(otherID)
            model[storeID] = (*model[storeID][:2], otherID)
        else:
            row.deleteFromStore()
            del model[storeID]
            gone.add(storeID)
            for key, (label, number, other) in list(model.items()):
                if other == storeID:
                    model[key] = (label, number, None)

    @rule(values=_values)
    def create(self, values: tuple[str, int]) -> None:
        self._apply(self.model, self.gone, ("create", values))

    @precondition(lambda self: bool(self.model))
    @rule(index=st.integers(min_value=0), values=_values)
    def update(self, index: int, values: tuple[str, int]) -> None:
        self._apply(self.model, self.gone, ("update", index, values))

    @precondition(lambda self: bool(self.model))
    @rule(index=st.integers(min_value=0), otherIndex=st.integers(min_value=0))
    def link(self, index: int, otherIndex: int) -> None:
        self._apply(self.model, self.gone, ("link", index, otherIndex))

    @precondition(lambda self: bool(self.model))
    @rule(index=st.integers(min_value=0))
    def delete(self, index: int) -> None:
        self._apply(self.model, self.gone, ("delete", index))

    @rule(ops=_ops, commit=st.booleans())
    def transaction(self, ops: list[Any], commit: bool) -> None:
        model = dict(self.model)
        gone = set(self.gone)

        def work() -> None:
            for op in ops:
                self._apply(model, gone, op)
            self.check(model)
            if not commit:
                raise _Rollback()

        if commit:
            self.store.transact(work)
            self.model, self.gone = model, gone
        else:
            try:
                self.store.transact(work)
            except _Rollback:
                pass
            else:
                raise AssertionError("the transaction did not raise")
            # Rows created and rolled back are gone too.
            self.gone |= set(model) - set(self.model)

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = Store(self.dbdir)

    def check(self, model: dict[int, tuple[str, int, int | None]]) -> None:
        """
        The store holds exactly C{model}, and C{other == None} finds exactly
        the rows with no reference.
        """
        rows = {
            row.storeID: (row.label, row.number, None if row.other is None else row.other.storeID)
            for row in self.store.query(ModelRow)
        }
        assert rows == model, (rows, model)
        assert self.store.query(ModelRow).count() == len(model)
        unlinked = {row.storeID for row in self.store.query(ModelRow, ModelRow.other == None)}  # noqa: E711
        assert unlinked == {k for k, v in model.items() if v[2] is None}, unlinked

    @invariant()
    def agrees(self) -> None:
        self.check(self.model)
        for storeID, values in self.model.items():
            row = self.store.getItemByID(storeID)
            assert (row.label, row.number) == values[:2]
        for storeID in self.gone - set(self.model):
            try:
                row = self.store.getItemByID(storeID)
            except ItemNotFound:
                continue
            raise AssertionError(f"{storeID} should be gone but is {row!r}")


_StoreModelCase = StoreModel.TestCase
_StoreModelCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


class StoreModelTests(SynchronousTestCase):
    """
    The store agrees with a plain-dict model.
    """

    def test_agreesWithModel(self) -> None:
        """
        Through random creates, updates, deletes, committed and rolled-back
        transactions and reopens, the store always holds what the dict
        model holds, and deleted or rolled-back rows are not found.
        """
        _StoreModelCase("runTest").runTest()

# -*- test-case-name: tests.test_durable_backend -*-
"""
An in-memory durable backend, for tests; public as
L{fractal.testing.MemoryDurableBackend}.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred
from zope.interface import implementer

from fractal.durable.filesystem import checkAppend, checkInfo
from fractal.durable.interfaces import (
    IDurableBackend,
    NoSuchRecord,
    RecordInfo,
    SequenceConflict,
    StaleEpoch,
)
from fractal.keys import checkStoreName

__all__ = ["MemoryDurableBackend", "BackendUnavailable"]

T = TypeVar("T")


class BackendUnavailable(ConnectionError):
    """
    The in-memory backend was told to behave as if it could not be reached.
    """


@implementer(IDurableBackend)
class MemoryDurableBackend:
    """
    Chains of records kept in memory, with the same checks as a real backend.

    Tests can make it unreachable (L{available}) or hold its appends until
    they choose (L{holdAppends}, L{releaseAppends}), to play a backend that is
    down or slow.

    @ivar available: when false, every method fails with
        L{BackendUnavailable}.
    @ivar holdAppends: when true, appends wait until L{releaseAppends}.
    @ivar appended: every record info accepted, in order.
    """

    def __init__(self) -> None:
        self.available = True
        self.holdAppends = False
        self.appended: list[RecordInfo] = []
        self._records: dict[str, dict[int, tuple[RecordInfo, bytes]]] = {}
        self._epochs: dict[str, int] = {}
        self._held: list[tuple[Deferred[Any], list[tuple[RecordInfo, bytes]], bool]] = []

    def _call(self, f: Callable[[], T]) -> Deferred[T]:
        if not self.available:
            return fail(BackendUnavailable("the in-memory backend is unavailable"))
        return maybeDeferred(f)

    def _append(self, info: RecordInfo, data: bytes) -> None:
        if not self.available:
            raise BackendUnavailable("the in-memory backend is unavailable")
        checkInfo(info, data)
        current = self._epochs.get(info.store, 0)
        records = self._records.setdefault(info.store, {})
        checkAppend(info, current, max(records, default=0))
        self._epochs[info.store] = max(current, info.epoch)
        records[info.seq] = (info, bytes(data))
        self.appended.append(info)

    def _appendMany(
        self, records: Sequence[tuple[RecordInfo, bytes]]
    ) -> list[BaseException | None]:
        if not self.available:
            raise BackendUnavailable("the in-memory backend is unavailable")
        outcomes: list[BaseException | None] = []
        for info, data in records:
            try:
                self._append(info, data)
            except (ValueError, StaleEpoch, SequenceConflict) as e:
                outcomes.append(e)
            else:
                outcomes.append(None)
        return outcomes

    def append(self, info: RecordInfo, data: bytes) -> Deferred[None]:
        if self.holdAppends:
            d: Deferred[None] = Deferred()
            self._held.append((d, [(info, data)], False))
            return d
        return self._call(lambda: self._append(info, data))

    def appendMany(
        self, records: Sequence[tuple[RecordInfo, bytes]]
    ) -> Deferred[list[BaseException | None]]:
        """
        See L{IDurableBackend.appendMany}: the batch is held as one while
        L{holdAppends} is true.
        """
        records = list(records)
        if self.holdAppends:
            d: Deferred[list[BaseException | None]] = Deferred()
            self._held.append((d, records, True))
            return d
        return self._call(lambda: self._appendMany(records))

    def releaseAppends(self) -> None:
        """
        Perform the held appends and batches, in order, and fire their
        Deferreds.
        """
        held, self._held = self._held, []
        for d, records, batch in held:
            try:
                outcomes = self._appendMany(records)
            except Exception as e:
                d.errback(e)
                continue
            if batch:
                d.callback(outcomes)
            elif outcomes[0] is not None:
                d.errback(outcomes[0])
            else:
                d.callback(None)

    def fence(self, store: str, epoch: int) -> Deferred[None]:
        def fence() -> None:
            checkStoreName(store)
            current = self._epochs.get(store, 0)
            if epoch < current:
                raise StaleEpoch(store, epoch, current)
            self._epochs[store] = epoch

        return self._call(fence)

    def head(self, store: str) -> Deferred[RecordInfo | None]:
        def head() -> RecordInfo | None:
            records = self._records.get(checkStoreName(store), {})
            return records[max(records)][0] if records else None

        return self._call(head)

    def records(self, store: str) -> Deferred[list[RecordInfo]]:
        def records() -> list[RecordInfo]:
            stored = self._records.get(checkStoreName(store), {})
            return [stored[seq][0] for seq in sorted(stored)]

        return self._call(records)

    def read(self, store: str, seq: int) -> Deferred[bytes]:
        def read() -> bytes:
            stored = self._records.get(checkStoreName(store), {})
            if seq not in stored:
                raise NoSuchRecord(f"store {store} has no record {seq}")
            return stored[seq][1]

        return self._call(read)

    def corrupt(self, store: str, seq: int, data: bytes) -> None:
        """
        Replace the bytes of a stored record, to play a medium that lost or
        damaged them.  The record's info is left as it was.
        """
        info, _ = self._records[store][seq]
        self._records[store][seq] = (info, data)

    def remove(self, store: str, seq: int) -> None:
        """
        Delete one stored record, to play a chain that lost a link.
        """
        del self._records[store][seq]

    def prune(self, store: str, beforeSeq: int) -> Deferred[int]:
        def prune() -> int:
            stored = self._records.get(checkStoreName(store), {})
            if beforeSeq not in stored or not stored[beforeSeq][0].isSnapshot:
                return 0
            old = [seq for seq in stored if seq < beforeSeq]
            for seq in old:
                del stored[seq]
            return len(old)

        return self._call(prune)

    def stores(self) -> Deferred[list[str]]:
        return self._call(
            lambda: sorted(set(self._epochs) | {s for s, r in self._records.items() if r})
        )

# -*- test-case-name: tests.test_durable_backend -*-
"""
The conformance tests every L{IDurableBackend} runs; public as
L{fractal.testing.DurableBackendTestsMixin}.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from fractal.durable.interfaces import (
    IDurableBackend,
    NoSuchRecord,
    RecordInfo,
    SequenceConflict,
    StaleEpoch,
)
from fractal.keys import storeNameForKey

__all__ = ["DurableBackendTestsMixin", "recordInfo"]

_STORE = storeNameForKey("alice@example.com")
_OTHER = storeNameForKey("bob@example.com")


def recordInfo(store: str, epoch: int, seq: int, baseSeq: int, data: bytes) -> RecordInfo:
    """
    The L{RecordInfo} describing C{data}.
    """
    return RecordInfo(
        store=store,
        epoch=epoch,
        seq=seq,
        baseSeq=baseSeq,
        size=len(data),
        digest=hashlib.sha256(data).digest(),
    )


class DurableBackendTestsMixin:
    """
    Tests of the L{IDurableBackend} contract.

    Mix into a L{twisted.trial.unittest.TestCase} subclass that defines
    C{makeBackend()}, returning a new, empty backend.  The tests are
    coroutines, so backends whose Deferreds fire later (a database through a
    thread pool) run them as well as those that answer at once.
    """

    def makeBackend(self) -> IDurableBackend:
        raise NotImplementedError("define makeBackend")

    async def _append(
        self, backend: Any, store: str, epoch: int, seq: int, baseSeq: int, data: bytes
    ) -> None:
        await backend.append(recordInfo(store, epoch, seq, baseSeq, data), data)

    async def _refused(self, d: Deferred[Any], *errors: type[BaseException]) -> BaseException:
        try:
            await d
        except errors as e:
            return e
        self.fail(f"expected one of {errors}")  # type: ignore[attr-defined]
        raise AssertionError("unreachable")

    async def test_provides(self) -> None:
        """
        The backend provides L{IDurableBackend}.
        """
        self.assertTrue(verifyObject(IDurableBackend, self.makeBackend()))  # type: ignore[attr-defined]

    async def test_roundTrip(self) -> None:
        """
        Appended records are listed in order, the newest is the head, and
        each reads back byte for byte.
        """
        backend = self.makeBackend()
        await self._append(backend, _STORE, 1, 1, 0, b"snapshot")
        await self._append(backend, _STORE, 1, 2, 1, b"delta two")
        await self._append(backend, _STORE, 1, 3, 2, b"delta three")
        records = await backend.records(_STORE)
        self.assertEqual([(r.seq, r.baseSeq) for r in records], [(1, 0), (2, 1), (3, 2)])  # type: ignore[attr-defined]
        self.assertEqual(records[1], recordInfo(_STORE, 1, 2, 1, b"delta two"))  # type: ignore[attr-defined]
        self.assertEqual(await backend.head(_STORE), records[-1])  # type: ignore[attr-defined]
        self.assertEqual(await backend.read(_STORE, 2), b"delta two")  # type: ignore[attr-defined]
        self.assertEqual(await backend.stores(), [_STORE])  # type: ignore[attr-defined]

    async def test_empty(self) -> None:
        """
        A store that was never written has no head, no records, and reading
        a record of it fails with L{NoSuchRecord}.
        """
        backend = self.makeBackend()
        self.assertIsNone(await backend.head(_STORE))  # type: ignore[attr-defined]
        self.assertEqual(await backend.records(_STORE), [])  # type: ignore[attr-defined]
        self.assertEqual(await backend.stores(), [])  # type: ignore[attr-defined]
        await self._refused(backend.read(_STORE, 1), NoSuchRecord)

    async def test_firstMustBeSnapshot(self) -> None:
        """
        The first record of a store must be a snapshot: a delta with nothing
        to apply to is refused with L{SequenceConflict}.
        """
        backend = self.makeBackend()
        await self._refused(
            backend.append(recordInfo(_STORE, 1, 2, 1, b"d"), b"d"), SequenceConflict
        )
        self.assertEqual(await backend.records(_STORE), [])  # type: ignore[attr-defined]

    async def test_sequenceMustFollow(self) -> None:
        """
        A record whose sequence number is not one past the newest (a gap or a
        duplicate) is refused with L{SequenceConflict} and not stored.
        """
        backend = self.makeBackend()
        await self._append(backend, _STORE, 1, 1, 0, b"s")
        await self._refused(
            backend.append(recordInfo(_STORE, 1, 3, 2, b"gap"), b"gap"), SequenceConflict
        )
        await self._refused(
            backend.append(recordInfo(_STORE, 1, 1, 0, b"again"), b"again"), SequenceConflict
        )
        self.assertEqual([r.seq for r in await backend.records(_STORE)], [1])  # type: ignore[attr-defined]

    async def test_staleEpochRefused(self) -> None:
        """
        Once a record at epoch 3 is stored, a write at epoch 2 is refused
        with L{StaleEpoch}, and stores nothing; epoch 3 and higher go on.
        """
        backend = self.makeBackend()
        await self._append(backend, _STORE, 2, 1, 0, b"s")
        await self._append(backend, _STORE, 3, 2, 1, b"d")
        error = await self._refused(
            backend.append(recordInfo(_STORE, 2, 3, 2, b"late"), b"late"), StaleEpoch
        )
        self.assertEqual((error.epoch, error.current), (2, 3))  # type: ignore[attr-defined]
        self.assertEqual([r.seq for r in await backend.records(_STORE)], [1, 2])  # type: ignore[attr-defined]
        await self._append(backend, _STORE, 4, 3, 2, b"new owner")
        self.assertEqual((await backend.head(_STORE)).epoch, 4)  # type: ignore[attr-defined, union-attr]

    async def test_fence(self) -> None:
        """
        A fence raises the lowest accepted epoch without a record; fencing
        lower than the stored epoch fails with L{StaleEpoch}.
        """
        backend = self.makeBackend()
        await self._append(backend, _STORE, 1, 1, 0, b"s")
        await backend.fence(_STORE, 5)
        await self._refused(
            backend.append(recordInfo(_STORE, 4, 2, 1, b"d"), b"d"), StaleEpoch
        )
        await self._refused(backend.fence(_STORE, 4), StaleEpoch)
        await backend.fence(_STORE, 5)
        await self._append(backend, _STORE, 5, 2, 1, b"d")
        await backend.fence(_OTHER, 2)
        self.assertEqual(await backend.stores(), sorted([_STORE, _OTHER]))  # type: ignore[attr-defined]

    async def test_storesIndependent(self) -> None:
        """
        The epochs and sequences of one store do not affect another's.
        """
        backend = self.makeBackend()
        await self._append(backend, _STORE, 7, 1, 0, b"s")
        await self._append(backend, _OTHER, 1, 1, 0, b"t")
        self.assertEqual(await backend.read(_OTHER, 1), b"t")  # type: ignore[attr-defined]
        self.assertEqual(await backend.read(_STORE, 1), b"s")  # type: ignore[attr-defined]

    async def test_prune(self) -> None:
        """
        Pruning before a snapshot deletes the older records and keeps the
        snapshot, later records and the fenced epoch; pruning before a delta
        deletes nothing.
        """
        backend = self.makeBackend()
        await self._append(backend, _STORE, 1, 1, 0, b"s1")
        await self._append(backend, _STORE, 1, 2, 1, b"d2")
        await self._append(backend, _STORE, 2, 3, 0, b"s3")
        await self._append(backend, _STORE, 2, 4, 3, b"d4")
        self.assertEqual(await backend.prune(_STORE, 4), 0)  # type: ignore[attr-defined]
        self.assertEqual(await backend.prune(_STORE, 3), 2)  # type: ignore[attr-defined]
        self.assertEqual([r.seq for r in await backend.records(_STORE)], [3, 4])  # type: ignore[attr-defined]
        await self._refused(
            backend.append(recordInfo(_STORE, 1, 5, 4, b"x"), b"x"), StaleEpoch
        )
        await self._refused(backend.read(_STORE, 1), NoSuchRecord)

    async def test_appendMany(self) -> None:
        """
        A batch stores every record in it, several of one store each
        following the one before, and fires with L{None} for each.
        """
        backend = self.makeBackend()
        await self._append(backend, _OTHER, 1, 1, 0, b"t1")
        batch = [
            (recordInfo(_STORE, 1, 1, 0, b"s1"), b"s1"),
            (recordInfo(_OTHER, 1, 2, 1, b"t2"), b"t2"),
            (recordInfo(_STORE, 1, 2, 1, b"s2"), b"s2"),
        ]
        self.assertEqual(await backend.appendMany(batch), [None, None, None])  # type: ignore[attr-defined]
        self.assertEqual([r.seq for r in await backend.records(_STORE)], [1, 2])  # type: ignore[attr-defined]
        self.assertEqual(await backend.read(_STORE, 2), b"s2")  # type: ignore[attr-defined]
        self.assertEqual(await backend.read(_OTHER, 2), b"t2")  # type: ignore[attr-defined]
        self.assertEqual(await backend.appendMany([]), [])  # type: ignore[attr-defined]

    async def test_appendManyRefusedAlone(self) -> None:
        """
        A record of a batch refused for a stale epoch, a sequence that does
        not follow, or an info that does not describe its data is refused
        alone, with its exception in its place; the other records of the
        batch are stored.
        """
        backend = self.makeBackend()
        third = storeNameForKey("carol@example.com")
        await self._append(backend, _STORE, 3, 1, 0, b"s1")
        await self._append(backend, _OTHER, 1, 1, 0, b"t1")
        batch = [
            (recordInfo(_STORE, 2, 2, 1, b"stale"), b"stale"),
            (recordInfo(_OTHER, 1, 2, 1, b"t2"), b"t2"),
            (recordInfo(_OTHER, 1, 4, 3, b"gap"), b"gap"),
            (recordInfo(third, 1, 1, 0, b"u1"), b"other bytes"),
            (recordInfo(third, 1, 1, 0, b"u1"), b"u1"),
        ]
        outcomes = await backend.appendMany(batch)
        self.assertEqual(  # type: ignore[attr-defined]
            [type(o) for o in outcomes],
            [StaleEpoch, type(None), SequenceConflict, ValueError, type(None)],
        )
        self.assertEqual([r.seq for r in await backend.records(_STORE)], [1])  # type: ignore[attr-defined]
        self.assertEqual([r.seq for r in await backend.records(_OTHER)], [1, 2])  # type: ignore[attr-defined]
        self.assertEqual(await backend.read(third, 1), b"u1")  # type: ignore[attr-defined]

    async def test_appendManyFenceRaisedInBatch(self) -> None:
        """
        A record of a batch that raises its store's epoch fences the
        records after it in the same batch: a later record of the store at
        the older epoch is refused as stale.
        """
        backend = self.makeBackend()
        batch = [
            (recordInfo(_STORE, 1, 1, 0, b"s1"), b"s1"),
            (recordInfo(_STORE, 2, 2, 1, b"s2"), b"s2"),
            (recordInfo(_STORE, 1, 3, 2, b"late"), b"late"),
        ]
        outcomes = await backend.appendMany(batch)
        self.assertEqual(  # type: ignore[attr-defined]
            [type(o) for o in outcomes], [type(None), type(None), StaleEpoch]
        )
        self.assertEqual([r.seq for r in await backend.records(_STORE)], [1, 2])  # type: ignore[attr-defined]

    async def test_badInfoRefused(self) -> None:
        """
        An append whose info does not describe its data, or whose store name
        is not a store name, is refused with L{ValueError} and stores
        nothing.
        """
        backend = self.makeBackend()
        info = recordInfo(_STORE, 1, 1, 0, b"data")
        await self._refused(backend.append(info, b"other"), ValueError)
        for name in ["../../etc", "A" * 64, _STORE + "/x", ""]:
            bad = recordInfo(name, 1, 1, 0, b"data")
            await self._refused(backend.append(bad, b"data"), ValueError)
            await self._refused(backend.records(name), ValueError)
        self.assertEqual(await backend.stores(), [])  # type: ignore[attr-defined]

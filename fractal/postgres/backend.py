# -*- test-case-name: tests.test_postgres_backend -*-
"""
L{PostgresBackend}: durable records in PostgreSQL, fenced by slot ownership
in the same transaction.

Each append is one transaction that:

    1. locks the store's row in C{store_fences} (creating it at epoch 0), so
       writers of one store take turns;
    2. refuses the write (L{StaleEpoch}) if its epoch is lower than the
       store's fenced epoch, or lower than the current epoch of the store's
       slot in C{slot_owners} (read with C{FOR SHARE}, so a concurrent move of
       the slot either commits first and is seen, or waits for the write);
    3. checks the sequence against the newest record;
    4. inserts the record and raises the store's fenced epoch.

A batch (L{PostgresBackend.appendMany}) is one transaction doing these steps
for all its records at once: each statement covers every store of the batch
(the fence rows locked in store order, so that two batches cannot deadlock),
so a batch costs a few round trips to the server, not a few per record.  A
record refused at step 2 or 3 writes nothing and the others go on.

Step 2 is what makes a move of a slot and the durable writes of its stores
serialise: once the transaction that moves a slot to epoch E+1 has committed,
no write at epoch E of any store of that slot can commit, even for a store
the new owner has not touched yet.  Without a cluster (no C{cluster} row) the
slot check is skipped and the backend is a plain, fenced record store.
"""

from __future__ import annotations

from typing import Any, Sequence

import psycopg
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from fractal.durable.filesystem import checkAppend, checkInfo
from fractal.durable.interfaces import (
    IDurableBackend,
    NoSuchRecord,
    RecordInfo,
    SequenceConflict,
    StaleEpoch,
)
from fractal.keys import checkStoreName, slotOfStoreName
from fractal.postgres.connection import Database

__all__ = ["PostgresBackend"]

Cursor = psycopg.Cursor[Any]


def _lockFence(cursor: Cursor, store: str) -> int:
    """
    Lock C{store}'s fence row, creating it at epoch 0, and return its epoch.
    """
    cursor.execute(
        "INSERT INTO store_fences (store, epoch) VALUES (%s, 0) ON CONFLICT (store) DO NOTHING",
        (store,),
    )
    cursor.execute("SELECT epoch FROM store_fences WHERE store = %s FOR UPDATE", (store,))
    row = cursor.fetchone()
    assert row is not None
    return int(row[0])


def _slotCount(cursor: Cursor) -> int | None:
    """
    The cluster's slot count, or L{None} when there is no cluster.
    """
    cursor.execute("SELECT slots FROM cluster WHERE id = 1")
    row = cursor.fetchone()
    return None if row is None else int(row[0])


def _appendAll(
    cursor: Cursor, records: Sequence[tuple[RecordInfo, bytes]]
) -> list[StaleEpoch | SequenceConflict | None]:
    """
    Check and insert C{records} inside the caller's transaction (the steps
    of the module docstring), with the same few statements however many
    records there are: each statement covers every store of the batch.  The
    fence rows are locked in store order, so that two batches cannot
    deadlock, and the records of one store are taken in their order.

    @return: per record, L{None} if inserted, else why it was refused
        (L{StaleEpoch}: its epoch is below the store's fence or slot;
        L{SequenceConflict}: its sequence does not follow the newest
        record).  A refused record writes nothing.
    """
    stores = sorted({info.store for info, _ in records})
    cursor.execute(
        "INSERT INTO store_fences (store, epoch) SELECT unnest(%s::text[]), 0 "
        "ON CONFLICT (store) DO NOTHING",
        (stores,),
    )
    cursor.execute(
        "SELECT store, epoch FROM store_fences WHERE store = ANY(%s) ORDER BY store FOR UPDATE",
        (stores,),
    )
    fenced = {str(store): int(epoch) for store, epoch in cursor.fetchall()}
    slotEpochs: dict[str, int] = {}
    slots = _slotCount(cursor)
    if slots is not None:
        slotOf = {store: slotOfStoreName(store, slots) for store in stores}
        cursor.execute(
            "SELECT slot, epoch FROM slot_owners WHERE slot = ANY(%s) ORDER BY slot FOR SHARE",
            (sorted(set(slotOf.values())),),
        )
        bySlot = {int(slot): int(epoch) for slot, epoch in cursor.fetchall()}
        slotEpochs = {store: bySlot.get(slot, 0) for store, slot in slotOf.items()}
    cursor.execute(
        "SELECT s.store, (SELECT r.seq FROM records r WHERE r.store = s.store "
        "ORDER BY r.seq DESC LIMIT 1) FROM unnest(%s::text[]) AS s(store)",
        (stores,),
    )
    newest = {str(store): 0 if seq is None else int(seq) for store, seq in cursor.fetchall()}
    outcomes: list[StaleEpoch | SequenceConflict | None] = []
    inserts = []
    raised: dict[str, int] = {}
    for info, data in records:
        current = max(fenced[info.store], slotEpochs.get(info.store, 0))
        try:
            if info.epoch < current:
                raise StaleEpoch(info.store, info.epoch, current)
            checkAppend(info, current, newest[info.store])
        except (StaleEpoch, SequenceConflict) as e:
            outcomes.append(e)
            continue
        outcomes.append(None)
        inserts.append((info.store, info.seq, info.baseSeq, info.epoch, info.digest, data))
        newest[info.store] = info.seq
        if info.epoch > fenced[info.store]:
            fenced[info.store] = raised[info.store] = info.epoch
    if inserts:
        cursor.executemany(
            "INSERT INTO records (store, seq, base_seq, epoch, digest, data) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            inserts,
        )
    if raised:
        cursor.executemany(
            "UPDATE store_fences SET epoch = %s WHERE store = %s",
            [(epoch, store) for store, epoch in sorted(raised.items())],
        )
    return outcomes


def _info(store: str, row: tuple[Any, ...]) -> RecordInfo:
    seq, baseSeq, epoch, size, digest = row
    return RecordInfo(
        store=store,
        epoch=int(epoch),
        seq=int(seq),
        baseSeq=int(baseSeq),
        size=int(size),
        digest=bytes(digest),
    )


_COLUMNS = "seq, base_seq, epoch, octet_length(data), digest"


@implementer(IDurableBackend)
class PostgresBackend:
    """
    Chains of records in the C{records} table of a cluster's schema.

    @ivar database: the connection layer.
    """

    def __init__(self, database: Database) -> None:
        """
        @param database: the database; its schema must be initialised
            (L{fractal.postgres.schema.initSchema}).
        """
        self.database = database

    def append(self, info: RecordInfo, data: bytes) -> Deferred[None]:
        def append(cursor: Cursor) -> None:
            [refused] = _appendAll(cursor, [(info, data)])
            if refused is not None:
                raise refused

        try:
            checkInfo(info, data)
        except ValueError as e:
            return _failed(e)
        return self.database.transact(append)

    def appendMany(
        self, records: Sequence[tuple[RecordInfo, bytes]]
    ) -> Deferred[list[BaseException | None]]:
        """
        See L{IDurableBackend.appendMany}: one transaction for the batch, in
        which each record is checked as L{append} checks it, with a few
        statements for the whole batch rather than a few per record.
        """
        outcomes: list[BaseException | None] = [None] * len(records)
        valid: list[int] = []
        for index, (info, data) in enumerate(records):
            try:
                checkInfo(info, data)
            except ValueError as e:
                outcomes[index] = e
            else:
                valid.append(index)

        def appendMany(cursor: Cursor) -> list[BaseException | None]:
            refused = _appendAll(cursor, [records[index] for index in valid])
            for index, outcome in zip(valid, refused):
                outcomes[index] = outcome
            return outcomes

        if not valid:
            return succeed(outcomes)
        return self.database.transact(appendMany)

    def fence(self, store: str, epoch: int) -> Deferred[None]:
        def fence(cursor: Cursor) -> None:
            current = _lockFence(cursor, store)
            if epoch < current:
                raise StaleEpoch(store, epoch, current)
            if epoch > current:
                cursor.execute(
                    "UPDATE store_fences SET epoch = %s WHERE store = %s", (epoch, store)
                )

        return self._checked(store, fence)

    def head(self, store: str) -> Deferred[RecordInfo | None]:
        def head(cursor: Cursor) -> RecordInfo | None:
            cursor.execute(
                f"SELECT {_COLUMNS} FROM records WHERE store = %s ORDER BY seq DESC LIMIT 1",
                (store,),
            )
            row = cursor.fetchone()
            return None if row is None else _info(store, row)

        return self._checked(store, head)

    def records(self, store: str) -> Deferred[list[RecordInfo]]:
        def records(cursor: Cursor) -> list[RecordInfo]:
            cursor.execute(
                f"SELECT {_COLUMNS} FROM records WHERE store = %s ORDER BY seq", (store,)
            )
            return [_info(store, row) for row in cursor.fetchall()]

        return self._checked(store, records)

    def read(self, store: str, seq: int) -> Deferred[bytes]:
        def read(cursor: Cursor) -> bytes:
            cursor.execute("SELECT data FROM records WHERE store = %s AND seq = %s", (store, seq))
            row = cursor.fetchone()
            if row is None:
                raise NoSuchRecord(f"store {store} has no record {seq}")
            return bytes(row[0])

        return self._checked(store, read)

    def prune(self, store: str, beforeSeq: int) -> Deferred[int]:
        def prune(cursor: Cursor) -> int:
            _lockFence(cursor, store)
            cursor.execute(
                "SELECT 1 FROM records WHERE store = %s AND seq = %s AND base_seq = 0",
                (store, beforeSeq),
            )
            if cursor.fetchone() is None:
                return 0
            cursor.execute(
                "DELETE FROM records WHERE store = %s AND seq < %s", (store, beforeSeq)
            )
            return cursor.rowcount

        return self._checked(store, prune)

    def stores(self) -> Deferred[list[str]]:
        def stores(cursor: Cursor) -> list[str]:
            cursor.execute(
                "SELECT store FROM store_fences f WHERE f.epoch > 0 "
                "OR EXISTS (SELECT 1 FROM records r WHERE r.store = f.store) ORDER BY store"
            )
            return [str(row[0]) for row in cursor.fetchall()]

        return self.database.transact(stores)

    def _checked(self, store: str, f: Any) -> Deferred[Any]:
        try:
            checkStoreName(store)
        except ValueError as e:
            return _failed(e)
        return self.database.transact(f)


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d

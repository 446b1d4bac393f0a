# -*- test-case-name: tests.test_durable_shipper -*-
"""
The seams of durable persistence: what a node asks of its shipper, and what a
shipper asks of the durable storage behind it.

A node's user stores live on its local disk.  A shipper (L{IShipper}) watches
every open store, and after commits ships each store's changed pages, as one
delta record, to a durable backend (L{IDurableBackend}).  The records of one
store form a chain: a full image, then deltas each based on the record
before it.  A store whose local copy is missing is restored from its chain.

Every record carries the writer's epoch (the epoch at which the writing node
owns the store's slot); a backend refuses a record whose epoch is lower than
the highest it has stored for that store (L{StaleEpoch}), so a node that lost
a slot cannot overwrite its new owner's work.
"""

from __future__ import annotations

from typing import Callable, Sequence

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.python.filepath import FilePath
from zope.interface import Interface

__all__ = [
    "DurableError",
    "StaleEpoch",
    "SequenceConflict",
    "AnotherWriter",
    "NoSuchRecord",
    "CorruptRecord",
    "BrokenChain",
    "RecordInfo",
    "StoreLag",
    "ShippingLag",
    "IDurableBackend",
    "IShipper",
]


class DurableError(Exception):
    """
    The base of every error of durable persistence.
    """


class StaleEpoch(DurableError):
    """
    A write was refused because its epoch is lower than the highest epoch the
    backend has stored for that store: another node owns the store now.

    @ivar store: the store's name.
    @ivar epoch: the epoch of the refused write.
    @ivar current: the highest epoch stored for the store.
    """

    def __init__(self, store: str, epoch: int, current: int) -> None:
        super().__init__(
            f"store {store}: write at epoch {epoch} refused, "
            f"epoch {current} is already stored"
        )
        self.store = store
        self.epoch = epoch
        self.current = current


class SequenceConflict(DurableError):
    """
    An append was refused because its sequence number does not follow the
    newest record of the store (another writer at the same epoch appended, or
    the writer's idea of the chain is out of date).
    """


class NoSuchRecord(DurableError):
    """
    A record that was asked for is not stored.
    """


class CorruptRecord(DurableError):
    """
    A record's bytes are not a well-formed record: wrong magic or version,
    truncated, failed checksum, or contents that contradict its header.
    """


class BrokenChain(DurableError):
    """
    A store's chain cannot be restored: a gap in its sequence, a corrupt link,
    a record that is not based on the one before it, or an image that fails
    SQLite's integrity check.  Such a chain is never served.
    """


@frozen
class RecordInfo:
    """
    What a backend knows of one stored record, without reading its bytes.

    @ivar store: the store's name, from L{fractal.keys.storeNameForKey}.
    @ivar epoch: the writer's epoch.
    @ivar seq: the record's sequence number in its store's chain, from 1.
    @ivar baseSeq: the sequence number of the record this one is a delta
        against, or C{0} for a full image (a snapshot), which needs no base.
    @ivar size: the length of the record's bytes.
    @ivar digest: the SHA-256 digest of the record's bytes.
    """

    store: str
    epoch: int
    seq: int
    baseSeq: int
    size: int
    digest: bytes

    @property
    def isSnapshot(self) -> bool:
        """
        Whether the record is a full image rather than a delta.
        """
        return self.baseSeq == 0


class AnotherWriter(StaleEpoch):
    """
    An append was refused because another writer appended to the store's
    chain at the writer's own epoch: two nodes believe they own the store's
    slot at the same epoch (nodes of a static cluster whose configurations
    differ, say).  Nothing in the backend can fence either of them, so the
    writer that learns of it refuses as if fenced: it stops shipping the
    store and stops serving its slot, and an operator must make the nodes
    agree.

    @ivar head: the newest stored record, the other writer's.
    """

    def __init__(self, store: str, epoch: int, head: RecordInfo) -> None:
        DurableError.__init__(
            self,
            f"store {store}: record {head.seq} was appended by another writer at "
            f"epoch {head.epoch}, this node's epoch; two nodes are writing the same "
            "store (do all nodes have the same cluster configuration?)",
        )
        self.store = store
        self.epoch = epoch
        self.current = head.epoch
        self.head = head


@frozen
class StoreLag:
    """
    How far one store's durable copy is behind its local copy.

    @ivar key: the user key.
    @ivar seconds: seconds since the oldest commit not yet stored durably, or
        C{0.0} when everything is stored.
    @ivar bytesPending: the size of the newest record built for the store but
        not yet stored (known once a ship attempt has built it), else C{0}.
    @ivar seq: the sequence number of the newest record stored, C{0} if none.
    @ivar fenced: whether shipping stopped because of a stale epoch.
    """

    key: str
    seconds: float
    bytesPending: int
    seq: int
    fenced: bool = False


@frozen
class ShippingLag:
    """
    How far a node's durable copies are behind: the worst store, the total,
    and every store with something unshipped.

    @ivar seconds: the largest L{StoreLag.seconds} of any store.
    @ivar bytesPending: the sum of L{StoreLag.bytesPending}.
    @ivar stores: the lag of each store with unshipped commits, by key.
    """

    seconds: float
    bytesPending: int
    stores: tuple[StoreLag, ...]


class IDurableBackend(Interface):
    """
    Durable storage for chains of records, one chain per store.

    Every method returns a L{Deferred}; none blocks the calling thread.  A
    backend checks fencing and sequence in the same atomic step as the write
    (one transaction, in a database), so two writers can never both succeed.
    Stores are named by L{fractal.keys.storeNameForKey}: 64 hexadecimal
    digits, safe as a file name.
    """

    def append(info: RecordInfo, data: bytes) -> Deferred[None]:
        """
        Store one record, atomically checking its epoch and sequence.

        The record is stored only if C{info.epoch} is at least the highest
        epoch stored (or fenced) for C{info.store}, and C{info.seq} is exactly
        one more than the store's newest record (or the store has no record
        and the record is a snapshot).  Once the Deferred fires, the record
        survives a crash of this process and of the machine.

        @param info: the record's description; C{size} and C{digest} must
            match C{data}.
        @param data: the encoded record.
        @return: fires with L{None} once the record is durable; fails with
            L{StaleEpoch} or L{SequenceConflict} when refused, and stores
            nothing then.
        """

    def appendMany(
        records: Sequence[tuple[RecordInfo, bytes]],
    ) -> Deferred[list[BaseException | None]]:
        """
        Store several records as one batch (group commit): each is checked
        exactly as L{append} checks it, in order (so a batch may hold several
        records of one store, each following the one before), and those that
        pass are made durable together, with one flush or one transaction
        for the batch rather than one per record.

        A refused record is refused alone: the others of the batch are
        stored.  The epoch of each record is checked inside the same atomic
        step as its write, so fencing holds for batches as for single
        appends.

        @param records: pairs of (info, data), as L{append} takes them.
        @return: fires, once every stored record of the batch is durable,
            with one outcome per record in the order given: L{None} if it is
            stored, or the exception refusing it (L{StaleEpoch},
            L{SequenceConflict}, L{ValueError} for an info that does not
            describe its data).  Fails as a whole only when the batch could
            not be written (the backend is unreachable, a disk error); then
            none of its records may be counted on.
        """

    def fence(store: str, epoch: int) -> Deferred[None]:
        """
        Raise the lowest epoch the backend accepts for C{store} to C{epoch}
        without writing a record: a new owner claims the store.

        @return: fires once the fence is durable; fails with L{StaleEpoch} if
            a higher epoch is already stored.
        """

    def head(store: str) -> Deferred[RecordInfo | None]:
        """
        The newest record of C{store}, or L{None} if it has none.
        """

    def records(store: str) -> Deferred[list[RecordInfo]]:
        """
        Every stored record of C{store}, in ascending sequence order.
        """

    def read(store: str, seq: int) -> Deferred[bytes]:
        """
        The bytes of one record.

        @return: fails with L{NoSuchRecord} if it is not stored.
        """

    def prune(store: str, beforeSeq: int) -> Deferred[int]:
        """
        Delete the records of C{store} older than the snapshot at
        C{beforeSeq}, after compaction.  Nothing is deleted unless the record
        at C{beforeSeq} is a stored snapshot.  The fenced epoch is kept.

        @return: fires with the number of records deleted.
        """

    def stores() -> Deferred[list[str]]:
        """
        The names of every store with a record or a fence, sorted.
        """


class IShipper(Interface):
    """
    What a node's store pool asks of durable persistence.

    A shipper marks a store dirty at each commit and ships, every interval,
    the changed pages of every dirty store to a L{IDurableBackend}.
    """

    def storeOpened(key: str, store: object) -> None:
        """
        The pool has opened C{key}'s store: watch its commits from now on.
        A shipper may keep the store's write-ahead log files open from now
        until L{storeClosed}.

        @param key: a valid user key.
        @param store: the open L{fractal.store.Store}; it provides
            C{addCommitObserver}, C{dbdir} and C{restartLog}.
        """

    def storeClosing(key: str, store: object) -> Deferred[None]:
        """
        The pool is about to close C{key}'s store: ship what is unshipped.

        @return: fires when the pool may close the store.  It fires even when
            the backend cannot be reached; the store stays marked unshipped and
            is shipped from its file later, and the lag shows it.
        """

    def storeClosed(key: str, store: object) -> None:
        """
        The pool has closed C{key}'s store, after L{storeClosing} fired: its
        files are as the close left them until it is opened again, and the
        shipper lets go of the files it kept open.
        """

    def unshipped(key: str) -> bool:
        """
        Whether C{key}'s store has commits not yet stored durably, or is
        being shipped or compared with its last ship: whether
        L{storeClosing} may have to wait for a ship.  The pool, making room
        for another store, closes an idle store for which this is false
        first, since that close need not wait.

        @param key: a valid user key.
        @return: C{False} for a store the shipper does not know.
        """

    def whenDurable(key: str) -> Deferred[None]:
        """
        The output gate of C{ack="durable"}.

        Starts a ship cycle at once (commits of many users waiting at the same
        time share cycles: group commit).

        @return: fires when every commit made so far to C{key}'s store is
            stored durably; fails with L{StaleEpoch} if the node lost the
            store's slot.
        """

    def restore(key: str, destination: FilePath[str]) -> Deferred[bool]:
        """
        Restore C{key}'s store from its chain into the directory
        C{destination} (as C{destination/db.sqlite}), because the local copy is
        missing.

        @return: fires with C{True} once restored, with C{False} if the backend
            has no copy of the store (a new user); fails with L{BrokenChain}
            if the chain cannot be restored exactly.  Nothing is left at
            C{destination/db.sqlite} on failure.
        """

    def lag() -> ShippingLag:
        """
        The node's current shipping lag, per node and per store.
        """

    def addFencedObserver(observer: Callable[[str, StaleEpoch], None]) -> None:
        """
        Call C{observer(key, error)} when the backend refuses a write of
        C{key}'s store for a stale epoch: the node must stop serving that
        key's slot.  The shipper stops shipping that store.
        """

"""
Tests for how L{fractal.durable.shipper.Shipper} tells whose record it ran
into when the backend refuses an append for its sequence number: its own
(a record whose answer was lost), a late one of an older owner, or another
writer at its own epoch (two nodes that both believe they own the store),
which it refuses as if fenced.

Real stores on disk, the in-memory backend, a L{Clock}, blocking work run
synchronously.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from fractal.durable._threads import runSynchronously
from fractal.durable.interfaces import AnotherWriter, RecordInfo, StaleEpoch
from fractal.durable.shipper import Shipper
from fractal.keys import storeNameForKey
from fractal.testing import MemoryDurableBackend
from tests.test_durable_shipper import dump, openStore, write


class _LosesAnswers(MemoryDurableBackend):
    """
    The in-memory backend, but the answer to the next C{lose} batches is
    lost after they are stored, as over a connection that dropped after the
    commit.
    """

    lose = 0

    def appendMany(
        self, records: Sequence[tuple[RecordInfo, bytes]]
    ) -> Deferred[list[BaseException | None]]:
        d = super().appendMany(records)
        if self.lose:
            self.lose -= 1

            def lost(_: object) -> None:
                raise ConnectionError("connection lost before the answer")

            d.addCallback(lost)
        return d


class _Writer:
    """
    One node's shipper and its copy of one store, on a shared backend.
    """

    def __init__(
        self, case: SynchronousTestCase, backend: MemoryDurableBackend, key: str, epoch: int
    ) -> None:
        self.case = case
        self.key = key
        self.epoch = epoch
        self.clock = Clock()
        self.backend = backend
        self.shipper = Shipper(
            backend, self.clock, runInThread=runSynchronously, epochForKey=lambda k: self.epoch
        )
        self.shipper.startService()
        case.addCleanup(self.shipper.stopService)
        self.fenced: list[tuple[str, StaleEpoch]] = []
        self.shipper.addFencedObserver(lambda k, error: self.fenced.append((k, error)))
        name = storeNameForKey(key)
        self.dbdir = FilePath(case.mktemp()).child(name[:2]).child(name)
        self.store: Any = None

    def open(self) -> None:
        """
        Open the local copy, restored from the backend first if missing.
        """
        if not self.dbdir.child("db.sqlite").exists():
            self.case.successResultOf(self.shipper.restore(self.key, self.dbdir))
        self.store = openStore(self.dbdir)
        self.case.addCleanup(self.store.close)
        self.shipper.storeOpened(self.key, self.store)

    def commit(self, number: int, body: str) -> Deferred[None]:
        """
        Commit a note and ask for it to be durable, starting a ship; give
        the shipper ten intervals to retry.
        """
        write(self.store, number, body)
        d = self.shipper.whenDurable(self.key)
        self.clock.advance(0)
        for _ in range(10):
            if d.called:
                break
            self.clock.advance(1.0)
        return d

    def restored(self) -> str:
        destination = FilePath(self.case.mktemp())
        other = Shipper(self.backend, Clock(), runInThread=runSynchronously)
        self.case.assertTrue(self.case.successResultOf(other.restore(self.key, destination)))
        return "\n".join(dump(destination.child("db.sqlite")))


class AnotherWriterTests(SynchronousTestCase):
    """
    Two shippers at the same epoch on one store: the one that finds the
    other's record where its own should go stops, rather than shipping a
    snapshot over the other's commits.
    """

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_sameEpochRefusedAsFenced(self) -> None:
        """
        n1 and n2 both ship alice's store at epoch 1, each from its own copy.
        n2's record follows n1's first one; n1's next one then runs into
        n2's record: n1 stops shipping the store (its durable waiters fail
        with L{AnotherWriter}, a L{StaleEpoch}; its fenced observers are
        told; nothing more of it is stored), logs an error that says two
        nodes write the store, and n2's commits stay the newest stored.
        """
        backend = MemoryDurableBackend()
        n1 = _Writer(self, backend, "alice", 1)
        n1.open()
        self.successResultOf(n1.commit(1, "from n1"))
        n2 = _Writer(self, backend, "alice", 1)
        n2.open()
        self.successResultOf(n2.commit(2, "from n2"))
        failure = self.failureResultOf(n1.commit(3, "n1 again"), AnotherWriter)
        self.assertIsInstance(failure.value, StaleEpoch)
        self.assertEqual([k for k, _ in n1.fenced], ["alice"])
        self.assertIsInstance(n1.fenced[0][1], AnotherWriter)
        self.assertTrue(n1.shipper.lag().stores[0].fenced)
        count = len(backend.appended)
        write(n1.store, 4, "n1 once more")
        n1.clock.advance(5)
        self.failureResultOf(n1.shipper.whenDurable("alice"), AnotherWriter)
        self.assertEqual(len(backend.appended), count)
        content = n1.restored()
        self.assertIn("'from n2'", content)
        self.assertNotIn("n1 again", content)
        [event] = [e for e in self.events if "Two nodes write" in e.get("log_format", "")]
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertIn(storeNameForKey("alice"), formatEvent(event))
        self.assertIn("cluster configuration", formatEvent(event))
        # n2 goes on shipping.
        self.successResultOf(n2.commit(5, "n2 goes on"))
        self.assertIn("'n2 goes on'", n2.restored())

    def test_ownLostAnswerNotAnotherWriter(self) -> None:
        """
        A record stored whose answer was lost is recognised as this
        shipper's own when the next attempt runs into it: the shipper starts
        again from it, with a snapshot, and is not fenced.
        """
        backend = _LosesAnswers()
        n1 = _Writer(self, backend, "alice", 1)
        n1.open()
        self.successResultOf(n1.commit(1, "first"))
        backend.lose = 1
        write(n1.store, 2, "answer lost")
        n1.clock.advance(1.0)
        self.assertEqual(len(backend.appended), 2)
        self.assertTrue(n1.shipper.lag().stores)
        self.successResultOf(n1.commit(3, "after"))
        self.assertEqual(n1.fenced, [])
        self.assertEqual(n1.shipper.lag().stores, ())
        content = n1.restored()
        self.assertIn("'answer lost'", content)
        self.assertIn("'after'", content)

    def test_olderEpochLateRecordOverwritten(self) -> None:
        """
        A late record of the slot's previous owner (an older epoch), stored
        after the new owner read the chain, is not another writer at the
        new owner's epoch: the new owner starts again from it with a
        snapshot and ships on.
        """
        backend = MemoryDurableBackend()
        old = _Writer(self, backend, "alice", 1)
        old.open()
        self.successResultOf(old.commit(1, "old owner"))
        new = _Writer(self, backend, "alice", 2)
        new.open()
        self.successResultOf(old.commit(2, "late from the old owner"))
        self.successResultOf(new.commit(3, "new owner"))
        self.assertEqual(new.fenced, [])
        content = new.restored()
        self.assertIn("'new owner'", content)
        self.failureResultOf(old.commit(4, "too late"), StaleEpoch)

    def test_newerEpochIsStale(self) -> None:
        """
        A record of a newer epoch where this shipper's should go fences the
        store as L{StaleEpoch}, not L{AnotherWriter}.
        """
        backend = MemoryDurableBackend()
        n1 = _Writer(self, backend, "alice", 1)
        n1.open()
        self.successResultOf(n1.commit(1, "n1"))
        n2 = _Writer(self, backend, "alice", 1)
        n2.open()
        n2.epoch = 2
        self.successResultOf(n2.commit(2, "n2 at epoch 2"))
        failure = self.failureResultOf(n1.commit(3, "n1 late"), StaleEpoch)
        self.assertNotIsInstance(failure.value, AnotherWriter)
        self.assertEqual(failure.value.current, 2)


class EpochRefusedTests(SynchronousTestCase):
    """
    An C{epochForKey} that refuses a key (the node does not own its slot)
    fences that store alone.
    """

    def test_refusedKeyFencedAlone(self) -> None:
        """
        When C{epochForKey} raises L{StaleEpoch} for alice, alice's store is
        fenced (its waiters fail, the observers are told) and bob's, in the
        same cycle, is shipped.
        """
        backend = MemoryDurableBackend()
        owned = {"alice": True, "bob": True}

        def epochForKey(key: str) -> int:
            if not owned[key]:
                raise StaleEpoch(storeNameForKey(key), 0, 2)
            return 1

        clock = Clock()
        shipper = Shipper(backend, clock, runInThread=runSynchronously, epochForKey=epochForKey)
        fenced: list[str] = []
        shipper.addFencedObserver(lambda key, error: fenced.append(key))
        stores = {}
        for key in ("alice", "bob"):
            name = storeNameForKey(key)
            store = stores[key] = openStore(FilePath(self.mktemp()).child(name[:2]).child(name))
            shipper.storeOpened(key, store)
            self.addCleanup(shipper.storeClosed, key, store)
            self.addCleanup(store.close)
        owned["alice"] = False
        write(stores["alice"], 1, "not mine")
        write(stores["bob"], 1, "mine")
        waits = [shipper.whenDurable("alice"), shipper.whenDurable("bob")]
        clock.advance(0)
        self.failureResultOf(waits[0], StaleEpoch)
        self.successResultOf(waits[1])
        self.assertEqual(fenced, ["alice"])
        self.assertEqual(
            [info.store for info in backend.appended], [storeNameForKey("bob")]
        )

"""
Tests for L{fractal.store.scheduler}.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from fractal.store.attributes import Time, boolean, integer, text
from fractal.store.errors import NoCrossStoreReferences, StoreNotFound
from fractal.store.interfaces import IScheduler
from fractal.store.item import Item
from fractal.store.scheduler import (
    MAX_WORK_PER_TICK,
    TimedEvent,
    TimedEventFailureLog,
    _SiteScheduler,
    _SubSchedulerParentHook,
    _UserScheduler,
)
from fractal.store.store import Store
from fractal.store.substore import SubStore
from tests._axiomdb import _AxiomDatabase


class _Boom(Exception):
    """
    Raised by failing runnables.
    """


def _at(seconds: float) -> Time:
    return Time.fromPOSIXTimestamp(seconds)


class Runnable(Item):
    """
    A runnable that counts its runs and, while C{repeat} is positive, asks to
    run again C{interval} seconds later.
    """

    runs = integer(default=0)
    repeat = integer(default=0)
    interval = integer(default=10)
    fail = boolean(default=False)
    note = text(default="")

    def run(self) -> Time | None:
        self.runs += 1
        self.note = "ran"
        if self.fail:
            raise _Boom("run failed")
        if self.repeat > 0:
            self.repeat -= 1
            return _at(IScheduler(self.store).now().asPOSIXTimestamp() + self.interval)
        return None


class HandledRunnable(Item):
    """
    A failing runnable with an error handler, which records its calls and
    returns C{retryIn} seconds from now (or L{None} when 0).
    """

    runs = integer(default=0)
    handled = integer(default=0)
    retryIn = integer(default=0)
    handlerFails = boolean(default=False)

    def run(self) -> None:
        self.runs += 1
        raise _Boom("handled run failed")

    def timedEventErrorHandler(self, event: Any, failure: Failure) -> Time | None:
        self.handled += 1
        assert failure.check(_Boom)
        assert isinstance(event, TimedEvent)
        if self.handlerFails:
            raise ValueError("handler failed")
        if self.retryIn:
            return _at(IScheduler(self.store).now().asPOSIXTimestamp() + self.retryIn)
        return None


class Introspector(Item):
    """
    A runnable that records what the scheduler says about it while it runs.
    """

    seenTimes = integer(default=-1)

    def run(self) -> None:
        self.seenTimes = len(list(IScheduler(self.store).scheduledTimes(self)))
        return None


class _SiteFixture:
    """
    A site store with an injected clock and a started scheduler.
    """

    store: Store
    clock: Clock
    scheduler: Any

    def makeSite(self, test: SynchronousTestCase, dbdir: str | None = None, start: bool = True) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = Store(dbdir) if dbdir is not None else Store()
        test.addCleanup(self.store.close)
        self.scheduler = IScheduler(self.store)
        self.scheduler.clock = self.clock
        if start:
            self.scheduler.startService()
            test.addCleanup(self._stop)

    def _stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.stopService()

    def later(self, seconds: float) -> Time:
        return _at(self.clock.seconds() + seconds)


class SiteSchedulerTests(SynchronousTestCase, _SiteFixture):
    """
    Tests for the scheduler of a store without a parent.
    """

    def setUp(self) -> None:
        self.makeSite(self)

    def test_singleton(self) -> None:
        """
        C{IScheduler(store)} is one object per store: the site scheduler, a
        service named C{"Site Scheduler"} that provides L{IScheduler}.
        """
        self.assertIs(IScheduler(self.store), self.scheduler)
        self.assertIsInstance(self.scheduler, _SiteScheduler)
        self.assertEqual(self.scheduler.name, "Site Scheduler")
        verifyObject(IScheduler, self.scheduler)
        verifyObject(IService, self.scheduler)

    def test_injectedClock(self) -> None:
        """
        The scheduler's time is its clock's; a clock can also be given to the
        constructor.
        """
        self.assertEqual(self.scheduler.now(), _at(self.clock.seconds()))
        other = Clock()
        other.advance(42)
        self.assertEqual(_SiteScheduler(Store(), clock=other).now(), _at(42))

    def test_axiomStyleTestHooks(self) -> None:
        """
        Replacing a scheduler's C{now} and C{callLater} on the instance, as
        Axiom's tests do, drives it too.
        """
        other = Clock()
        other.advance(5_000_000)
        scheduler = _SiteScheduler(Store())
        scheduler.now = lambda: _at(other.seconds())  # type: ignore[method-assign]
        scheduler.callLater = other.callLater  # type: ignore[method-assign]
        scheduler.startService()
        self.addCleanup(scheduler.stopService)
        r = Runnable(store=scheduler.store)
        scheduler.schedule(r, _at(5_000_030))
        other.advance(29)
        self.assertEqual(r.runs, 0)
        other.advance(1)
        self.assertEqual(r.runs, 1)

    def test_runAtTime(self) -> None:
        """
        An event runs when its time comes, not before, and is then deleted
        when C{run()} returns L{None}.
        """
        r = Runnable(store=self.store)
        self.scheduler.schedule(r, self.later(10))
        self.clock.advance(9)
        self.assertEqual(r.runs, 0)
        self.clock.advance(1)
        self.assertEqual(r.runs, 1)
        self.assertEqual(self.store.query(TimedEvent).count(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_runInTransaction(self) -> None:
        """
        C{run()} runs inside a transaction: when it raises, its changes are
        rolled back.
        """
        r = Runnable(store=self.store, fail=True)
        self.scheduler.schedule(r, self.later(1))
        self.clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(_Boom)), 1)
        self.assertEqual(r.runs, 0)
        self.assertEqual(r.note, "")

    def test_rescheduleFromRun(self) -> None:
        """
        When C{run()} returns a time the event moves there: three runs ten
        seconds apart.
        """
        r = Runnable(store=self.store, repeat=2, interval=10)
        self.scheduler.schedule(r, self.later(10))
        for expected in 1, 2, 3:
            self.clock.advance(10)
            self.assertEqual(r.runs, expected)
        self.clock.advance(100)
        self.assertEqual(r.runs, 3)
        self.assertEqual(self.store.query(TimedEvent).count(), 0)

    def test_failureLog(self) -> None:
        """
        When C{run()} raises and the runnable has no error handler, a
        L{TimedEventFailureLog} records the failure, the event is dropped
        and the failure is logged.
        """
        r = Runnable(store=self.store, fail=True)
        due = self.later(5)
        self.scheduler.schedule(r, due)
        self.clock.advance(7)
        self.assertEqual(len(self.flushLoggedErrors(_Boom)), 1)
        [log] = list(self.store.query(TimedEventFailureLog))
        self.assertEqual(log.desiredTime, due)
        self.assertEqual(log.actualTime, _at(self.clock.seconds()))
        self.assertIs(log.runnable, r)
        self.assertIsInstance(log.traceback, bytes)
        self.assertIn(b"run failed", log.traceback)
        self.assertEqual(self.store.query(TimedEvent).count(), 0)

    def test_errorHandlerReschedules(self) -> None:
        """
        A runnable's C{timedEventErrorHandler} is called in its own
        transaction (its changes are kept); the time it returns moves the
        event, and L{None} drops it.  No failure log is written.
        """
        r = HandledRunnable(store=self.store, retryIn=30)
        self.scheduler.schedule(r, self.later(1))
        self.clock.advance(1)
        self.assertEqual((r.runs, r.handled), (0, 1))
        self.assertEqual(list(self.scheduler.scheduledTimes(r)), [self.later(30)])
        r.retryIn = 0
        self.clock.advance(30)
        self.assertEqual((r.runs, r.handled), (0, 2))
        self.assertEqual(self.store.query(TimedEvent).count(), 0)
        self.assertEqual(self.store.query(TimedEventFailureLog).count(), 0)
        self.assertEqual(len(self.flushLoggedErrors(_Boom)), 2)

    def test_errorHandlerFails(self) -> None:
        """
        When the error handler itself raises, the failure is logged and
        recorded as if there were no handler, so the event cannot loop.
        """
        r = HandledRunnable(store=self.store, handlerFails=True, retryIn=1)
        self.scheduler.schedule(r, self.later(1))
        self.clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(_Boom)), 1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(r.handled, 0)
        self.assertEqual(self.store.query(TimedEventFailureLog).count(), 1)
        self.assertEqual(self.store.query(TimedEvent).count(), 0)

    def test_ticksAreBounded(self) -> None:
        """
        A tick runs at most L{MAX_WORK_PER_TICK} events and comes back at
        once for the rest: 25 due events all run, over three ticks.
        """
        runnables = [Runnable(store=self.store) for _ in range(25)]
        for r in runnables:
            self.scheduler.schedule(r, self.later(-5))
        self.scheduler.tick()
        self.assertEqual(sum(r.runs for r in runnables), MAX_WORK_PER_TICK)
        [pending] = self.clock.getDelayedCalls()
        self.assertEqual(pending.getTime(), self.clock.seconds())
        self.clock.advance(0)
        self.assertEqual([r.runs for r in runnables], [1] * 25)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failuresCountTowardTheBound(self) -> None:
        """
        Failed events count toward a tick's bound too.
        """
        runnables = [Runnable(store=self.store, fail=True) for _ in range(12)]
        for r in runnables:
            self.scheduler.schedule(r, self.later(-1))
        self.scheduler.tick()
        self.assertEqual(self.store.query(TimedEventFailureLog).count(), MAX_WORK_PER_TICK)
        self.clock.advance(0)
        self.assertEqual(self.store.query(TimedEventFailureLog).count(), 12)
        self.assertEqual(len(self.flushLoggedErrors(_Boom)), 12)

    def test_reschedule(self) -> None:
        """
        L{reschedule} moves the event at exactly C{fromWhen}; any other time
        raises L{ValueError}.
        """
        r = Runnable(store=self.store)
        self.scheduler.schedule(r, self.later(100))
        self.assertRaises(ValueError, self.scheduler.reschedule, r, self.later(99), self.later(5))
        self.scheduler.reschedule(r, self.later(100), self.later(5))
        self.assertEqual(list(self.scheduler.scheduledTimes(r)), [self.later(5)])
        self.clock.advance(5)
        self.assertEqual(r.runs, 1)

    def test_rescheduleLater(self) -> None:
        """
        Moving the only event later does not run it at its old time.
        """
        r = Runnable(store=self.store)
        self.scheduler.schedule(r, self.later(5))
        self.scheduler.reschedule(r, self.later(5), self.later(50))
        self.clock.advance(10)
        self.assertEqual(r.runs, 0)
        self.clock.advance(40)
        self.assertEqual(r.runs, 1)

    def test_unscheduleFirst(self) -> None:
        """
        L{unscheduleFirst} removes only the earliest event.
        """
        r = Runnable(store=self.store)
        for t in 30, 10, 20:
            self.scheduler.schedule(r, self.later(t))
        self.scheduler.unscheduleFirst(r)
        self.assertEqual(list(self.scheduler.scheduledTimes(r)), [self.later(20), self.later(30)])

    def test_unscheduleAll(self) -> None:
        """
        L{unscheduleAll} removes every event of the runnable and no other.
        """
        r, other = Runnable(store=self.store), Runnable(store=self.store)
        for t in 30, 10, 20:
            self.scheduler.schedule(r, self.later(t))
        self.scheduler.schedule(other, self.later(15))
        self.scheduler.unscheduleAll(r)
        self.assertEqual(list(self.scheduler.scheduledTimes(r)), [])
        self.clock.advance(40)
        self.assertEqual((r.runs, other.runs), (0, 1))

    def test_scheduledTimesSkipsRunning(self) -> None:
        """
        L{scheduledTimes} gives the times earliest first and leaves out the
        event that is running.
        """
        r = Introspector(store=self.store)
        self.scheduler.schedule(r, self.later(20))
        self.scheduler.schedule(r, self.later(10))
        self.assertEqual(list(self.scheduler.scheduledTimes(r)), [self.later(10), self.later(20)])
        self.clock.advance(10)
        self.assertEqual(r.seenTimes, 1)

    def test_deletedRunnable(self) -> None:
        """
        The event of a deleted runnable is dropped quietly when it comes due.
        """
        r = Runnable(store=self.store)
        self.scheduler.schedule(r, self.later(10))
        r.deleteFromStore()
        self.assertEqual(self.store.query(TimedEvent).count(), 1)
        self.clock.advance(10)
        self.assertEqual(self.store.query(TimedEvent).count(), 0)
        self.assertEqual(self.store.query(TimedEventFailureLog).count(), 0)

    def test_scheduleInRolledBackTransaction(self) -> None:
        """
        An event scheduled in a transaction that rolls back never runs, and
        its timer fires harmlessly.
        """
        r = Runnable(store=self.store)

        def work() -> None:
            self.scheduler.schedule(r, self.later(5))
            raise _Boom()

        self.assertRaises(_Boom, self.store.transact, work)
        self.clock.advance(10)
        self.assertEqual(r.runs, 0)
        self.assertEqual(self.store.query(TimedEvent).count(), 0)

    def test_stopCancelsTimer(self) -> None:
        """
        Stopping the service cancels its timer; the event waits in the store.
        """
        r = Runnable(store=self.store)
        self.scheduler.schedule(r, self.later(10))
        self.scheduler.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(20)
        self.assertEqual(r.runs, 0)
        self.assertEqual(self.store.query(TimedEvent).count(), 1)


    def test_closedStore(self) -> None:
        """
        A timer that fires after its store was closed does nothing and
        leaves no timer behind.
        """
        r = Runnable(store=self.store)
        self.scheduler.schedule(r, self.later(10))
        self.store.close()
        self.clock.advance(10)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StartTests(SynchronousTestCase, _SiteFixture):
    """
    Tests for what happens before and at the start of the site scheduler.
    """

    def test_nothingBeforeStart(self) -> None:
        """
        Nothing runs before the scheduler is started, even when due; overdue
        events run as soon as it starts.
        """
        self.makeSite(self, start=False)
        r = Runnable(store=self.store)
        self.scheduler.schedule(r, self.later(5))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(r.runs, 0)
        self.scheduler.startService()
        self.addCleanup(self.scheduler.stopService)
        self.clock.advance(0)
        self.assertEqual(r.runs, 1)

    def test_startWithoutEvents(self) -> None:
        """
        Starting the scheduler of a store without events arms no timer.
        """
        self.makeSite(self, start=False)
        self.scheduler.startService()
        self.addCleanup(self.scheduler.stopService)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(self.scheduler.timer)

    def test_startArmsEarliest(self) -> None:
        """
        Starting the scheduler arms its timer for the earliest pending event,
        which then runs when it comes due.
        """
        self.makeSite(self, start=False)
        r = Runnable(store=self.store)
        self.scheduler.schedule(r, self.later(30))
        self.scheduler.schedule(r, self.later(20))
        self.scheduler.startService()
        self.addCleanup(self.scheduler.stopService)
        self.assertEqual(
            [c.getTime() for c in self.clock.getDelayedCalls()], [self.clock.seconds() + 20]
        )
        self.clock.advance(20)
        self.assertEqual(r.runs, 1)

    def test_startedByStoreService(self) -> None:
        """
        The scheduler is part of C{IService(store)}: starting that starts
        it.
        """
        self.makeSite(self, start=False)
        service = IService(self.store)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertTrue(self.scheduler.running)

    def test_persistentEvents(self) -> None:
        """
        Events are items: after the store is closed and reopened, a new
        scheduler runs them when started.
        """
        dbdir = self.mktemp()
        self.makeSite(self, dbdir, start=False)
        r = Runnable(store=self.store)
        self.scheduler.schedule(r, self.later(10))
        rid = r.storeID
        self.store.close()
        self.clock.advance(20)
        store = Store(dbdir)
        self.addCleanup(store.close)
        scheduler = IScheduler(store)
        self.assertIsNot(scheduler, self.scheduler)
        scheduler.clock = self.clock
        scheduler.startService()
        self.addCleanup(scheduler.stopService)
        self.clock.advance(0)
        self.assertEqual(store.getItemByID(rid).runs, 1)


class SubSchedulerTests(SynchronousTestCase, _SiteFixture):
    """
    Tests for the scheduler of a substore and its hook in the parent.
    """

    def setUp(self) -> None:
        self.makeSite(self, self.mktemp())
        self.subStoreItem = SubStore.createNew(self.store, ["account", "alice.axiom"])
        self.user = self.subStoreItem.open()
        self.addCleanup(self.subStoreItem.close)
        self.userScheduler = IScheduler(self.user)

    def hookTimes(self) -> list[Time]:
        hooks = list(self.store.query(_SubSchedulerParentHook))
        self.assertLessEqual(len(hooks), 1)
        return [t for hook in hooks for t in self.scheduler.scheduledTimes(hook)]

    def test_userScheduler(self) -> None:
        """
        A substore has its own scheduler, which takes its time from the
        parent's.
        """
        self.assertIsInstance(self.userScheduler, _UserScheduler)
        self.assertIs(IScheduler(self.user), self.userScheduler)
        verifyObject(IScheduler, self.userScheduler)
        self.assertEqual(self.userScheduler.now(), _at(self.clock.seconds()))
        self.assertEqual(_SubSchedulerParentHook.typeName, "axiom_subscheduler_parent_hook")
        self.assertEqual(_SubSchedulerParentHook.schemaVersion, 4)

    def test_hookChain(self) -> None:
        """
        A substore's event is kept in the substore; the parent gets one hook
        scheduled at the substore's earliest event, which runs the event
        then follows the next one.
        """
        r = Runnable(store=self.user, repeat=1, interval=20)
        self.userScheduler.schedule(r, self.later(10))
        self.assertEqual(self.user.query(TimedEvent).count(), 1)
        self.assertEqual(self.hookTimes(), [self.later(10)])
        [hook] = self.store.query(_SubSchedulerParentHook)
        self.assertIs(hook.subStore, self.subStoreItem)
        self.clock.advance(10)
        self.assertEqual(r.runs, 1)
        self.assertEqual(self.hookTimes(), [self.later(20)])
        self.clock.advance(20)
        self.assertEqual(r.runs, 2)
        self.assertEqual(self.hookTimes(), [])
        self.assertEqual(self.user.query(TimedEvent).count(), 0)

    def test_hookMovesEarlier(self) -> None:
        """
        An earlier substore event moves the hook earlier; a later one leaves
        it; there is only ever one hook event.
        """
        r = Runnable(store=self.user)
        self.userScheduler.schedule(r, self.later(50))
        self.userScheduler.schedule(r, self.later(20))
        self.userScheduler.schedule(r, self.later(80))
        self.assertEqual(self.hookTimes(), [self.later(20)])
        self.clock.advance(20)
        self.assertEqual(r.runs, 1)
        self.assertEqual(self.hookTimes(), [self.later(30)])
        self.clock.advance(60)
        self.assertEqual(r.runs, 3)

    def test_closedSubstoreOpenedAndClosed(self) -> None:
        """
        The hook opens a closed substore to run its events, and closes it
        again.
        """
        r = Runnable(store=self.user)
        self.userScheduler.schedule(r, self.later(10))
        rid = r.storeID
        del r
        self.subStoreItem.close()
        self.clock.advance(10)
        self.assertFalse(self.subStoreItem.isOpen())
        user = self.subStoreItem.open()
        self.assertEqual(user.getItemByID(rid).runs, 1)

    def test_substoreGone(self) -> None:
        """
        When the substore's directory is gone, its hook fails with
        L{StoreNotFound}, which is logged in the parent, and no empty store
        is made in its place.
        """
        r = Runnable(store=self.user)
        self.userScheduler.schedule(r, self.later(10))
        del r
        self.subStoreItem.close()
        self.subStoreItem.storepath.remove()
        self.clock.advance(10)
        self.assertEqual(len(self.flushLoggedErrors(StoreNotFound)), 1)
        [log] = self.store.query(TimedEventFailureLog)
        self.assertIsInstance(log.runnable, _SubSchedulerParentHook)
        self.assertFalse(self.subStoreItem.storepath.exists())

    def test_userFailureLog(self) -> None:
        """
        A failing substore event is logged in the substore.
        """
        r = Runnable(store=self.user, fail=True)
        self.userScheduler.schedule(r, self.later(1))
        self.clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(_Boom)), 1)
        self.assertEqual(self.user.query(TimedEventFailureLog).count(), 1)
        self.assertEqual(self.store.query(TimedEventFailureLog).count(), 0)

    def test_migrateDownAndUp(self) -> None:
        """
        L{_UserScheduler.migrateDown} removes the hook from the parent
        (before a user store is moved out) and L{_UserScheduler.migrateUp}
        re-arms it at the earliest pending event (after it is moved in).
        """
        r = Runnable(store=self.user)
        self.userScheduler.schedule(r, self.later(30))
        self.userScheduler.schedule(r, self.later(10))
        self.userScheduler.migrateDown()
        self.assertEqual(self.store.query(_SubSchedulerParentHook).count(), 0)
        self.assertEqual(self.store.query(TimedEvent).count(), 0)
        self.clock.advance(15)
        self.assertEqual(r.runs, 0)
        self.userScheduler.migrateUp()
        self.assertEqual(self.hookTimes(), [self.later(-5)])
        self.clock.advance(0)
        self.assertEqual(r.runs, 1)
        self.clock.advance(15)
        self.assertEqual(r.runs, 2)

    def test_deletedSubStore(self) -> None:
        """
        Deleting the L{SubStore} item deletes its hook; the hook's pending
        event is then dropped quietly.
        """
        r = Runnable(store=self.user)
        self.userScheduler.schedule(r, self.later(10))
        self.subStoreItem.deleteFromStore()
        self.assertEqual(self.store.query(_SubSchedulerParentHook).count(), 0)
        self.clock.advance(10)
        self.assertEqual(self.store.query(TimedEvent).count(), 0)
        self.assertEqual(self.store.query(TimedEventFailureLog).count(), 0)

    def test_moveToAnotherSite(self) -> None:
        """
        A user store moved to another site store (hook dropped with
        L{_UserScheduler.migrateDown}, directory moved, a new L{SubStore}
        made, hook re-armed with L{_UserScheduler.migrateUp}) keeps its data
        and runs its pending events there.
        """
        r = Runnable(store=self.user, note="moving")
        self.userScheduler.schedule(r, self.later(10))
        rid = r.storeID
        del r
        self.userScheduler.migrateDown()
        source = self.subStoreItem.storepath
        self.subStoreItem.close()
        self.subStoreItem.deleteFromStore()

        other = Store(self.mktemp())
        self.addCleanup(other.close)
        otherScheduler = IScheduler(other)
        otherScheduler.clock = self.clock
        otherScheduler.startService()
        self.addCleanup(otherScheduler.stopService)
        destination = other.newFilePath("account", "alice.axiom")
        destination.parent().makedirs()
        source.moveTo(destination)
        moved = SubStore(store=other, storepath=destination)
        self.addCleanup(moved.close)
        IScheduler(moved.open()).migrateUp()

        self.clock.advance(10)
        self.assertEqual(self.store.query(TimedEvent).count(), 0)
        r = moved.open().getItemByID(rid)
        self.assertEqual((r.note, r.runs), ("ran", 1))


class ScheduleErrorTests(SynchronousTestCase):
    """
    Tests for scheduling mistakes.
    """

    def test_crossStoreRunnable(self) -> None:
        """
        Scheduling a runnable from another store raises
        L{NoCrossStoreReferences} and schedules nothing.
        """
        store, elsewhere = Store(), Store()
        r = Runnable(store=elsewhere)
        self.assertRaises(NoCrossStoreReferences, IScheduler(store).schedule, r, _at(10))
        self.assertEqual(store.query(TimedEvent).count(), 0)
        self.assertEqual(elsewhere.query(TimedEvent).count(), 0)


class AxiomDataTests(SynchronousTestCase):
    """
    Stores written by Axiom keep their substores and pending events.
    """

    def test_axiomSiteAndUserStore(self) -> None:
        """
        A site store and a user store laid out by Axiom, with a substore, its
        parent hook and pending timed events, open here, and the user
        store's event runs through the hook when it is due.
        """
        when = 1_000_010 * 1_000_000
        siteDir = FilePath(self.mktemp())
        site = _AxiomDatabase(siteDir)
        site.declare("substore", "axiom.substore", 1, [("storepath", "TEXT COLLATE NOCASE", "path")])
        site.declare(
            "axiom_subscheduler_parent_hook",
            "axiom.scheduler",
            4,
            [("subStore", "INTEGER", "reference")],
        )
        site.declare(
            "timed_event",
            "axiom.scheduler",
            1,
            [("runnable", "INTEGER", "reference"), ("time", "INTEGER", "timestamp")],
        )
        ssID = site.insert("substore", storepath="account/alice.axiom")
        hookID = site.insert("axiom_subscheduler_parent_hook", subStore=ssID)
        site.insert("timed_event", runnable=hookID, time=when)
        site.close()

        user = _AxiomDatabase(siteDir.child("files").child("account").child("alice.axiom"))
        user.declare(
            "timed_event",
            "axiom.scheduler",
            1,
            [("runnable", "INTEGER", "reference"), ("time", "INTEGER", "timestamp")],
        )
        user.declare(
            Runnable.typeName,
            Runnable.__module__,
            Runnable.schemaVersion,
            [(name, attr.sqltype, type(attr).__name__) for name, attr in Runnable.getSchema()],
        )
        rid = user.insert(Runnable.typeName, fail=0, interval=10, note="axiom", repeat=0, runs=0)
        user.insert("timed_event", runnable=rid, time=when)
        user.close()

        clock = Clock()
        clock.advance(1_000_000)
        store = Store(siteDir, create=False)
        self.addCleanup(store.close)
        scheduler = IScheduler(store)
        scheduler.clock = clock
        scheduler.startService()
        self.addCleanup(scheduler.stopService)
        ss = store.getItemByID(ssID)
        self.addCleanup(ss.close)
        self.assertIsInstance(ss, SubStore)
        self.assertIs(store.getItemByID(hookID).subStore, ss)
        self.assertEqual(list(scheduler.scheduledTimes(store.getItemByID(hookID))), [_at(1_000_010)])
        clock.advance(10)
        self.assertEqual(ss.open().getItemByID(rid).runs, 1)
        self.assertEqual(ss.open().query(TimedEvent).count(), 0)
        self.assertEqual(store.query(TimedEvent).count(), 0)

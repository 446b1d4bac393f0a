# -*- test-case-name: tests.test_store_scheduler -*-
"""
Persistent timed events: run an item's C{run()} method at a given time.

C{IScheduler(store)} gives the store's scheduler (L{_schedulerFor}).  Events
are L{TimedEvent} items in the same store as their runnable.  Each event runs
in its own transaction; C{run()} returns L{None} (the event is done) or a
L{Time} (the event moves there).  When C{run()} raises, its changes are
rolled back and, in a new transaction, the runnable's
C{timedEventErrorHandler(event, failure)} decides (like C{run()}'s result),
or a L{TimedEventFailureLog} is written and the event dropped.

A store with no parent has a site scheduler: an C{IService} named
C{"Site Scheduler"} that runs nothing until it is started (normally through
C{IService(store)}), then runs overdue events at once and the rest when
they come due, at most L{MAX_WORK_PER_TICK} per tick.  A substore has a user
scheduler: its events stay in the substore, and a L{_SubSchedulerParentHook}
item in the parent is scheduled there at the substore's earliest event; when
it runs, it opens the substore and runs its due events.

Unlike Axiom, the clock is injectable: pass C{clock} to the site scheduler or
set its C{clock} attribute (e.g. to a L{twisted.internet.task.Clock}); the
global reactor is looked up only when no clock was given.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, cast

from twisted.application.service import IService, Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from fractal.store.attributes import AND, Time, bytes, inmemory, reference, timestamp
from fractal.store.errors import StoreClosed
from fractal.store.interfaces import IScheduler
from fractal.store.item import Item
from fractal.store.substore import SubStore

__all__ = [
    "MAX_WORK_PER_TICK",
    "TimedEvent",
    "TimedEventFailureLog",
]

MAX_WORK_PER_TICK = 10
"""
The most events one tick of a scheduler runs before it yields to the reactor
and comes back for the rest.
"""


def _seconds(when: Any) -> float:
    """
    @param when: an L{epsilon.extime.Time}.
    @return: C{when} as seconds since the epoch.
    """
    return float(when.asPOSIXTimestamp())


class TimedEventFailureLog(Item):
    """
    The record of a timed event whose runnable raised and had no
    C{timedEventErrorHandler}.

    @ivar desiredTime: when the event was due.
    @ivar actualTime: when it ran and failed.
    @ivar runnable: the item whose C{run()} failed.
    @ivar traceback: the failure's traceback, UTF-8 encoded.
    """

    typeName = "timed_event_failure_log"
    schemaVersion = 1

    desiredTime = timestamp(doc="When the event was due.")
    actualTime = timestamp(doc="When it ran and failed.")
    runnable = reference(doc="The item whose run() failed.")
    traceback = bytes(doc="The failure's traceback, UTF-8 encoded.")


class TimedEvent(Item):
    """
    One pending call of C{runnable.run()} at C{time}.

    @ivar time: when the event is due.
    @ivar runnable: the item to run; L{None} once it was deleted, and the
        event is then dropped when it comes due.
    @ivar running: whether the event is running now.
    """

    typeName = "timed_event"
    schemaVersion = 1

    time = timestamp(indexed=True, doc="When the event is due.")
    runnable = reference(doc="The item whose run() is called.")
    running = inmemory(doc="Whether the event is running now.")

    def activate(self) -> None:
        """
        An event loaded from the database is not running.
        """
        self.running = False

    def _rescheduleFromRun(self, newTime: Any) -> None:
        """
        Apply the result of C{run()} or of an error handler.

        @param newTime: L{None} to drop the event, or the L{Time} to move it
            to.
        """
        if newTime is None:
            self.deleteFromStore()
        else:
            self.time = newTime

    def invokeRunnable(self) -> None:
        """
        Run the runnable and apply its result.  Call it in a transaction.
        """
        runnable = self.runnable
        if runnable is None:
            self.deleteFromStore()
            return
        self.running = True
        try:
            newTime = runnable.run()
        finally:
            self.running = False
        self._rescheduleFromRun(newTime)

    def handleError(self, now: Any, failure: Failure) -> None:
        """
        Deal with a failed run: ask the runnable's C{timedEventErrorHandler}
        if it has one, else log the failure as a L{TimedEventFailureLog} and
        drop the event.  Call it in a transaction.

        @param now: when the event ran.
        @param failure: what C{run()} raised.
        """
        handler = getattr(self.runnable, "timedEventErrorHandler", None)
        if handler is not None:
            self._rescheduleFromRun(handler(self, failure))
        else:
            self._defaultErrorHandler(now, failure)

    def _defaultErrorHandler(self, now: Any, failure: Failure) -> None:
        """
        Record the failure and drop the event.
        """
        TimedEventFailureLog(
            store=self.store,
            desiredTime=self.time,
            actualTime=now,
            runnable=self.runnable,
            traceback=failure.getTraceback().encode("utf-8", "replace"),
        )
        self.deleteFromStore()


class _EventFailed(Exception):
    """
    Carries a failed event out of its transaction, so the transaction rolls
    back and the scheduler handles the failure in a new one.
    """

    def __init__(self, event: TimedEvent, failure: Failure) -> None:
        super().__init__("A timed event's runnable failed.")
        self.event = event
        self.failure = failure


class _SchedulerMixin:
    """
    What every scheduler does with the L{TimedEvent}s of its store.

    @ivar store: the store whose events this scheduler runs.
    """

    _log = Logger()
    store: Any

    def now(self) -> Time:
        """
        @return: the current time for this scheduler.
        """
        raise NotImplementedError()

    def _transientSchedule(self, when: Any, now: Any) -> None:
        """
        Make sure this scheduler ticks no later than C{when}.
        """
        raise NotImplementedError()

    def _oneTick(self, now: Any) -> bool:
        """
        Run the earliest due event.  Call it in a transaction.

        @return: whether there was one.
        @raise _EventFailed: its runnable raised.
        """
        for event in self.store.query(
            TimedEvent, TimedEvent.time <= now, sort=TimedEvent.time.ascending, limit=1
        ):
            try:
                event.invokeRunnable()
            except Exception:
                raise _EventFailed(event, Failure())  # type: ignore[no-untyped-call]
            return True
        return False

    def _handleFailure(self, now: Any, failed: _EventFailed) -> None:
        """
        Handle a failed event in a transaction of its own; if the error
        handler itself fails, fall back to the failure log.
        """
        event, failure = failed.event, failed.failure
        self._log.failure("Timed event {event!r} failed", failure, event=event)
        try:
            self.store.transact(event.handleError, now, failure)
        except Exception:
            self._log.failure("Error handler for timed event {event!r} failed", event=event)
            self.store.transact(event._defaultErrorHandler, now, failure)

    def tick(self) -> None:
        """
        Run due events, each in its own transaction, at most
        L{MAX_WORK_PER_TICK} of them, then arrange to tick again at the
        earliest event left.
        """
        now = self.now()
        for _ in range(MAX_WORK_PER_TICK):
            try:
                if not self.store.transact(self._oneTick, now):
                    break
            except _EventFailed as failed:
                self._handleFailure(now, failed)
        for event in self.store.query(TimedEvent, sort=TimedEvent.time.ascending, limit=1):
            self._transientSchedule(event.time, now)

    def schedule(self, runnable: Any, when: Any) -> None:
        """
        Call C{runnable.run()} at C{when}, or as soon as possible if C{when}
        is past.

        @param runnable: an item in this scheduler's store with a C{run()}
            method.
        @param when: a L{Time}.
        """
        TimedEvent(store=self.store, time=when, runnable=runnable)
        self._transientSchedule(when, self.now())

    def reschedule(self, runnable: Any, fromWhen: Any, toWhen: Any) -> None:
        """
        Move the event of C{runnable} due at C{fromWhen} to C{toWhen}.

        @raise ValueError: C{runnable} has no event at exactly C{fromWhen}.
        """
        for event in self.store.query(
            TimedEvent, AND(TimedEvent.time == fromWhen, TimedEvent.runnable == runnable), limit=1
        ):
            event.time = toWhen
            self._transientSchedule(toWhen, self.now())
            return
        raise ValueError(f"{runnable!r} is not scheduled to run at {fromWhen!r}.")

    def unscheduleFirst(self, runnable: Any) -> None:
        """
        Remove the earliest event of C{runnable}, if any.
        """
        for event in self.store.query(
            TimedEvent,
            TimedEvent.runnable == runnable,
            sort=TimedEvent.time.ascending,
            limit=1,
        ):
            event.deleteFromStore()

    def unscheduleAll(self, runnable: Any) -> None:
        """
        Remove every event of C{runnable}.
        """
        for event in list(self.store.query(TimedEvent, TimedEvent.runnable == runnable)):
            event.deleteFromStore()

    def scheduledTimes(self, runnable: Any) -> Iterator[Any]:
        """
        @return: the times at which C{runnable} is scheduled, earliest
            first, leaving out an event that is running now.
        """
        events = list(
            self.store.query(
                TimedEvent, TimedEvent.runnable == runnable, sort=TimedEvent.time.ascending
            )
        )
        return iter([event.time for event in events if not event.running])


@implementer(IScheduler, IService)
class _SiteScheduler(_SchedulerMixin, Service):
    """
    The scheduler of a store with no parent: a service that keeps one timer
    for the earliest event while it runs.

    @ivar clock: the L{IReactorTime} giving the time and the timer; the
        global reactor when L{None}.
    @ivar timer: the pending tick, or L{None}.
    """

    name = "Site Scheduler"

    def __init__(self, store: Any, clock: IReactorTime | None = None) -> None:
        self.store = store
        self.clock = clock
        self.timer: IDelayedCall | None = None

    def _clock(self) -> IReactorTime:
        """
        @return: L{clock}, or the global reactor if it is L{None}.
        """
        if self.clock is None:
            from twisted.internet import reactor

            return reactor
        return self.clock

    def now(self) -> Time:
        """
        @return: the clock's current time.
        """
        return cast(Time, Time.fromPOSIXTimestamp(self._clock().seconds()))

    def callLater(self, delay: float, f: Callable[..., object], *a: Any, **kw: Any) -> IDelayedCall:
        """
        Arm a timer on the clock.  Like L{now}, it can be replaced on an
        instance, as Axiom's tests do.

        @return: the clock's delayed call.
        """
        return self._clock().callLater(delay, f, *a, **kw)

    def startService(self) -> None:
        """
        Start ticking: arm the timer for the earliest event, so overdue
        events run at once (in the next reactor turn).  A store with no event
        (and so, often, no event table) costs no query and no tick.
        """
        super().startService()  # type: ignore[no-untyped-call]
        if not self.store._hasTable(TimedEvent):
            # No event was ever scheduled here (a query would say the same,
            # for the cost of building it).
            return
        now = self.now()
        for event in self.store.query(TimedEvent, sort=TimedEvent.time.ascending, limit=1):
            self._transientSchedule(event.time, now)

    def stopService(self) -> None:
        """
        Stop ticking.  Events stay in the store for the next start.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    def tick(self) -> None:
        """
        Run due events; see L{_SchedulerMixin.tick}.  Called directly rather
        than by the timer, it cancels the pending timer, which it re-arms.  If
        the store was closed meanwhile, it does nothing.
        """
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        try:
            super().tick()
        except StoreClosed:
            self._log.info("Scheduler of closed store {store!r} stops ticking", store=self.store)

    def _transientSchedule(self, when: Any, now: Any) -> None:
        """
        While running, make sure the timer fires no later than C{when}.
        """
        if not self.running:
            return
        whenSeconds = _seconds(when)
        if self.timer is not None:
            if self.timer.active() and self.timer.getTime() <= whenSeconds:
                return
            if self.timer.active():
                self.timer.cancel()
            self.timer = None
        delay = max(0.0, whenSeconds - _seconds(self.now()))
        self.timer = self.callLater(delay, self.tick)


@implementer(IScheduler)
class _UserScheduler(_SchedulerMixin):
    """
    The scheduler of a substore: it runs when the parent store's scheduler
    runs the substore's L{_SubSchedulerParentHook}, and takes its time from
    the parent's scheduler.
    """

    def __init__(self, store: Any) -> None:
        self.store = store

    def now(self) -> Time:
        """
        @return: the parent store's scheduler's time.
        """
        return cast(Time, cast(Any, IScheduler(self.store.parent)).now())

    def _subStoreItem(self) -> SubStore:
        """
        @return: the L{SubStore} item naming this store in its parent.
        """
        return self.store.parent.getItemByID(self.store.idInParent)  # type: ignore[no-any-return]

    def _transientSchedule(self, when: Any, now: Any) -> None:
        """
        Make sure the parent runs this store's hook no later than C{when}.
        """
        parent = self.store.parent
        parent.transact(self._scheduleHook, when)

    def _scheduleHook(self, when: Any) -> None:
        """
        Find or create this store's hook in the parent and schedule it.
        """
        hook = self.store.parent.findOrCreate(_SubSchedulerParentHook, subStore=self._subStoreItem())
        hook._schedule(when)

    def migrateDown(self) -> None:
        """
        Remove this store's hook from the parent, before the substore is
        moved out of it.  Its events stay in the substore.
        """
        parent = self.store.parent
        parent.transact(self._deleteHook)

    def _deleteHook(self) -> None:
        """
        Delete this store's hook and its events in the parent.
        """
        parent = self.store.parent
        for hook in list(
            parent.query(_SubSchedulerParentHook, _SubSchedulerParentHook.subStore == self._subStoreItem())
        ):
            IScheduler(parent).unscheduleAll(hook)
            hook.deleteFromStore()

    def migrateUp(self) -> None:
        """
        Schedule this store's hook in the parent at its earliest event, after
        the substore was moved into the parent.
        """
        for event in self.store.query(TimedEvent, sort=TimedEvent.time.ascending, limit=1):
            self._transientSchedule(event.time, None)


class _SubSchedulerParentHook(Item):
    """
    The parent's stand-in for a substore's pending events: scheduled in the
    parent at the substore's earliest event, it runs the substore's due
    events when it runs.

    @ivar subStore: the L{SubStore} whose events this hook runs.
    """

    typeName = "axiom_subscheduler_parent_hook"
    schemaVersion = 4

    subStore = reference(
        reftype=SubStore,
        whenDeleted=reference.CASCADE,
        doc="The SubStore whose events this hook runs.",
    )

    def run(self) -> None:
        """
        Open the substore, run its due events (its scheduler re-arms this
        hook for the next one), and close it again if it was closed.
        """
        subStore = self.subStore
        if subStore is None:
            return None
        wasOpen = subStore.isOpen()
        store = subStore.open()
        try:
            cast(Any, IScheduler(store)).tick()
        finally:
            if not wasOpen:
                subStore.close()
        return None

    def _schedule(self, when: Any) -> None:
        """
        Schedule this hook at C{when} unless it is already due earlier.
        """
        scheduler = IScheduler(self.store)
        times = list(cast(Any, scheduler.scheduledTimes(self)))
        if not times:
            scheduler.schedule(self, when)
            return
        earliest = min(times, key=_seconds)
        if _seconds(when) < _seconds(earliest):
            scheduler.reschedule(self, earliest, when)


def _schedulerFor(store: Any) -> IScheduler:
    """
    Return the scheduler of a store, creating it on first use.

    @param store: a L{fractal.store.store.Store}.
    @return: the store's site scheduler if it has no parent, else its user
        scheduler; the same object on every call for the same store.
    """
    scheduler = getattr(store, "_schedulerService", None)
    if scheduler is None:
        if store.parent is None:
            scheduler = _SiteScheduler(store)
        else:
            scheduler = _UserScheduler(store)
        store._schedulerService = scheduler
    return scheduler

# -*- test-case-name: tests.test_pool -*-
# mypy: disable-error-code="no-untyped-call"
"""
The store pool: a node's open user stores.

A node may serve millions of users but can hold only so many SQLite files open
(each store in WAL mode holds L{FDS_PER_STORE} descriptors).  The pool opens a
user's store on demand at C{dataDir/stores/<2 hex>/<storeNameForKey(key)>},
keeps at most C{maxOpenStores} open, closes the least recently used one to make
room and any one idle longer than C{idleTimeout}, and never closes a store
while a call holds it.  When every open store is in use it refuses with the
retryable L{Overloaded} rather than running out of descriptors.

The raw user key never becomes a path: it is stored inside the store, in a
L{UserKey} item, and checked each time the store is opened.

With a durable shipper (L{fractal.durable.interfaces.IShipper}), a store whose
local copy is missing is first restored from durable storage, the shipper
watches every store the pool opens, and the pool waits for the shipper to ship
a store before closing it; so to make room it closes first an idle store that
is shipped already (L{IShipper.unshipped}), which closes at once.
"""

from __future__ import annotations

import errno
import os
import resource
from collections import OrderedDict
from typing import Any, Callable, Collection, Iterator

from attrs import frozen
from twisted.application.service import IService
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from fractal.durable._threads import RunInThread
from fractal.durable.interfaces import IShipper
from fractal.keys import InvalidUserKey, slotForKey, storeNameForKey, validateKey
from fractal.protocol import Overloaded, StoreUnavailable
from fractal.store import Item, Store, text
from fractal.store.errors import StoreNotFound, StoreOutOfDescriptors
from fractal.store.interfaces import IScheduler
from fractal.store.store import DEFAULT_PAGE_SIZE, _checkPageSize

__all__ = [
    "FDS_PER_STORE",
    "DEFAULT_IDLE_TIMEOUT",
    "defaultMaxOpenStores",
    "UserKey",
    "StoreLease",
    "StorePool",
    "StoresClosing",
]

FDS_PER_STORE = 3
"""
File descriptors one open store holds in WAL mode: the database, its
write-ahead log and its shared-memory index.
"""

DEFAULT_IDLE_TIMEOUT = 300.0
"""
Seconds after which a store nobody has used is closed.
"""


def defaultMaxOpenStores(
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
) -> int:
    """
    How many stores a process may keep open, from its soft C{RLIMIT_NOFILE}.

    A quarter of the descriptors (at least 64) is left for sockets, logs and
    the stores being opened or inspected; the rest is divided by
    L{FDS_PER_STORE}.

    @param getrlimit: L{resource.getrlimit}, or a stand-in for tests.
    @return: at least 1.
    """
    soft, _ = getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0 or soft > 1 << 20:
        soft = 1 << 20
    reserve = max(64, soft // 4)
    return max(1, (soft - reserve) // FDS_PER_STORE)


def _outOfDescriptors() -> bool:
    """
    Whether the process cannot open another file now (C{EMFILE} or
    C{ENFILE}): SQLite reports that only as "unable to open database file",
    so a failed open asks the system directly.
    """
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
    except OSError as e:
        return e.errno in (errno.EMFILE, errno.ENFILE)
    os.close(fd)
    return False


class UserKey(Item):
    """
    The raw key of the user a store belongs to, kept inside the store because
    the store's path is only a hash of it.
    """

    typeName = "fractal_user_key"
    schemaVersion = 1

    key = text(allowNone=False, doc="The user key, exactly as the client sent it.")


class StoreLease:
    """
    One open store, held for a call.  While any lease on a store is held, the
    pool does not close it.  Each L{StorePool.acquire} hands out the store's
    lease once; call L{release} exactly once for each.

    @ivar key: the user key.
    @ivar store: the open store.
    @ivar prepared: what the pool's C{prepare} callable returned for the store
        (for a node: the application's bound responders), or L{None}.
    """

    __slots__ = (
        "key", "store", "prepared", "_pool", "_busy", "_lastUsed", "_whenClosed", "_closeOnRelease"
    )

    def __init__(self, pool: StorePool, key: str, store: Store, prepared: Any) -> None:
        self.key = key
        self.store = store
        self.prepared = prepared
        self._pool = pool
        self._busy = 0
        self._lastUsed = 0.0
        self._whenClosed: list[Deferred[None]] = []
        self._closeOnRelease = False

    def release(self) -> None:
        """
        The call is done with the store.
        """
        self._pool._release(self)


@frozen
class StoresClosing:
    """
    What L{StorePool.closeStoresOf} is closing.

    @ivar held: the keys of the stores that calls held when it was asked;
        each closes once its last call releases it.
    @ivar opening: the keys of the stores being opened when it was asked;
        each closes once it is open and no call holds it.
    @ivar closed: fires (never fails) once every chosen store is closed,
        each shipped first when the pool has a shipper.
    """

    held: list[str]
    opening: list[str]
    closed: Deferred[None]


class StorePool:
    """
    The user stores a node holds open.

    @ivar dataDir: the node's data directory; stores live under
        C{dataDir/stores}.
    @ivar maxOpenStores: the most stores held open at once, counting those
        being opened or closed.
    @ivar idleTimeout: seconds after which an unused store is closed.
    @ivar shipper: the durable shipper, or L{None}.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        dataDir: FilePath[str],
        prepare: Callable[[Store], Any] | None = None,
        maxOpenStores: int | None = None,
        idleTimeout: float = DEFAULT_IDLE_TIMEOUT,
        shipper: IShipper | None = None,
        pageSize: int = DEFAULT_PAGE_SIZE,
        runInThread: RunInThread | None = None,
    ) -> None:
        """
        @param clock: the time source for idle closing.
        @param dataDir: the node's data directory.
        @param prepare: called with every store the pool opens, after its key
            is checked; its result is kept as
            L{StoreLease.prepared}.  A node passes
            L{fractal.app.Application.installOn}.
        @param maxOpenStores: the most stores open at once; L{None} for
            L{defaultMaxOpenStores}.
        @param idleTimeout: seconds after which an unused store is closed.
        @param shipper: the durable shipper, or L{None}.
        @param pageSize: the SQLite page size of the stores it creates (see
            L{Store}).
        @param runInThread: closes the stores' connections off the calling
            thread (L{Store.closeIn}), so that SQLite's checkpoint and sync
            at each close do not hold up the reactor; L{None} to close them
            in the calling thread.
        @raise ValueError: if C{maxOpenStores} or C{idleTimeout} is not
            positive, or C{pageSize} is not a power of two from 512 to 65536.
        """
        if maxOpenStores is None:
            maxOpenStores = defaultMaxOpenStores()
        if maxOpenStores < 1:
            raise ValueError(f"maxOpenStores must be at least 1, not {maxOpenStores!r}")
        if not idleTimeout > 0:
            raise ValueError(f"idleTimeout must be positive, not {idleTimeout!r}")
        _checkPageSize(pageSize)
        self._clock = clock
        self.dataDir = dataDir
        self._prepare = prepare
        self._pageSize = pageSize
        self.maxOpenStores = maxOpenStores
        self.idleTimeout = idleTimeout
        self.shipper = shipper
        self._runInThread = runInThread
        self._open: OrderedDict[str, StoreLease] = OrderedDict()
        self._opening: dict[str, list[Deferred[StoreLease]]] = {}
        self._closing: dict[str, StoreLease] = {}
        self._roomWaiters: list[Deferred[None]] = []
        self._sweepCall: IDelayedCall | None = None
        self._closed = False
        self._closeWaiters: list[Deferred[None]] = []
        self._closeWhenOpened: dict[str, list[Deferred[None]]] = {}
        self._holds: dict[int, int] = {}
        self._holdSlotCount = 1
        self._holdWaiters: dict[int, list[Deferred[None]]] = {}
        self.opened = 0
        self.closedCount = 0

    # -- paths and keys --------------------------------------------------

    @property
    def storesDir(self) -> FilePath[str]:
        """
        The directory holding every user store of this node.
        """
        return self.dataDir.child("stores")

    def pathForKey(self, key: str) -> FilePath[str]:
        """
        The directory of C{key}'s store: a name derived from a hash of the
        key, under L{storesDir}, whatever the key contains.

        @raise fractal.keys.InvalidUserKey: if C{key} is not valid.
        """
        name = storeNameForKey(key)
        # The name is 64 hex digits, so it is safe to join as it is.
        return self.storesDir.preauthChild(name[:2] + "/" + name)

    def openKeys(self) -> list[str]:
        """
        The keys of the stores open now, least recently used first.
        """
        return list(self._open)

    def knownKeys(self, limit: int = 100) -> list[str]:
        """
        Up to C{limit} keys of users that have a store on this node's disk:
        those open now first, then others, read from inside their stores.

        @param limit: the most keys to return.
        """
        keys = list(self._open)[:limit]
        seen = set(keys)
        for dbdir in self._storeDirectories():
            if len(keys) >= limit:
                break
            key = self._readKey(dbdir)
            if key is not None and key not in seen:
                seen.add(key)
                keys.append(key)
        return keys

    def _storeDirectories(self) -> Iterator[FilePath[str]]:
        """
        Every store directory under L{storesDir} holding a database.
        """
        if not self.storesDir.isdir():
            return
        for bucket in sorted(self.storesDir.children()):
            if not bucket.isdir():
                continue
            for dbdir in sorted(bucket.children()):
                if dbdir.child("db.sqlite").isfile():
                    yield dbdir

    def _readKey(self, dbdir: FilePath[str]) -> str | None:
        """
        The user key stored inside the store at C{dbdir}, or L{None} if it
        cannot be read (being opened or closed, or damaged).
        """
        for lease in list(self._open.values()) + list(self._closing.values()):
            if lease.store.dbdir == dbdir:
                return lease.key
        for waiting in self._opening:
            if self.pathForKey(waiting) == dbdir:
                return None
        try:
            # Never create one: the directory may have been moved away (set
            # aside, handed off) since it was listed, and an empty store in
            # its place would look like the user's own.
            store = Store(dbdir, create=False)
        except StoreNotFound:
            return None
        except Exception:
            self.log.failure("Cannot open store {path} to read its key", path=dbdir.path)
            return None
        try:
            found = store.findFirst(UserKey)
            return None if found is None else found.key
        finally:
            store.close()

    # -- opening ---------------------------------------------------------

    def tryAcquire(self, key: str) -> StoreLease | None:
        """
        The lease of C{key}'s store if it is open now, else L{None}: the fast
        path of L{acquire}, without a L{Deferred}.

        @param key: a valid user key.
        """
        if self._holds and self._heldSlot(key) is not None:
            return None
        lease = self._open.get(key)
        if lease is not None:
            lease._busy += 1
            lease._lastUsed = self._clock.seconds()
            self._open.move_to_end(key)
        return lease

    def acquire(self, key: str) -> Deferred[StoreLease]:
        """
        Hold C{key}'s store for a call, opening (or restoring, or creating) it
        if needed.  The store stays open at least until the lease is released.

        @param key: a valid user key.
        @return: fires with the L{StoreLease}, at once when the store is open
            already; fails with L{Overloaded} when every open store is in use,
            with L{StoreUnavailable} when the store cannot be opened or the
            pool is closed, or with L{InvalidUserKey}.
        """
        lease = self.tryAcquire(key)
        if lease is not None:
            return succeed(lease)
        if self._closed:
            return fail(StoreUnavailable("the node's store pool is closed"))
        try:
            validateKey(key)
        except InvalidUserKey:
            return fail()
        held = self._heldSlot(key) if self._holds else None
        if held is not None:
            # Its slot's local copies are being set aside: open it after.
            unheld: Deferred[None] = Deferred()
            self._holdWaiters.setdefault(held, []).append(unheld)
            return unheld.addCallback(lambda _: self.acquire(key))
        waiters = self._opening.get(key)
        if waiters is not None:
            d: Deferred[StoreLease] = Deferred()
            waiters.append(d)
            return d
        closing = self._closing.get(key)
        if closing is not None:
            # Never two Store objects on one file: reopen once it is closed.
            waitClosed: Deferred[None] = Deferred()
            closing._whenClosed.append(waitClosed)
            return waitClosed.addCallback(lambda _: self.acquire(key))
        if not self._makeRoom():
            if self._closing:
                room: Deferred[None] = Deferred()
                self._roomWaiters.append(room)
                return room.addCallback(lambda _: self.acquire(key))
            return fail(
                Overloaded(
                    f"all {self.maxOpenStores} open stores are in use; try again shortly"
                )
            )
        self._opening[key] = []
        result: Deferred[StoreLease] = Deferred()
        self._opening[key].append(result)
        self._startOpening(key)
        return result

    def openStore(self, key: str) -> Deferred[Store]:
        """
        C{key}'s store, opened if needed, for inspection (a console, a tool).

        The store is not held: the pool may close it once it has been idle for
        L{idleTimeout} or is the least recently used when room is needed.
        Write to it only inside C{store.transact}.

        @param key: a valid user key.
        @return: fires with the store; at once when it is open already.
        """

        def unhold(lease: StoreLease) -> Store:
            lease.release()
            return lease.store

        return self.acquire(key).addCallback(unhold)

    def _count(self) -> int:
        """
        Stores that hold descriptors: open, being opened, being closed.
        """
        return len(self._open) + len(self._opening) + len(self._closing)

    def _makeRoom(self) -> bool:
        """
        Close least recently used idle stores until one more may be opened:
        with a shipper, first those it has shipped already, which close at
        once (the close of another waits for its ship: a cycle of worker
        thread hand-offs and a flush), then the others.  Once a close is
        under way, no more stores are closed for this open: it waits for
        that one (so one cold open does not close every idle store whose
        commits are unshipped), as it does when an earlier close will free
        a slot no other open is waiting for.

        @return: whether there is room now.
        """
        if self._count() < self.maxOpenStores:
            return True
        if len(self._closing) > len(self._roomWaiters):
            # A close under way will free a slot that no other open waits
            # for: wait for it rather than close one more store.
            return False
        for lease in self._idleShippedFirst():
            self._closeLease(lease)
            if self._count() < self.maxOpenStores:
                return True
            if lease.key in self._closing:
                # Its close waits for its ship: the slot comes when it ends.
                return False
        return False

    def _idleShippedFirst(self) -> Iterator[StoreLease]:
        """
        The idle stores, least recently used first: those the shipper (if
        any) has shipped already, then the others.  Lazily, since the first
        is usually the one closed.
        """
        shipper = self.shipper
        unshipped: list[StoreLease] = []
        for lease in list(self._open.values()):
            if lease._busy:
                continue
            if shipper is not None and shipper.unshipped(lease.key):
                unshipped.append(lease)
            else:
                yield lease
        yield from unshipped

    def _startOpening(self, key: str) -> None:
        """
        Open C{key}'s store (restoring it first when a shipper has a copy and
        the local one is missing) and hand its lease to every waiter.
        """
        dbdir = self.pathForKey(key)
        if self.shipper is not None and not dbdir.child("db.sqlite").exists():
            shipper = self.shipper
            d = maybeDeferred(shipper.restore, key, dbdir)
        else:
            d = succeed(False)
        d.addCallback(lambda restored: self._openLocal(key, dbdir))
        d.addCallbacks(
            lambda lease: self._opened(key, lease), lambda f: self._openFailed(key, f)
        )

    def _openLocal(self, key: str, dbdir: FilePath[str]) -> StoreLease:
        """
        Open (or create) the store at C{dbdir}, store or check its key, and
        prepare it.

        @raise Overloaded: if the process has run out of descriptors.
        @raise StoreUnavailable: if the store cannot be opened or belongs to
            another key.
        """
        try:
            store = Store(dbdir, pageSize=self._pageSize)
            try:
                prepared = self._checkStore(store, key)
            except BaseException:
                store.close()
                raise
        except Exception as e:
            # The store names running out of descriptors when it sees it while
            # opening; anything else is checked now, after the fact.
            if isinstance(e, StoreOutOfDescriptors) or _outOfDescriptors():
                raise Overloaded(
                    "the node has no file descriptors left; try again shortly"
                ) from e
            raise
        return StoreLease(self, key, store, prepared)

    def _checkStore(self, store: Store, key: str) -> Any:
        """
        Record C{key} in a new store, or check that an existing one is
        C{key}'s; then prepare it.  An existing store is only read (no write
        transaction), so opening it stays cheap.
        """
        found = store.findFirst(UserKey)
        if found is None:
            # A new store: its key and its preparation commit together.
            return store.transact(self._initStore, store, key)
        if found.key != key:
            raise StoreUnavailable(
                "the store at this user's path belongs to another key; refusing to serve it"
            )
        return self._prepare(store) if self._prepare is not None else None

    def _initStore(self, store: Store, key: str) -> Any:
        """
        Record C{key} in a new store and prepare it; runs in a transaction.
        """
        if store.findFirst(UserKey) is None:
            UserKey(store=store, key=key)
        return self._prepare(store) if self._prepare is not None else None

    def _opened(self, key: str, lease: StoreLease) -> None:
        """
        A store is open: register it and hand it to its waiters.
        """
        waiters = self._opening.pop(key)
        self.opened += 1
        self._open[key] = lease
        lease._lastUsed = self._clock.seconds()
        if self.shipper is not None:
            try:
                self.shipper.storeOpened(key, lease.store)
            except Exception:
                self.log.failure("Shipper failed to watch the store of {key!r}", key=key)
        self._startServices(lease)
        lease._busy += len(waiters)
        closeWaiters = self._closeWhenOpened.pop(key, None)
        if closeWaiters is not None:
            lease._closeOnRelease = True
            lease._whenClosed.extend(closeWaiters)
        for waiter in waiters:
            waiter.callback(lease)
        if (closeWaiters is not None or self._closed) and self._open.get(key) is lease:
            # close() or closeStoresOf() came while this store was being
            # opened (and its first calls may have released it already).
            self._closeWhenIdle(lease)
        self._scheduleSweep()

    def _openFailed(self, key: str, failure: Failure) -> None:
        """
        A store could not be opened: fail every waiter with a clear error.
        """
        waiters = self._opening.pop(key)
        if not failure.check(Overloaded, StoreUnavailable):
            self.log.failure(
                "Cannot open the store of {key!r} at {path}",
                failure,
                key=key,
                path=self.pathForKey(key).path,
            )
            failure = Failure(StoreUnavailable("the user's store cannot be opened"))
        for waiter in waiters:
            waiter.errback(failure)
        for closeWaiter in self._closeWhenOpened.pop(key, []):
            closeWaiter.callback(None)
        self._roomFreed()

    # -- closing ---------------------------------------------------------

    def _release(self, lease: StoreLease) -> None:
        """
        See L{StoreLease.release}.
        """
        lease._busy -= 1
        lease._lastUsed = self._clock.seconds()
        if self._open.get(lease.key) is not lease:
            # Closed already, by a forced close.
            return
        self._open.move_to_end(lease.key)
        if lease._busy == 0:
            if self._closed or lease._closeOnRelease:
                self._closeLease(lease)
            elif self._sweepCall is None:
                self._scheduleSweep()

    def _scheduleSweep(self) -> None:
        """
        Arrange for the idle sweep to run when the least recently used idle
        store reaches L{idleTimeout}.
        """
        if self._sweepCall is not None or self._closed:
            return
        for lease in self._open.values():
            if lease._busy == 0:
                delay = lease._lastUsed + self.idleTimeout - self._clock.seconds()
                self._sweepCall = self._clock.callLater(max(0.0, delay), self._sweep)
                return

    def _sweep(self) -> None:
        """
        Close every store idle for at least L{idleTimeout}.
        """
        self._sweepCall = None
        now = self._clock.seconds()
        for lease in list(self._open.values()):
            if lease._busy:
                continue
            if now - lease._lastUsed < self.idleTimeout:
                # The order is of last use: every later store is fresher.
                break
            self.log.debug("Closing idle store of {key!r}", key=lease.key)
            self._closeLease(lease)
        self._scheduleSweep()

    def _startServices(self, lease: StoreLease) -> None:
        """
        Start the services of a store just opened, C{IService(store)}: its
        scheduler, on the pool's clock, so its timed events run while it is
        open and overdue ones run now; and its service powerups.  (The shipper
        watches the store first, so it sees the commits of those events.)
        """
        store = lease.store
        try:
            scheduler = IScheduler(store, None)
            if scheduler is not None and getattr(scheduler, "clock", False) is None:
                scheduler.clock = self._clock  # type: ignore[attr-defined]
            IService(store).startService()
        except Exception:
            self.log.failure("Cannot start the services of the store of {key!r}", key=lease.key)

    def _stopServices(self, lease: StoreLease) -> Deferred[Any]:
        """
        Stop the services of a store about to close (its scheduler's timer is
        cancelled; its events stay in the store for the next open).

        @return: fires when they have stopped; never fails.
        """
        try:
            service = IService(lease.store)
        except Exception:
            self.log.failure("Cannot find the services of the store of {key!r}", key=lease.key)
            return succeed(None)
        if not service.running:
            return succeed(None)
        d = maybeDeferred(service.stopService)
        d.addErrback(
            lambda f: self.log.failure(
                "Cannot stop the services of the store of {key!r}", f, key=lease.key
            )
        )
        return d

    def _closeLease(self, lease: StoreLease) -> None:
        """
        Close an idle store: stop its services, let the shipper ship it, then
        close it.
        """
        key = lease.key
        del self._open[key]
        self._closing[key] = lease
        stopped = self._stopServices(lease)
        if self.shipper is not None:
            shipper = self.shipper
            d = stopped.addCallback(lambda _: shipper.storeClosing(key, lease.store))
            d.addErrback(
                lambda f: self.log.failure(
                    "Shipper failed before closing the store of {key!r}", f, key=key
                )
            )
            d.addCallback(lambda _: self._finishClose(lease))
        else:
            stopped.addCallback(lambda _: self._finishClose(lease))

    def _finishClose(self, lease: StoreLease) -> None:
        """
        Close the store's connection (in a thread, given a runner), then
        tell the shipper and wake whoever waits for it.
        """
        try:
            if self._runInThread is None:
                lease.store.close()
                closed: Deferred[None] = succeed(None)
            else:
                closed = lease.store.closeIn(self._runInThread)
        except Exception:
            closed = fail()

        def done(result: object) -> None:
            if isinstance(result, Failure):
                self.log.failure("Error closing the store of {key!r}", result, key=lease.key)
            elif self.shipper is not None:
                try:
                    self.shipper.storeClosed(lease.key, lease.store)
                except Exception:
                    self.log.failure(
                        "Shipper failed after closing the store of {key!r}", key=lease.key
                    )
            del self._closing[lease.key]
            self.closedCount += 1
            waiters, lease._whenClosed = lease._whenClosed, []
            for waiter in waiters:
                waiter.callback(None)
            self._roomFreed()

        closed.addBoth(done)

    def _roomFreed(self) -> None:
        """
        A descriptor slot is free: retry the opens waiting for room, and
        finish L{close} when everything is closed.
        """
        waiters, self._roomWaiters = self._roomWaiters, []
        for waiter in waiters:
            waiter.callback(None)
        self._checkClosed()

    def _closeWhenIdle(self, lease: StoreLease) -> None:
        """
        Close C{lease}'s store now if no call holds it, else at its release.
        """
        if lease._busy == 0:
            self._closeLease(lease)

    def closeStoresOf(self, slots: Collection[int], slotCount: int) -> StoresClosing:
        """
        Close the stores of the users whose slots are in C{slots}: idle ones
        now, ones held by calls as soon as their last call releases them
        (so every commit of a call running now is in the store when it
        closes), ones being opened once open and released; each is shipped
        first when the pool has a shipper.  For a node giving up slots: it
        stops routing their calls here first, then closes their stores.

        The pool itself still hands out a held store to a new call until it
        closes; a store acquired again after it closed is opened again.

        @param slots: the slots whose stores close.
        @param slotCount: the cluster's slot count, to find each key's slot.
        @return: the L{StoresClosing}: which stores calls hold, and a
            L{Deferred} firing once every chosen store is closed.
        """
        chosen = set(slots)
        held: list[str] = []
        opening: list[str] = []
        waits: list[Deferred[None]] = []
        for key, lease in list(self._open.items()):
            if slotForKey(key, slotCount) not in chosen:
                continue
            d: Deferred[None] = Deferred()
            lease._whenClosed.append(d)
            waits.append(d)
            if lease._busy:
                held.append(key)
                lease._closeOnRelease = True
            else:
                self._closeLease(lease)
        for key, lease in list(self._closing.items()):
            if slotForKey(key, slotCount) in chosen:
                d = Deferred()
                lease._whenClosed.append(d)
                waits.append(d)
        for key in list(self._opening):
            if slotForKey(key, slotCount) in chosen:
                opening.append(key)
                d = Deferred()
                self._closeWhenOpened.setdefault(key, []).append(d)
                waits.append(d)
        closed: Deferred[None] = Deferred()
        DeferredList(waits, consumeErrors=True).addCallback(lambda _: closed.callback(None))
        return StoresClosing(held, opening, closed)

    def holdSlots(self, slots: Collection[int], slotCount: int) -> Callable[[], None]:
        """
        Hand out no store of the users whose slots are in C{slots} until the
        returned callable is called: L{acquire} (and L{openStore}) wait for
        it, and L{tryAcquire} answers L{None}.  For a node that has gained
        slots: no call may open or use their stale local copies while it
        closes them (L{closeStoresOf}) and sets them aside; the calls that
        arrive meanwhile run once it is done, on the stores restored from
        durable storage.  Holds of a slot nest; calling the returned
        callable again does nothing.

        @param slots: the slots held.
        @param slotCount: the cluster's slot count, to find each key's slot.
        @return: the callable that ends this hold.
        """
        chosen = set(slots)
        self._holdSlotCount = slotCount
        for slot in chosen:
            self._holds[slot] = self._holds.get(slot, 0) + 1
        ended = False

        def release() -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            waiters: list[Deferred[None]] = []
            for slot in chosen:
                count = self._holds.pop(slot) - 1
                if count:
                    self._holds[slot] = count
                else:
                    waiters.extend(self._holdWaiters.pop(slot, []))
            for waiter in waiters:
                waiter.callback(None)

        return release

    def _heldSlot(self, key: str) -> int | None:
        """
        C{key}'s slot if it is held (L{holdSlots}), else L{None}.
        """
        try:
            slot = slotForKey(key, self._holdSlotCount)
        except InvalidUserKey:
            return None
        return slot if slot in self._holds else None

    def close(self, force: bool = False) -> Deferred[None]:
        """
        Close every store: idle ones now, held ones when released (or now, if
        C{force}), ones being opened once open; each shipped first when there
        is a shipper.  New acquisitions fail with L{StoreUnavailable}.

        @param force: close stores still held by calls too (a call that then
            uses its store fails); for a stop that cannot wait any longer.
        @return: fires when every store is closed.
        """
        d: Deferred[None] = Deferred()
        self._closeWaiters.append(d)
        if not self._closed:
            self._closed = True
            if self._sweepCall is not None:
                self._sweepCall.cancel()
                self._sweepCall = None
        for lease in list(self._open.values()):
            if force or lease._busy == 0:
                self._closeLease(lease)
        self._checkClosed()
        return d

    def _checkClosed(self) -> None:
        """
        Fire the Deferreds of L{close} once every store is closed.
        """
        if self._closed and self._count() == 0:
            waiters, self._closeWaiters = self._closeWaiters, []
            for waiter in waiters:
                waiter.callback(None)

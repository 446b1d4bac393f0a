"""
Tests for L{fractal.store.substore}.
"""

from __future__ import annotations

import gc
import os
import sqlite3

from twisted.application.service import IService, Service
from twisted.python.filepath import FilePath, InsecurePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface, implementer

from fractal.store.attributes import inmemory, integer, text
from fractal.store.errors import StoreNotFound
from fractal.store.interfaces import IPowerupIndirector
from fractal.store.item import Item
from fractal.store.store import DEFAULT_PAGE_SIZE, Store
from fractal.store.substore import SubStore


class IGreeter(Interface):
    """
    A powerup interface for user stores.
    """

    def greet() -> str:
        """
        Say hello.
        """


class IUnused(Interface):
    """
    An interface nothing provides.
    """


@implementer(IGreeter)
class Greeter(Item):
    """
    A user store powerup.
    """

    powerupInterfaces = (IGreeter,)
    name = text()

    def greet(self) -> str:
        return f"hello from {self.name}"


class Note(Item):
    """
    Plain user data.
    """

    body = text()
    n = integer(default=0)


@implementer(IService)
class RecordingService(Item, Service):
    """
    An IService powerup that records whether it was started.
    """

    powerupInterfaces = (IService,)
    label = text()
    running = inmemory()
    name = inmemory()
    parent = inmemory()

    def activate(self) -> None:
        self.running = 0
        self.name = None
        self.parent = None


def _openFileCount() -> int:
    """
    @return: the number of file descriptors this process has open.
    """
    return len(os.listdir("/proc/self/fd"))


class CreateTests(SynchronousTestCase):
    """
    Tests for L{SubStore.createNew}.
    """

    def setUp(self) -> None:
        self.dbdir = FilePath(self.mktemp())
        self.site = Store(self.dbdir)
        self.addCleanup(self.site.close)

    def test_layout(self) -> None:
        """
        The new store is a complete store directory at the segments under
        the parent's files directory, and the item records that path.
        """
        ss = SubStore.createNew(self.site, ("account", "example.com", "alice.axiom"))
        expected = self.site.filesdir.child("account").child("example.com").child("alice.axiom")
        self.assertEqual(ss.storepath, expected)
        self.assertTrue(expected.child("db.sqlite").exists())
        for name in "files", "temp", "run":
            self.assertTrue(expected.child(name).isdir(), name)
        self.assertEqual(ss.typeName, "substore")
        self.assertFalse(ss.isOpen())

    def test_pathRelativeToParent(self) -> None:
        """
        The path is kept relative to the parent's files directory, so the
        site store directory can be moved with its substores.
        """
        ss = SubStore.createNew(self.site, ["account", "example.com", "bob.axiom"])
        ssID = ss.storeID
        user = ss.open()
        Note(store=user, body="kept")
        ss.close()
        self.site.close()
        moved = FilePath(self.mktemp())
        self.dbdir.moveTo(moved)
        site = Store(moved)
        self.addCleanup(site.close)
        ss = site.getItemByID(ssID)
        self.assertEqual(
            ss.storepath, moved.child("files").child("account").child("example.com").child("bob.axiom")
        )
        user = ss.open()
        self.addCleanup(ss.close)
        self.assertEqual([n.body for n in user.query(Note)], ["kept"])

    def test_onDisk(self) -> None:
        """
        On disk the item is a row of Axiom's C{item_substore_v1} table whose
        C{storepath} is the '/'-separated path under the files directory.
        """
        ss = SubStore.createNew(self.site, ("account", "example.com", "alice.axiom"))
        self.site.close()
        db = sqlite3.connect(self.dbdir.child("db.sqlite").path)
        self.addCleanup(db.close)
        rows = db.execute("SELECT oid, storepath FROM item_substore_v1").fetchall()
        self.assertEqual(rows, [(ss.storeID, "account/example.com/alice.axiom")])

    def test_stringRejected(self) -> None:
        """
        A string instead of a sequence of segments raises L{ValueError}.
        """
        self.assertRaises(ValueError, SubStore.createNew, self.site, "account/alice.axiom")
        self.assertEqual(self.site.query(SubStore).count(), 0)

    def test_unsafeSegment(self) -> None:
        """
        A segment that is not a plain name never reaches the filesystem.
        """
        self.assertRaises(ValueError, SubStore.createNew, self.site, ["..", "escape.axiom"])
        self.assertRaises(InsecurePath, SubStore.createNew, self.site, ["a/b"])
        self.assertFalse(self.dbdir.sibling("escape.axiom").exists())
        self.assertEqual(self.site.query(SubStore).count(), 0)

    def test_inMemory(self) -> None:
        """
        A substore of an in-memory store is in memory, keeps its data across
        L{SubStore.close}, and has no store path.
        """
        site = Store()
        ss = SubStore.createNew(site, ["account", "alice.axiom"])
        self.assertIsNone(ss.storepath)
        user = ss.open()
        self.assertIsNone(user.dbdir)
        Note(store=user, body="memory")
        ss.close()
        self.assertIs(ss.open(), user)
        self.assertEqual([n.body for n in ss.open().query(Note)], ["memory"])

    def test_providesIndirector(self) -> None:
        """
        L{SubStore} provides L{IPowerupIndirector}.
        """
        ss = SubStore.createNew(self.site, ["x.axiom"])
        self.assertTrue(IPowerupIndirector.providedBy(ss))


class OpenCloseTests(SynchronousTestCase):
    """
    Tests for L{SubStore.open} and L{SubStore.close}.
    """

    def setUp(self) -> None:
        self.site = Store(self.mktemp())
        self.addCleanup(self.site.close)
        self.ss = SubStore.createNew(self.site, ["account", "example.com", "alice.axiom"])

    def test_openIsCached(self) -> None:
        """
        While open, every L{SubStore.open} gives the same store, with the
        site store as C{parent} and the item's storeID as C{idInParent}.
        """
        user = self.ss.open()
        self.addCleanup(self.ss.close)
        self.assertIs(self.ss.open(), user)
        self.assertIs(user.parent, self.site)
        self.assertEqual(user.idInParent, self.ss.storeID)
        self.assertEqual(user.journalMode, self.site.journalMode)
        self.assertEqual(user.debug, self.site.debug)
        self.assertEqual(user.dbdir, self.ss.storepath)

    def test_itemKeptWhileOpen(self) -> None:
        """
        While the store is open, losing every reference to the item does not
        lose the open store: the item is found again with it.
        """
        user = self.ss.open()
        ssID = self.ss.storeID
        del self.ss
        gc.collect()
        ss = self.site.getItemByID(ssID)
        self.addCleanup(ss.close)
        self.assertIs(ss.open(), user)

    def test_closeAndReopen(self) -> None:
        """
        After L{SubStore.close} the store is closed; L{SubStore.open} opens
        it again with its data.
        """
        user = self.ss.open()
        Note(store=user, body="first", n=1)
        self.ss.close()
        self.assertFalse(self.ss.isOpen())
        self.assertRaises(Exception, user.query(Note).count)
        again = self.ss.open()
        self.addCleanup(self.ss.close)
        self.assertIsNot(again, user)
        self.assertEqual([(n.body, n.n) for n in again.query(Note)], [("first", 1)])

    def test_closeTwice(self) -> None:
        """
        Closing a closed substore does nothing.
        """
        self.ss.open()
        self.ss.close()
        self.ss.close()
        self.assertFalse(self.ss.isOpen())

    def test_noDescriptorLeak(self) -> None:
        """
        Opening and closing many substores leaves no file open.
        """
        items = [SubStore.createNew(self.site, ["many", f"u{i}.axiom"]) for i in range(30)]
        before = _openFileCount()
        for round in range(3):
            for ss in items:
                Note(store=ss.open(), body=str(round))
            self.assertGreaterEqual(_openFileCount(), before + len(items))
            for ss in items:
                ss.close()
        gc.collect()
        self.assertEqual(_openFileCount(), before)
        self.assertEqual(items[7].open().query(Note).count(), 3)
        items[7].close()

    if not os.path.isdir("/proc/self/fd"):
        test_noDescriptorLeak.skip = "needs /proc/self/fd"  # type: ignore[attr-defined]

    def test_missingDirectory(self) -> None:
        """
        Opening a substore whose directory is gone raises L{StoreNotFound}
        instead of making a new empty store there.
        """
        self.ss.storepath.remove()
        self.assertRaises(StoreNotFound, self.ss.open)
        self.assertFalse(self.ss.storepath.exists())
        self.assertFalse(self.ss.isOpen())

    def test_journalModeInherited(self) -> None:
        """
        A substore inherits its parent's journal mode, including SQLite's
        default (L{None}).
        """
        site = Store(self.mktemp(), journalMode=None)
        self.addCleanup(site.close)
        ss = SubStore.createNew(site, ["u.axiom"])
        self.addCleanup(ss.close)
        self.assertIsNone(ss.open().journalMode)

    def test_pageSizeInherited(self) -> None:
        """
        A substore's new database gets the page size of its parent's
        database, whether the parent chose one or kept its own; a substore
        that already exists keeps its page size.
        """
        for size in (4096, 2048):
            site = Store(self.mktemp(), pageSize=size)
            self.addCleanup(site.close)
            ss = SubStore.createNew(site, ["u.axiom"])
            self.addCleanup(ss.close)
            self.assertEqual(ss.open().querySQL("PRAGMA page_size"), [(size,)])
        self.assertEqual(
            self.ss.open().querySQL("PRAGMA page_size"), [(DEFAULT_PAGE_SIZE,)]
        )
        self.ss.close()
        existing = self.site.newFilePath("existing.axiom")
        Store(existing, pageSize=512).close()
        ss = SubStore(store=self.site, storepath=existing)
        self.addCleanup(ss.close)
        self.assertEqual(ss.open().querySQL("PRAGMA page_size"), [(512,)])

    def test_deleteCloses(self) -> None:
        """
        Deleting the item closes its open store; the directory stays.
        """
        user = self.ss.open()
        path = self.ss.storepath
        self.ss.deleteFromStore()
        self.assertRaises(Exception, user.query(Note).count)
        self.assertTrue(path.child("db.sqlite").exists())

    def test_siteRollbackDoesNotCoverUserStore(self) -> None:
        """
        The stores are independent: a user-store write made inside a site
        transaction that fails is not rolled back.
        """
        user = self.ss.open()
        self.addCleanup(self.ss.close)

        class Failed(Exception):
            pass

        def work() -> None:
            Note(store=user, body="survives")
            Note(store=self.site, body="rolled back")
            raise Failed()

        self.assertRaises(Failed, self.site.transact, work)
        self.assertEqual([n.body for n in user.query(Note)], ["survives"])
        self.assertEqual(self.site.query(Note).count(), 0)


class AdaptationTests(SynchronousTestCase):
    """
    Tests for adapting a L{SubStore} and powering a site store up with it.
    """

    def setUp(self) -> None:
        self.site = Store(self.mktemp())
        self.addCleanup(self.site.close)
        self.ss = SubStore.createNew(self.site, ["account", "alice.axiom"])
        self.user = self.ss.open()
        self.addCleanup(self.ss.close)
        self.greeter = Greeter(store=self.user, name="alice")
        self.user.powerUp(self.greeter)

    def test_adaptItem(self) -> None:
        """
        Adapting the item gives the user store's powerup.
        """
        self.assertIs(IGreeter(self.ss), self.greeter)

    def test_adaptItemOpens(self) -> None:
        """
        Adapting a closed item opens its store.
        """
        self.ss.close()
        greeter = IGreeter(self.ss)
        self.assertEqual(greeter.greet(), "hello from alice")
        self.assertTrue(self.ss.isOpen())

    def test_noPowerup(self) -> None:
        """
        Adapting to an interface the user store has no powerup for fails
        like any failed adaptation.
        """
        self.assertRaises(TypeError, IUnused, self.ss)
        self.assertIsNone(IUnused(self.ss, None))

    def test_indirect(self) -> None:
        """
        L{SubStore.indirect} gives the user store's powerup.
        """
        self.assertIs(self.ss.indirect(IGreeter), self.greeter)

    def test_sitePowerup(self) -> None:
        """
        Powering the site store up with the item makes the site's powerups
        for the interface yield the user store's powerup.
        """
        self.site.powerUp(self.ss, IGreeter)
        self.assertEqual(list(self.site.powerupsFor(IGreeter)), [self.greeter])
        self.assertIs(IGreeter(self.site), self.greeter)


class ServiceTests(SynchronousTestCase):
    """
    Tests for the services of user stores.
    """

    def setUp(self) -> None:
        self.site = Store(self.mktemp())
        self.addCleanup(self.site.close)
        self.ss = SubStore.createNew(self.site, ["account", "alice.axiom"])
        self.user = self.ss.open()
        self.addCleanup(self.ss.close)
        self.service = RecordingService(store=self.user, label="user")
        self.user.powerUp(self.service, IService)

    def test_notStartedWithSite(self) -> None:
        """
        Starting the site store's services does not start a user store's.
        """
        siteService = IService(self.site)
        siteService.startService()
        self.addCleanup(siteService.stopService)
        self.assertFalse(self.service.running)

    def test_startedWhenPoweredUp(self) -> None:
        """
        A user store's services start with the site's when the item is a
        site IService powerup.
        """
        self.site.powerUp(self.ss, IService)
        siteService = IService(self.site)
        siteService.startService()
        self.assertTrue(self.service.running)
        siteService.stopService()
        self.assertFalse(self.service.running)

"""
Tests for powerups on stores and items, adaptation and the IService
aggregate.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, IServiceCollection, MultiService
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface, implementer

from fractal.store import (
    POWERUP_AFTER,
    POWERUP_BEFORE,
    Item,
    Store,
    empowerment,
    errors,
    inmemory,
    integer,
    text,
)
from fractal.store.interfaces import IPowerupIndirector, IScheduler
from fractal.store.item import _PowerupConnector


class IGreeter(Interface):
    """
    Says hello.
    """

    def greet() -> str:
        """
        A greeting.
        """


class IOther(Interface):
    """
    Another interface.
    """


@implementer(IGreeter)
class Greeter(Item):
    """
    A powerup with no declared interfaces.
    """

    word = text()

    def greet(self) -> str:
        return self.word


@empowerment(IGreeter)
@empowerment(IOther, POWERUP_AFTER)
class Declared(Item):
    """
    A powerup declaring its interfaces.
    """

    word = text(default="declared")

    def greet(self) -> str:
        return self.word


class Chooser(Item):
    """
    Filters its declared interfaces.
    """

    powerupInterfaces = (IGreeter, (IOther, 3))
    onlyOther = integer(default=1)

    def __getPowerupInterfaces__(self, pifs: Any) -> Any:
        return [(i, p) for i, p in pifs if i is IOther]


@implementer(IGreeter)
class SelfGreeter(Item):
    """
    Provides IGreeter itself.
    """

    word = text(default="self")

    def greet(self) -> str:
        return self.word


@implementer(IPowerupIndirector)
class Indirect(Item):
    """
    Stands in for an in-memory greeter.
    """

    word = text(default="indirect")

    def indirect(self, interface: Any) -> Any:
        return ("indirected", interface, self.word)


@implementer(IService)
class ServiceItem(Item):
    """
    A service powerup.
    """

    name = inmemory()
    parent = inmemory()
    running = inmemory()
    started = integer(default=0)

    def activate(self) -> None:
        self.name = None
        self.parent = None
        self.running = False

    def setName(self, name: str) -> None:
        self.name = name

    def setServiceParent(self, parent: Any) -> None:
        parent.addService(self)

    def disownServiceParent(self) -> None:
        pass

    def privilegedStartService(self) -> None:
        pass

    def startService(self) -> None:
        self.running = True

    def stopService(self) -> None:
        self.running = False


class PowerUpTests(SynchronousTestCase):
    """
    powerUp, powerDown, powerupsFor and interfacesFor.
    """

    def setUp(self) -> None:
        self.store = Store()

    def test_priorityOrder(self) -> None:
        """
        Powerups come by descending priority, ties in installation order.
        """
        s = self.store
        low, mid, high, mid2 = (Greeter(store=s, word=w) for w in ("low", "mid", "high", "mid2"))
        s.powerUp(low, IGreeter, POWERUP_AFTER)
        s.powerUp(mid, IGreeter)
        s.powerUp(high, IGreeter, POWERUP_BEFORE)
        s.powerUp(mid2, IGreeter)
        self.assertEqual([p.word for p in s.powerupsFor(IGreeter)], ["high", "mid", "mid2", "low"])
        self.assertEqual(IGreeter(s).greet(), "high")

    def test_repeatChangesPriority(self) -> None:
        """
        Powering up again only changes the priority.
        """
        s = self.store
        a, b = Greeter(store=s, word="a"), Greeter(store=s, word="b")
        s.powerUp(a, IGreeter, 0)
        s.powerUp(b, IGreeter, 1)
        s.powerUp(a, IGreeter, 2)
        self.assertEqual([p.word for p in s.powerupsFor(IGreeter)], ["a", "b"])
        self.assertEqual(s.count(_PowerupConnector), 2)

    def test_connectorLayout(self) -> None:
        """
        Installations are connector items with Axiom's type name and the
        interface's qualified name.
        """
        s = self.store
        g = Greeter(store=s, word="g")
        s.powerUp(g, IGreeter)
        conn = s.findUnique(_PowerupConnector)
        self.assertEqual(_PowerupConnector.typeName, "axiom_powerup_connector")
        self.assertEqual(conn.interface, "tests.test_store_powerups.IGreeter")
        self.assertIs(conn.item, s)
        self.assertIs(conn.powerup, g)

    def test_declaredInterfaces(self) -> None:
        """
        powerUp without an interface uses powerupInterfaces (as declared by
        empowerment, with priorities); empowerment declares implementer.
        """
        s = self.store
        d = Declared(store=s)
        s.powerUp(d)
        self.assertIs(IGreeter(s), d)
        self.assertIs(IOther(s), d)
        self.assertTrue(IGreeter.providedBy(d))
        self.assertEqual(set(s.interfacesFor(d)), {IGreeter, IOther})
        s.powerDown(d)
        self.assertIsNone(IGreeter(s, None))

    def test_getPowerupInterfaces(self) -> None:
        """
        __getPowerupInterfaces__ filters the declared interfaces.
        """
        s = self.store
        c = Chooser(store=s)
        s.powerUp(c)
        self.assertEqual(list(s.interfacesFor(c)), [IOther])

    def test_noDeclaredInterfaces(self) -> None:
        """
        powerUp with nothing declared does nothing (as in Axiom).
        """
        s = self.store
        g = Greeter(store=s, word="g")
        s.powerUp(g)
        self.assertEqual(s.count(_PowerupConnector), 0)

    def test_powerDownErrors(self) -> None:
        """
        Powering down something not installed raises ValueError.
        """
        s = self.store
        g = Greeter(store=s, word="g")
        self.assertRaises(ValueError, s.powerDown, g, IGreeter)
        s.powerUp(g, IGreeter)
        self.assertRaises(ValueError, s.powerDown, g, IOther)
        s.powerDown(g, IGreeter)
        self.assertEqual(list(s.powerupsFor(IGreeter)), [])

    def test_indirectorRejected(self) -> None:
        """
        IPowerupIndirector cannot be a powerup interface.
        """
        s = self.store
        self.assertRaises(TypeError, s.powerUp, Indirect(store=s), IPowerupIndirector)

    def test_deletedPowerupCleanedUp(self) -> None:
        """
        Deleting a powerup deletes its installation; reading never writes.
        """
        s = self.store
        g = Greeter(store=s, word="g")
        s.powerUp(g, IGreeter)
        g.deleteFromStore()
        self.assertEqual(s.count(_PowerupConnector), 0)
        self.assertEqual(list(s.powerupsFor(IGreeter)), [])

    def test_danglingConnectorSkippedNotDeleted(self) -> None:
        """
        A connector whose powerup vanished behind the store's back (as in old
        Axiom data) is skipped by powerupsFor, which deletes nothing.
        """
        s = self.store
        g = Greeter(store=s, word="g")
        s.powerUp(g, IGreeter)
        s._cursor.execute("DELETE FROM %s" % (Greeter._fTable,))
        s._cache.clear()
        del g
        writes: list[int] = []
        s.addCommitObserver(lambda: writes.append(1))
        self.assertEqual(list(s.powerupsFor(IGreeter)), [])
        self.assertEqual(s.count(_PowerupConnector), 1)
        self.assertEqual(writes, [])

    def test_indirector(self) -> None:
        """
        A powerup providing IPowerupIndirector is replaced by its indirect().
        """
        s = self.store
        i = Indirect(store=s)
        s.powerUp(i, IGreeter)
        self.assertEqual(IGreeter(s), ("indirected", IGreeter, "indirect"))

    def test_inMemoryFirst(self) -> None:
        """
        An in-memory powerup comes before stored ones and is not persisted.
        """
        s = self.store
        g = Greeter(store=s, word="stored")
        s.powerUp(g, IGreeter, 100)
        memory = object()
        s.inMemoryPowerUp(memory, IGreeter)
        self.assertEqual(list(s.powerupsFor(IGreeter)), [memory, g])
        self.assertEqual(s.count(_PowerupConnector), 1)

    def test_powerupBeatsTarget(self) -> None:
        """
        An item that provides IGreeter but has an IGreeter powerup adapts to
        the powerup; without one it adapts to itself.
        """
        s = self.store
        target = SelfGreeter(store=s)
        self.assertIs(IGreeter(target), target)
        g = Greeter(store=s, word="powerup")
        target.powerUp(g, IGreeter)
        self.assertIs(IGreeter(target), g)

    def test_noPowerup(self) -> None:
        """
        With no powerup, adaptation fails with TypeError, or gives the
        default.
        """
        s = self.store
        self.assertRaises(TypeError, IGreeter, s)
        self.assertIsNone(IGreeter(s, None))

    def test_unstoredItemInMemoryOnly(self) -> None:
        """
        An unstored item sees only its in-memory powerups.
        """
        target = SelfGreeter()
        memory = object()
        target.inMemoryPowerUp(memory, IOther)
        self.assertIs(IOther(target), memory)
        self.assertEqual(list(target.powerupsFor(IGreeter)), [])

    def test_itemPowerups(self) -> None:
        """
        Items carry powerups of their own, separate from the store's.
        """
        s = self.store
        target = SelfGreeter(store=s)
        g = Greeter(store=s, word="item")
        target.powerUp(g, IGreeter)
        self.assertEqual(list(s.powerupsFor(IGreeter)), [])
        self.assertEqual(list(target.interfacesFor(g)), [IGreeter])

    def test_crossStoreRejected(self) -> None:
        """
        A powerup from another store is rejected.
        """
        other = Store()
        self.assertRaises(
            errors.NoCrossStoreReferences, self.store.powerUp, Greeter(store=other, word="x"), IGreeter
        )


class ServiceTests(SynchronousTestCase):
    """
    The IService aggregate.
    """

    def test_aggregate(self) -> None:
        """
        IService(store) is one cached MultiService of the IService powerups;
        IServiceCollection gives the same.
        """
        s = Store()
        svc = ServiceItem(store=s)
        s.powerUp(svc, IService)
        aggregate = IService(s)
        self.assertIsInstance(aggregate, MultiService)
        self.assertIs(IService(s), aggregate)
        self.assertIs(IServiceCollection(s), aggregate)
        self.assertIn(svc, list(aggregate))
        aggregate.startService()
        self.assertTrue(svc.running)

    def test_laterPowerupJoins(self) -> None:
        """
        An IService powerup added after the aggregate exists joins it (and
        starts if it is running).
        """
        s = Store()
        aggregate = IService(s)
        aggregate.startService()
        svc = ServiceItem(store=s)
        s.powerUp(svc, IService)
        self.assertIn(svc, list(aggregate))
        self.assertTrue(svc.running)

    def test_schedulerFallback(self) -> None:
        """
        IScheduler(store) without a powerup gives the store's scheduler from
        fractal.store.scheduler, if that module provides one, and the same
        object each time.
        """
        s = Store()
        try:
            import fractal.store.scheduler as scheduler
        except ImportError:
            self.assertIsNone(IScheduler(s, None))
        else:
            self.assertTrue(hasattr(scheduler, "_schedulerFor"))
            self.assertIs(IScheduler(s), IScheduler(s))

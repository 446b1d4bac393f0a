"""
Tests for L{fractal.store.dependency}.
"""

from __future__ import annotations

from typing import Any

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface

from fractal.store.attributes import integer, text
from fractal.store.dependency import (
    DependencyError,
    UnsatisfiedRequirement,
    _DependencyConnector,
    dependable,
    dependsOn,
    installedDependents,
    installedOn,
    installedRequirements,
    installedUniqueRequirements,
    installOn,
    requiresFromSite,
    uninstallFrom,
)
from fractal.store.item import Item
from fractal.store.store import Store
from fractal.store.substore import SubStore
from tests._axiomdb import _AxiomDatabase


class IPowerStrip(Interface):
    """
    Something appliances plug into.
    """


class IBreadFactory(Interface):
    """
    Something that makes toast.
    """


class IBlender(Interface):
    """
    Something that blends.
    """


class IOven(Interface):
    """
    Something that bakes.
    """


class ISiteThing(Interface):
    """
    A powerup a site store may offer its substores.
    """


class PowerStrip(Item):
    """
    A requirement shared by several appliances.
    """

    powerupInterfaces = (IPowerStrip,)
    voltage = integer(default=0)


def _setVoltage(strip: PowerStrip) -> None:
    strip.voltage = 110


class Toaster(Item):
    """
    An appliance that needs a power strip, customized when created for it.
    Not decorated with L{dependable}.
    """

    powerupInterfaces = (IBreadFactory,)
    powerStrip = dependsOn(PowerStrip, _setVoltage)
    installedCalls = integer(default=0)
    uninstalledCalls = integer(default=0)

    def installed(self) -> None:
        self.installedCalls += 1

    def uninstalled(self) -> None:
        self.uninstalledCalls += 1


@dependable
class Blender(Item):
    """
    Another appliance needing a power strip, decorated as Axiom requires.
    """

    powerupInterfaces = (IBlender,)
    powerStrip = dependsOn(PowerStrip)


class Oven(Item):
    """
    An appliance that needs a toaster, which needs a power strip.
    """

    powerupInterfaces = (IOven,)
    toaster = dependsOn(Toaster)


class _Explosion(Exception):
    """
    Raised by L{Exploding.installed}.
    """


class Exploding(Item):
    """
    An appliance whose C{installed()} fails after its requirement was
    created and installed.
    """

    powerupInterfaces = (IBlender,)
    powerStrip = dependsOn(PowerStrip)

    def installed(self) -> None:
        raise _Explosion()


class Kitchen(Item):
    """
    An item to install things on.
    """

    name = text()


class SiteThing(Item):
    """
    A site store powerup.
    """

    powerupInterfaces = (ISiteThing,)
    label = text()


def _defaultThing(store: Any) -> str:
    return f"default for {store!r}"


class UsesSite(Item):
    """
    An item that reads a site powerup.
    """

    value = integer()
    thing = requiresFromSite(ISiteThing, _defaultThing)
    strictThing = requiresFromSite(ISiteThing)
    siteThing = requiresFromSite(ISiteThing, siteDefaultFactory=lambda s: ("site", s))


class InstallTests(SynchronousTestCase):
    """
    Tests for L{installOn}.
    """

    def setUp(self) -> None:
        self.store = Store()

    def test_requirementCreated(self) -> None:
        """
        Installing an item whose requirement is missing creates the
        requirement, customizes it, installs it on the target and points the
        item's L{dependsOn} reference at it, without any class decorator.
        """
        toaster = Toaster(store=self.store)
        installOn(toaster, self.store)
        strip = toaster.powerStrip
        self.assertIsInstance(strip, PowerStrip)
        self.assertEqual(strip.voltage, 110)
        self.assertIs(IBreadFactory(self.store), toaster)
        self.assertIs(IPowerStrip(self.store), strip)
        self.assertIs(installedOn(toaster), self.store)
        self.assertIs(installedOn(strip), self.store)

    def test_installedCalled(self) -> None:
        """
        C{installed()} is called once, after the item is installed.
        """
        toaster = Toaster(store=self.store)
        installOn(toaster, self.store)
        self.assertEqual(toaster.installedCalls, 1)

    def test_requirementReused(self) -> None:
        """
        A requirement already installed on the target is reused, and its
        customizer is not applied to it.
        """
        strip = PowerStrip(store=self.store, voltage=230)
        installOn(strip, self.store)
        toaster = Toaster(store=self.store)
        installOn(toaster, self.store)
        self.assertIs(toaster.powerStrip, strip)
        self.assertEqual(strip.voltage, 230)
        self.assertEqual(self.store.query(PowerStrip).count(), 1)

    def test_sharedRequirement(self) -> None:
        """
        Two items needing the same class of requirement share one instance.
        """
        toaster = Toaster(store=self.store)
        blender = Blender(store=self.store)
        installOn(toaster, self.store)
        installOn(blender, self.store)
        self.assertIs(blender.powerStrip, toaster.powerStrip)
        self.assertEqual(self.store.query(PowerStrip).count(), 1)

    def test_recursive(self) -> None:
        """
        Requirements of requirements are created and installed too.
        """
        oven = Oven(store=self.store)
        installOn(oven, self.store)
        self.assertIsInstance(oven.toaster, Toaster)
        self.assertIsInstance(oven.toaster.powerStrip, PowerStrip)
        self.assertIs(IOven(self.store), oven)
        self.assertIs(IBreadFactory(self.store), oven.toaster)
        self.assertIs(IPowerStrip(self.store), oven.toaster.powerStrip)

    def test_secondDependedUponInstance(self) -> None:
        """
        Installing a second instance of a class something depends on raises
        L{DependencyError} and installs nothing.
        """
        installOn(PowerStrip(store=self.store), self.store)
        second = PowerStrip(store=self.store)
        self.assertRaises(DependencyError, installOn, second, self.store)
        self.assertIsNone(installedOn(second))
        self.assertEqual(list(self.store.powerupsFor(IPowerStrip)), [self.store.findFirst(PowerStrip)])

    def test_secondIndependentInstance(self) -> None:
        """
        Two instances of a class nothing depends on may be installed on the
        same target.
        """
        first, second = Oven(store=self.store), Oven(store=self.store)
        installOn(first, self.store)
        # Oven's Toaster is reused, Oven itself is not depended on.
        installOn(second, self.store)
        self.assertIs(second.toaster, first.toaster)
        self.assertEqual(len(list(self.store.powerupsFor(IOven))), 2)

    def test_installedTwice(self) -> None:
        """
        Installing the same item twice on one target raises
        L{DependencyError}.
        """
        blender = Blender(store=self.store)
        installOn(blender, self.store)
        self.assertRaises(DependencyError, installOn, blender, self.store)
        self.assertEqual(self.store.query(_DependencyConnector).count(), 2)

    def test_failedInstallLeavesNothing(self) -> None:
        """
        An installation that fails part-way is rolled back whole: neither the
        item nor the requirement created for it is installed, and the
        requirement is not kept.
        """
        exploding = Exploding(store=self.store)
        self.assertRaises(_Explosion, installOn, exploding, self.store)
        self.assertIsNone(installedOn(exploding))
        self.assertIsNone(IBlender(self.store, None))
        self.assertIsNone(IPowerStrip(self.store, None))
        self.assertEqual(self.store.query(PowerStrip).count(), 0)
        self.assertEqual(self.store.query(_DependencyConnector).count(), 0)

    def test_onItem(self) -> None:
        """
        Items can be installed on another item as well as on a store.
        """
        kitchen = Kitchen(store=self.store, name="main")
        blender = Blender(store=self.store)
        installOn(blender, kitchen)
        self.assertIs(installedOn(blender), kitchen)
        self.assertIs(IBlender(kitchen), blender)
        self.assertIs(IPowerStrip(kitchen), blender.powerStrip)
        self.assertIsNone(IBlender(self.store, None))

    def test_dependableIsIdentity(self) -> None:
        """
        L{dependable} returns its class unchanged; it is not needed.
        """
        self.assertIs(dependable(Kitchen), Kitchen)

    def test_connectorTypeName(self) -> None:
        """
        The connector keeps Axiom's type name, so Axiom's installations can be
        read.
        """
        self.assertEqual(_DependencyConnector.typeName, "axiom_dependency__dependencyconnector")

    def test_persisted(self) -> None:
        """
        Installations survive closing and reopening the store.
        """
        dbdir = self.mktemp()
        store = Store(dbdir)
        toaster = Toaster(store=store)
        installOn(toaster, store)
        toasterID, stripID = toaster.storeID, toaster.powerStrip.storeID
        store.close()
        store = Store(dbdir)
        self.addCleanup(store.close)
        toaster = store.getItemByID(toasterID)
        self.assertEqual(toaster.powerStrip.storeID, stripID)
        self.assertIs(installedOn(toaster), store)
        self.assertEqual(list(installedRequirements(toaster, store)), [toaster.powerStrip])


class UninstallTests(SynchronousTestCase):
    """
    Tests for L{uninstallFrom} and the queries it uses.
    """

    def setUp(self) -> None:
        self.store = Store()

    def test_uninstallTakesRequirement(self) -> None:
        """
        Uninstalling an item powers the target down, calls C{uninstalled()}
        and uninstalls the requirements it alone brought.
        """
        toaster = Toaster(store=self.store)
        installOn(toaster, self.store)
        strip = toaster.powerStrip
        uninstallFrom(toaster, self.store)
        self.assertEqual(toaster.uninstalledCalls, 1)
        self.assertIsNone(IBreadFactory(self.store, None))
        self.assertIsNone(IPowerStrip(self.store, None))
        self.assertIsNone(installedOn(toaster))
        self.assertIsNone(installedOn(strip))

    def test_sharedRequirementKept(self) -> None:
        """
        A requirement another installed item still needs stays installed
        until that item is uninstalled too.
        """
        toaster = Toaster(store=self.store)
        blender = Blender(store=self.store)
        installOn(toaster, self.store)
        installOn(blender, self.store)
        strip = toaster.powerStrip
        self.assertEqual(list(installedUniqueRequirements(toaster, self.store)), [])
        uninstallFrom(toaster, self.store)
        self.assertIs(installedOn(strip), self.store)
        self.assertIs(IPowerStrip(self.store), strip)
        self.assertEqual(list(installedUniqueRequirements(blender, self.store)), [strip])
        uninstallFrom(blender, self.store)
        self.assertIsNone(installedOn(strip))

    def test_explicitRequirementKept(self) -> None:
        """
        A requirement that was installed on its own account is not taken
        away with the items that used it.
        """
        strip = PowerStrip(store=self.store)
        installOn(strip, self.store)
        toaster = Toaster(store=self.store)
        installOn(toaster, self.store)
        self.assertEqual(list(installedUniqueRequirements(toaster, self.store)), [])
        uninstallFrom(toaster, self.store)
        self.assertIs(installedOn(strip), self.store)

    def test_stillDependedOn(self) -> None:
        """
        Uninstalling an item something installed still depends on raises
        L{DependencyError} and changes nothing.
        """
        toaster = Toaster(store=self.store)
        installOn(toaster, self.store)
        strip = toaster.powerStrip
        self.assertRaises(DependencyError, uninstallFrom, strip, self.store)
        self.assertIs(installedOn(strip), self.store)
        self.assertIs(IPowerStrip(self.store), strip)

    def test_recursiveUninstall(self) -> None:
        """
        Uninstalling the top of a chain uninstalls the whole chain it
        brought.
        """
        oven = Oven(store=self.store)
        installOn(oven, self.store)
        toaster = oven.toaster
        strip = toaster.powerStrip
        uninstallFrom(oven, self.store)
        for item in oven, toaster, strip:
            self.assertIsNone(installedOn(item))
        self.assertEqual(self.store.query(_DependencyConnector).count(), 0)
        self.assertEqual(toaster.uninstalledCalls, 1)

    def test_dependentsAndRequirements(self) -> None:
        """
        L{installedDependents} lists the installed items that need an item,
        L{installedRequirements} the installed items an item needs.
        """
        toaster = Toaster(store=self.store)
        blender = Blender(store=self.store)
        installOn(toaster, self.store)
        installOn(blender, self.store)
        strip = toaster.powerStrip
        self.assertEqual(list(installedDependents(strip, self.store)), [toaster, blender])
        self.assertEqual(list(installedDependents(toaster, self.store)), [])
        self.assertEqual(list(installedRequirements(toaster, self.store)), [strip])
        self.assertEqual(list(installedRequirements(strip, self.store)), [])

    def test_reinstall(self) -> None:
        """
        An uninstalled item can be installed again.
        """
        toaster = Toaster(store=self.store)
        installOn(toaster, self.store)
        uninstallFrom(toaster, self.store)
        installOn(toaster, self.store)
        self.assertIs(IBreadFactory(self.store), toaster)
        self.assertEqual(toaster.installedCalls, 2)


class RequiresFromSiteTests(SynchronousTestCase):
    """
    Tests for L{requiresFromSite}.
    """

    def setUp(self) -> None:
        self.site = Store(self.mktemp())
        self.addCleanup(self.site.close)
        self.subStoreItem = SubStore.createNew(self.site, ["account", "user.axiom"])
        self.user = self.subStoreItem.open()
        self.addCleanup(self.subStoreItem.close)

    def test_sitePowerup(self) -> None:
        """
        On an item in a substore it is the site store's powerup.
        """
        thing = SiteThing(store=self.site, label="site")
        self.site.powerUp(thing)
        item = UsesSite(store=self.user, value=1)
        self.assertIs(item.thing, thing)
        self.assertIs(item.strictThing, thing)

    def test_defaultFactory(self) -> None:
        """
        With no site powerup it is C{defaultFactory(siteStore)}.
        """
        item = UsesSite(store=self.user, value=1)
        self.assertEqual(item.thing, _defaultThing(self.site))

    def test_unsatisfied(self) -> None:
        """
        With no site powerup and no factory, reading it raises
        L{UnsatisfiedRequirement}.
        """
        item = UsesSite(store=self.user, value=1)
        self.assertRaises(UnsatisfiedRequirement, getattr, item, "strictThing")

    def test_onSite(self) -> None:
        """
        On an item in a store without a parent it is
        C{siteDefaultFactory(store)}, and without that factory reading it
        raises L{UnsatisfiedRequirement}.
        """
        item = UsesSite(store=self.site, value=1)
        self.assertEqual(item.siteThing, ("site", self.site))
        self.assertRaises(UnsatisfiedRequirement, getattr, item, "thing")

    def test_onClass(self) -> None:
        """
        Read on the class it is the descriptor itself.
        """
        self.assertIsInstance(UsesSite.thing, requiresFromSite)


class AxiomDataTests(SynchronousTestCase):
    """
    Installations made by Axiom are read back.
    """

    def test_axiomInstallation(self) -> None:
        """
        A store laid out by Axiom with an item installed on it (Axiom's
        dependency connector and powerup connector rows) opens here: the
        installation is found and can be undone.
        """
        dbdir = FilePath(self.mktemp())
        db = _AxiomDatabase(dbdir)
        db.declare(
            PowerStrip.typeName,
            PowerStrip.__module__,
            PowerStrip.schemaVersion,
            [(name, attr.sqltype, type(attr).__name__) for name, attr in PowerStrip.getSchema()],
        )
        db.declare(
            "axiom_dependency__dependencyconnector",
            "axiom.dependency",
            1,
            [
                ("explicitlyInstalled", "BOOLEAN", "boolean"),
                ("installee", "INTEGER", "reference"),
                ("target", "INTEGER", "reference"),
            ],
        )
        db.declare(
            "axiom_powerup_connector",
            "axiom.item",
            1,
            [
                ("interface", "TEXT COLLATE NOCASE", "text"),
                ("item", "INTEGER", "reference"),
                ("powerup", "INTEGER", "reference"),
                ("priority", "INTEGER", "integer"),
            ],
        )
        stripID = db.insert(PowerStrip.typeName, voltage=230)
        db.insert(
            "axiom_dependency__dependencyconnector", explicitlyInstalled=1, installee=stripID, target=-1
        )
        db.insert(
            "axiom_powerup_connector",
            interface=f"{IPowerStrip.__module__}.{IPowerStrip.__name__}",
            item=-1,
            powerup=stripID,
            priority=0,
        )
        db.close()

        store = Store(dbdir, create=False)
        self.addCleanup(store.close)
        strip = store.getItemByID(stripID)
        self.assertIs(installedOn(strip), store)
        self.assertIs(IPowerStrip(store), strip)
        toaster = Toaster(store=store)
        installOn(toaster, store)
        self.assertIs(toaster.powerStrip, strip)
        uninstallFrom(toaster, store)
        self.assertIs(installedOn(strip), store)
        uninstallFrom(strip, store)
        self.assertIsNone(installedOn(strip))
        self.assertIsNone(IPowerStrip(store, None))

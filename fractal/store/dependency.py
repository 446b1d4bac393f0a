# -*- test-case-name: tests.test_store_dependency -*-
"""
Powerups that bring their requirements with them.

An item class declares what it needs with L{dependsOn}, a reference
attribute that also names the class to create when the requirement is
missing.  L{installOn} then installs an item on a target (another item or a
store): it reuses the requirements already installed there, creates and
installs the missing ones (recursively), records the installation in a
L{_DependencyConnector} and powers the target up with the item.
L{uninstallFrom} undoes that, taking away the requirements it installed on
its own once nothing else needs them.

Unlike Axiom on Python 3, a class does not need the L{dependable} decorator
for its L{dependsOn} attributes to count: they are found in the class schema,
so a forgotten decorator can no longer drop a dependency silently.
L{dependable} is kept so that ported code still runs.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, TypeVar
from weakref import WeakSet

from fractal.store.attributes import boolean, reference
from fractal.store.errors import DependencyError, ItemNotFound, UnsatisfiedRequirement
from fractal.store.item import Item

__all__ = [
    "DependencyError",
    "UnsatisfiedRequirement",
    "dependable",
    "dependsOn",
    "installOn",
    "installedDependents",
    "installedOn",
    "installedRequirements",
    "installedUniqueRequirements",
    "requiresFromSite",
    "uninstallFrom",
]

_T = TypeVar("_T")

_dependedUpon: WeakSet[type] = WeakSet()
"""
The item classes some L{dependsOn} names.
"""


class _DependsOn(reference):
    """
    The reference attribute L{dependsOn} returns.  Its class is what marks it
    as a dependency, so L{installOn} finds it in the item class's schema.

    @ivar dependencyType: the L{Item} class to create and install when the
        target does not have one yet.
    @ivar itemCustomizer: called with a newly created dependency before it is
        installed, or L{None}.
    """

    def __init__(
        self,
        dependencyType: type[Item],
        itemCustomizer: Callable[[Any], object] | None,
        doc: str,
        indexed: bool,
        whenDeleted: object,
    ) -> None:
        super().__init__(
            reftype=dependencyType,
            doc=doc,
            indexed=indexed,
            allowNone=True,
            whenDeleted=whenDeleted,
        )
        self.dependencyType = dependencyType
        self.itemCustomizer = itemCustomizer
        _dependedUpon.add(dependencyType)


def dependsOn(
    itemType: type[Item],
    itemCustomizer: Callable[[Any], object] | None = None,
    doc: str = "",
    indexed: bool = True,
    whenDeleted: object = reference.NULLIFY,
) -> Any:
    """
    Declare, in an item class body, a reference to a requirement.

    When an item of the class is installed with L{installOn}, the reference
    is set to the target's installed instance of C{itemType}, which is
    created, customized and installed first if the target has none.

    @param itemType: the L{Item} class required.
    @param itemCustomizer: a one-argument callable applied to a requirement
        created for this attribute (not to one that was already installed).
    @param doc: the attribute's documentation.
    @param indexed: whether the reference column is indexed.
    @param whenDeleted: the reference's deletion policy.
    @return: a reference attribute.
    """
    return _DependsOn(itemType, itemCustomizer, doc, indexed, whenDeleted)


def dependable(cls: _T) -> _T:
    """
    Return C{cls} unchanged.

    Axiom on Python 3 needs this class decorator to notice L{dependsOn}
    attributes.  Here they are found without it; the name is kept so that
    ported code runs unchanged.

    @param cls: an L{Item} class.
    @return: C{cls}.
    """
    return cls


def _dependencies(cls: Any) -> list[tuple[str, _DependsOn]]:
    """
    @param cls: an L{Item} class.
    @return: the C{(name, attribute)} pairs of C{cls}'s L{dependsOn}
        attributes, in name order.
    """
    return [(name, attr) for name, attr in cls.getSchema() if isinstance(attr, _DependsOn)]


def _isDependedOn(cls: type) -> bool:
    """
    @param cls: an L{Item} class.
    @return: whether some L{dependsOn} names C{cls}, which makes C{cls}
        one-per-target.
    """
    return cls in _dependedUpon


class _DependencyConnector(Item):
    """
    The record that an item was installed on a target.  The type name is the
    one Axiom gives its connector, so installations made by Axiom are read
    back.

    @ivar installee: the installed item.
    @ivar target: the item or store it was installed on.
    @ivar explicitlyInstalled: C{True} when L{installOn} was called for the
        installee itself, C{False} when it was installed as another item's
        requirement (and may then be removed with it).
    """

    typeName = "axiom_dependency__dependencyconnector"
    schemaVersion = 1

    installee = reference(doc="The installed item.")
    target = reference(doc="The item or store installed upon.")
    explicitlyInstalled = boolean(
        doc="Whether the installee was installed on its own account rather than as a requirement."
    )


def _connectorsOn(store: Any, target: Any) -> list[_DependencyConnector]:
    """
    @return: the live connectors of everything installed on C{target}, in
        installation order.
    """
    return [
        dc
        for dc in store.query(
            _DependencyConnector,
            _DependencyConnector.target == target,
            sort=_DependencyConnector.storeID.ascending,
        )
        if dc.installee is not None
    ]


def _installedOfType(store: Any, target: Any, cls: type) -> Any:
    """
    @return: the item of class C{cls} installed on C{target}, or L{None}.
    """
    for dc in _connectorsOn(store, target):
        if type(dc.installee) is cls:
            return dc.installee
    return None


def installOn(self: Any, target: Any) -> None:
    """
    Install an item on a target, with its requirements.

    Requirements already installed on the target are reused; missing ones
    are created in the item's store, customized and installed (recursively).
    The target is then powered up with the item (for the interfaces its
    class declares) and the item's C{installed()} method, if any, is called.
    The whole installation is one transaction: if it fails, nothing of it
    is left.

    @param self: the item to install.
    @param target: the item or store to install it on.
    @raise DependencyError: C{self} is already installed on C{target}, or
        the target already has another instance of C{self}'s class and some
        class depends on that class.
    """
    self.store.transact(_installOn, self, target, True)


def _installOn(self: Any, target: Any, explicitlyInstalled: bool) -> None:
    """
    Install C{self} on C{target}; see L{installOn}.

    @param explicitlyInstalled: whether the installation is on C{self}'s own
        account.
    """
    store = self.store
    for dc in _connectorsOn(store, target):
        if dc.installee is self:
            raise DependencyError(f"{self!r} is already installed on {target!r}.")
        if type(dc.installee) is type(self) and _isDependedOn(type(self)):
            raise DependencyError(
                f"An instance of {type(self).__name__} is already installed on {target!r}."
            )
    for name, attr in _dependencies(type(self)):
        requirement = _installedOfType(store, target, attr.dependencyType)
        if requirement is None:
            requirement = attr.dependencyType(store=store)
            if attr.itemCustomizer is not None:
                attr.itemCustomizer(requirement)
            _installOn(requirement, target, False)
        setattr(self, name, requirement)
    _DependencyConnector(
        store=store, target=target, installee=self, explicitlyInstalled=explicitlyInstalled
    )
    target.powerUp(self)
    installed = getattr(self, "installed", None)
    if installed is not None:
        installed()


def uninstallFrom(self: Any, target: Any) -> None:
    """
    Remove an item from a target, with the requirements it brought.

    The target is powered down, the installation record removed, and every
    requirement that was installed only on this item's account and that
    nothing else installed on the target still needs is uninstalled too.
    Then the item's C{uninstalled()} method, if any, is called.  The whole
    uninstallation is one transaction.

    @param self: the installed item.
    @param target: the item or store it is installed on.
    @raise DependencyError: something installed on C{target} still depends
        on C{self}; nothing is changed.
    """
    self.store.transact(_uninstallFrom, self, target)


def _uninstallFrom(self: Any, target: Any) -> None:
    """
    Uninstall C{self} from C{target}; see L{uninstallFrom}.
    """
    dependents = list(installedDependents(self, target))
    if dependents:
        raise DependencyError(
            f"{self!r} cannot be uninstalled from {target!r}: {dependents!r} still depend on it."
        )
    unique = list(installedUniqueRequirements(self, target))
    target.powerDown(self)
    for dc in _connectorsOn(self.store, target):
        if dc.installee is self:
            dc.deleteFromStore()
    for requirement in unique:
        _uninstallFrom(requirement, target)
    uninstalled = getattr(self, "uninstalled", None)
    if uninstalled is not None:
        uninstalled()


def installedOn(self: Any) -> Any:
    """
    @param self: an item.
    @return: the item or store C{self} is installed on, or L{None}.
    @raise fractal.store.errors.DuplicateUniqueItem: C{self} is installed on
        more than one target.
    """
    try:
        dc = self.store.findUnique(_DependencyConnector, _DependencyConnector.installee == self)
    except ItemNotFound:
        return None
    return dc.target


def _dependsOnItem(item: Any, requirement: Any) -> bool:
    """
    @return: whether one of C{item}'s L{dependsOn} attributes refers to
        C{requirement}.
    """
    return any(getattr(item, name) is requirement for name, _attr in _dependencies(type(item)))


def installedDependents(self: Any, target: Any) -> Iterator[Any]:
    """
    @param self: an item installed on C{target}.
    @param target: an item or store.
    @return: the items installed on C{target} that depend on C{self}.
    """
    for dc in _connectorsOn(self.store, target):
        if dc.installee is not self and _dependsOnItem(dc.installee, self):
            yield dc.installee


def installedRequirements(self: Any, target: Any) -> Iterator[Any]:
    """
    @param self: an item installed on C{target}.
    @param target: an item or store.
    @return: the items installed on C{target} that C{self} depends on.
    """
    for dc in _connectorsOn(self.store, target):
        if _dependsOnItem(self, dc.installee):
            yield dc.installee


def installedUniqueRequirements(self: Any, target: Any) -> Iterator[Any]:
    """
    @param self: an item installed on C{target}.
    @param target: an item or store.
    @return: the items installed on C{target} that C{self} depends on, that
        were not installed explicitly and that nothing else installed on
        C{target} depends on: what uninstalling C{self} takes away with it.
    """
    connectors = _connectorsOn(self.store, target)
    for dc in connectors:
        requirement = dc.installee
        if dc.explicitlyInstalled or not _dependsOnItem(self, requirement):
            continue
        if any(
            other.installee is not self and _dependsOnItem(other.installee, requirement)
            for other in connectors
        ):
            continue
        yield requirement


class requiresFromSite:
    """
    A read-only descriptor giving an item the site store's powerup for an
    interface.

    Read on an item in a substore, it adapts the site store (the substore's
    parent) to the interface; when the site store has no such powerup it
    returns C{defaultFactory(siteStore)}.  Read on an item in a store with no
    parent, it returns C{siteDefaultFactory(store)}.

    @ivar powerupInterface: the interface to adapt the site store to.
    @ivar defaultFactory: a one-argument callable taking the site store, or
        L{None}.
    @ivar siteDefaultFactory: a one-argument callable taking the item's own
        (parentless) store, or L{None}.
    """

    def __init__(
        self,
        powerupInterface: Any,
        defaultFactory: Callable[[Any], Any] | None = None,
        siteDefaultFactory: Callable[[Any], Any] | None = None,
    ) -> None:
        self.powerupInterface = powerupInterface
        self.defaultFactory = defaultFactory
        self.siteDefaultFactory = siteDefaultFactory

    def __get__(self, oself: Any, owner: type | None = None) -> Any:
        """
        @return: the requirement for C{oself}, or this descriptor when read
            on the class.
        @raise UnsatisfiedRequirement: no powerup and no factory.
        """
        if oself is None:
            return self
        siteStore = oself.store.parent
        if siteStore is not None:
            powerup = self.powerupInterface(siteStore, None)
            if powerup is not None:
                return powerup
            return self._invoke(self.defaultFactory, siteStore)
        return self._invoke(self.siteDefaultFactory, oself.store)

    def _invoke(self, factory: Callable[[Any], Any] | None, store: Any) -> Any:
        """
        @return: C{factory(store)}.
        @raise UnsatisfiedRequirement: C{factory} is L{None}.
        """
        if factory is None:
            raise UnsatisfiedRequirement(
                f"No {self.powerupInterface.__name__} powerup on the site store and no default."
            )
        return factory(store)

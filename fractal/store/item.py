# -*- test-case-name: tests.test_store_item -*-
"""
L{Item}, the base class of everything kept in a L{fractal.store.Store}, and
the powerup machinery shared by items and stores.

Define an item by subclassing L{Item} once and declaring attributes from
L{fractal.store.attributes} in the class body::

    class Note(Item):
        title = text(allowNone=False)
        body = text(default="")

Instances are strict: only persistent attributes, C{inmemory()} attributes,
properties with setters and slots can be set.
"""

from __future__ import annotations

import functools
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from twisted.application.service import IService, MultiService
from twisted.python.reflect import namedAny
from zope.interface import implementer
from zope.interface.interface import InterfaceClass

from fractal.store.attributes import (
    Placeholder,
    SQLAttribute,
    _StoreIDColumn,
    inmemory,
    integer,
    reference,
    text,
)
from fractal.store.errors import NoCrossStoreReferences, NoInheritance
from fractal.store.interfaces import IPowerupIndirector, axiomInterfaceNames

if TYPE_CHECKING:
    from fractal.store.store import Store

__all__ = [
    "Empowered",
    "Item",
    "POWERUP_AFTER",
    "POWERUP_BEFORE",
    "Placeholder",
    "declareLegacyItem",
    "empowerment",
    "transacted",
]

POWERUP_BEFORE = 1
"""
A priority for powerups that should come before the default ones.
"""

POWERUP_AFTER = -1
"""
A priority for powerups that should come after the default ones.
"""

_typeNameToMostRecentClass: dict[str, type[Item]] = {}
_legacyTypes: dict[tuple[str, int], type[Item]] = {}
_allReferences: list[reference] = []
_generation = [0]

_reverseInterfaceNames: dict[str, list[str]] = {}
for _old, _new in axiomInterfaceNames.items():
    _reverseInterfaceNames.setdefault(_new, []).append(_old)


def _qual(interface: Any) -> str:
    return "%s.%s" % (interface.__module__, interface.__name__)


@functools.lru_cache(maxsize=None)
def _interfaceNames(interface: Any) -> tuple[str, ...]:
    name = _qual(interface)
    return (name,) + tuple(_reverseInterfaceNames.get(name, ()))


def _defaultTypeName(cls: type) -> str:
    return ("%s.%s" % (cls.__module__, cls.__qualname__)).lower().replace(".", "_")


class Empowered:
    """
    Powerup support, shared by L{Item} and L{fractal.store.Store}.

    A powerup is an item installed on a target (an item or a store) for an
    interface, at a priority.  Adapting the target to the interface
    (C{IFoo(target)}) gives the first powerup, before the target's own
    implementation.  Installations are stored as connector items.
    """

    powerupInterfaces: tuple[Any, ...] = ()

    def _powerupTarget(self) -> tuple[Store | None, int | None]:
        raise NotImplementedError()

    def _inMemoryPowerups(self) -> dict[Any, Any]:
        raise NotImplementedError()

    def _cachedAggregate(self) -> MultiService | None:
        raise NotImplementedError()

    def powerUp(self, powerup: Any, interface: Any = None, priority: int = 0) -> None:
        """
        Install C{powerup} for C{interface} at C{priority}.  Installing the
        same powerup for the same interface again only changes its priority.

        With no C{interface}, install it for each of its class's
        C{powerupInterfaces} (which does nothing if there are none, as in
        Axiom).

        @raise TypeError: for C{IPowerupIndirector}, which cannot be a
            powerup interface.
        @raise NoCrossStoreReferences: if C{powerup} is in another store.
        """
        if interface is None:
            for iface, prio in _declaredInterfaces(powerup):
                self.powerUp(powerup, iface, prio)
            return
        if interface is IPowerupIndirector:
            raise TypeError("IPowerupIndirector cannot be a powerup interface")
        store, _ = self._powerupTarget()
        if store is None:
            raise AttributeError("%r must be in a store to be powered up" % (self,))
        if getattr(powerup, "store", None) is not store:
            raise NoCrossStoreReferences(
                "%r cannot be a powerup of %r: they are not in the same store" % (powerup, self)
            )
        target: Any = store
        target.transact(self._installPowerup, store, powerup, interface, priority)

    def _installPowerup(self, store: Store, powerup: Any, interface: Any, priority: int) -> None:
        name = _qual(interface)
        existing = store.findFirst(
            _PowerupConnector,
            AND_(
                _PowerupConnector.item == self,
                _PowerupConnector.interface.oneOf(_interfaceNames(interface)),
                _PowerupConnector.powerup == powerup,
            ),
        )
        if existing is not None:
            existing.priority = priority
            return
        _PowerupConnector(
            store=store, item=self, interface=name, powerup=powerup, priority=priority
        )
        if interface is IService:
            aggregate = self._cachedAggregate()
            if aggregate is not None:
                aggregate.addService(powerup)  # type: ignore[no-untyped-call]

    def powerDown(self, powerup: Any, interface: Any = None) -> None:
        """
        Remove an installation made by L{powerUp}; with no C{interface}, the
        installations for C{powerupInterfaces}.

        @raise ValueError: if C{powerup} is not installed for C{interface}.
        """
        if interface is None:
            for iface, prio in _declaredInterfaces(powerup):
                self.powerDown(powerup, iface)
            return
        store, _ = self._powerupTarget()
        if store is None:
            raise ValueError("%r is not installed on %r" % (powerup, self))
        store.transact(self._removePowerup, store, powerup, interface)

    def _removePowerup(self, store: Store, powerup: Any, interface: Any) -> None:
        found = False
        if store._hasTable(_PowerupConnector):
            for conn in store.query(
                _PowerupConnector,
                AND_(
                    _PowerupConnector.item == self,
                    _PowerupConnector.interface.oneOf(_interfaceNames(interface)),
                    _PowerupConnector.powerup == powerup,
                ),
            ):
                conn.deleteFromStore()
                found = True
        if not found:
            raise ValueError("%r is not installed on %r for %r" % (powerup, self, interface))
        if interface is IService:
            aggregate = self._cachedAggregate()
            if aggregate is not None and powerup in list(aggregate):
                aggregate.removeService(powerup)  # type: ignore[no-untyped-call]

    def inMemoryPowerUp(self, powerup: Any, interface: Any) -> None:
        """
        Install C{powerup} for C{interface} in memory only: it is not
        persisted, and it comes before every stored powerup.  There is one
        per interface.
        """
        self._inMemoryPowerups()[interface] = powerup

    def powerupsFor(self, interface: Any) -> Iterator[Any]:
        """
        Iterate the powerups for C{interface}: the in-memory one first, then
        the stored ones by descending priority (ties in installation order).
        An installation whose powerup no longer exists is skipped; reading
        never writes.  A powerup providing C{IPowerupIndirector} is replaced
        by the result of its C{indirect(interface)}.
        """
        inMemory = self._inMemoryPowerups().get(interface)
        if inMemory is not None:
            yield inMemory
        store, storeID = self._powerupTarget()
        if store is None or storeID is None:
            return
        for powerup in store._storedPowerups(storeID, _interfaceNames(interface)):
            if IPowerupIndirector.providedBy(powerup):
                powerup = powerup.indirect(interface)
            yield powerup

    def interfacesFor(self, powerup: Any) -> Iterator[Any]:
        """
        Iterate the interfaces C{powerup} is installed for on this target.
        """
        store, storeID = self._powerupTarget()
        if store is None or storeID is None or powerup.storeID is None:
            return
        for name in store._powerupInterfaceNames(storeID, powerup.storeID):
            name = axiomInterfaceNames.get(name, name)
            try:
                yield namedAny(name)  # type: ignore[no-untyped-call]
            except (ImportError, AttributeError):
                continue

    def __conform__(self, interface: Any) -> Any:
        """
        Adapt to C{interface} through the powerups: the first one wins, even
        over the target's own implementation.  C{IService} and
        C{IServiceCollection} give, for a store, one cached C{MultiService}
        holding every C{IService} powerup.
        """
        for powerup in self.powerupsFor(interface):
            return powerup
        return None


def _declaredInterfaces(powerup: Any) -> list[tuple[Any, int]]:
    declared = getattr(powerup, "powerupInterfaces", ())
    pairs: list[tuple[Any, int]] = []
    for entry in declared:
        if isinstance(entry, tuple):
            pairs.append((entry[0], entry[1]))
        else:
            pairs.append((entry, 0))
    chooser = getattr(powerup, "__getPowerupInterfaces__", None)
    if chooser is not None:
        pairs = [
            (e[0], e[1]) if isinstance(e, tuple) else (e, 0) for e in chooser(pairs)
        ]
    return pairs


def AND_(*comparisons: Any) -> Any:
    from fractal.store.attributes import AND

    return AND(*comparisons)


def _loadCheck(store: Any) -> None:
    if getattr(type(store), "_fKind", None) != "store":
        raise TypeError("%r is not a Store" % (store,))


def _setStore(item: Item, store: Any) -> None:
    d = item.__dict__
    current = d.get("_fstore")
    if current is not None:
        if current is store:
            return
        raise AttributeError("%r is already in a store; items cannot move between stores" % (item,))
    if store is None:
        return
    _loadCheck(store)
    if d.get("_fstoreID") is not None:
        raise AttributeError("%r was deleted and cannot be stored again" % (item,))
    store._insertItem(item)


class Item(Empowered):
    """
    The base class of persistent items.

    Subclass it exactly once (subclasses of subclasses raise
    L{fractal.store.errors.NoInheritance}); plain mixins are fine.

    @cvar typeName: the name of the item type in the database; by default
        the qualified class name, lowercased, with dots replaced by
        underscores.  It must be unique in the process.
    @cvar schemaVersion: the version of the persistent schema (default 1).
        Bump it whenever the persistent attribute names or SQL types change,
        and register an upgrader from the previous version.
    @ivar store: the L{fractal.store.Store} this item is in, or C{None}.
        Setting it inserts the item; it can be set only once.
    @ivar storeID: the item's identifier in its store, assigned at insert.
    """

    _fKind = "item"
    storeID: Any = None
    typeName: str = ""
    schemaVersion: int = 1
    __legacy__ = False

    _fSchema: list[tuple[str, SQLAttribute]] = []
    _fAttrs: tuple[SQLAttribute, ...] = ()
    _fHidden: tuple[str, ...] = ()
    _fSetters: dict[str, SQLAttribute] = {}
    _fAllowed: frozenset[str] = frozenset()
    _fLate: tuple[SQLAttribute, ...] = ()
    _fRequired: tuple[SQLAttribute, ...] = ()
    _fDefaults: dict[str, Any] = {}
    _fFactories: tuple[SQLAttribute, ...] = ()
    _fTable = ""
    _fHasActivate = False
    _fHasStored = False
    _fHasCommitted = False
    _fHasDeleted = False
    _fOverridesDelete = False

    store = property(attrgetter("_fstore"), _setStore, None, "The store this item is in, or None.")

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        ns = cls.__dict__
        for base in cls.__mro__[1:]:
            if base is not Item and isinstance(base, type) and issubclass(base, Item):
                raise NoInheritance(
                    "%s subclasses %s: items allow only one level of inheritance"
                    % (cls.__name__, base.__name__)
                )
        legacy = bool(ns.get("__legacy__", False))
        if "typeName" not in ns:
            cls.typeName = _defaultTypeName(cls)
        if "schemaVersion" not in ns:
            cls.schemaVersion = 1
        if not isinstance(cls.schemaVersion, int) or cls.schemaVersion < 1:
            raise ValueError("%s.schemaVersion must be a positive int" % (cls.__name__,))
        schema = sorted(
            ((name, obj) for name, obj in ns.items() if isinstance(obj, SQLAttribute)),
            key=lambda pair: pair[0],
        )
        table = "item_%s_v%d" % (cls.typeName, cls.schemaVersion)
        for name, attr in schema:
            attr._finish(table)
        cls._fSchema = schema
        cls._fAttrs = tuple(a for _, a in schema)
        cls._fHidden = tuple(a.hidden for a in cls._fAttrs)
        cls._fLoadKeys = ("_fstoreID",) + cls._fHidden  # type: ignore[attr-defined]
        cls._fKey = (cls.typeName, cls.schemaVersion)  # type: ignore[attr-defined]
        cls._fTable = table
        cls.storeID = _StoreIDColumn(cls, table)
        cls._fSetters = {name: attr for name, attr in schema}
        allowed = {"__provides__"}
        for klass in reversed(cls.__mro__):
            for name, obj in vars(klass).items():
                if isinstance(obj, SQLAttribute):
                    continue
                if isinstance(obj, inmemory) or hasattr(type(obj), "__set__"):
                    allowed.add(name)
        cls._fAllowed = frozenset(allowed)
        cls._fLate = tuple(a for a in cls._fAttrs if a._late)
        cls._fRequired = tuple(a for a in cls._fAttrs if not a.allowNone)
        cls._fDefaults = {
            a.hidden: a._defaultDB() for a in cls._fAttrs if a.defaultFactory is None
        }
        cls._fFactories = tuple(a for a in cls._fAttrs if a.defaultFactory is not None)
        cls._fHasActivate = cls.activate is not Item.activate
        cls._fHasStored = cls.stored is not Item.stored
        cls._fHasCommitted = cls.committed is not Item.committed
        cls._fHasDeleted = cls.deleted is not Item.deleted
        cls._fOverridesDelete = (
            cls.deleteFromStore is not Item.deleteFromStore or cls._fHasDeleted
        )
        columns = ", ".join(["oid"] + [a.columnName for a in cls._fAttrs])
        cls._fColumns = columns  # type: ignore[attr-defined]
        cls._fSelectColumns = ", ".join(  # type: ignore[attr-defined]
            [table + ".oid"] + [a._sqlName for a in cls._fAttrs]
        )
        cls._fInsertSQL = "INSERT INTO %s (%s) VALUES (%s)" % (  # type: ignore[attr-defined]
            table,
            columns,
            ", ".join(["?"] * (len(cls._fAttrs) + 1)),
        )
        cls._fSelectByIDSQL = "SELECT %s FROM %s WHERE oid = ?" % (  # type: ignore[attr-defined]
            columns,
            table,
        )
        if ns.get("_fPrivateLegacy"):
            return
        if legacy:
            _legacyTypes[(cls.typeName, cls.schemaVersion)] = cls
        else:
            existing = _typeNameToMostRecentClass.get(cls.typeName)
            if existing is not None and existing is not cls:
                raise RuntimeError(
                    "typeName %r is already used by %s.%s"
                    % (cls.typeName, existing.__module__, existing.__qualname__)
                )
            _typeNameToMostRecentClass[cls.typeName] = cls
            for attr in cls._fAttrs:
                if isinstance(attr, reference):
                    _allReferences.append(attr)
        _generation[0] += 1

    def __init__(self, **kw: Any) -> None:
        cls = type(self)
        d = self.__dict__
        if "_fstoreID" not in d:
            if d:
                for key, value in cls._fDefaults.items():
                    d.setdefault(key, value)
            else:
                d.update(cls._fDefaults)
            for attr in cls._fFactories:
                if attr.hidden not in d:
                    attr._set(self, attr.computeDefault())
            d["_fstore"] = None
            d["_fstoreID"] = None
        store = kw.pop("store", None)
        if kw:
            setters = cls._fSetters
            unstored = d["_fstore"] is None
            for name, value in kw.items():
                setter = setters.get(name)
                if setter is None:
                    if name == "storeID":
                        raise AttributeError("storeID is assigned by the store and cannot be passed")
                    setattr(self, name, value)
                elif unstored and value is not None:
                    # The common case, inlined: check and keep the value.
                    d[setter.hidden] = setter.infilter(value, self, None)
                else:
                    setter._set(self, value)
        if cls._fRequired:
            for attr in cls._fRequired:
                if d[attr.hidden] is None:
                    raise TypeError("attribute [%s] must not be None" % (attr,))
        if store is not None:
            if d["_fstore"] is None and getattr(type(store), "_fKind", None) == "store":
                store._insertItem(self)
            else:
                self.store = store

    def __setattr__(self, name: str, value: Any) -> None:
        attr = self._fSetters.get(name)
        if attr is not None:
            attr._set(self, value)
        elif name in self._fAllowed:
            object.__setattr__(self, name, value)
        else:
            raise AttributeError(
                "%s has no attribute %r to set (declare it, or use inmemory())"
                % (type(self).__name__, name)
            )

    def __repr__(self) -> str:
        d = self.__dict__
        parts = []
        for name, attr in self._fSchema:
            raw = d.get(attr.hidden)
            if isinstance(attr, reference):
                if raw is None:
                    shown = "None"
                elif type(raw) is int:
                    shown = "reference(%d)" % (raw,)
                else:
                    shown = "reference(%r)" % (getattr(raw, "storeID", raw),)
            else:
                try:
                    shown = repr(getattr(self, name))
                except Exception:
                    shown = repr(raw)
            parts.append("%s=%s" % (name, shown))
        parts.append("storeID=%r" % (d.get("_fstoreID"),))
        return "%s(%s)@0x%X" % (type(self).__name__, ", ".join(parts), id(self))

    # Hooks

    def activate(self) -> None:
        """
        Called when the item is inserted and every time it is loaded from
        the database (including a reload after garbage collection), before
        C{stored()}.  Set C{inmemory()} attributes here.
        """

    def stored(self) -> None:
        """
        Called once, when the item is first inserted, after C{activate()}.
        """

    def committed(self) -> None:
        """
        Called after a transaction that touched this item commits.  The
        store's bookkeeping does not depend on it, so overrides need not
        call up.  Changing the database here raises
        L{fractal.store.errors.ChangeRejected}.
        """

    def deleted(self) -> None:
        """
        Called after the transaction that deleted this item commits.
        """

    # Persistence API

    @classmethod
    def getSchema(cls) -> list[tuple[str, SQLAttribute]]:
        """
        The persistent attributes as C{(name, attribute)} pairs, sorted by
        name (the column order).
        """
        return list(cls._fSchema)

    def persistentValues(self) -> dict[str, Any]:
        """
        A dict of every persistent attribute's current value.
        """
        return {name: getattr(self, name) for name, _ in self._fSchema}

    def deleteFromStore(self, deleteObject: bool = True) -> None:
        """
        Delete this item: C{DISALLOW} references are checked, C{CASCADE}
        referrers are deleted, C{NULLIFY} references are set to NULL.  After
        the transaction commits, C{deleted()} runs and C{store} becomes
        C{None}; the attribute values stay readable.

        @raise AttributeError: if the item is not in a store (for example,
            already deleted).
        @raise fractal.store.errors.DeletionDisallowed: if a C{DISALLOW}
            reference still points here.
        """
        store = self.__dict__.get("_fstore")
        if store is None:
            raise AttributeError("%r is not in a store" % (self,))
        store._deleteItem(self)

    def checkpoint(self) -> None:
        """
        Write the changes made in this transaction to the database now.
        They are written anyway before the store's next statement and at
        commit (each changed item with one C{UPDATE}), so this is needed
        only by code that reads the database file some other way.
        """
        store = self.__dict__.get("_fstore")
        if store is not None and getattr(store, "_unflushed", False):
            store._flush()

    def touch(self) -> None:
        """
        Axiom compatibility: nothing to do.
        """

    def upgradeVersion(
        self, typeName: str, oldVersion: int, newVersion: int, **values: Any
    ) -> Item:
        """
        Replace this legacy item by an item of version C{newVersion} with
        the same storeID and the given attribute values; for use in
        upgraders.
        """
        store = self.__dict__.get("_fstore")
        if store is None:
            raise AttributeError("%r is not in a store" % (self,))
        result: Item = store._upgradeVersion(self, typeName, oldVersion, newVersion, values)
        return result

    # Powerup support

    def _powerupTarget(self) -> tuple[Store | None, int | None]:
        d = self.__dict__
        return d.get("_fstore"), d.get("_fstoreID")

    def _inMemoryPowerups(self) -> dict[Any, Any]:
        d = self.__dict__
        found = d.get("_fInMemoryPowerups")
        if found is None:
            found = d["_fInMemoryPowerups"] = {}
        return found

    def _cachedAggregate(self) -> MultiService | None:
        return None


class _PowerupConnector(Item):
    """
    One powerup installation: C{powerup} is installed on C{item} (a storeID,
    -1 for the store) for the interface named C{interface} (its qualified
    name) at C{priority}.  Deleting the powerup or the target deletes the
    connector.
    """

    typeName = "axiom_powerup_connector"
    schemaVersion = 1

    powerup = reference(whenDeleted=reference.CASCADE)
    item = reference(whenDeleted=reference.CASCADE)
    interface = text()
    priority = integer()


_T = TypeVar("_T", bound=type)


def empowerment(iface: InterfaceClass, priority: int = 0) -> Callable[[_T], _T]:
    """
    Class decorator: add C{(iface, priority)} to the class's
    C{powerupInterfaces} and declare that it implements C{iface}.
    """

    def decorate(cls: _T) -> _T:
        cls.powerupInterfaces = tuple(getattr(cls, "powerupInterfaces", ())) + (  # type: ignore[attr-defined]
            (iface, priority),
        )
        result: _T = implementer(iface)(cls)
        return result

    return decorate


_F = TypeVar("_F", bound=Callable[..., Any])


def transacted(method: _F) -> _F:
    """
    Decorate an item method so that it runs inside
    C{self.store.transact}.
    """

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kw: Any) -> Any:
        return self.store.transact(method, self, *args, **kw)

    return wrapper  # type: ignore[return-value]


def declareLegacyItem(
    typeName: str,
    schemaVersion: int,
    attributes: dict[str, Any],
    dummyBases: tuple[Any, ...] = (),
) -> type[Item]:
    """
    Declare the schema of an old version of an item type, so that upgraders
    can load and produce items of that version.

    @param typeName: the item type's C{typeName}.
    @param schemaVersion: the old version.
    @param attributes: a dict mapping attribute names to new attribute
        objects (C{{"name": text()}}).
    @param dummyBases: accepted for Axiom compatibility and ignored.
    @return: the legacy class.
    """
    found = _legacyTypes.get((typeName, schemaVersion))
    if found is not None:
        return found
    return _makeLegacyClass(typeName, schemaVersion, attributes, private=False)


def _makeLegacyClass(
    typeName: str, schemaVersion: int, attributes: dict[str, Any], private: bool
) -> type[Item]:
    namespace = dict(attributes)
    namespace["__module__"] = "item_dummy"
    namespace["__legacy__"] = True
    namespace["typeName"] = typeName
    namespace["schemaVersion"] = schemaVersion
    if private:
        namespace["_fPrivateLegacy"] = True
    return type(str("DummyItem<%s,%d>" % (typeName, schemaVersion)), (Item,), namespace)

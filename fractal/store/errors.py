# -*- test-case-name: tests.test_store_store -*-
"""
Exceptions raised by L{fractal.store}.

The names follow Axiom's C{axiom.errors} so that ported code can catch the
same exceptions; the fractal-only ones (L{StoreLocked}, L{StoreClosed},
L{StoreNotFound}, L{StoreAlreadyOpen}, L{TransactionInProgress}) replace the
silent hangs and C{AttributeError}s that Axiom gives in those situations.
"""

from __future__ import annotations

__all__ = [
    "BrokenReference",
    "CannotOpenStore",
    "ChangeRejected",
    "ConstraintError",
    "DeletionDisallowed",
    "DependencyError",
    "DuplicateUniqueItem",
    "InvalidPathError",
    "ItemClassesOnly",
    "ItemNotFound",
    "ItemUpgradeError",
    "NoCrossStoreReferences",
    "NoInheritance",
    "NoUpgradePathAvailable",
    "SQLError",
    "StoreAlreadyOpen",
    "StoreClosed",
    "StoreLocked",
    "StoreNotFound",
    "StoreOutOfDescriptors",
    "TransactionInProgress",
    "UnknownItemType",
    "UnsatisfiedRequirement",
    "UpgraderRecursion",
]


class CannotOpenStore(RuntimeError):
    """
    A store could not be opened.
    """


class StoreNotFound(CannotOpenStore):
    """
    C{Store(dbdir, create=False)} was given a directory that does not exist.
    """


class StoreAlreadyOpen(CannotOpenStore):
    """
    A L{fractal.store.Store} object for this database file is already open in
    this process.  Only one store object per file is allowed, because two
    connections to one file in one thread can deadlock each other.
    """


class StoreOutOfDescriptors(OSError, CannotOpenStore):
    """
    The store could not be opened because the process has no file
    descriptors left (C{errno} is C{EMFILE} or C{ENFILE}).  SQLite reports
    this only as "unable to open database file"; the store checks the system
    before it releases what it had opened, so the cause is not lost.
    Retrying after other files are closed can succeed.
    """


class StoreLocked(RuntimeError):
    """
    The database stayed locked by another connection for longer than the
    store's C{lockTimeout}.  Nothing was changed; the operation can be retried.
    """


class StoreClosed(RuntimeError):
    """
    The store was used after L{fractal.store.Store.close}.
    """


class TransactionInProgress(RuntimeError):
    """
    The operation (for example L{fractal.store.Store.close}) is not allowed
    while a transaction is open.
    """


class NoUpgradePathAvailable(CannotOpenStore):
    """
    The database holds an old version of an item type and no chain of
    upgraders (with a declared schema for every intermediate version) leads
    from it to the current version.
    """


class ItemUpgradeError(RuntimeError):
    """
    An upgrader failed.

    @ivar originalFailure: the L{twisted.python.failure.Failure} of the
        upgrader.
    @ivar storeID: the storeID of the item being upgraded.
    @ivar oldType: the legacy class of the item.
    @ivar newType: the class the upgrade was heading for.
    """

    def __init__(
        self, originalFailure: object, storeID: int, oldType: object, newType: object
    ) -> None:
        RuntimeError.__init__(self, originalFailure, storeID, oldType, newType)
        self.originalFailure = originalFailure
        self.storeID = storeID
        self.oldType = oldType
        self.newType = newType


class UpgraderRecursion(RuntimeError):
    """
    An upgrader (directly or not) asked for the item it is upgrading.
    """


class ItemNotFound(KeyError):
    """
    No item matched (L{fractal.store.Store.getItemByID},
    L{fractal.store.Store.findUnique}).
    """


class DuplicateUniqueItem(KeyError):
    """
    L{fractal.store.Store.findUnique} found more than one item.
    """


class UnknownItemType(RuntimeError):
    """
    The database holds an item whose type is not defined by any imported
    module.
    """


class ItemClassesOnly(TypeError):
    """
    Something other than an L{fractal.store.Item} subclass was given where
    only item classes are allowed.
    """


class NoInheritance(RuntimeError):
    """
    A subclass of an L{fractal.store.Item} subclass was defined.  Items allow
    only one level of inheritance (plain mixins are fine).
    """


class ChangeRejected(RuntimeError):
    """
    The database was changed from inside a C{committed()} or C{deleted()}
    hook, after the transaction had already committed.
    """


class NoCrossStoreReferences(AttributeError):
    """
    A reference (or a query comparison, or a powerup) would point at an item
    in another store.
    """


class BrokenReference(RuntimeError):
    """
    A C{CASCADE} or C{DISALLOW} reference points at an item that no longer
    exists.
    """


class DeletionDisallowed(ValueError):
    """
    An item cannot be deleted because a C{DISALLOW} reference still points at
    it.
    """


class ConstraintError(TypeError):
    """
    A value of the wrong type (or out of range) was given to an attribute.

    @ivar attributeObj: the attribute.
    @ivar requiredTypes: a description of what is accepted.
    @ivar providedValue: the rejected value.
    """

    def __init__(self, attributeObj: object, requiredTypes: str, providedValue: object) -> None:
        self.attributeObj = attributeObj
        self.requiredTypes = requiredTypes
        self.providedValue = providedValue
        TypeError.__init__(
            self,
            "attribute [%s] must be (%s); not %s"
            % (attributeObj, requiredTypes, type(providedValue).__name__),
        )


class InvalidPathError(ValueError):
    """
    A L{twisted.python.filepath.FilePath} given to a C{path()} attribute is
    not inside the store's files directory (or the store has none).
    """


class SQLError(RuntimeError):
    """
    SQLite reported an error for a statement.

    @ivar sql: the statement.
    @ivar args: its arguments.
    """


class DependencyError(Exception):
    """
    A dependency could not be installed or uninstalled (used by
    L{fractal.store.dependency}).
    """


class UnsatisfiedRequirement(AttributeError):
    """
    A C{requiresFromSite} requirement has no provider and no default
    (used by L{fractal.store.dependency}).
    """

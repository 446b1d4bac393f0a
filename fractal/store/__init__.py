# -*- test-case-name: tests.test_store_store -*-
"""
fractal.store: an Axiom-compatible object store on SQLite.

Port Axiom code by changing imports: C{axiom.item} → L{fractal.store.item},
C{axiom.attributes} → L{fractal.store.attributes}, C{axiom.store} →
L{fractal.store.store}, and so on, or import everything from here.  Stores
written by Axiom open here.  The deliberate differences from Axiom are listed
in C{docs/store.rst}.
"""

from fractal.store import errors
from fractal.store.attributes import (
    AND,
    OR,
    Placeholder,
    Time,
    boolean,
    bytes,
    compoundIndex,
    ieee754_double,
    inmemory,
    integer,
    money,
    path,
    point1decimal,
    point2decimal,
    point3decimal,
    point4decimal,
    point5decimal,
    point6decimal,
    point7decimal,
    point8decimal,
    point9decimal,
    point10decimal,
    reference,
    text,
    textlist,
    timestamp,
)
from fractal.store.errors import (
    BrokenReference,
    ChangeRejected,
    ConstraintError,
    DeletionDisallowed,
    DuplicateUniqueItem,
    ItemNotFound,
    NoCrossStoreReferences,
    StoreClosed,
    StoreLocked,
    StoreNotFound,
)
from fractal.store.item import (
    POWERUP_AFTER,
    POWERUP_BEFORE,
    Item,
    declareLegacyItem,
    empowerment,
    transacted,
)
from fractal.store.store import Store
from fractal.store.upgrade import (
    registerAttributeCopyingUpgrader,
    registerDeletionUpgrader,
    registerUpgrader,
)

__all__ = [
    "AND",
    "OR",
    "POWERUP_AFTER",
    "POWERUP_BEFORE",
    "BrokenReference",
    "ChangeRejected",
    "ConstraintError",
    "DeletionDisallowed",
    "DuplicateUniqueItem",
    "Item",
    "ItemNotFound",
    "NoCrossStoreReferences",
    "Placeholder",
    "Store",
    "StoreClosed",
    "StoreLocked",
    "StoreNotFound",
    "Time",
    "boolean",
    "bytes",
    "compoundIndex",
    "declareLegacyItem",
    "empowerment",
    "errors",
    "ieee754_double",
    "inmemory",
    "integer",
    "money",
    "path",
    "point1decimal",
    "point2decimal",
    "point3decimal",
    "point4decimal",
    "point5decimal",
    "point6decimal",
    "point7decimal",
    "point8decimal",
    "point9decimal",
    "point10decimal",
    "reference",
    "registerAttributeCopyingUpgrader",
    "registerDeletionUpgrader",
    "registerUpgrader",
    "text",
    "textlist",
    "timestamp",
    "transacted",
]

# Names added by the dependency/substore/scheduler modules go below.

from fractal.store.dependency import (  # noqa: E402
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
from fractal.store.errors import DependencyError, UnsatisfiedRequirement  # noqa: E402
from fractal.store.scheduler import TimedEvent, TimedEventFailureLog  # noqa: E402
from fractal.store.substore import SubStore  # noqa: E402

__all__ += [
    "DependencyError",
    "SubStore",
    "TimedEvent",
    "TimedEventFailureLog",
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

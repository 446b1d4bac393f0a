# -*- test-case-name: tests.test_store_upgrade -*-
"""
Upgraders: functions that turn an item of an old schema version into the
next one.

Old versions of an item type are upgraded when a store opens (user stores
are small), one upgrader after another until the current version; the
storeID never changes.  Intermediate versions that are not in the database
need their schema declared with L{fractal.store.item.declareLegacyItem}.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = [
    "registerAttributeCopyingUpgrader",
    "registerDeletionUpgrader",
    "registerUpgrader",
]

_upgradeRegistry: dict[tuple[str, int], tuple[Callable[[Any], Any], int]] = {}


def registerUpgrader(
    upgrader: Callable[[Any], Any], typeName: str, oldVersion: int, newVersion: int
) -> None:
    """
    Register C{upgrader(oldItem)} to upgrade items of C{typeName} from
    C{oldVersion} to C{newVersion}.  It returns
    C{oldItem.upgradeVersion(typeName, oldVersion, newVersion, **values)},
    or C{None} if it deleted the item.

    @raise ValueError: if C{newVersion} is not greater than C{oldVersion}.
    """
    if newVersion <= oldVersion:
        raise ValueError("an upgrader must go to a higher version")
    _upgradeRegistry[(typeName, oldVersion)] = (upgrader, newVersion)


def registerAttributeCopyingUpgrader(
    itemType: Any,
    fromVersion: int,
    toVersion: int,
    postCopy: Callable[[Any], None] | None = None,
) -> None:
    """
    Register an upgrader that copies every attribute of the old version by
    name, then calls C{postCopy(newItem)}.  Every old attribute must exist in
    the new version (else C{AttributeError} during the upgrade).

    @param itemType: the current item class (only its C{typeName} is used).
    """
    typeName = itemType.typeName

    def upgrader(old: Any) -> Any:
        values = {name: getattr(old, name) for name, _ in old.getSchema()}
        new = old.upgradeVersion(typeName, fromVersion, toVersion, **values)
        if postCopy is not None:
            postCopy(new)
        return new

    registerUpgrader(upgrader, typeName, fromVersion, toVersion)


def registerDeletionUpgrader(itemType: Any, fromVersion: int, toVersion: int) -> None:
    """
    Register an upgrader that deletes the items of the old version.
    """

    def upgrader(old: Any) -> None:
        old.deleteFromStore()
        return None

    registerUpgrader(upgrader, itemType.typeName, fromVersion, toVersion)

# -*- test-case-name: tests.test_store_powerups -*-
"""
Interfaces of L{fractal.store}, mirroring Axiom's C{axiom.iaxiom}.

Powerup installations record the qualified name of their interface.  Data
written by Axiom names Axiom's interfaces (C{axiom.iaxiom.IScheduler}...);
L{fractal.store} treats those names as aliases of the interfaces defined here
(see L{axiomInterfaceNames}).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, IServiceCollection
from zope.interface import Attribute, Interface

__all__ = [
    "IAtomicFile",
    "IBeneficiary",
    "IColumn",
    "IComparison",
    "IOrdering",
    "IPowerupIndirector",
    "IQuery",
    "IScheduler",
    "IService",
    "IServiceCollection",
    "axiomInterfaceNames",
]


class IPowerupIndirector(Interface):
    """
    A powerup that stands in for another object: when it is found as a
    powerup for an interface, the result of L{indirect} is used instead.
    """

    def indirect(interface: object) -> object:
        """
        Return the object that really provides C{interface}.

        @param interface: the interface being looked up.
        """


class IBeneficiary(Interface):
    """
    Something that can be powered up: an item or a store.
    """

    def powerUp(powerup: object, interface: object = None, priority: int = 0) -> None:
        """
        Install C{powerup} for C{interface} at C{priority}.
        """

    def powerDown(powerup: object, interface: object = None) -> None:
        """
        Remove an installation made by L{powerUp}.
        """

    def powerupsFor(interface: object) -> object:
        """
        Iterate the powerups installed for C{interface}, in-memory first, then
        by descending priority.
        """

    def interfacesFor(powerup: object) -> object:
        """
        Iterate the interfaces C{powerup} is installed for.
        """


class IScheduler(Interface):
    """
    Runs items' C{run()} methods at given times (see L{fractal.store.scheduler}).
    """

    def schedule(runnable: object, when: object) -> None:
        """
        Run C{runnable.run()} at C{when} (an L{epsilon.extime.Time}).
        """

    def reschedule(runnable: object, fromWhen: object, toWhen: object) -> None:
        """
        Move the event of C{runnable} at C{fromWhen} to C{toWhen}.

        @raise ValueError: if no event of C{runnable} is at C{fromWhen}.
        """

    def unscheduleFirst(runnable: object) -> None:
        """
        Remove the earliest event of C{runnable}.
        """

    def unscheduleAll(runnable: object) -> None:
        """
        Remove every event of C{runnable}.
        """

    def scheduledTimes(runnable: object) -> object:
        """
        Iterate the times C{runnable} is scheduled at.
        """


class IColumn(Interface):
    """
    Something that names a column in a query: an attribute of an item class,
    C{Cls.storeID}, or an attribute of a L{fractal.store.item.Placeholder}.
    """

    type = Attribute("The item class the column belongs to.")
    attrname = Attribute("The attribute name.")

    def getColumnName(store: Any) -> str:
        """
        The qualified SQL name of the column.
        """


class IComparison(Interface):
    """
    A condition in a query's C{WHERE} clause.
    """

    def getQuery(store: Any) -> str:
        """
        The SQL text of the condition, with C{?} placeholders.
        """

    def getArgs(store: Any) -> list[Any]:
        """
        The values for the placeholders of L{getQuery}.
        """

    def getInvolvedTables() -> list[object]:
        """
        The item classes (or placeholders) the condition mentions.
        """


class IOrdering(Interface):
    """
    A sort order for a query.
    """

    def orderColumns() -> list[tuple[object, str]]:
        """
        A list of C{(column, "ASC" or "DESC")} pairs.
        """


class IQuery(Interface):
    """
    A lazy query over a store.
    """

    store = Attribute("The store queried.")

    def count() -> int:
        """
        The number of results.
        """

    def cloneQuery(limit: object = None, sort: object = None) -> "IQuery":
        """
        A copy of this query, optionally with a new limit or sort.
        """


class IAtomicFile(Interface):
    """
    A file being written in a store's C{temp/} directory that appears at its
    final place only when L{close} succeeds.
    """

    def write(data: bytes) -> None:
        """
        Append C{data}.
        """

    def close() -> object:
        """
        Finish the file; return a Deferred firing with its final FilePath.
        """

    def abort() -> None:
        """
        Discard the file.
        """


axiomInterfaceNames: dict[str, str] = {
    "axiom.iaxiom.IPowerupIndirector": __name__ + ".IPowerupIndirector",
    "axiom.iaxiom.IScheduler": __name__ + ".IScheduler",
    "axiom.iaxiom.IBeneficiary": __name__ + ".IBeneficiary",
}
"""
Qualified names of Axiom interfaces, mapped to the qualified names of the
fractal interfaces that replace them.  A powerup installed by Axiom for the
first is found when looking up the second.
"""

# -*- test-case-name: tests.test_integration_node -*-
"""
The mailbox with one more powerup whose responder always raises an exception
its command does not declare, for the integration tests of bad input.
"""

from __future__ import annotations

from typing import Any

from examples.mailbox import Deliver, Inbox, Mailbox, MarkRead, Stats
from fractal.app import Application, UserCommand
from fractal.store import Item, integer

__all__ = ["Explode", "Fragile", "application"]


class Explode(UserCommand):
    """
    Change the user's store, then fail with an undeclared exception.
    """

    arguments: list[Any] = []
    response: list[Any] = []


class Fragile(Item):
    """
    A powerup that counts the explosions it was asked for (and, as each one
    is rolled back, always holds zero).
    """

    typeName = "tests_integration_fragile"
    schemaVersion = 1

    explosions = integer(default=0, allowNone=False)

    @Explode.responder
    def explode(self) -> dict[str, Any]:
        self.explosions += 1
        raise ZeroDivisionError("deliberate failure in a responder")


application = Application(
    "mailbox-fragile",
    powerups=[Mailbox, Fragile],
    commands=[Deliver, Inbox, MarkRead, Stats, Explode],
)

"""
The mailbox application acknowledging every command durably, for the
durable integration tests.
"""

from __future__ import annotations

from examples.mailbox import Deliver, Inbox, Mailbox, MarkRead, Stats
from fractal.app import Application

__all__ = ["application"]

application = Application(
    "mailbox", powerups=[Mailbox], commands=[Deliver, Inbox, MarkRead, Stats], ack="durable"
)

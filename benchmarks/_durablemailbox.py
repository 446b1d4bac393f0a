"""
The mailbox application acknowledging every command durably, for
C{benchmarks/durable.py --node}.
"""

from __future__ import annotations

from examples.mailbox import Deliver, Inbox, Mailbox, MarkRead, Stats
from fractal.app import Application

__all__ = ["application"]

application = Application(
    "mailbox", powerups=[Mailbox], commands=[Deliver, Inbox, MarkRead, Stats], ack="durable"
)

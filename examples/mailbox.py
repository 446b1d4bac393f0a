# -*- test-case-name: tests.test_examples_mailbox -*-
"""
A webmail back end as a fractal application: each user's mailbox lives in that
user's own store.

Run it::

    twistd -n fractal --app examples.mailbox:application

and call it with L{fractal.client} (see C{examples/mailclient.py}).
"""

from __future__ import annotations

from typing import Any

from epsilon.extime import Time
from twisted.protocols import amp

from fractal.app import Application, UserCommand
from fractal.store import Item, boolean, text, timestamp

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_INBOX",
    "NoSuchMessage",
    "InvalidMessage",
    "Deliver",
    "Inbox",
    "MarkRead",
    "Stats",
    "Message",
    "Mailbox",
    "application",
]

MAX_HEADER_BYTES = 256
"""
The longest sender or subject, in UTF-8 bytes.  With L{MAX_INBOX} this keeps
an L{Inbox} answer well inside AMP's 64 KiB value limit.
"""

MAX_INBOX = 50
"""
The most messages one L{Inbox} call returns.
"""


class NoSuchMessage(Exception):
    """
    The user has no message with that id.
    """


class InvalidMessage(Exception):
    """
    A message or a request about messages is malformed; the description says
    how.
    """


class Deliver(UserCommand):
    """
    Deliver one message to the user's mailbox.
    """

    arguments = [
        (b"sender", amp.Unicode()),
        (b"subject", amp.Unicode()),
        (b"body", amp.Unicode()),
    ]
    response = [(b"messageID", amp.Integer())]
    errors = {InvalidMessage: b"INVALID_MESSAGE"}


class Inbox(UserCommand):
    """
    List the user's newest messages, newest first.
    """

    arguments = [(b"limit", amp.Integer()), (b"unreadOnly", amp.Boolean())]
    response = [
        (
            b"messages",
            amp.AmpList(
                [
                    (b"messageID", amp.Integer()),
                    (b"sender", amp.Unicode()),
                    (b"subject", amp.Unicode()),
                    (b"read", amp.Boolean()),
                ]
            ),
        )
    ]
    errors = {InvalidMessage: b"INVALID_MESSAGE"}


class MarkRead(UserCommand):
    """
    Mark one of the user's messages as read.
    """

    arguments = [(b"messageID", amp.Integer())]
    response: list[tuple[bytes, amp.Argument]] = []
    errors = {NoSuchMessage: b"NO_SUCH_MESSAGE"}


class Stats(UserCommand):
    """
    Count the user's messages.
    """

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [(b"total", amp.Integer()), (b"unread", amp.Integer())]


class Message(Item):
    """
    One delivered message.
    """

    typeName = "examples_mailbox_message"
    schemaVersion = 1

    sender = text(allowNone=False)
    subject = text(allowNone=False)
    body = text(allowNone=False)
    received = timestamp(allowNone=False)
    read = boolean(default=False, allowNone=False)


def _checkHeader(name: str, value: str) -> None:
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_HEADER_BYTES:
        raise InvalidMessage(f"{name} is {size} bytes; the limit is {MAX_HEADER_BYTES}")


class Mailbox(Item):
    """
    The mailbox powerup, one in every user's store: it answers the mailbox
    commands.  It keeps no counters: the messages are counted when asked, so
    delivering writes only the new message.
    """

    typeName = "examples_mailbox_mailbox"
    schemaVersion = 1

    @Deliver.responder
    def deliver(self, sender: str, subject: str, body: str) -> dict[str, Any]:
        _checkHeader("sender", sender)
        _checkHeader("subject", subject)
        message = Message(
            store=self.store, sender=sender, subject=subject, body=body, received=Time()
        )
        return {"messageID": message.storeID}

    @Inbox.responder
    def inbox(self, limit: int, unreadOnly: bool) -> dict[str, Any]:
        if not 0 <= limit <= MAX_INBOX:
            raise InvalidMessage(f"limit must be between 0 and {MAX_INBOX}, not {limit}")
        if unreadOnly:
            query = self.store.query(
                Message, Message.read == False, sort=Message.storeID.descending, limit=limit  # noqa: E712
            )
        else:
            query = self.store.query(Message, sort=Message.storeID.descending, limit=limit)
        return {
            "messages": [
                {
                    "messageID": message.storeID,
                    "sender": message.sender,
                    "subject": message.subject,
                    "read": message.read,
                }
                for message in query
            ]
        }

    @MarkRead.responder
    def markRead(self, messageID: int) -> dict[str, Any]:
        if not 0 < messageID < 2**63:
            raise NoSuchMessage(f"no message {messageID}")
        message = self.store.getItemByID(messageID, default=None)
        if not isinstance(message, Message):
            raise NoSuchMessage(f"no message {messageID}")
        message.read = True
        return {}

    @Stats.responder
    def stats(self) -> dict[str, Any]:
        return {
            "total": self.store.count(Message),
            "unread": self.store.count(Message, Message.read == False),  # noqa: E712
        }


application = Application(
    "mailbox", powerups=[Mailbox], commands=[Deliver, Inbox, MarkRead, Stats]
)
"""
The mailbox application: C{--app examples.mailbox:application}.
"""

"""
Tests for L{examples.mailbox}: the mailbox powerup's answers, called the way
a node calls them (the responders the application binds in a user's store,
each in one transaction).  C{tests.test_integration_node} drives the same
commands through a real node process.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from examples.mailbox import (
    MAX_HEADER_BYTES,
    MAX_INBOX,
    Deliver,
    Inbox,
    InvalidMessage,
    Mailbox,
    MarkRead,
    NoSuchMessage,
    Stats,
    application,
)
from fractal.app import UserCommand
from fractal.store import Store


class MailboxTests(SynchronousTestCase):
    """
    The mailbox commands, answered in one user's in-memory store.
    """

    def setUp(self) -> None:
        self.store = Store()
        self.responders = application.installOn(self.store)

    def call(self, command: type[UserCommand], **arguments: Any) -> Any:
        """
        Answer C{command} with C{arguments} as a node does: the bound
        responder, inside one transaction of the store.
        """
        responder: Callable[..., Any] = self.responders[command.commandName]
        return self.store.transact(responder, **arguments)

    def deliver(self, subject: str, sender: str = "bob@example.com") -> int:
        """
        Deliver a message with C{subject}; return its id.
        """
        answer = self.call(Deliver, sender=sender, subject=subject, body="hello")
        messageID: int = answer["messageID"]
        return messageID

    def test_deliverAndCount(self) -> None:
        """
        Delivered messages are counted, all unread; each gets its own id.
        """
        self.assertEqual(self.call(Stats), {"total": 0, "unread": 0})
        ids = [self.deliver(f"s{n}") for n in range(3)]
        self.assertEqual(len(set(ids)), 3)
        self.assertEqual(self.call(Stats), {"total": 3, "unread": 3})

    def test_inboxNewestFirst(self) -> None:
        """
        L{Inbox} lists the newest messages first, at most C{limit} of them,
        and only the unread ones when asked.
        """
        ids = [self.deliver(f"s{n}") for n in range(4)]
        self.call(MarkRead, messageID=ids[3])
        messages = self.call(Inbox, limit=3, unreadOnly=False)["messages"]
        self.assertEqual([m["messageID"] for m in messages], ids[3:0:-1])
        self.assertEqual(
            messages[0],
            {"messageID": ids[3], "sender": "bob@example.com", "subject": "s3", "read": True},
        )
        unread = self.call(Inbox, limit=MAX_INBOX, unreadOnly=True)["messages"]
        self.assertEqual([m["messageID"] for m in unread], ids[2::-1])
        self.assertEqual(self.call(Inbox, limit=0, unreadOnly=False), {"messages": []})

    def test_markRead(self) -> None:
        """
        L{MarkRead} marks one message read, and doing it again changes
        nothing.
        """
        first, second = self.deliver("a"), self.deliver("b")
        self.assertEqual(self.call(MarkRead, messageID=first), {})
        self.assertEqual(self.call(MarkRead, messageID=first), {})
        self.assertEqual(self.call(Stats), {"total": 2, "unread": 1})
        [unread] = self.call(Inbox, limit=10, unreadOnly=True)["messages"]
        self.assertEqual(unread["messageID"], second)

    def test_markReadUnknown(self) -> None:
        """
        An id that is no message of this user, including one of another
        item (the mailbox powerup itself) and ones out of range, is
        L{NoSuchMessage}.
        """
        self.deliver("a")
        mailbox = self.store.findUnique(Mailbox)
        for messageID in [0, -1, 999, 2**63, mailbox.storeID]:
            with self.assertRaises(NoSuchMessage):
                self.call(MarkRead, messageID=messageID)
        self.assertEqual(self.call(Stats), {"total": 1, "unread": 1})

    def test_inboxLimitChecked(self) -> None:
        """
        A limit outside 0 to L{MAX_INBOX} is L{InvalidMessage}.
        """
        for limit in [-1, MAX_INBOX + 1]:
            with self.assertRaises(InvalidMessage) as e:
                self.call(Inbox, limit=limit, unreadOnly=False)
            self.assertIn(str(limit), str(e.exception))

    def test_headersChecked(self) -> None:
        """
        A sender or subject longer than L{MAX_HEADER_BYTES} UTF-8 bytes is
        L{InvalidMessage}, and nothing is delivered; one exactly that long
        is delivered.
        """
        tooLong = "\N{EURO SIGN}" * (MAX_HEADER_BYTES // 3 + 1)
        with self.assertRaises(InvalidMessage) as e:
            self.deliver(tooLong)
        self.assertIn("subject", str(e.exception))
        with self.assertRaises(InvalidMessage):
            self.deliver("s", sender=tooLong)
        self.assertEqual(self.call(Stats), {"total": 0, "unread": 0})
        self.deliver("x" * MAX_HEADER_BYTES)
        self.assertEqual(self.call(Stats)["total"], 1)

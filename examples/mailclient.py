# -*- test-case-name: tests.test_integration_node -*-
"""
A short client of the mailbox example: deliver a message to a user, list the
user's inbox, mark the message read and print the user's counts.

Start a node in one terminal::

    twistd -n fractal --app examples.mailbox:application

and run, in another::

    python3 examples/mailclient.py alice@example.com
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from twisted.internet import defer, task

try:
    from examples.mailbox import Deliver, Inbox, MarkRead, Stats
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from examples.mailbox import Deliver, Inbox, MarkRead, Stats

from fractal.client import connect

__all__ = ["main"]


async def session(reactor: Any, endpoint: str, user: str) -> None:
    client = connect(reactor, endpoint, timeout=5)
    try:
        answer = await client.callRemote(
            Deliver, user=user, sender="bob@example.com", subject="Lunch?", body="At noon."
        )
        print(f"delivered message {answer['messageID']} to {user}")
        inbox = await client.callRemote(Inbox, user=user, limit=5, unreadOnly=False)
        for message in inbox["messages"]:
            flag = " " if message["read"] else "*"
            print(f"  {flag} {message['messageID']:>5}  {message['sender']:<20} {message['subject']}")
        await client.callRemote(MarkRead, user=user, messageID=answer["messageID"])
        stats = await client.callRemote(Stats, user=user)
        print(f"{user}: {stats['total']} messages, {stats['unread']} unread")
    finally:
        await client.disconnect()


def main() -> None:
    parser = argparse.ArgumentParser(description="Call the mailbox example.")
    parser.add_argument("user", help="the user key, e.g. alice@example.com")
    parser.add_argument(
        "--connect",
        default="tcp:host=127.0.0.1:port=7100",
        help="the node's client endpoint (default: %(default)s)",
    )
    options = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(session(reactor, options.connect, options.user)))


if __name__ == "__main__":
    main()

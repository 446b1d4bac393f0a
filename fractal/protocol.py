# -*- test-case-name: tests.test_server -*-
"""
The wire contract of a fractal node: every AMP error and command the
framework itself defines.

Application commands are L{fractal.app.UserCommand}s; each of them gets
L{FRAMEWORK_ERRORS} added to its C{errors}, so a client calling it receives
these as typed exceptions.  The internal commands nodes exchange with each
other and with smart clients (shard map, forwarding, health) belong here too,
next to the public ones, so the whole wire surface is in one module.

An unknown command is answered with AMP's own C{UNHANDLED} error code, which
every AMP client already turns into L{twisted.protocols.amp.UnhandledCommand}.

Errors marked I{retryable} mean that the call did not run and may be sent again
(later, or to another node); the others are answered for a call that must not
be repeated unchanged.
"""

from __future__ import annotations

from typing import Mapping

from twisted.protocols import amp

from fractal.keys import InvalidUserKey
from fractal.routing.wire import ShardMapArgument

__all__ = [
    "USER_ARGUMENT",
    "InvalidUserKey",
    "InvalidRequest",
    "Overloaded",
    "NodeStopping",
    "StoreUnavailable",
    "NotOwner",
    "OwnerUnavailable",
    "CallNotSent",
    "PeerStopped",
    "CallFailed",
    "FRAMEWORK_ERRORS",
    "RETRYABLE_ERRORS",
    "GetShardMap",
    "Health",
]

USER_ARGUMENT = b"user"
"""
The name of the AMP argument that carries the user key, the routing key of
every user command.  A node reads only this value (and C{_command}, C{_ask})
from a box to decide where the call runs.
"""


class InvalidRequest(Exception):
    """
    The box cannot be a call: an argument is missing or cannot be decoded, or
    the box has more keys than the node accepts.  The description says which.
    """


class Overloaded(Exception):
    """
    I{Retryable.}  The node refused the call without running it: too many
    stores are open and all of them are in use, or the connection has too many
    calls outstanding.
    """


class NodeStopping(Exception):
    """
    I{Retryable.}  The node is shutting down and no longer starts new calls;
    send the call again (it will reach the user's next owner).
    """


class StoreUnavailable(Exception):
    """
    The user's store could not be opened (for example, its local copy is
    damaged, or restoring it from durable storage was refused).  The call did
    not run.
    """


class NotOwner(Exception):
    """
    I{Retryable elsewhere.}  This node does not own the user's slot.  The
    description, and so C{args[0]} on the client, is the id of the node this
    node believes owns it.
    """

    @property
    def owner(self) -> str:
        """
        The id of the node believed to own the user's slot.
        """
        return str(self.args[0]) if self.args else ""


class OwnerUnavailable(Exception):
    """
    I{Retryable.}  The user's slot is owned by another node that cannot be
    reached right now; the call did not run.
    """


class CallNotSent(OwnerUnavailable):
    """
    I{Retryable.}  Raised by a node's forwarder, never sent on the wire (a
    client receives it as L{OwnerUnavailable}): the call was not sent to the
    owner at all (its peer link is down or did not come up in time, or the
    node has no link to it), so it certainly did not run there and may be
    routed again.
    """


class PeerStopped(CallNotSent):
    """
    A L{CallNotSent} from a peer that said it is stopping
    (L{NodeStopping}): a node that stops gracefully answers every call it
    accepted before it closes its connections, so a call it left unanswered
    did not run there either.
    """


class CallFailed(Exception):
    """
    The responder raised an exception its command does not declare.  Its
    transaction was rolled back and the failure was logged on the node; the
    description does not carry the node's traceback.
    """


FRAMEWORK_ERRORS: Mapping[type[Exception], bytes] = {
    InvalidUserKey: b"INVALID_USER_KEY",
    InvalidRequest: b"INVALID_REQUEST",
    Overloaded: b"OVERLOADED",
    NodeStopping: b"NODE_STOPPING",
    StoreUnavailable: b"STORE_UNAVAILABLE",
    NotOwner: b"NOT_OWNER",
    OwnerUnavailable: b"OWNER_UNAVAILABLE",
    CallFailed: b"CALL_FAILED",
}
"""
Every error the framework itself may answer to a user command, with its AMP
error code.  L{fractal.app.UserCommand} adds them to each command's C{errors}.
"""

RETRYABLE_ERRORS: tuple[type[Exception], ...] = (
    Overloaded,
    NodeStopping,
    NotOwner,
    OwnerUnavailable,
)
"""
The framework errors after which the same call may be sent again: the node did
not run it.
"""


class GetShardMap(amp.Command):
    """
    I{Internal.}  Ask a node for the newest shard map it knows: which node
    owns each slot, at which epoch, and how to reach every node.  Smart
    clients (L{fractal.routing.client}) call it on any node.

    Response: C{map}, a L{fractal.routing.interfaces.ShardMap}.
    """

    commandName = b"fractal.GetShardMap"
    arguments = []
    response = [(b"map", ShardMapArgument())]


class Health(amp.Command):
    """
    I{Internal.}  Ask a node how it is: its id, the version of its shard
    map, how many slots it owns, and which peer links are up and down.

    Response: C{node}, C{mapVersion}, C{slotsOwned}, C{peersUp},
    C{peersDown} (lists of node ids).
    """

    commandName = b"fractal.Health"
    arguments = []
    response = [
        (b"node", amp.Unicode()),  # type: ignore[no-untyped-call]
        (b"mapVersion", amp.Integer()),  # type: ignore[no-untyped-call]
        (b"slotsOwned", amp.Integer()),  # type: ignore[no-untyped-call]
        (b"peersUp", amp.ListOf(amp.Unicode())),  # type: ignore[no-untyped-call]
        (b"peersDown", amp.ListOf(amp.Unicode())),  # type: ignore[no-untyped-call]
    ]

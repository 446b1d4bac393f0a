# -*- test-case-name: tests.test_app -*-
"""
The programming model of a fractal application.

An application is a set of powerups: L{fractal.store.Item} classes installed
once in every user's store.  Methods of those classes answer
L{UserCommand}s, AMP commands routed by the user key::

    class Deliver(app.UserCommand):
        arguments = [(b"sender", amp.Unicode()), (b"body", amp.Unicode())]
        response = [(b"messageID", amp.Integer())]

    class Mailbox(Item):
        unread = integer(default=0)

        @Deliver.responder
        def deliver(self, sender, body):
            ...
            return {"messageID": message.storeID}

    application = app.Application("mailbox", powerups=[Mailbox])

The node opens (or creates) the user's store, makes sure the application's
powerups are installed in it, and calls the responder on the powerup inside one
C{store.transact}: everything the responder does synchronously commits
together, or, when it raises, rolls back together.  A responder may return a
L{Deferred} (or be a coroutine function); only the part before it first waits
runs in the transaction, so store work done after that must call
C{store.transact} itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, TypeVar

from attrs import frozen
from twisted.protocols import amp

from fractal.protocol import FRAMEWORK_ERRORS, USER_ARGUMENT

if TYPE_CHECKING:
    from fractal.store import Item, Store

__all__ = ["ACK_MODES", "Ack", "UserCommand", "Responder", "Application"]

Ack = Literal["local", "durable"]

ACK_MODES: tuple[Ack, ...] = ("local", "durable")
"""
The acknowledgement modes: C{"local"} answers a call after its local SQLite
commit; C{"durable"} answers only once that commit is stored durably.
"""

_RESPONDS_TO = "__fractalRespondsTo__"
"""
The attribute that L{UserCommand.responder} sets on a function: a tuple of the
commands it answers.
"""

_T = TypeVar("_T", bound=Callable[..., Any])


def _checkAck(ack: object, what: str) -> None:
    """
    Refuse an unknown acknowledgement mode.

    @raise ValueError: if C{ack} is not one of L{ACK_MODES}.
    """
    if ack not in ACK_MODES:
        raise ValueError(
            f"{what}: ack must be one of {', '.join(map(repr, ACK_MODES))}, not {ack!r}"
        )


class UserCommand(amp.Command):
    """
    An AMP command routed to the store of the user named by its C{user}
    argument.

    Subclasses declare C{arguments}, C{response} and C{errors} as for any
    L{amp.Command}; the routing argument C{(b"user", amp.Unicode())} is added
    to C{arguments} and L{fractal.protocol.FRAMEWORK_ERRORS} to the errors, so
    clients receive the framework's errors as typed exceptions.

    @cvar ack: L{None} to use the application's acknowledgement mode, or
        C{"local"} or C{"durable"} to override it for this command.
    """

    arguments = [(USER_ARGUMENT, amp.Unicode())]  # type: ignore[no-untyped-call]
    errors = dict(FRAMEWORK_ERRORS)
    ack: Ack | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Runs inside amp's command metaclass, before it collects the errors,
        # so the framework errors declared above reach allErrors and
        # reverseErrors of every subclass.
        super().__init_subclass__(**kwargs)
        if cls.ack is not None:
            _checkAck(cls.ack, f"command {cls.__name__}")
        if "arguments" in cls.__dict__:
            arguments = list(cls.arguments)
            for name, _ in arguments:
                if name == USER_ARGUMENT:
                    raise TypeError(
                        f"command {cls.__name__}: the argument {USER_ARGUMENT!r} is "
                        "reserved for the user key, which UserCommand adds itself"
                    )
            cls.arguments = [(USER_ARGUMENT, amp.Unicode())] + arguments  # type: ignore[no-untyped-call]

    @classmethod
    def responder(cls, methodfunc: _T) -> _T:
        """
        Declare a method of a powerup L{Item} class as the responder for this
        command.  This only marks the function; L{Application} finds it.

        Unlike L{amp.Command.responder}, this does not register anything with
        L{amp.CommandLocator}, so a user command can never become callable on a
        plain AMP protocol by accident.

        @param methodfunc: a function taking the command's arguments, except
            C{user}, as keywords and returning a C{dict} matching its
            C{response} (or a L{Deferred} firing with one).
        @return: C{methodfunc}.
        """
        commands = getattr(methodfunc, _RESPONDS_TO, ())
        setattr(methodfunc, _RESPONDS_TO, commands + (cls,))
        return methodfunc


@frozen
class Responder:
    """
    Where one command of an application is answered.

    @ivar command: the command.
    @ivar powerup: the powerup class whose method answers it.
    @ivar methodName: the name of that method.
    @ivar ack: the effective acknowledgement mode of the command.
    """

    command: type[UserCommand]
    powerup: type[Item]
    methodName: str
    ack: Ack


class Application:
    """
    A fractal application: its powerups and the commands they answer.

    @ivar name: the application's name, for logs and consoles.
    @ivar powerups: the powerup classes installed in every user store.
    @ivar ack: the default acknowledgement mode.
    @ivar pageSize: the SQLite page size of the user stores it creates.
    @ivar responders: for each command name, its L{Responder}.
    """

    def __init__(
        self,
        name: str,
        powerups: Iterable[type[Item]],
        ack: Ack = "local",
        commands: Iterable[type[UserCommand]] | None = None,
        pageSize: int | None = None,
    ) -> None:
        """
        @param name: the application's name.
        @param powerups: the powerup L{Item} classes, each installed once in
            every user store.
        @param ack: the default acknowledgement mode, C{"local"} or
            C{"durable"}.
        @param commands: if given, the commands the application promises to
            answer: each must have exactly one responder, and no other command
            may have one.
        @param pageSize: the SQLite page size of new user stores;
            L{fractal.store.store.DEFAULT_PAGE_SIZE} (1 KiB) if not given,
            which suits small items.  Stores that exist keep theirs.
        @raise ValueError: if C{ack} or a command's C{ack} is unknown, a
            command has several responders, a promised command has none, or
            C{pageSize} is not a power of two from 512 to 65536.
        @raise TypeError: if a powerup is not an L{Item} class.
        """
        from fractal.store import Item
        from fractal.store.store import DEFAULT_PAGE_SIZE, _checkPageSize

        _checkAck(ack, f"application {name!r}")
        if pageSize is None:
            pageSize = DEFAULT_PAGE_SIZE
        _checkPageSize(pageSize)
        self.name = name
        self.ack: Ack = ack
        self.pageSize = pageSize
        self.powerups: tuple[type[Item], ...] = tuple(powerups)
        seen: set[type[Item]] = set()
        for powerup in self.powerups:
            if not (isinstance(powerup, type) and issubclass(powerup, Item)):
                raise TypeError(
                    f"application {name!r}: powerup {powerup!r} is not an Item class"
                )
            if powerup in seen:
                raise ValueError(f"application {name!r}: powerup {powerup.__name__} is listed twice")
            seen.add(powerup)
        responders: dict[bytes, Responder] = {}
        for powerup in self.powerups:
            for methodName, command in _markedMethods(powerup):
                if command.ack is not None:
                    _checkAck(command.ack, f"command {command.__name__}")
                responder = Responder(
                    command, powerup, methodName, command.ack or ack
                )
                previous = responders.get(command.commandName)
                if previous is not None:
                    raise ValueError(
                        f"application {name!r}: command {command.__name__} has two "
                        f"responders, {_describe(previous)} and {_describe(responder)}"
                    )
                responders[command.commandName] = responder
        if commands is not None:
            promised = {command.commandName: command for command in commands}
            for commandName, command in promised.items():
                if commandName not in responders:
                    raise ValueError(
                        f"application {name!r}: command {command.__name__} has no "
                        "responder on any of its powerups"
                    )
            for commandName, responder in responders.items():
                if commandName not in promised:
                    raise ValueError(
                        f"application {name!r}: {_describe(responder)} answers "
                        f"{responder.command.__name__}, which is not among its commands"
                    )
        self.responders: Mapping[bytes, Responder] = responders

    def __repr__(self) -> str:
        return f"<Application {self.name!r} ack={self.ack!r} commands={len(self.responders)}>"

    @property
    def requiresDurable(self) -> bool:
        """
        Whether any command is acknowledged only once durable, so a node
        running this application needs a durable shipper.
        """
        return any(r.ack == "durable" for r in self.responders.values())

    def installOn(self, store: Store) -> Mapping[bytes, Callable[..., Any]]:
        """
        Make sure every powerup of the application is installed in C{store},
        installing the missing ones in one transaction, and return the bound
        responder for each command.

        A missing powerup is installed as Axiom's C{installOn} does
        (L{fractal.store.dependency.installOn}): its C{dependsOn} requirements
        are installed too, the store is powered up with it for the interfaces
        its class declares (so C{store.powerupsFor} finds it), and its
        C{installed()} hook runs.

        @param store: a user store.
        @return: for each command name, the responder method bound to the
            store's powerup instance.
        """
        found = {powerup: store.findFirst(powerup) for powerup in self.powerups}
        if None in found.values():
            from fractal.store.dependency import installOn

            def install() -> None:
                for powerup, instance in found.items():
                    if instance is None:
                        instance = found[powerup] = store.findFirst(powerup)
                    if instance is None:
                        instance = found[powerup] = powerup(store=store)
                        installOn(instance, store)

            store.transact(install)
        return {
            commandName: getattr(found[responder.powerup], responder.methodName)
            for commandName, responder in self.responders.items()
        }


def _markedMethods(powerup: type) -> Iterable[tuple[str, type[UserCommand]]]:
    """
    The methods of C{powerup} marked by L{UserCommand.responder}, with the
    commands they answer.  A name defined in a subclass hides the same name in
    its bases.
    """
    names: dict[str, object] = {}
    for klass in reversed(powerup.__mro__):
        names.update(vars(klass))
    for methodName, value in sorted(names.items()):
        for command in getattr(value, _RESPONDS_TO, ()):
            yield methodName, command


def _describe(responder: Responder) -> str:
    """
    A responder's qualified method name, for error messages.
    """
    return f"{responder.powerup.__name__}.{responder.methodName}"

"""
Tests for L{fractal.app}: user commands, responders on powerups, and the
application that finds them and installs its powerups in user stores.
"""

from __future__ import annotations

from typing import Any

from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface

from fractal import app
from fractal.protocol import FRAMEWORK_ERRORS, NotOwner
from fractal.store import Item, Store, integer, text
from fractal.store.dependency import dependsOn
from fractal.store.store import DEFAULT_PAGE_SIZE


class NoSuchMessage(Exception):
    """
    A declared error of L{Deliver}.
    """


class Deliver(app.UserCommand):
    arguments = [(b"sender", amp.Unicode()), (b"body", amp.Unicode())]
    response = [(b"messageID", amp.Integer())]
    errors = {NoSuchMessage: b"NO_SUCH_MESSAGE"}


class Count(app.UserCommand):
    response = [(b"count", amp.Integer())]


class Sync(app.UserCommand):
    ack = "durable"


class IGreeter(Interface):
    """
    An interface a powerup declares in C{powerupInterfaces}.
    """


class AppTestMessage(Item):
    typeName = "test_app_message"
    sender = text()
    body = text()


class AppTestMailbox(Item):
    typeName = "test_app_mailbox"
    delivered = integer(default=0)

    @Deliver.responder
    def deliver(self, sender: str, body: str) -> dict[str, Any]:
        message = AppTestMessage(store=self.store, sender=sender, body=body)
        self.delivered += 1
        return {"messageID": message.storeID}

    @Count.responder
    def count(self) -> dict[str, Any]:
        return {"count": self.delivered}


class AppTestSyncer(Item):
    typeName = "test_app_syncer"
    powerupInterfaces = (IGreeter,)
    synced = integer(default=0)

    @Sync.responder
    def sync(self) -> dict[str, Any]:
        return {}


class AppTestSettings(Item):
    typeName = "test_app_settings"
    installedCount = integer(default=0)

    def installed(self) -> None:
        self.installedCount += 1


class AppTestNeedy(Item):
    typeName = "test_app_needy"
    settings = dependsOn(AppTestSettings)

    @Count.responder
    def count(self) -> dict[str, Any]:
        return {"count": self.settings.installedCount}


class AppTestRival(Item):
    typeName = "test_app_rival"
    unused = integer(default=0)

    @Deliver.responder
    def deliverToo(self, sender: str, body: str) -> dict[str, Any]:
        return {"messageID": 0}


class UserCommandTests(SynchronousTestCase):
    """
    Tests for L{app.UserCommand}.
    """

    def test_userArgumentAdded(self) -> None:
        """
        A user command's arguments start with the user key, C{b"user"}, as
        AMP Unicode, followed by the arguments it declares.
        """
        names = [name for name, _ in Deliver.arguments]
        self.assertEqual(names, [b"user", b"sender", b"body"])
        self.assertIsInstance(Deliver.arguments[0][1], amp.Unicode)
        self.assertEqual([name for name, _ in Count.arguments], [b"user"])

    def test_subclassHasOneUserArgument(self) -> None:
        """
        A subclass of a user command that does not redeclare its arguments
        inherits them, with the user key once.
        """

        class LoudDeliver(Deliver):
            pass

        self.assertEqual(LoudDeliver.arguments, Deliver.arguments)
        self.assertEqual(LoudDeliver.commandName, b"LoudDeliver")

    def test_userArgumentReserved(self) -> None:
        """
        Declaring an argument named C{user} is refused: it is the routing key.
        """
        with self.assertRaises(TypeError) as e:

            class Bad(app.UserCommand):
                arguments = [(b"user", amp.Unicode())]

        self.assertIn("reserved", str(e.exception))

    def test_frameworkErrorsDeclared(self) -> None:
        """
        Every framework error is declared on every user command, next to the
        command's own errors, so clients receive them as typed exceptions.
        """
        for error, code in FRAMEWORK_ERRORS.items():
            self.assertEqual(Deliver.allErrors[error], code)
            self.assertIs(Deliver.reverseErrors[code], error)
            self.assertIs(Count.reverseErrors[code], error)
        self.assertIs(Deliver.reverseErrors[b"NO_SUCH_MESSAGE"], NoSuchMessage)
        self.assertNotIn(b"NO_SUCH_MESSAGE", Count.reverseErrors)

    def test_badAck(self) -> None:
        """
        A command with an unknown C{ack} is refused when it is defined.
        """
        with self.assertRaises(ValueError) as e:

            class Bad(app.UserCommand):
                ack = "eventually"  # type: ignore[assignment]

        self.assertIn("'eventually'", str(e.exception))

    def test_responderMarksOnly(self) -> None:
        """
        L{app.UserCommand.responder} returns the function itself, unchanged in
        behaviour.
        """

        def f(self: object) -> dict[str, Any]:
            return {"count": 3}

        self.assertIs(Count.responder(f), f)
        self.assertEqual(f(None), {"count": 3})

    def test_responderDoesNotLeakIntoLocators(self) -> None:
        """
        Declaring a user command responder registers nothing with AMP's
        L{amp.CommandLocator}: a locator class defined next does not answer
        the user command.
        """
        before = list(amp.CommandLocator._currentClassCommands)

        class Powerup:
            @Count.responder
            def count(self) -> dict[str, Any]:
                return {"count": 1}

        self.assertEqual(amp.CommandLocator._currentClassCommands, before)

        class Locator(amp.CommandLocator):
            pass

        self.assertIsNone(Locator().locateResponder(b"Count"))

    def test_notOwnerCarriesOwner(self) -> None:
        """
        L{NotOwner}, built from its wire description as an AMP client builds
        it, names the owner.
        """
        self.assertEqual(NotOwner("n2").owner, "n2")
        self.assertEqual(str(NotOwner("n2")), "n2")


class ApplicationTests(SynchronousTestCase):
    """
    Tests for L{app.Application}.
    """

    def test_responders(self) -> None:
        """
        The application finds, for each command, the powerup and method that
        answer it, with the application's acknowledgement mode by default and
        the command's own where it sets one.
        """
        application = app.Application(
            "mail", powerups=[AppTestMailbox, AppTestSyncer], ack="local"
        )
        self.assertEqual(
            application.responders[b"Deliver"],
            app.Responder(Deliver, AppTestMailbox, "deliver", "local"),
        )
        self.assertEqual(application.responders[b"Count"].methodName, "count")
        self.assertEqual(application.responders[b"Sync"].ack, "durable")
        self.assertTrue(application.requiresDurable)
        self.assertFalse(app.Application("mail", powerups=[AppTestMailbox]).requiresDurable)
        self.assertEqual(
            app.Application("mail", powerups=[AppTestMailbox], ack="durable")
            .responders[b"Count"]
            .ack,
            "durable",
        )

    def test_pageSize(self) -> None:
        """
        An application's user stores get L{DEFAULT_PAGE_SIZE}-byte pages
        unless it names another size; a size SQLite does not support is
        refused when the application is defined.
        """
        self.assertEqual(
            app.Application("mail", powerups=[AppTestMailbox]).pageSize, DEFAULT_PAGE_SIZE
        )
        self.assertEqual(
            app.Application("mail", powerups=[AppTestMailbox], pageSize=4096).pageSize, 4096
        )
        with self.assertRaises(ValueError) as e:
            app.Application("mail", powerups=[AppTestMailbox], pageSize=3000)
        self.assertIn("3000", str(e.exception))

    def test_duplicateResponders(self) -> None:
        """
        Two responders for one command are refused, naming both.
        """
        with self.assertRaises(ValueError) as e:
            app.Application("mail", powerups=[AppTestMailbox, AppTestRival])
        message = str(e.exception)
        self.assertIn("Deliver", message)
        self.assertIn("AppTestMailbox.deliver", message)
        self.assertIn("AppTestRival.deliverToo", message)

    def test_commandWithoutResponder(self) -> None:
        """
        A command the application promises to answer, with no responder on any
        powerup, is refused.
        """
        with self.assertRaises(ValueError) as e:
            app.Application("mail", powerups=[AppTestMailbox], commands=[Deliver, Count, Sync])
        self.assertIn("Sync has no responder", str(e.exception))
        application = app.Application(
            "mail", powerups=[AppTestMailbox], commands=[Deliver, Count]
        )
        self.assertEqual(set(application.responders), {b"Deliver", b"Count"})

    def test_responderForUnpromisedCommand(self) -> None:
        """
        With a list of commands, a responder for a command not in it is
        refused.
        """
        with self.assertRaises(ValueError) as e:
            app.Application("mail", powerups=[AppTestMailbox], commands=[Deliver])
        self.assertIn("Count", str(e.exception))

    def test_badAck(self) -> None:
        """
        An unknown acknowledgement mode is refused.
        """
        with self.assertRaises(ValueError) as e:
            app.Application("mail", powerups=[AppTestMailbox], ack="soon")  # type: ignore[arg-type]
        self.assertIn("'soon'", str(e.exception))

    def test_powerupMustBeItem(self) -> None:
        """
        A powerup that is not an L{Item} class is refused, and so is one
        listed twice.
        """
        self.assertRaises(TypeError, app.Application, "x", powerups=[object])
        self.assertRaises(TypeError, app.Application, "x", powerups=[AppTestMailbox()])
        self.assertRaises(
            ValueError, app.Application, "x", powerups=[AppTestMailbox, AppTestMailbox]
        )

    def test_installOnNewStore(self) -> None:
        """
        L{app.Application.installOn} creates one instance of every powerup in
        a new store and returns each command's responder bound to it.
        """
        application = app.Application("mail", powerups=[AppTestMailbox, AppTestSyncer])
        store = Store()
        bound = application.installOn(store)
        mailbox = store.findUnique(AppTestMailbox)
        self.assertEqual(store.query(AppTestSyncer).count(), 1)
        self.assertEqual(bound[b"Deliver"].__self__, mailbox)
        result = store.transact(bound[b"Deliver"], sender="a", body="b")
        self.assertEqual(store.getItemByID(result["messageID"]).body, "b")
        self.assertEqual(mailbox.delivered, 1)

    def test_installOnIsIdempotent(self) -> None:
        """
        Installing on a store that has the powerups already creates nothing
        and binds to the existing instances.
        """
        application = app.Application("mail", powerups=[AppTestMailbox])
        store = Store()
        first = application.installOn(store)
        second = application.installOn(store)
        self.assertEqual(store.query(AppTestMailbox).count(), 1)
        self.assertEqual(first[b"Count"].__self__, second[b"Count"].__self__)

    def test_installAddsMissingPowerups(self) -> None:
        """
        A store made by an older version of an application gets the powerups
        added since, and keeps the ones it had.
        """
        store = Store()
        app.Application("mail", powerups=[AppTestMailbox]).installOn(store)
        mailbox = store.findUnique(AppTestMailbox)
        app.Application("mail", powerups=[AppTestMailbox, AppTestSyncer]).installOn(store)
        self.assertEqual(store.findUnique(AppTestMailbox), mailbox)
        self.assertEqual(store.query(AppTestSyncer).count(), 1)

    def test_installLikeAxiom(self) -> None:
        """
        A missing powerup is installed as Axiom's C{installOn} does: its
        C{installed()} hook runs once, and its C{dependsOn} requirements are
        installed with it and reused when they are powerups of the
        application too.
        """
        store = Store()
        application = app.Application("needy", powerups=[AppTestNeedy, AppTestSettings])
        bound = application.installOn(store)
        self.assertEqual(store.query(AppTestSettings).count(), 1)
        settings = store.findUnique(AppTestSettings)
        self.assertEqual(settings.installedCount, 1)
        self.assertIs(store.findUnique(AppTestNeedy).settings, settings)
        self.assertEqual(store.transact(bound[b"Count"]), {"count": 1})
        application.installOn(store)
        self.assertEqual(settings.installedCount, 1)

    def test_installPowersUpDeclaredInterfaces(self) -> None:
        """
        A powerup declaring C{powerupInterfaces} is powered up on the store for
        them.
        """
        store = Store()
        app.Application("sync", powerups=[AppTestSyncer]).installOn(store)
        self.assertEqual(
            list(store.powerupsFor(IGreeter)), [store.findUnique(AppTestSyncer)]
        )

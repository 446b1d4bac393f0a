# -*- test-case-name: tests.test_cli -*-
"""
The C{fractal} command: operator tools that are not the node itself.

The node is run with C{twistd fractal}; this command gathers the offline tools
around it (certificates, restore, verification, database set-up).  Each tool is
a subcommand whose L{usage.Options} subclass lives in its own subsystem's
module and is imported only when it is used, so C{fractal --help} stays cheap.
A subcommand's options object has a C{run()} method returning the exit status.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from twisted.python import usage
from twisted.python.reflect import namedAny

import fractal

__all__ = ["SUBCOMMANDS", "CommandOptions", "FractalOptions", "main"]

SUBCOMMANDS: list[tuple[str, str, str]] = [
    # (name, "module.OptionsClass", one-line description)
    ("certs", "fractal.certs.CertsOptions", "Create a cluster CA and node certificates."),
    (
        "dev-cluster",
        "fractal.routing.devcluster.DevClusterOptions",
        "Write (and run) a local development cluster of N nodes.",
    ),
    ("db", "fractal.postgres.schema.DbOptions", "Create or upgrade a cluster's PostgreSQL tables."),
    ("restore", "fractal.durable.tool.RestoreOptions", "Restore one user's store from durable storage."),
    ("verify", "fractal.durable.tool.VerifyOptions", "Check that every chain in a durable backend restores."),
]
"""
The subcommands of C{fractal}, each as its name, the fully qualified name of
its options class, and a one-line description for C{--help}.
"""


def _lazyOptions(name: str, qualifiedName: str) -> Callable[[], usage.Options]:
    """
    An options factory that imports C{qualifiedName} only when called.

    Twisted shows a subcommand's synopsis after the command's own and the
    subcommand's name, so a synopsis written in full (C{"Usage: fractal
    restore ..."}) would say it twice: that prefix is dropped.  A subcommand
    without a C{longdesc} gets an empty one rather than the docstring of
    whatever C{__main__} is.

    @param name: the subcommand's name.
    @param qualifiedName: the fully qualified name of its options class.
    """

    def build() -> usage.Options:
        options: usage.Options = namedAny(qualifiedName)()  # type: ignore[no-untyped-call]
        synopsis = getattr(options, "synopsis", None)
        prefix = f"Usage: fractal {name}"
        if isinstance(synopsis, str) and synopsis.startswith(prefix):
            setattr(options, "synopsis", synopsis[len(prefix) :].lstrip())
        if getattr(options, "longdesc", None) is None:
            setattr(options, "longdesc", "")
        return options

    return build


class CommandOptions(usage.Options):
    """
    The options of C{fractal} or of one of its subcommands that has
    subcommands of its own (C{fractal db}).

    Twisted builds a subcommand's synopsis as its parent's synopsis, the
    subcommand's name, then the subcommand's own synopsis; so once a
    subcommand is chosen, the synopsis of a command with subcommands is only
    its path (C{"Usage: fractal db"}), or each level's synopsis would be said
    again.
    """

    longdesc = ""

    def getSynopsis(self) -> str:
        """
        The synopsis: this command's path alone once a subcommand is chosen,
        its full synopsis otherwise.
        """
        if self.subCommand is None:
            synopsis: str = super().getSynopsis()
            return synopsis
        if self.parent is None:
            return "Usage: fractal"
        return f"{self.parent.getSynopsis()} {self.parent.subCommand}"


class FractalOptions(CommandOptions):
    """
    The top-level options of the C{fractal} command.
    """

    synopsis = "Usage: fractal [--version] COMMAND [options]"
    subCommands = [
        (name, None, _lazyOptions(name, qualifiedName), description)
        for (name, qualifiedName, description) in SUBCOMMANDS
    ]

    def opt_version(self) -> None:
        """
        Print the txfractal version and exit.
        """
        print(f"txfractal {fractal.__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("a command is required; see --help")


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the C{fractal} command.

    @param argv: the arguments, without the program name; C{sys.argv[1:]} by
        default.
    @return: the exit status.
    """
    options = FractalOptions()  # type: ignore[no-untyped-call]
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))  # type: ignore[no-untyped-call]
    except usage.UsageError as e:
        # The usage of the (sub)command the error is about, once.  An options
        # object is a dict, false when no option is set: test for None.
        shown: usage.Options = options
        command = ["fractal"]
        while getattr(shown, "subOptions", None) is not None:
            command.append(str(shown.subCommand))
            shown = shown.subOptions
        print(f"{shown}\n{' '.join(command)}: {e}", file=sys.stderr)
        return 2
    status: int = options.subOptions.run()
    return status


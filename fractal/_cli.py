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

__all__ = ["SUBCOMMANDS", "FractalOptions", "main"]

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


def _lazyOptions(qualifiedName: str) -> Callable[[], usage.Options]:
    """
    An options factory that imports C{qualifiedName} only when called.
    """

    def build() -> usage.Options:
        options: usage.Options = namedAny(qualifiedName)()  # type: ignore[no-untyped-call]
        return options

    return build


class FractalOptions(usage.Options):
    """
    The top-level options of the C{fractal} command.
    """

    synopsis = "Usage: fractal [--version] COMMAND [options]"
    subCommands = [
        (name, None, _lazyOptions(qualifiedName), description)
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
        print(f"{options}\nfractal: {e}", file=sys.stderr)
        return 2
    status: int = options.subOptions.run()
    return status


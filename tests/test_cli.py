"""
Tests for L{fractal._cli}, the C{fractal} command.
"""

from __future__ import annotations

import io
import sys

from twisted.trial.unittest import SynchronousTestCase

import fractal
from fractal._cli import SUBCOMMANDS, FractalOptions, main


class MainTests(SynchronousTestCase):
    """
    Tests for L{main}.
    """

    def setUp(self) -> None:
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)

    def test_noCommand(self) -> None:
        """
        Without a subcommand, C{fractal} prints its usage and exits with
        status 2.
        """
        self.assertEqual(main([]), 2)
        self.assertIn("a command is required", self.stderr.getvalue())

    def test_unknownCommand(self) -> None:
        """
        An unknown subcommand is a usage error.
        """
        self.assertEqual(main(["no-such-command"]), 2)

    def test_version(self) -> None:
        """
        C{fractal --version} prints the version and exits successfully.
        """
        error = self.assertRaises(SystemExit, main, ["--version"])
        self.assertEqual(error.code, 0)
        self.assertEqual(self.stdout.getvalue(), f"txfractal {fractal.__version__}\n")

    def test_subcommandsImportable(self) -> None:
        """
        Every registered subcommand names an importable options class with a
        C{run} method, and shows in C{--help}.
        """
        helpText = str(FractalOptions())
        for name, qualifiedName, description in SUBCOMMANDS:
            options = dict((c[0], c[2]) for c in FractalOptions.subCommands)[name]()
            self.assertTrue(callable(getattr(options, "run", None)), qualifiedName)
            self.assertIn(name, helpText)

    def test_subcommandErrorUsageOnce(self) -> None:
        """
        A usage error in C{fractal restore} or C{fractal verify} prints that
        subcommand's usage once, starting with its own synopsis, then the
        error, and exits with status 2.
        """
        for argv, synopsis in [
            (["restore"], "Usage: fractal restore [--data DIR] [--durable DIR] USER --to PATH"),
            (["verify", "extra"], "Usage: fractal verify [--data DIR] [--durable DIR]"),
            (["verify", "--no-such-option"], "Usage: fractal verify [--data DIR] [--durable DIR]"),
        ]:
            self.stderr.seek(0)
            self.stderr.truncate()
            self.assertEqual(main(argv), 2)
            output = self.stderr.getvalue()
            self.assertEqual(output.count("Usage:"), 1, output)
            self.assertEqual(output.splitlines()[0], synopsis)
            self.assertIn(f"\nfractal {argv[0]}: ", output)

    def test_subcommandHelpUsageOnce(self) -> None:
        """
        C{fractal SUBCOMMAND --help} shows C{Usage: fractal SUBCOMMAND} once,
        for every subcommand, and not the top-level synopsis.
        """
        for name, _, _ in SUBCOMMANDS:
            self.stdout.seek(0)
            self.stdout.truncate()
            error = self.assertRaises(SystemExit, main, [name, "--help"])
            self.assertEqual(error.code, 0)
            output = self.stdout.getvalue()
            self.assertEqual(output.count("Usage:"), 1, output)
            self.assertTrue(output.startswith(f"Usage: fractal {name} "), output)
            self.assertNotIn("COMMAND", output.splitlines()[0])

    def test_topLevelUsageUnchanged(self) -> None:
        """
        Without a subcommand, the usage is the command's own.
        """
        self.assertEqual(main([]), 2)
        self.assertTrue(
            self.stderr.getvalue().startswith("Usage: fractal [--version] COMMAND [options]\n")
        )

    def test_nestedSubcommandUsageOnce(self) -> None:
        """
        C{fractal db init --help} shows C{Usage: fractal db init} and its
        synopsis once, with its own description rather than the docstring of
        C{__main__}; a usage error in C{fractal db init}, or in C{fractal db}
        without its command, shows the usage of the command it is about, once,
        then the error named by that command's path.
        """
        synopsis = "Usage: fractal db init --postgres DSN [--schema NAME]"
        error = self.assertRaises(SystemExit, main, ["db", "init", "--help"])
        self.assertEqual(error.code, 0)
        output = self.stdout.getvalue()
        self.assertEqual(output.count("Usage:"), 1, output)
        self.assertEqual(output.splitlines()[0], synopsis)
        self.assertIn("--postgres=", output)
        self.assertNotIn("C{", output)
        for argv, expected, message in [
            (["db", "init"], "--postgres=", "\nfractal db init: --postgres DSN is required"),
            (["db"], "init ", "\nfractal db: a command is required"),
        ]:
            self.stderr.seek(0)
            self.stderr.truncate()
            self.assertEqual(main(argv), 2)
            output = self.stderr.getvalue()
            self.assertEqual(output.count("Usage:"), 1, output)
            self.assertEqual(output.splitlines()[0], synopsis)
            self.assertIn(expected, output)
            self.assertIn(message, output)

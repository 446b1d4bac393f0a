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

# -*- test-case-name: tests.test_tap -*-
"""
The C{fractal} plugin for twistd: C{twistd -n fractal --app module:attribute}.

This directory must not have an C{__init__.py}: it is a part of Twisted's own
C{twisted.plugins} package, found by Twisted's plugin search along
C{sys.path}.  The options and the service live in L{fractal.tap}, which is
imported only when the plugin is used, so C{twistd --help} stays cheap.
"""

from twisted.application.service import ServiceMaker

fractalNode = ServiceMaker(
    "txfractal node",
    "fractal.tap",
    "Run a txfractal node: per-user SQLite stores served over AMP.",
    "fractal",
)

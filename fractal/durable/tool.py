# -*- test-case-name: tests.test_durable_tool -*-
"""
C{fractal restore} and C{fractal verify}: offline tools over a node's durable
backend.

Both work on the filesystem backend of a node's data directory
(C{DATA/durable}, the default of C{twistd fractal}), or on the one named by
C{--durable}.  They run in the calling thread, without a reactor.
"""

from __future__ import annotations

import getopt
import sys
from datetime import datetime, timezone
from typing import Any, Sequence, TextIO, TypeVar

from twisted.internet.defer import Deferred
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from fractal.durable._threads import runSynchronously
from fractal.durable.filesystem import FilesystemBackend
from fractal.durable.interfaces import DurableError
from fractal.durable.restore import RebuiltImage, rebuildFromBackend
from fractal.keys import InvalidUserKey, storeNameForKey

__all__ = ["RestoreOptions", "VerifyOptions", "durableDirectory"]

T = TypeVar("T")


def durableDirectory(data: str, durable: str | None) -> FilePath[str]:
    """
    The directory of a node's filesystem backend: C{durable} if given, else
    C{data/durable}.
    """
    return FilePath(durable) if durable else FilePath(data).child("durable")


def _result(d: Deferred[T]) -> T:
    """
    The result of a Deferred that has fired (everything here runs
    synchronously); raises its failure's exception.
    """
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError("a synchronous operation did not finish")
    if isinstance(results[0], Failure):
        results[0].raiseException()
    value: T = results[0]
    return value


def _when(takenAt: float) -> str:
    """
    A record's image time, in UTC, for people.
    """
    return datetime.fromtimestamp(takenAt, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class _BackendOptions(usage.Options):
    optParameters = [
        ["data", None, "./fractal-data", "The node's data directory."],
        [
            "durable",
            None,
            None,
            "The filesystem backend's directory (default: DATA/durable).",
        ],
    ]

    @property
    def out(self) -> TextIO:
        return sys.stdout

    @property
    def err(self) -> TextIO:
        return sys.stderr

    def backend(self) -> FilesystemBackend:
        return FilesystemBackend(
            durableDirectory(self["data"], self["durable"]), runSynchronously
        )


class RestoreOptions(_BackendOptions):
    """
    C{fractal restore --data DIR USER --to PATH}: restore one user's store
    from durable storage into a new directory, for inspection.
    """

    synopsis = "Usage: fractal restore [--data DIR] [--durable DIR] USER --to PATH"
    optParameters = [
        ["to", None, None, "The directory to restore into (PATH/db.sqlite); must not exist."],
    ]

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Parse like L{usage.Options}, but allow options after the user key, as
        in C{fractal restore --data DIR USER --to PATH}.
        """
        if options is None:
            options = sys.argv[1:]
        try:
            found, arguments = getopt.gnu_getopt(list(options), self.shortOpt, self.longOpt)
        except getopt.error as e:
            raise usage.UsageError(str(e)) from None
        ordered: list[str] = []
        for option, value in found:
            if option.startswith("--") and option[2:] + "=" in self.longOpt:
                ordered.append(f"{option}={value}")
            else:
                ordered.append(option + value)
        super().parseOptions(ordered + ["--"] + arguments)  # type: ignore[no-untyped-call]

    def parseArgs(self, user: str) -> None:  # type: ignore[override]
        try:
            self["user"] = user
            self["store"] = storeNameForKey(user)
        except InvalidUserKey as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self) -> None:
        if not self["to"]:
            raise usage.UsageError("--to PATH is required")
        if FilePath(self["to"]).exists():
            raise usage.UsageError(f"--to {self['to']!r} already exists; give a new path")

    def run(self) -> int:
        """
        Restore, and print where the store went and its chain position.

        @return: 0 when restored, 1 when there is no durable copy or the
            chain is broken.
        """
        destination = FilePath(self["to"])
        try:
            rebuilt = _result(
                rebuildFromBackend(self.backend(), self["store"], runSynchronously, destination)
            )
        except (DurableError, OSError) as e:
            print(f"fractal restore: {e}", file=self.err)
            return 1
        if rebuilt is None:
            print(
                f"fractal restore: no durable copy of user {self['user']!r} "
                f"(store {self['store']})",
                file=self.err,
            )
            return 1
        print(
            f"restored user {self['user']!r} (store {self['store']}) at record "
            f"{rebuilt.head.seq}, epoch {rebuilt.head.epoch}, {len(rebuilt.image)} bytes, "
            f"image taken {_when(rebuilt.takenAt)}, to {destination.child('db.sqlite').path}",
            file=self.out,
        )
        return 0


class VerifyOptions(_BackendOptions):
    """
    C{fractal verify}: check every segment of a backend in full, and that
    every chain in it restores exactly.
    """

    synopsis = "Usage: fractal verify [--data DIR] [--durable DIR]"

    def run(self) -> int:
        """
        Check every segment (all CRCs) and print one line per segment and
        one per problem in it; then rebuild every store's chain in memory,
        and print one line per store.

        A torn tail (an unfinished batch at the end of a segment, which its
        own framing shows incomplete: never acknowledged, the expected
        leftover of a crash) is reported but is no failure.

        @return: 0 when every chain is sound and no segment holds damage
            (or what may be damage) to acknowledged data, 1 otherwise.
        """
        backend = self.backend()
        try:
            damaged = self._segments(backend)
        except OSError as e:
            print(f"fractal verify: cannot read the segments: {e.strerror}", file=self.err)
            return 1
        broken = 0
        stores = _result(backend.stores())
        for store in stores:
            try:
                rebuilt: RebuiltImage | None = _result(
                    rebuildFromBackend(backend, store, runSynchronously)
                )
            except (DurableError, OSError) as e:
                broken += 1
                print(f"BROKEN {store}: {e}", file=self.out)
                continue
            if rebuilt is None:
                print(f"empty  {store}: fenced, no records", file=self.out)
                continue
            print(
                f"ok     {store}: record {rebuilt.head.seq}, epoch {rebuilt.head.epoch}, "
                f"{rebuilt.chainLength} deltas after the snapshot, {len(rebuilt.image)} bytes, "
                f"image taken {_when(rebuilt.takenAt)}",
                file=self.out,
            )
        print(f"{len(stores)} stores, {broken} broken", file=self.out)
        return 1 if broken or damaged else 0

    def _segments(self, backend: FilesystemBackend) -> int:
        """
        Check and report every segment.

        @return: how many segments hold damage to acknowledged data.
        """
        reports = _result(backend.inspect())
        torn = damaged = 0
        for report in reports:
            where = f"segment {report.name}"
            held = ", held by a running writer" if report.held else ""
            status = "DAMAGED" if report.damaged else "torn   " if report.problems else "ok     "
            print(
                f"{status} {where}: {report.size} bytes, "
                f"{report.batches} intact batches, {report.entries} entries{held}",
                file=self.out,
            )
            fate = (
                "kept, since the segment holds damage"
                if report.damaged
                else "a writer's next compaction cuts it off"
            )
            for problem in report.problems:
                span = f"{problem.length} bytes at byte {problem.offset}"
                if problem.torn:
                    print(
                        f"  torn tail: {span}: {problem.reason}; an unacknowledged "
                        f"batch cut short by a crash (expected after a crash, nothing "
                        f"acknowledged is lost; {fate})",
                        file=self.out,
                    )
                else:
                    print(
                        f"  DAMAGED: {span}: {problem.reason}; damage inside "
                        f"acknowledged data (its records may be unreadable: see the "
                        f"chains below)",
                        file=self.out,
                    )
                    if problem.following:
                        print(
                            f"  readable: {problem.following} intact batches after it, "
                            f"from byte {problem.offset + problem.length}; readers "
                            f"go on there and serve their records",
                            file=self.out,
                        )
            if report.damaged and report.affected:
                shown = ", ".join(report.affected[:8])
                more = len(report.affected) - 8
                print(
                    f"  stores with entries in or after the damage ({len(report.affected)}): "
                    f"{shown}{f' and {more} more' if more > 0 else ''}",
                    file=self.out,
                )
            if report.damaged:
                damaged += 1
            elif report.tornTail is not None:
                torn += 1
        print(
            f"{len(reports)} segments, {torn} with a torn tail (expected after a crash), "
            f"{damaged} damaged",
            file=self.out,
        )
        return damaged

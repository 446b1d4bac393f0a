# -*- test-case-name: tests.test_routing_devcluster -*-
# mypy: disable-error-code="no-untyped-call"
"""
C{fractal dev-cluster}: a local development cluster of N nodes on loopback,
from one generated configuration file.

    fractal dev-cluster -n 3 --dir devcluster --run

writes C{devcluster/cluster.toml} (nodes C{n1} ... C{nN}, clients on ports
C{--port}, C{--port}+1, ..., peers 100 higher, data in C{devcluster/nI}),
prints the C{twistd} command of each node and, with C{--run}, runs them all
until interrupted (Ctrl-C or SIGTERM stops every node gracefully).  With
C{--tls} it also makes a cluster CA and node certificates (C{fractal certs})
and the nodes talk mutual TLS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable

from twisted.python import usage
from twisted.python.filepath import FilePath

from fractal.certs import CertsOptions

__all__ = ["DevClusterOptions", "clusterConfig", "twistdCommand"]


def _tomlString(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def clusterConfig(
    app: str,
    directory: FilePath[str],
    count: int,
    port: int,
    certs: FilePath[str] | None = None,
) -> str:
    """
    The text of a cluster configuration of C{count} nodes on loopback.

    @param app: the application, C{module:attribute}.
    @param directory: where each node's data directory goes.
    @param count: the number of nodes.
    @param port: the first node's client port; node C{i} (from 0) uses
        C{port + i} for clients and C{port + 100 + i} for peers.
    @param certs: the certificate directory, for mutual TLS between nodes.
    """
    lines = [
        "# A local development cluster, written by 'fractal dev-cluster'.",
        f"app = {_tomlString(app)}",
    ]
    if certs is not None:
        lines.append(f"certs = {_tomlString(certs.path)}")
    for index in range(count):
        nodeId = f"n{index + 1}"
        client, peer = port + index, port + 100 + index
        lines += [
            "",
            "[[node]]",
            f"id = {_tomlString(nodeId)}",
            f'listen = "tcp:{client}:interface=127.0.0.1"',
            f'client = "tcp:host=127.0.0.1:port={client}"',
            f'peer = "tcp:host=127.0.0.1:port={peer}"',
            f"data = {_tomlString(directory.child(nodeId).path)}",
        ]
    return "\n".join(lines) + "\n"


def twistdCommand(config: FilePath[str], nodeId: str, directory: FilePath[str]) -> list[str]:
    """
    The command that runs one node of a configuration in the foreground.
    """
    return [
        "twistd",
        "-n",
        "--pidfile",
        directory.child(f"{nodeId}.pid").path,
        "--logfile",
        directory.child(f"{nodeId}.log").path,
        "fractal",
        "--config",
        config.path,
        "--node",
        nodeId,
    ]


def _executable(command: list[str]) -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(script, os.X_OK):
        return [sys.executable, script] + command[1:]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"] + command[1:]


class DevClusterOptions(usage.Options):
    """
    C{fractal dev-cluster}: write a local cluster's configuration, print
    (and optionally run) its nodes' commands.
    """

    synopsis = "[-n N] [--dir DIR] [--app M:A] [--tls] [--run]"
    optParameters = [
        ["nodes", "n", 3, "How many nodes.", int],
        ["dir", "d", "fractal-devcluster", "Where the config, data, logs and certs go."],
        ["app", None, "examples.mailbox:application", "The application, module:attribute."],
        ["port", "p", 7101, "The first node's client port; peers listen 100 higher.", int],
    ]
    optFlags = [
        ["tls", None, "Make a cluster CA and node certificates; peers talk mutual TLS."],
        ["run", None, "Run the nodes until interrupted."],
    ]

    def postOptions(self) -> None:
        if not 1 <= self["nodes"] <= 99:
            raise usage.UsageError("--nodes must be between 1 and 99")
        if not 1 <= self["port"] <= 65535 - 200:
            raise usage.UsageError("--port is out of range")

    def write(self, out: Callable[[str], object] = print) -> list[list[str]]:
        """
        Write the configuration (and certificates) and print the commands.

        @return: the command of each node.
        """
        directory = FilePath(os.path.abspath(self["dir"]))
        directory.makedirs(ignoreExistingDirectory=True)
        ids = [f"n{i + 1}" for i in range(self["nodes"])]
        certs = None
        if self["tls"]:
            certs = directory.child("certs")
            missing = [i for i in ids if not certs.child(i + ".crt").exists()]
            if missing:
                options = CertsOptions()
                options.parseOptions(["--dir", certs.path] + missing)
                if options.run(out=out) != 0:
                    raise usage.UsageError(f"could not create certificates in {certs.path}")
        config = directory.child("cluster.toml")
        config.setContent(
            clusterConfig(self["app"], directory, self["nodes"], self["port"], certs).encode()
        )
        out(f"wrote {config.path}")
        commands = [twistdCommand(config, nodeId, directory) for nodeId in ids]
        out("start each node with:")
        for command in commands:
            out("  " + " ".join(command))
        out(f"then call any node, e.g. fractal.client.connect(reactor, "
            f"'tcp:host=127.0.0.1:port={self['port']}')")
        return commands

    def run(self, out: Callable[[str], object] = print) -> int:
        """
        Write everything and, with C{--run}, run the nodes until interrupted.

        @return: the exit status.
        """
        try:
            commands = self.write(out)
        except usage.UsageError as e:
            print(f"fractal dev-cluster: {e}", file=sys.stderr)
            return 1
        if not self["run"]:
            return 0
        processes = [subprocess.Popen(_executable(command)) for command in commands]
        stopping = False

        def stop(signum: int = signal.SIGTERM, frame: object = None) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        out(f"running {len(processes)} nodes; Ctrl-C stops them")
        try:
            while not stopping and all(p.poll() is None for p in processes):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        status = 0
        for process in processes:
            try:
                status = max(status, abs(process.wait(timeout=30)))
            except subprocess.TimeoutExpired:
                process.kill()
                status = 1
        return status

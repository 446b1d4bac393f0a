# -*- test-case-name: tests.test_tap -*-
"""
C{twistd fractal}: the options of a node process and the service they build.

A single node on the embedded defaults::

    twistd -n fractal --app examples.mailbox:application

One node of a cluster described by a shared configuration file (see
L{fractal.config} for its format)::

    twistd -n fractal --config cluster.toml --node n2

Adding an option
================

Add it to L{Options.optParameters} (or C{optFlags}) and read it in
L{makeService}.  It can then be written in the configuration file too, under
its long name, at the top level or in a C{[[node]]} table.  Give a parameter
the default L{None} in C{optParameters} and, if it has one, its real default
in L{DEFAULTS}: a value that is still L{None} after the command line is taken
from the file, then from L{DEFAULTS}.  A coercion function (the fifth item)
checks the value from either source; give it a C{configType} attribute of
C{int} or C{float} when the file should hold a number rather than a string.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Mapping, cast

from twisted.application.service import IService
from twisted.python import usage
from twisted.python.filepath import FilePath

from fractal.config import (
    NODE_ONLY_KEYS,
    ConfigError,
    FractalConfig,
    NodeEntry,
    loadConfig,
    schemaFromOptions,
)

if TYPE_CHECKING:
    from fractal.app import Application
    from fractal.routing.interfaces import ITopology

__all__ = ["DEFAULTS", "Options", "makeService", "resolveApplication"]

DEFAULT_NODE_ID = "n1"
"""
The id of a node run without C{--node}.
"""

DEFAULTS: Mapping[str, object] = {
    "data": "./fractal-data",
    "listen": "tcp:7100:interface=127.0.0.1",
}
"""
The defaults of the options whose C{optParameters} default is L{None}, used
when neither the command line nor the configuration file sets them.
"""


def _positive(kind: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """
    A coercion function for a positive number of type C{kind}.
    """

    def coerce(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"{what} must be a positive number, not {value!r}") from None
        if not number > 0:
            raise ValueError(f"{what} must be a positive number, not {value!r}")
        return number

    coerce.coerceDoc = f"A positive {'integer' if kind is int else 'number'}."  # type: ignore[attr-defined]
    coerce.configType = kind  # type: ignore[attr-defined]
    return coerce


def _recordFormat(value: str) -> int:
    """
    The coercion of C{--record-format}: a record format version this version
    writes.
    """
    from fractal.durable.record import FORMAT_VERSIONS

    if value not in [str(version) for version in FORMAT_VERSIONS]:
        raise ValueError(
            f"--record-format must be {' or '.join(map(str, FORMAT_VERSIONS))}, not {value!r}"
        )
    return int(value)


_recordFormat.coerceDoc = "1 or 2."  # type: ignore[attr-defined]
_recordFormat.configType = int  # type: ignore[attr-defined]


def resolveApplication(spec: str) -> Application:
    """
    Import the application named by C{spec}, C{"module:attribute"}.

    The current directory is put on C{sys.path} first when it is not there:
    the C{twistd} script puts its own directory there instead, and an
    application is usually a module of the project it is run from.

    @param spec: the module's dotted name and the attribute's (possibly
        dotted) name, separated by a colon.
    @return: the application.
    @raise usage.UsageError: if C{spec} is malformed, the module cannot be
        imported, it has no such attribute, or the attribute is not a
        L{fractal.app.Application}.
    """
    from fractal.app import Application

    moduleName, colon, attribute = spec.partition(":")
    if not colon or not moduleName or not attribute:
        raise usage.UsageError(
            f"--app {spec!r}: expected module:attribute, "
            "for example examples.mailbox:application"
        )
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(moduleName)
    except ModuleNotFoundError as e:
        if e.name and (moduleName == e.name or moduleName.startswith(e.name + ".")):
            raise usage.UsageError(
                f"--app {spec!r}: no module named {e.name!r} "
                f"(looked in the current directory, {here}, and on sys.path)"
            ) from None
        raise usage.UsageError(f"--app {spec!r}: importing {moduleName!r} failed: {e}") from e
    except ImportError as e:
        raise usage.UsageError(f"--app {spec!r}: importing {moduleName!r} failed: {e}") from e
    value: object = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            found = sorted(
                name for name, obj in vars(module).items() if isinstance(obj, Application)
            )
            hint = f" (its applications: {', '.join(found)})" if found else ""
            raise usage.UsageError(
                f"--app {spec!r}: module {moduleName!r} has no attribute {attribute!r}{hint}"
            ) from None
    if not isinstance(value, Application):
        raise usage.UsageError(
            f"--app {spec!r} is {type(value).__name__} {value!r:.60}, "
            "not a fractal.app.Application"
        )
    return value


class Options(usage.Options):
    """
    The options of C{twistd fractal}.

    After parsing, every option key holds its final value (command line, then
    the chosen C{[[node]]} table, then the file's top level, then
    L{DEFAULTS}), C{self["node"]} holds the node id, and:

    @ivar application: the application named by C{--app}.
    @ivar config: the parsed configuration file, or L{None} without
        C{--config}.  A cluster topology reads C{config.nodes}.
    @ivar nodeEntry: the chosen C{[[node]]} table, or L{None}.
    """

    synopsis = "[options]"
    longdesc = (
        "Run one txfractal node: per-user SQLite object stores, served over AMP.  "
        "Every long option can also be set in the --config file."
    )

    optParameters: list[list[Any]] = [
        ["app", None, None, "The application to serve, as module:attribute."],
        [
            "data",
            None,
            None,
            f"The node's data directory (default: {DEFAULTS['data']}).",
        ],
        [
            "listen",
            None,
            None,
            f"The AMP endpoint clients call (default: {DEFAULTS['listen']}).",
        ],
        [
            "max-open-stores",
            None,
            None,
            "The most user stores kept open at once "
            "(default: derived from the open file limit)",
            _positive(int, "--max-open-stores"),
        ],
        [
            "idle-timeout",
            None,
            None,
            "Close a user store unused for this many seconds (default: the node's)",
            _positive(float, "--idle-timeout"),
        ],
        [
            "drain-timeout",
            None,
            None,
            "On stop, wait at most this many seconds for calls in flight "
            "(default: the node's, 30)",
            _positive(float, "--drain-timeout"),
        ],
        [
            "durable",
            None,
            None,
            "The directory the stores are shipped to, durably, as deltas "
            "(default: DATA/durable; ideally another disk); 'none' ships nothing.",
        ],
        [
            "ship-interval",
            None,
            None,
            "Seconds between ship cycles of changed stores (default: 1)",
            _positive(float, "--ship-interval"),
        ],
        [
            "record-format",
            None,
            None,
            "The durable record format version to write (default: the newest, 2); "
            "1 while nodes of a version that reads only 1 may restore this node's "
            "stores, in a rolling upgrade (see docs/durable.rst)",
            _recordFormat,
        ],
        ["config", None, None, "A TOML configuration file (see docs/deploying.rst)."],
        [
            "peer-listen",
            None,
            None,
            "The endpoint the node listens on for calls forwarded by its peers "
            "(default: derived from the node's 'peer' address in --config).",
        ],
        [
            "certs",
            None,
            None,
            "A directory made by 'fractal certs': peers then talk mutual TLS "
            "(ca.crt, <node>.crt, <node>.key).",
        ],
        [
            "peer-timeout",
            None,
            None,
            "Seconds a forwarded call waits for its owner before failing with "
            "OwnerUnavailable (default: 5)",
            _positive(float, "--peer-timeout"),
        ],
        [
            "node",
            None,
            None,
            f"The id of this node in the configuration file (default: {DEFAULT_NODE_ID}, "
            "or the file's only [[node]]).",
        ],
        [
            "manhole",
            None,
            None,
            "Open the Manhole, an SSH Python console into the node, on this endpoint, "
            "e.g. tcp:2222:interface=127.0.0.1 (default: off; see docs/manhole.rst).",
        ],
        [
            "manhole-keys",
            None,
            None,
            "The OpenSSH authorized_keys file of the operators who may log into the Manhole.",
        ],
        [
            "postgres",
            None,
            None,
            "A libpq connection string: the cluster runs itself on this PostgreSQL "
            "database (membership, failover, rebalancing, and the durable copies instead "
            "of --durable); create its tables first with 'fractal db init'.",
        ],
        [
            "postgres-schema",
            None,
            None,
            "The PostgreSQL schema of the cluster's tables (default: fractal).",
        ],
        [
            "lease",
            None,
            None,
            "With --postgres: seconds a node stays a member without a heartbeat (default: 10)",
            _positive(float, "--lease"),
        ],
        [
            "handoff-drain",
            None,
            None,
            "With --postgres: seconds a slot handoff waits for the calls running on the "
            "slot before giving up and trying again later (default: 10)",
            _positive(float, "--handoff-drain"),
        ],
        [
            "stale-keep",
            None,
            None,
            "Seconds the stale local stores set aside in DATA/stale (those of slots the "
            "node gained) are kept for inspection (default: 604800, a week)",
            _positive(float, "--stale-keep"),
        ],
        [
            "stale-max",
            None,
            None,
            "The most stale local stores kept in DATA/stale; the oldest go first "
            "(default: 1000)",
            _positive(int, "--stale-max"),
        ],
    ]

    optFlags: list[list[Any]] = [
        [
            "insecure-peers",
            None,
            "Allow plain TCP between nodes on addresses that are not loopback.",
        ],
        [
            "manhole-allow-remote",
            None,
            "Let the Manhole listen on an interface that is not loopback.",
        ],
    ]

    application: Application
    config: FractalConfig | None = None
    nodeEntry: NodeEntry | None = None

    def _coercions(self) -> dict[str, Callable[[str], Any] | None]:
        coercions: dict[str, Callable[[str], Any] | None] = {}
        for spec in self.optParameters:
            coercions[spec[0]] = spec[4] if len(spec) > 4 else None
        return coercions

    def _chooseNode(self, config: FractalConfig) -> str | None:
        """
        The id of the C{[[node]]} table this process runs as, or L{None} when
        the file has no such tables (a C{--node} given then is just the id).

        @raise ConfigError: if C{--node} names no table of a file that has
            some, or the file has several and C{--node} is missing.
        """
        nodeId: str | None = self["node"]
        if nodeId is not None:
            if not config.nodes:
                return None
            config.node(nodeId)
            return nodeId
        if len(config.nodes) == 1:
            return config.nodes[0].id
        if config.nodes:
            raise ConfigError(
                f"{config.source} describes {len(config.nodes)} nodes; choose one with "
                f"--node ({', '.join(entry.id for entry in config.nodes)})"
            )
        return None

    def postOptions(self) -> None:
        """
        Merge the configuration file under the command line, fill in the
        defaults, and import the application.

        @raise usage.UsageError: for a bad file, an unknown node or a bad
            C{--app}.
        """
        settings: dict[str, Any] = {}
        source = "--config"
        if self["config"] is not None:
            try:
                config = loadConfig(FilePath(self["config"]), schemaFromOptions(type(self)))
                nodeId = self._chooseNode(config)
                settings = config.settingsFor(nodeId)
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
            self.config = config
            if nodeId is not None:
                self.nodeEntry = config.node(nodeId)
                self["node"] = nodeId
            source = config.source
        flags = {spec[0] for spec in self.optFlags}
        coercions = self._coercions()
        for key, value in settings.items():
            if key in NODE_ONLY_KEYS:
                continue
            if key in flags:
                self[key] = self[key] or value
            elif self[key] is None:
                coerce = coercions.get(key)
                if coerce is not None:
                    try:
                        value = coerce(str(value))
                    except ValueError as e:
                        raise usage.UsageError(f"{source}: {key!r}: {e}") from None
                self[key] = value
        for key, default in DEFAULTS.items():
            if self[key] is None:
                self[key] = default
        if self["node"] is None:
            self["node"] = DEFAULT_NODE_ID
        if self["app"] is None:
            raise usage.UsageError(
                "an application is required: --app module:attribute "
                "(for example --app examples.mailbox:application), or 'app' in --config"
            )
        self.application = resolveApplication(self["app"])
        _checkManhole(self)


def _checkManhole(options: Options) -> None:
    """
    Check the Manhole options: C{--manhole-keys} goes with C{--manhole}, the
    endpoint is loopback unless C{--manhole-allow-remote}, the keys file
    exists and only its owner may write it, and a host key already in the
    data directory is private to its owner.

    @raise usage.UsageError: saying what to change.
    """
    from fractal._manholeconfig import (
        HOST_KEY_NAME,
        ManholeConfigurationError,
        checkEndpoint,
        checkHostKeyFile,
        checkKeysFile,
    )

    if options["manhole"] is None:
        if options["manhole-keys"] is not None:
            raise usage.UsageError("--manhole-keys needs --manhole ENDPOINT")
        return
    if options["manhole-keys"] is None:
        raise usage.UsageError(
            "--manhole needs --manhole-keys FILE, an OpenSSH authorized_keys file "
            "(the Manhole accepts public keys only)"
        )
    try:
        checkEndpoint(options["manhole"], options["manhole-allow-remote"])
        checkKeysFile(FilePath(os.path.abspath(options["manhole-keys"])))
        checkHostKeyFile(FilePath(os.path.abspath(options["data"])).child(HOST_KEY_NAME))
    except ManholeConfigurationError as e:
        raise usage.UsageError(str(e)) from None


def _topology(options: Options) -> ITopology | None:
    """
    The topology of the node: L{None} (the node's own single-node topology)
    unless the configuration file describes a cluster, which gives a
    L{fractal.routing.topology.StaticTopology} of its C{[[node]]} tables.  A
    node table without C{client} is reached where its C{listen} says.

    @raise usage.UsageError: for a cluster description that cannot be used.
    """
    if options.config is None or len(options.config.nodes) < 2:
        return None
    from fractal.node import clientDescriptionFor
    from fractal.routing.interfaces import NodeAddress
    from fractal.routing.topology import StaticTopology, TopologyError

    addresses = []
    for entry in options.config.nodes:
        client = entry.client
        if client is None:
            listen = options.config.settingsFor(entry.id).get("listen")
            client = clientDescriptionFor(listen) if listen else None
        addresses.append(NodeAddress(entry.id, client or "", entry.peer))
    try:
        return StaticTopology(options["node"], addresses)
    except TopologyError as e:
        raise usage.UsageError(f"{options.config.source}: {e}") from None


def _joinCluster(options: Options, node: Any) -> None:
    """
    Make a node of a cluster forward calls to its peers and accept theirs.

    @raise usage.UsageError: if the certificates cannot be loaded or plain
        TCP would leave loopback without C{--insecure-peers}.
    """
    from fractal.certs import CertificateError, InsecurePeers, loadCredentials
    from fractal.routing.cluster import joinCluster

    credentials = None
    if options["certs"] is not None:
        try:
            credentials = loadCredentials(FilePath(options["certs"]), options["node"])
        except CertificateError as e:
            raise usage.UsageError(str(e)) from None
    extra: dict[str, Any] = {}
    if options["peer-timeout"] is not None:
        extra["callTimeout"] = options["peer-timeout"]
    try:
        joinCluster(
            node,
            peerListen=options["peer-listen"],
            credentials=credentials,
            insecure=options["insecure-peers"],
            **extra,
        )
    except (InsecurePeers, ValueError) as e:
        raise usage.UsageError(str(e)) from None


def _postgres(options: Options, reactor: Any) -> Any:
    """
    The node's view of a cluster on PostgreSQL (C{--postgres}), registered,
    or L{None}.  See L{fractal.postgres.deploy.openCluster}.

    @raise usage.UsageError: if the node has no peer address, or the
        database cannot be used.
    """
    if not options["postgres"]:
        return None
    import psycopg

    from fractal.node import clientDescriptionFor
    from fractal.postgres.deploy import openCluster
    from fractal.postgres.schema import SchemaError
    from fractal.routing.interfaces import NodeAddress
    from fractal.routing.topology import TopologyError

    entry = options.nodeEntry
    client = (entry.client if entry else None) or clientDescriptionFor(options["listen"])
    peer = entry.peer if entry else None
    if peer is None and options["peer-listen"]:
        peer = clientDescriptionFor(options["peer-listen"])
    if peer is None:
        raise usage.UsageError(
            "--postgres needs the node's peer address: --peer-listen ENDPOINT, "
            "or 'peer' in its [[node]] table"
        )
    extra: dict[str, Any] = {}
    if options["lease"] is not None:
        extra["lease"] = options["lease"]
    try:
        return openCluster(
            reactor,
            options["postgres"],
            NodeAddress(options["node"], client, peer),
            schema=options["postgres-schema"] or "fractal",
            **extra,
        )
    except (SchemaError, TopologyError, ValueError) as e:
        raise usage.UsageError(f"--postgres: {e}") from None
    except psycopg.Error as e:
        raise usage.UsageError(f"--postgres: cannot use the database: {e}") from None


def _shipper(
    options: Options, reactor: Any, dataDir: FilePath[str], cluster: Any = None
) -> Any:
    """
    The durable shipper of the node: to the filesystem backend in
    C{--durable} (C{DATA/durable} by default), or L{None} for C{--durable
    none}; to PostgreSQL, at the epochs of the node's slots, with
    C{--postgres} (C{cluster}).
    """
    from fractal.durable.record import FORMAT_VERSION

    if cluster is not None:
        from fractal.durable._threads import reactorThreads
        from fractal.durable.shipper import Shipper

        return Shipper(
            cluster.backend,
            reactor,
            runInThread=reactorThreads(reactor),
            interval=options["ship-interval"] or 1.0,
            storesDirectory=dataDir.child("stores"),
            epochForKey=cluster.topology.epochForKey,
            recordFormat=options["record-format"] or FORMAT_VERSION,
        )
    if (options["durable"] or "").lower() == "none":
        return None
    from fractal.durable._threads import reactorThreads
    from fractal.durable.filesystem import FilesystemBackend
    from fractal.durable.shipper import Shipper

    durable = (
        FilePath(os.path.abspath(options["durable"]))
        if options["durable"]
        else dataDir.child("durable")
    )
    return Shipper(
        FilesystemBackend(durable, reactorThreads(reactor), clock=reactor),
        reactor,
        runInThread=reactorThreads(reactor),
        interval=options["ship-interval"] or 1.0,
        storesDirectory=dataDir.child("stores"),
        recordFormat=options["record-format"] or FORMAT_VERSION,
    )


_heapFrozen = False


def _freezeStartupHeap() -> None:
    """
    Once per process, move everything alive after start-up (modules, classes,
    the application) out of the cyclic garbage collector's reach
    (L{gc.freeze}).  Its full collections then scan only what the node made
    since, instead of pausing every call for tens of milliseconds to scan the
    whole start-up heap again.
    """
    global _heapFrozen
    if not _heapFrozen:
        _heapFrozen = True
        gc.collect()
        gc.freeze()


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build the node service from parsed options.

    @param options: parsed L{Options}.
    @param reactor: the node's reactor; the global reactor, imported only
        then, if L{None} (as C{twistd} calls it).  Tests give their own, so
        that what the node registers with its reactor (timers, start-up and
        shutdown triggers) does not outlive them on the global one.
    @return: the node, a L{twisted.application.service.MultiService}.
    """
    if reactor is None:
        from twisted.internet import reactor

    from fractal.node import FractalNode

    extra: dict[str, Any] = {}
    if options["idle-timeout"] is not None:
        extra["idleTimeout"] = options["idle-timeout"]
    if options["drain-timeout"] is not None:
        extra["drainTimeout"] = options["drain-timeout"]
    if options["stale-keep"] is not None:
        extra["staleKeep"] = options["stale-keep"]
    if options["stale-max"] is not None:
        extra["staleMax"] = options["stale-max"]
    dataDir = FilePath(os.path.abspath(options["data"]))
    cluster = _postgres(options, reactor)
    shipper = _shipper(options, reactor, dataDir, cluster)
    node = FractalNode(
        reactor,
        options.application,
        dataDir=dataDir,
        listen=options["listen"],
        nodeId=options["node"],
        topology=cluster.topology if cluster is not None else _topology(options),
        maxOpenStores=options["max-open-stores"],
        shipper=shipper,
        **extra,
    )
    _freezeStartupHeap()
    if cluster is not None:
        from fractal.postgres.deploy import servePostgres

        served: dict[str, Any] = {}
        if options["handoff-drain"] is not None:
            served["handoffDrain"] = options["handoff-drain"]
        servePostgres(node, cluster, shipper, **served)
    elif shipper is not None:
        shipper.serveNode(node)
    if options["manhole"] is not None:
        from fractal.manhole import manholeForNode

        manholeForNode(
            node,
            options["manhole"],
            FilePath(os.path.abspath(options["manhole-keys"])),
            allowRemote=options["manhole-allow-remote"],
        ).setServiceParent(node)  # type: ignore[no-untyped-call]
    if cluster is not None or len(node.topology.currentMap().nodes) > 1:
        _joinCluster(options, node)
    else:
        from fractal.routing.cluster import serveShardMap

        serveShardMap(node.server)
    return cast(IService, node)

# -*- test-case-name: tests.test_node -*-
# mypy: disable-error-code="no-untyped-call"
"""
A fractal node: the service that wires the store pool, the AMP front door and
its listener, with a graceful stop.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from fractal.app import Application
from fractal.durable.interfaces import IShipper, StaleEpoch
from fractal.pool import DEFAULT_IDLE_TIMEOUT, StorePool
from fractal.routing.interfaces import ITopology
from fractal.routing.topology import SingleNodeTopology
from fractal.server import FractalServer, ServerLimits

__all__ = ["DEFAULT_DRAIN_TIMEOUT", "FractalNode", "clientDescriptionFor"]

DEFAULT_DRAIN_TIMEOUT = 30.0
"""
Seconds a stopping node waits for its calls in flight.
"""


def clientDescriptionFor(listen: str) -> str:
    """
    A client endpoint description that reaches a node listening on C{listen},
    as far as it can be told from the description alone.

    C{"tcp:7100:interface=127.0.0.1"} gives C{"tcp:host=127.0.0.1:port=7100"};
    a wildcard or missing interface is taken as loopback.  Other kinds of
    endpoint are returned unchanged.

    @param listen: a server endpoint description.
    """
    kind, _, rest = listen.partition(":")
    if kind not in ("tcp", "tcp6") or not rest:
        return listen
    port = None
    interface = "127.0.0.1" if kind == "tcp" else "::1"
    for part in rest.split(":"):
        name, equals, value = part.partition("=")
        if not equals:
            port = port or name
        elif name == "port":
            port = value
        elif name == "interface" and value not in ("", "0.0.0.0", "::"):
            interface = value
    if port is None:
        return listen
    host = interface.replace(":", "\\:")
    return f"tcp:host={host}:port={port}"


class FractalNode(MultiService):
    """
    One fractal node.

    Starting it listens for AMP clients on C{listen}.  Stopping it (the
    L{Deferred} of L{stopService}, which C{twistd} waits for on SIGTERM) runs,
    in this order:

        1. stop listening, so no new connection arrives;
        2. answer new calls on open connections with
           L{fractal.protocol.NodeStopping};
        3. wait for every call in flight to be answered (drain), at most
           C{drainTimeout} seconds;
        4. close every store (after a drain timeout, also those still held by
           a call), each first shipped by the shipper when there is one
           (L{fractal.durable.interfaces.IShipper.storeClosing});
        5. close the client connections (but not those of peers, which
           forward calls: they are answered L{fractal.protocol.NodeStopping},
           so the peers route them again, while the node hands its slots
           off);
        6. stop the other child services (added by others: shipper, console,
           peers, topology), in reverse order of addition;
        7. close the peers' connections;

    and then fires.

    @ivar reactor: the reactor.
    @ivar nodeId: this node's id in its cluster.
    @ivar application: the application served.
    @ivar dataDir: where the node's stores live.
    @ivar pool: the L{StorePool}.
    @ivar topology: who owns which slot.
    @ivar shipper: the durable shipper, or L{None}.  When it is told a store
        is fenced at a newer epoch, the node stops serving the store's slot
        (L{FractalServer.fenceSlot}).
    @ivar server: the L{FractalServer} answering client connections; its
        C{forward} attribute is the seam for forwarding calls to other nodes.
    @ivar listen: the server endpoint description listened on.
    @ivar drainTimeout: the most seconds a stop waits for calls in flight.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        application: Application,
        dataDir: FilePath[str],
        listen: str,
        nodeId: str = "n1",
        topology: ITopology | None = None,
        maxOpenStores: int | None = None,
        idleTimeout: float = DEFAULT_IDLE_TIMEOUT,
        shipper: IShipper | None = None,
        limits: ServerLimits = ServerLimits(),
        drainTimeout: float = DEFAULT_DRAIN_TIMEOUT,
    ) -> None:
        """
        @param reactor: the reactor: listening and time.
        @param application: the application to serve.
        @param dataDir: the node's data directory, created if missing.
        @param listen: a server endpoint description for AMP clients.
        @param nodeId: this node's id.
        @param topology: who owns which slot; by default this node owns all
            of them (L{SingleNodeTopology}).
        @param maxOpenStores: the most user stores open at once; by default
            derived from the process's descriptor limit.
        @param idleTimeout: seconds after which an unused store is closed.
        @param shipper: the durable shipper, or L{None}.
        @param limits: what one client connection may ask.
        @param drainTimeout: the most seconds a stop waits for calls in
            flight before closing their stores anyway.
        @raise ValueError: if the application acknowledges any command
            durably and there is no shipper, or if C{topology} serves another
            node than C{nodeId}.
        """
        super().__init__()
        if topology is None:
            topology = SingleNodeTopology(nodeId, clientDescriptionFor(listen))
        if topology.localNode != nodeId:
            raise ValueError(
                f"the topology is for node {topology.localNode!r}, not {nodeId!r}"
            )
        self.reactor = reactor
        self.nodeId = nodeId
        self.application = application
        self.dataDir = dataDir
        self.listen = listen
        self.topology = topology
        self.shipper = shipper
        self.drainTimeout = drainTimeout
        self.pool = StorePool(
            reactor,
            dataDir,
            prepare=application.installOn,
            maxOpenStores=maxOpenStores,
            idleTimeout=idleTimeout,
            shipper=shipper,
        )
        self.server = FractalServer(application, self.pool, topology, shipper, limits)
        if shipper is not None:
            shipper.addFencedObserver(self._fenced)
        self._listener = StreamServerEndpointService(
            serverFromString(reactor, listen), self.server.factory()
        )
        self._listener.setName("listener")
        self._listener.setServiceParent(self)

    def privilegedStartService(self) -> None:
        """
        Create the data directory, then bind the listener.
        """
        self.dataDir.makedirs(ignoreExistingDirectory=True)
        super().privilegedStartService()

    def startService(self) -> None:
        """
        Create the data directory, then start the children (the listener
        binds now unless L{privilegedStartService} bound it).
        """
        self.dataDir.makedirs(ignoreExistingDirectory=True)
        super().startService()

    def stats(self) -> dict[str, Any]:
        """
        The node's live figures, for consoles and metrics.
        """
        server = self.server
        pool = self.pool
        return {
            "node": self.nodeId,
            "application": self.application.name,
            "openStores": len(pool.openKeys()),
            "maxOpenStores": pool.maxOpenStores,
            "storesOpened": pool.opened,
            "storesClosed": pool.closedCount,
            "connections": server.connections,
            "inFlight": server.inFlight,
            "stopping": server.stopping,
            "callsServed": server.callsServed,
            "callsFailed": server.callsFailed,
            "responderErrors": server.responderErrors,
            "fencedSlots": len(server.fencedSlots()),
        }

    def _fenced(self, key: str, error: StaleEpoch) -> None:
        """
        The shipper was told that C{key}'s store is fenced at a newer epoch
        (L{IShipper.addFencedObserver}): stop serving the key's slot
        (L{FractalServer.fenceSlot}), whatever the topology, and have a
        topology that can reload its map (one with a C{refresh()} method, as
        L{fractal.postgres.topology.PostgresTopology} has) learn who owns the
        slot now, so the slot's calls go there.
        """
        self.server.fenceSlot(key, error)
        refresh = getattr(self.topology, "refresh", None)
        if callable(refresh):
            refresh()

    def stopService(self) -> Deferred[None]:
        """
        Stop gracefully, in the order given in the class docstring.

        @return: fires when the node has stopped.
        """
        Service.stopService(self)
        self.log.info(
            "Node {node} stopping: {inFlight} calls in flight, {open} stores open",
            node=self.nodeId,
            inFlight=self.server.inFlight,
            open=len(self.pool.openKeys()),
        )
        d: Deferred[Any] = (
            maybeDeferred(self._listener.stopService)
            if self._listener.running
            else succeed(None)
        )
        self.server.stopAccepting()
        d.addCallback(lambda _: self._drain())
        d.addCallback(lambda drained: self.pool.close(force=not drained))
        d.addCallback(lambda _: self.server.disconnectAll(peers=False))
        d.addCallback(lambda _: self._stopOthers())
        d.addCallback(lambda _: self.server.disconnectAll())
        d.addCallback(lambda _: self.log.info("Node {node} stopped", node=self.nodeId))
        return d

    def _drain(self) -> Deferred[bool]:
        """
        Wait for the calls in flight, at most L{drainTimeout} seconds.

        @return: fires with C{True} once drained, C{False} on timeout.
        """
        d = self.server.whenDrained()
        d.addTimeout(self.drainTimeout, self.reactor)

        def timedOut(failure: Failure) -> bool:
            failure.trap(defer.TimeoutError)
            self.log.warn(
                "Node {node}: {inFlight} calls still running after {timeout} s; "
                "closing their stores anyway",
                node=self.nodeId,
                inFlight=self.server.inFlight,
                timeout=self.drainTimeout,
            )
            return False

        return d.addCallbacks(lambda _: True, timedOut)

    def _stopOthers(self) -> Deferred[Any]:
        """
        Stop every child service but the listener, in reverse order.
        """
        stops = []
        for service in reversed(list(self)):
            if service is self._listener or not service.running:
                continue
            stops.append(maybeDeferred(service.stopService).addErrback(self._stopFailed, service))
        return DeferredList(stops)

    def _stopFailed(self, failure: Failure, service: Any) -> None:
        """
        Log a child service that failed to stop; the node stops anyway.
        """
        self.log.failure("Service {service!r} failed to stop", failure, service=service)

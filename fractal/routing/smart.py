# -*- test-case-name: tests.test_routing_cluster -*-
# mypy: disable-error-code="no-untyped-call"
"""
The smart client: a L{fractal.client.FractalClient} that knows the shard map
and sends each call straight to the node that owns its user.

    from fractal.routing.smart import connectCluster

    client = connectCluster(reactor, "tcp:host=127.0.0.1:port=7101")
    answer = await client.callRemote(Deliver, user="alice", ...)

It connects to one node first (any node: the I{seed}), asks it for the shard
map (L{fractal.protocol.GetShardMap}) and from then on opens one connection
per owner, on demand.  A call for a user whose owner's map entry is stale is
answered L{fractal.protocol.NotOwner}: the client fetches the map again and
sends the call once more.  When the owner cannot be reached from the client
within C{fallbackAfter} seconds, or before the map is known, the call goes to
any connected node instead, which forwards it (one hop).

With client-facing TLS (nodes listening with their certificates, see
L{fractal.certs}), give the cluster CA as C{authority}: the client then
speaks TLS on every connection, trusts only that CA, and checks that the
certificate of each owner it connects to names the node id the shard map
gives for that address; a connection is used only once its check has
passed.  The first connection (to a node the client cannot name yet) checks
only that the certificate comes from the cluster CA.  The map's C{client}
addresses are then the plain C{tcp:} addresses of the nodes' TLS listeners:
the client adds the TLS.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.internet import ssl
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from fractal.certs import anyNodeTLSOptions, clientTLSCreator
from fractal.client import DEFAULT_TIMEOUT, FractalClient, RetryPolicy
from fractal.keys import InvalidUserKey
from fractal.protocol import GetShardMap, NotOwner
from fractal.routing._routes import RouteMemo
from fractal.routing.interfaces import ShardMap

__all__ = [
    "ClusterClient",
    "AnyOfEndpoints",
    "connectCluster",
    "DEFAULT_FALLBACK_AFTER",
    "DEFAULT_REFRESH_INTERVAL",
]

DEFAULT_FALLBACK_AFTER = 1.0
"""
Seconds a call waits for a connection to its owner before it is sent to
another node to forward.
"""

DEFAULT_REFRESH_INTERVAL = 30.0
"""
Seconds between fetches of the shard map, so a client whose calls are all
forwarded (a moved slot is still served, one hop away) learns of the move.
"""


class ClusterClient(FractalClient):
    """
    A client of a whole cluster that sends each call to its user's owner.

    @ivar shardMap: the newest shard map the client has, or L{None} before
        the first one arrives.
    @ivar fallbackAfter: see L{DEFAULT_FALLBACK_AFTER}.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        endpoint: IStreamClientEndpoint,
        timeout: float = DEFAULT_TIMEOUT,
        retryPolicy: RetryPolicy | None = None,
        endpointFor: Callable[[str], IStreamClientEndpoint] | None = None,
        fallbackAfter: float = DEFAULT_FALLBACK_AFTER,
        refreshInterval: float | None = DEFAULT_REFRESH_INTERVAL,
        authority: ssl.Certificate | None = None,
    ) -> None:
        """
        Connect to the seed node at C{endpoint} and ask it for the map.

        @param clock: the reactor (or a clock in tests).
        @param endpoint: any node of the cluster.
        @param timeout: the default per-call timeout, in seconds.
        @param retryPolicy: see L{FractalClient.__init__}; also used for the
            connections to owners.
        @param endpointFor: makes the endpoint for a node's C{client}
            description; by default C{clientFromString(clock, description)}.
        @param fallbackAfter: see L{DEFAULT_FALLBACK_AFTER}.
        @param refreshInterval: see L{DEFAULT_REFRESH_INTERVAL}; L{None}
            fetches the map only at the start and after L{NotOwner}.
        @param authority: the cluster CA, to call each owner over TLS and
            check that its certificate names the node the map says; L{None}
            for no TLS of the client's own (C{endpoint}, and C{endpointFor}'s
            endpoints, are used as they are).  C{endpoint} is used as given
            either way (see L{connectCluster}).
        """
        FractalClient.__init__(self, clock, endpoint, timeout, retryPolicy)
        self.shardMap: ShardMap | None = None
        self.fallbackAfter = fallbackAfter
        self._retryPolicy = retryPolicy
        self._endpointFor = endpointFor or (
            lambda description: clientFromString(clock, description)
        )
        self._authority = authority
        self._owners: dict[str, FractalClient] = {}
        self._routes: RouteMemo[str, str] = RouteMemo(
            lambda shardMap, user: shardMap.ownerOfKey(user).node
        )
        self._mapWaiters: list[Deferred[ShardMap | None]] = []
        self.refreshMap()
        self._refresher: LoopingCall | None = None
        if refreshInterval is not None:
            self._refresher = LoopingCall(self.refreshMap)
            self._refresher.clock = clock
            self._refresher.start(refreshInterval, now=False)

    def refreshMap(self) -> Deferred[ShardMap | None]:
        """
        Fetch the shard map again from any node; callers asking while a
        fetch is under way share its result.

        @return: fires with the new map, or with L{None} when no node
            answered (the old map, if any, stays in use).
        """
        waiter: Deferred[ShardMap | None] = Deferred()
        self._mapWaiters.append(waiter)
        if len(self._mapWaiters) > 1:
            return waiter

        def fetched(result: dict[str, Any]) -> ShardMap:
            shardMap: ShardMap = result["map"]
            if self.shardMap is None or shardMap.version >= self.shardMap.version:
                self.shardMap = shardMap
                for node in [n for n in self._owners if n not in shardMap.nodes]:
                    # A node that left the cluster: stop connecting to it.
                    self._owners.pop(node).disconnect()
            return shardMap

        def failed(reason: Failure) -> None:
            self._log.info("could not fetch the shard map: {why}", why=reason.getErrorMessage())
            return None

        def done(result: ShardMap | None) -> None:
            waiters, self._mapWaiters = self._mapWaiters, []
            for each in waiters:
                each.callback(result)

        FractalClient._call(self, GetShardMap, None, None, {}).addCallbacks(
            fetched, failed
        ).addCallback(done)
        return waiter

    def _ownerClient(self, node: str) -> FractalClient | None:
        """
        The client of C{node}, connecting from its first use.
        """
        client = self._owners.get(node)
        if client is None and self.shardMap is not None and node in self.shardMap.nodes:
            endpoint = self._endpointFor(self.shardMap.nodes[node].client)
            if self._authority is not None:
                # Reach the node only if its certificate names it.
                endpoint = wrapClientTLS(clientTLSCreator(self._authority, node), endpoint)
            client = FractalClient(self._clock, endpoint, self.timeout, self._retryPolicy)
            self._owners[node] = client
        return client

    def _anyConnection(self, exclude: str | None = None) -> Deferred[amp.AMP]:
        """
        A connection to any node: one that is up now if there is one, else
        the seed's.
        """
        for node, client in self._owners.items():
            if node == exclude:
                continue
            d = client._connectionFor(None)
            if d.called:
                return d
            d.addErrback(lambda f: None)
            d.cancel()
        return FractalClient._connectionFor(self, None)

    def _ownerOf(self, user: object) -> str | None:
        """
        The node that owns C{user} in the current map, or L{None} if there is
        no map yet or C{user} is not a valid key.

        The answer for a key is remembered for as long as the map is the same
        object (L{RouteMemo}), so a busy user's calls skip validating and
        hashing its key.
        """
        shardMap = self.shardMap
        if shardMap is None or type(user) is not str:
            return None
        try:
            return self._routes.lookup(shardMap, user)
        except InvalidUserKey:
            return None

    def _connectionNow(self, user: object) -> amp.AMP | None:
        """
        The connection to C{user}'s owner if it is up now, else L{None}
        (and L{_connectionFor} decides).
        """
        owner = self._ownerOf(user)
        if owner is None:
            return None
        client = self._owners.get(owner)
        return None if client is None else client._connection

    def _connectionFor(self, user: str | None) -> Deferred[amp.AMP]:
        """
        The owner's connection for a call for C{user}, or any node's when the
        owner is not known or not reachable within C{fallbackAfter}.
        """
        owner = self._ownerOf(user)
        if owner is None:
            # No map yet, or no user key; a bad key is answered by a node,
            # as any bad call is.
            return self._anyConnection()
        client = self._ownerClient(owner)
        if client is None:
            return self._anyConnection()
        connected = client._connectionFor(None)
        if connected.called:
            return connected
        connected.addTimeout(self.fallbackAfter, self._clock)
        return connected.addErrback(lambda reason: self._anyConnection(exclude=owner))

    def _call(
        self,
        command: type[amp.Command],
        user: str | None,
        timeout: float | None,
        arguments: dict[str, Any],
    ) -> Deferred[dict[str, Any]]:
        """
        Call C{command} on the owner of C{user}; see
        L{FractalClient.callRemote}.  A L{NotOwner} answer refreshes the map
        and sends the call once more; a second one fails the call.
        """
        call = FractalClient._call(self, command, user, timeout, arguments)
        return call.addErrback(self._notOwner, command, user, timeout, arguments)

    def _notOwner(
        self,
        reason: Failure,
        command: type[amp.Command],
        user: str | None,
        timeout: float | None,
        arguments: dict[str, Any],
    ) -> Deferred[dict[str, Any]]:
        """
        A call was answered L{NotOwner}: fetch the map again and send the
        call once more.
        """
        reason.trap(NotOwner)
        return self.refreshMap().addCallback(
            lambda _: FractalClient._call(self, command, user, timeout, arguments)
        )

    def disconnect(self) -> Deferred[None]:
        """
        Close every connection and stop reconnecting.
        """
        if self._refresher is not None and self._refresher.running:
            self._refresher.stop()
        stops: list[Deferred[Any]] = [client.disconnect() for client in self._owners.values()]
        self._owners.clear()
        stops.append(FractalClient.disconnect(self))
        return gatherResults(stops).addCallback(lambda _: None)


@implementer(IStreamClientEndpoint)
class AnyOfEndpoints:
    """
    A client endpoint that connects to the first of several endpoints that
    accepts, starting with the one that worked last: the seed of a
    L{ClusterClient} given several nodes.
    """

    def __init__(self, endpoints: Sequence[IStreamClientEndpoint]) -> None:
        """
        @param endpoints: the endpoints to try, in order.
        @raise ValueError: if there are none.
        """
        if not endpoints:
            raise ValueError("AnyOfEndpoints needs at least one endpoint")
        self._endpoints = list(endpoints)
        self._first = 0

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        Try each endpoint in turn until one connects.

        @return: the first connection, or the last endpoint's failure.
        """
        count = len(self._endpoints)

        def attempt(index: int) -> Deferred[IProtocol]:
            position = (self._first + index) % count
            d: Deferred[IProtocol] = self._endpoints[position].connect(factory)

            def connected(protocol: IProtocol) -> IProtocol:
                self._first = position
                return protocol

            def failed(reason: Failure) -> Deferred[IProtocol] | Failure:
                if index + 1 < count:
                    return attempt(index + 1)
                return reason

            return d.addCallbacks(connected, failed)

        return attempt(0)


def connectCluster(
    reactor: Any,
    description: str | Sequence[str],
    timeout: float = DEFAULT_TIMEOUT,
    retryPolicy: RetryPolicy | None = None,
    fallbackAfter: float = DEFAULT_FALLBACK_AFTER,
    refreshInterval: float | None = DEFAULT_REFRESH_INTERVAL,
    authority: ssl.Certificate | None = None,
) -> ClusterClient:
    """
    Connect to a cluster through any of its nodes.

    @param reactor: the reactor.
    @param description: a client endpoint description of any node, or of
        several (the first that accepts is used, so the client starts even
        when some of them are down).
    @param timeout: the default per-call timeout, in seconds.
    @param retryPolicy: see L{FractalClient.__init__}.
    @param fallbackAfter: see L{DEFAULT_FALLBACK_AFTER}.
    @param refreshInterval: see L{DEFAULT_REFRESH_INTERVAL}.
    @param authority: the cluster CA, for nodes listening for clients with
        TLS (see L{ClusterClient.__init__}); C{description} is then the
        plain C{tcp:} address of a TLS listener, and the node there must
        hold a certificate from this CA.
    @return: a client, already fetching the shard map.
    """
    descriptions = [description] if isinstance(description, str) else list(description)
    seeds = [clientFromString(reactor, each) for each in descriptions]
    if authority is not None:
        options = anyNodeTLSOptions(authority)
        seeds = [wrapClientTLS(options, seed) for seed in seeds]
    endpoint: IStreamClientEndpoint = AnyOfEndpoints(seeds)
    return ClusterClient(
        reactor,
        endpoint,
        timeout=timeout,
        retryPolicy=retryPolicy,
        fallbackAfter=fallbackAfter,
        refreshInterval=refreshInterval,
        authority=authority,
    )

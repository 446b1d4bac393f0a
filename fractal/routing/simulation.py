# -*- test-case-name: tests.test_routing_simulation -*-
# mypy: disable-error-code="no-untyped-call"
"""
A simulated network for deterministic cluster tests: many hosts, each
listening on named addresses, connected by in-memory links
(L{twisted.test.iosim.FakeTransport}) that move bytes only when the test
says so, all timed by one L{twisted.internet.task.Clock}.

A test can cut the links of a host (existing connections drop, new ones are
refused, as with a dead machine), hold them (bytes stall, as with a stopped
process), delay them (bytes arrive a fixed time later on the clock) and
restore them.
"""

from __future__ import annotations

import itertools
from typing import Callable

from attrs import define
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.test.iosim import FakeTransport
from zope.interface import implementer

__all__ = ["SimulatedNetwork"]

_ports = itertools.count(20000)


@define
class _Link:
    """
    What happens to bytes between two hosts.
    """

    held: bool = False
    cut: bool = False
    delay: float = 0.0


@define
class _Connection:
    client: FakeTransport
    server: FakeTransport
    hosts: frozenset[str]


@implementer(IStreamClientEndpoint)
class _SimulatedEndpoint:
    def __init__(self, network: SimulatedNetwork, source: str, address: str) -> None:
        self._network = network
        self._source = source
        self._address = address

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        return self._network._connect(self._source, self._address, factory)


class SimulatedNetwork:
    """
    Hosts and in-memory links between them.

    @ivar clock: the clock of the whole simulation.
    """

    def __init__(self, clock: Clock | None = None) -> None:
        """
        @param clock: the clock to use; a new one by default.
        """
        self.clock = clock if clock is not None else Clock()
        self._listeners: dict[str, tuple[str, IProtocolFactory]] = {}
        self._links: dict[frozenset[str], _Link] = {}
        self._connections: list[_Connection] = []

    def listen(self, host: str, address: str, factory: IProtocolFactory) -> Callable[[], None]:
        """
        Make C{host} accept connections to C{address} with C{factory}.

        @return: a callable that stops listening (open connections stay).
        @raise ValueError: if something listens on C{address} already.
        """
        if address in self._listeners:
            raise ValueError(f"{address!r} is in use")
        self._listeners[address] = (host, factory)
        return lambda: self._listeners.pop(address, None) and None

    def endpoint(self, source: str, address: str) -> IStreamClientEndpoint:
        """
        A client endpoint from host C{source} to C{address}.
        """
        return _SimulatedEndpoint(self, source, address)

    def _connect(self, source: str, address: str, factory: IProtocolFactory) -> Deferred[IProtocol]:
        listener = self._listeners.get(address)
        if listener is None:
            return fail(ConnectionRefusedError(f"nothing listens on {address}"))
        host, serverFactory = listener
        if self._state(frozenset((source, host))).cut:
            return fail(ConnectionRefusedError(f"link {source} - {host} is cut"))
        clientAddress = IPv4Address("TCP", "127.0.0.1", next(_ports))
        serverAddress = IPv4Address("TCP", "127.0.0.1", next(_ports))
        serverProtocol = serverFactory.buildProtocol(clientAddress)
        clientProtocol = factory.buildProtocol(serverAddress)
        if serverProtocol is None or clientProtocol is None:
            return fail(ConnectionRefusedError("the factory refused the connection"))
        serverTransport = FakeTransport(serverProtocol, True, serverAddress, clientAddress)
        clientTransport = FakeTransport(clientProtocol, False, clientAddress, serverAddress)
        serverProtocol.makeConnection(serverTransport)
        clientProtocol.makeConnection(clientTransport)
        self._connections.append(
            _Connection(clientTransport, serverTransport, frozenset((source, host)))
        )
        return succeed(clientProtocol)

    def _keys(self, a: str, b: str | None) -> frozenset[str]:
        return frozenset((a,)) if b is None else frozenset((a, b))

    def _state(self, hosts: frozenset[str]) -> _Link:
        """
        The effective state of the link between C{hosts}: its own, combined
        with the state set for each of its hosts as a whole.
        """
        states = [self._links.get(hosts, _Link())] + [
            self._links.get(frozenset((host,)), _Link()) for host in hosts
        ]
        return _Link(
            held=any(s.held for s in states),
            cut=any(s.cut for s in states),
            delay=max(s.delay for s in states),
        )

    def cut(self, a: str, b: str | None = None) -> None:
        """
        Cut the link between C{a} and C{b}, or every link of C{a}: open
        connections drop without delivering what is in flight, and new ones
        are refused, until L{restore}.
        """
        self._links.setdefault(self._keys(a, b), _Link()).cut = True
        for connection in self._connections:
            if self._state(connection.hosts).cut:
                connection.client.getOutBuffer()
                connection.server.getOutBuffer()
                connection.client.disconnecting = True
        self.flush()

    def hold(self, a: str, b: str | None = None) -> None:
        """
        Stall the bytes between C{a} and C{b} (or on every link of C{a}):
        connections stay open but nothing moves, like a stopped process,
        until L{restore}.
        """
        self._links.setdefault(self._keys(a, b), _Link()).held = True

    def delay(self, a: str, b: str | None, seconds: float) -> None:
        """
        From now on, bytes between C{a} and C{b} (or on every link of C{a})
        arrive C{seconds} later on the clock.
        """
        self._links.setdefault(self._keys(a, b), _Link()).delay = seconds

    def restore(self, a: str, b: str | None = None) -> None:
        """
        Undo L{cut}, L{hold} and L{delay} on the link between C{a} and C{b},
        or on C{a} as a whole, and move what was held.
        """
        self._links.pop(self._keys(a, b), None)
        self.flush()

    def _deliver(self, connection: _Connection, transport: FakeTransport, data: bytes) -> None:
        if not transport.disconnected:
            transport.bufferReceived(data)

    def _pumpOnce(self) -> bool:
        moved = False
        for connection in list(self._connections):
            link = self._state(connection.hosts)
            client, server = connection.client, connection.server
            if link.held and not link.cut:
                continue
            clientData = client.getOutBuffer()
            serverData = server.getOutBuffer()
            client._checkProducer()
            server._checkProducer()
            if link.delay:
                for target, data in ((server, clientData), (client, serverData)):
                    if data:
                        self.clock.callLater(link.delay, self._deliver, connection, target, data)
                        moved = True
            else:
                if clientData:
                    server.bufferReceived(clientData)
                    moved = True
                if serverData:
                    client.bufferReceived(serverData)
                    moved = True
            if clientData or serverData:
                continue
            for one, other in ((server, client), (client, server)):
                if one.disconnecting and not one.disconnected:
                    one.disconnected = True
                    other.disconnecting = True
                    other.reportDisconnect()
                    moved = True
                    break
            if client.disconnected and server.disconnected:
                self._connections.remove(connection)
        return moved

    def flush(self) -> None:
        """
        Move bytes on every link, and run what is due now on the clock,
        until nothing more moves.
        """
        for _ in range(10000):
            self.clock.advance(0)
            if not self._pumpOnce():
                self.clock.advance(0)
                if not self._pumpOnce():
                    return
        raise RuntimeError("the simulated network did not settle")

    def advance(self, seconds: float) -> None:
        """
        Let C{seconds} pass on the clock in small steps, flushing the network
        as it goes.
        """
        end = self.clock.seconds() + seconds
        self.flush()
        while True:
            pending = [c.getTime() for c in self.clock.getDelayedCalls()]
            due = min([t for t in pending if t <= end], default=None)
            if due is None:
                break
            self.clock.advance(max(0.0, due - self.clock.seconds()))
            self.flush()
        self.clock.advance(max(0.0, end - self.clock.seconds()))
        self.flush()

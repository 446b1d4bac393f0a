"""
Tests for L{fractal.routing.simulation.SimulatedNetwork}.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase

from fractal.routing.simulation import SimulatedNetwork


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


class SimulatedNetworkTests(SynchronousTestCase):
    """
    Tests for L{SimulatedNetwork}.
    """

    def setUp(self) -> None:
        self.network = SimulatedNetwork()
        self.servers: list[_Recorder] = []

        def build() -> _Recorder:
            proto = _Recorder()
            self.servers.append(proto)
            return proto

        self.stop = self.network.listen("b", "b/x", Factory.forProtocol(build))

    def connect(self) -> _Recorder:
        d = self.network.endpoint("a", "b/x").connect(Factory.forProtocol(_Recorder))
        client: _Recorder = self.successResultOf(d)
        return client

    def test_bytesMoveOnFlush(self) -> None:
        """
        Bytes written move only when the network is flushed.
        """
        client = self.connect()
        client.transport.write(b"hello")  # type: ignore[union-attr]
        self.assertEqual(self.servers[0].received, [])
        self.network.flush()
        self.assertEqual(self.servers[0].received, [b"hello"])

    def test_refused(self) -> None:
        """
        Connecting to an address nobody listens on, or over a cut link, is
        refused.
        """
        self.stop()
        self.failureResultOf(
            self.network.endpoint("a", "b/x").connect(Factory.forProtocol(_Recorder)),
            ConnectionRefusedError,
        )
        self.network.listen("b", "b/x", Factory.forProtocol(_Recorder))
        self.network.cut("b")
        self.failureResultOf(
            self.network.endpoint("a", "b/x").connect(Factory.forProtocol(_Recorder)),
            ConnectionRefusedError,
        )

    def test_cutDropsConnections(self) -> None:
        """
        Cutting a host's links drops its connections on both sides without
        delivering what was in flight.
        """
        client = self.connect()
        client.transport.write(b"lost")  # type: ignore[union-attr]
        self.network.cut("a", "b")
        self.assertTrue(client.lost)
        self.assertTrue(self.servers[0].lost)
        self.assertEqual(self.servers[0].received, [])

    def test_holdAndDelay(self) -> None:
        """
        Held bytes move on restore; delayed bytes arrive after the delay on
        the clock.
        """
        client = self.connect()
        self.network.hold("b")
        client.transport.write(b"1")  # type: ignore[union-attr]
        self.network.advance(100)
        self.assertEqual(self.servers[0].received, [])
        self.network.restore("b")
        self.assertEqual(self.servers[0].received, [b"1"])
        self.network.delay("a", "b", 3.0)
        client.transport.write(b"2")  # type: ignore[union-attr]
        self.network.advance(2.9)
        self.assertEqual(self.servers[0].received, [b"1"])
        self.network.advance(0.1)
        self.assertEqual(self.servers[0].received, [b"1", b"2"])

"""
Tests for L{fractal.routing.wire} and the L{GetShardMap} command.
"""

from __future__ import annotations

import json
import zlib

from twisted.trial.unittest import SynchronousTestCase

from fractal.protocol import GetShardMap
from fractal.routing.interfaces import NodeAddress, ShardMap, SlotOwner
from fractal.routing.topology import StaticTopology
from fractal.routing.wire import decodeShardMap, encodeShardMap


class ShardMapWireTests(SynchronousTestCase):
    """
    Tests for L{encodeShardMap} and L{decodeShardMap}.
    """

    def test_roundTrip(self) -> None:
        """
        A full-size map survives encoding, including epochs and missing peer
        endpoints, and fits in one AMP value.
        """
        nodes = [
            NodeAddress(f"n{i}", f"tcp:host=127.0.0.1:port={7100 + i}", f"tcp:host=h:port={i}")
            for i in range(5)
        ]
        base = StaticTopology("n0", nodes).currentMap()
        owners = list(base.owners)
        owners[17] = SlotOwner(owners[17].node, 9)
        shardMap = ShardMap(tuple(owners), {**base.nodes, "x": NodeAddress("x", "c")}, 42)
        encoded = encodeShardMap(shardMap)
        self.assertLess(len(encoded), 65535)
        self.assertEqual(decodeShardMap(encoded), shardMap)

    def test_command(self) -> None:
        """
        L{GetShardMap}'s response carries the map through AMP's own
        serialisation.
        """
        shardMap = StaticTopology("a", [NodeAddress("a", "c")], slots=8).currentMap()
        box = GetShardMap.makeResponse({"map": shardMap}, None)
        self.assertEqual(GetShardMap.parseResponse(box, None), {"map": shardMap})

    def test_malformed(self) -> None:
        """
        Garbage, or a well-formed document with inconsistent contents, is a
        L{ValueError}, never anything else.
        """

        def pack(document: object) -> bytes:
            return zlib.compress(json.dumps(document).encode())

        good = {"format": 1, "version": 1, "nodes": [["a", "c", None]], "owners": [0], "epochs": [1]}
        cases = [
            b"not zlib",
            zlib.compress(b"\xff"),
            pack([]),
            pack({**good, "format": 2}),
            pack({**good, "owners": [1]}),
            pack({**good, "owners": [0, 0]}),
            pack({**good, "epochs": [0]}),
            pack({**good, "nodes": [["a", 3, None]]}),
            pack({**good, "owners": [], "epochs": []}),
            pack({**good, "nodes": [["a", "c", None], ["a", "d", None]], "owners": [1]}),
            zlib.compress(b" " * (17 << 20)),
        ]
        for data in cases:
            self.assertRaises(ValueError, decodeShardMap, data)
        self.assertEqual(decodeShardMap(pack(good)).ownerOf(0), SlotOwner("a", 1))

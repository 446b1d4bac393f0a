# -*- test-case-name: tests.test_routing_wire -*-
"""
The shard map on the wire: one AMP value holding a whole L{ShardMap}.

The value is zlib-compressed JSON: the map's version, its nodes (id, client
endpoint, peer endpoint) and, for every slot, the index of its owner in the
node list and its epoch.  A map of 4096 slots takes a few kilobytes, well
under AMP's 65,535-byte limit for one value.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from twisted.protocols import amp

from fractal.routing.interfaces import NodeAddress, ShardMap, SlotOwner

__all__ = ["encodeShardMap", "decodeShardMap", "ShardMapArgument"]

_FORMAT = 1
_MAX_DECODED = 16 << 20


def encodeShardMap(shardMap: ShardMap) -> bytes:
    """
    Encode C{shardMap} as bytes.
    """
    names = sorted(shardMap.nodes)
    index = {name: i for i, name in enumerate(names)}
    document = {
        "format": _FORMAT,
        "version": shardMap.version,
        "nodes": [
            [name, shardMap.nodes[name].client, shardMap.nodes[name].peer] for name in names
        ],
        "owners": [index[owner.node] for owner in shardMap.owners],
        "epochs": [owner.epoch for owner in shardMap.owners],
    }
    return zlib.compress(json.dumps(document, separators=(",", ":")).encode("utf-8"), 9)


def _fail(why: str) -> ValueError:
    return ValueError(f"malformed shard map: {why}")


def decodeShardMap(data: bytes) -> ShardMap:
    """
    Decode bytes made by L{encodeShardMap}.

    @raise ValueError: if C{data} is not a well-formed shard map.
    """
    try:
        decompressor = zlib.decompressobj()
        raw = decompressor.decompress(data, _MAX_DECODED)
        if decompressor.unconsumed_tail:
            raise _fail("too large")
        document: Any = json.loads(raw.decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(str(e)) from None
    if not isinstance(document, dict) or document.get("format") != _FORMAT:
        raise _fail("unknown format")
    version, nodes = document.get("version"), document.get("nodes")
    owners, epochs = document.get("owners"), document.get("epochs")
    if not isinstance(version, int) or not isinstance(nodes, list):
        raise _fail("no version or nodes")
    if not isinstance(owners, list) or not isinstance(epochs, list) or len(owners) != len(epochs):
        raise _fail("owners and epochs do not match")
    addresses: list[NodeAddress] = []
    for entry in nodes:
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or not all(isinstance(x, str) for x in entry[:2])
            or not (entry[2] is None or isinstance(entry[2], str))
        ):
            raise _fail(f"bad node entry {entry!r:.60}")
        addresses.append(NodeAddress(entry[0], entry[1], entry[2]))
    if len({address.node for address in addresses}) != len(addresses):
        raise _fail("a node id repeats")
    slotOwners = []
    for owner, epoch in zip(owners, epochs):
        if not isinstance(owner, int) or not 0 <= owner < len(addresses):
            raise _fail(f"bad owner index {owner!r:.20}")
        if not isinstance(epoch, int) or epoch < 1:
            raise _fail(f"bad epoch {epoch!r:.20}")
        slotOwners.append(SlotOwner(addresses[owner].node, epoch))
    return ShardMap(
        owners=tuple(slotOwners),
        nodes={address.node: address for address in addresses},
        version=version,
    )


class ShardMapArgument(amp.Argument):
    """
    An AMP argument type carrying a L{ShardMap}.
    """

    def __init__(self, optional: bool = False) -> None:
        amp.Argument.__init__(self, optional)  # type: ignore[no-untyped-call]

    def toString(self, inObject: ShardMap) -> bytes:
        """
        Encode a map; see L{encodeShardMap}.
        """
        return encodeShardMap(inObject)

    def fromString(self, inString: bytes) -> ShardMap:
        """
        Decode a map; see L{decodeShardMap}.
        """
        return decodeShardMap(inString)

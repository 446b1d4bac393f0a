"""
Routing: who owns which slot, and getting each call to its owner.

The shard map (L{fractal.routing.interfaces.ShardMap}) says, for every slot,
which node owns it at which epoch.  A topology
(L{fractal.routing.interfaces.ITopology}) supplies the current map and tells
its observers when the map changes.
"""

__all__: list[str] = []

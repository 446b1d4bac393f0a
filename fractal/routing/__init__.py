"""
Routing: who owns which slot, and getting each call to its owner.

The shard map (L{fractal.routing.interfaces.ShardMap}) says, for every slot,
which node owns it at which epoch.  A topology
(L{fractal.routing.interfaces.ITopology}) supplies the current map and tells
its observers when the map changes.

    - L{fractal.routing.interfaces}: the shard map and C{ITopology}.
    - L{fractal.routing.rendezvous}: slot assignment by rendezvous hashing.
    - L{fractal.routing.topology}: the single-node, static and manual
      topologies.
    - L{fractal.routing.peers}: persistent links to peer nodes that forward
      raw AMP boxes.
    - L{fractal.routing.cluster}: making a node a cluster member (forwarder,
      peer listener, internal commands).
    - L{fractal.routing.smart}: the smart client that calls owners directly.
    - L{fractal.routing.wire}: the shard map on the wire.
    - L{fractal.routing.devcluster}: C{fractal dev-cluster}.
    - L{fractal.routing.simulation}, L{fractal.routing.harness}: N real nodes
      over a simulated network, for tests (exported by L{fractal.testing}).
"""

__all__: list[str] = []

"""
txfractal: fractal application servers on Twisted.

A fractal cluster is many identical node processes.  Each node owns a share of
the users; each user has a small private SQLite object store (L{fractal.store})
on the owning node.  Requests are routed by user key over AMP to the owning
node, and each store is shipped, as byte-level diffs, to durable storage.

The packages, one responsibility each:

    - L{fractal.store}: the Axiom-compatible object store on SQLite.
    - L{fractal.keys}: user keys, slots and on-disk store names.
    - L{fractal.app}: the programming model (applications, user commands).
    - L{fractal.protocol}: the wire contract, every framework AMP error and
      internal command.
    - L{fractal.pool}: opening, limiting and closing user stores.
    - L{fractal.server}: the AMP front door of a node.
    - L{fractal.node}: the service that wires a node together.
    - L{fractal.client}: calling a node, or a cluster through its owners.
    - L{fractal.routing}: shard maps, topologies, forwarding between nodes.
    - L{fractal.durable}: shipping stores to durable storage and restoring.
    - L{fractal.postgres}: membership, failover and durable copies on
      PostgreSQL.
    - L{fractal.certs}: the cluster's certificate authority and TLS.
    - L{fractal.manhole}: the SSH console into a live node.
    - L{fractal.tap}: the C{twistd fractal} plugin's options.
    - L{fractal.testing}: public fakes and harnesses for tests.
"""

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]

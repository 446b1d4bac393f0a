"""
txfractal: fractal application servers on Twisted.

A fractal cluster is many identical node processes.  Each node owns a share of
the users; each user has a small private SQLite object store (L{fractal.store})
on the owning node.  Requests are routed by user key over AMP to the owning
node, and each store is shipped, as byte-level diffs, to durable storage.

The packages, one responsibility each:

    - L{fractal.store}: the Axiom-compatible object store on SQLite.
    - L{fractal.keys}: user keys, slots and on-disk store names.
"""

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]

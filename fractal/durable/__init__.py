# -*- test-case-name: tests.test_durable_shipper -*-
"""
Durable persistence: shipping each user store's changed pages to durable
storage as a chain of delta records, and restoring a store from its chain.

    - L{fractal.durable.interfaces}: L{IShipper <fractal.durable.interfaces.IShipper>},
      the seam the node's store pool uses, and
      L{IDurableBackend <fractal.durable.interfaces.IDurableBackend>}, the seam
      every storage backend implements.
    - L{fractal.durable.record}: the record format.
    - L{fractal.durable.filesystem}: the default backend, a directory.
    - L{fractal.durable.shipper}: the shipper.
    - L{fractal.durable.restore}: rebuilding a store from its chain, verified.
    - L{fractal.durable.tool}: C{fractal restore} and C{fractal verify}.

The in-memory backend and the conformance tests every backend runs are public
in L{fractal.testing} (C{MemoryDurableBackend}, C{DurableBackendTestsMixin}).
"""

__all__: list[str] = []

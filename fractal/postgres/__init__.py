"""
PostgreSQL as the shared engine of a self-running cluster: membership with
leases, slot ownership with epochs, and the durable copies of the stores, all
in one database, so that fencing and durable writes are checked in one
transaction.

    - L{fractal.postgres.connection}: L{Database
      <fractal.postgres.connection.Database>}, the one connection layer on one
      DSN, which runs every query off the reactor thread, and the LISTEN side
      of notifications.
    - L{fractal.postgres.schema}: the versioned schema and C{fractal db init}.
    - L{fractal.postgres.backend}: L{PostgresBackend
      <fractal.postgres.backend.PostgresBackend>}, an
      L{IDurableBackend <fractal.durable.interfaces.IDurableBackend>}.
    - L{fractal.postgres.topology}: L{PostgresTopology
      <fractal.postgres.topology.PostgresTopology>}, an
      L{ITopology <fractal.routing.interfaces.ITopology>} with leases,
      failover, rebalancing and handoff.
"""

__all__: list[str] = []

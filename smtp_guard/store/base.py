"""What every store raises, whatever the domain and the implementation.

Each domain declares its store interface (a Protocol) and the values that cross it next to its
own code: ``suppression_model.py``, ``hold/model.py``, ``breaker/model.py``, ``audit_model.py``,
``erasure/model.py``, ``change_model.py``. The SQLite implementation (``store/sqlite``) is the
only code with SQL in it; a PostgreSQL implementation for several guard instances can join it
later behind the same protocols (docs/design.md, "Scale").
"""


class StoreError(Exception):
    """The store could not do what was asked (locked, full, corrupt, unreachable)."""


class StoreBusy(StoreError):
    """Another writer held the store for longer than ``[store] busy_timeout``. Temporary: the
    same call succeeds once the other writer lets go."""


class StoreFull(StoreError):
    """The disk (or file system) holding the store is full. Temporary: the same call succeeds
    once space is freed; nothing was written."""

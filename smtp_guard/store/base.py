"""What every store raises, whatever the domain and the implementation.

Each domain declares its store interface (a Protocol) and the values that cross it next to its
own code: ``suppression_model.py``, ``hold/model.py``, ``breaker/model.py``, ``audit_model.py``,
``erasure/model.py``, ``change_model.py``. The SQLite implementation (``store/sqlite``) and the
PostgreSQL one for several guard instances (``store/postgres``) are the only code with SQL in
it; ``backends.py`` picks one from ``[store]`` (docs/design.md, "Scale").
"""


class StoreError(Exception):
    """The store could not do what was asked (locked, full, corrupt, unreachable)."""


class StoreBusy(StoreError):
    """Another writer held the store for longer than ``[store] busy_timeout``. Temporary: the
    same call succeeds once the other writer lets go."""


class StoreFull(StoreError):
    """The disk (or file system) holding the store is full. Temporary: the same call succeeds
    once space is freed; nothing was written."""

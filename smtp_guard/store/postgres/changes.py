"""The change generation and the guard instances on PostgreSQL (``change_generation``,
``guard_instances``).

``generation()`` is what every guard process of every instance repeats each
``[store] change_poll_interval``: one row by primary key. Heartbeats are written with each
guard's own clock, as on SQLite; ``services/propagation.py`` compares them with the admin's
clock, so the instances' clocks must agree to within a few seconds (NTP).
"""

from __future__ import annotations

import builtins
from typing import Any, Sequence

from ...change_model import GuardInstance
from ..base import StoreError
from .db import PostgresDatabase

_COLUMNS = "id, host, pid, started_at, heartbeat_at, applied_generation"
_NOT_MIGRATED = "the change_generation table has no row; the store was not migrated by smtp-guard"


class PostgresChangeStore:
    """``ChangeStore`` over a ``PostgresDatabase``."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    async def bump_generation(self) -> int:
        row = await self._db.fetchone(
            "UPDATE change_generation SET generation = generation + 1 WHERE id = 1 RETURNING generation")
        if row is None:
            raise StoreError(_NOT_MIGRATED)
        return int(row[0])

    async def generation(self) -> int:
        row = await self._db.fetchone("SELECT generation FROM change_generation WHERE id = 1")
        if row is None:
            raise StoreError(_NOT_MIGRATED)
        return int(row[0])

    async def report(self, instance: GuardInstance) -> None:
        await self._db.execute(
            f"INSERT INTO guard_instances ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, "
            "applied_generation = excluded.applied_generation",
            (instance.id, instance.host, instance.pid, instance.started_at, instance.heartbeat_at,
             instance.applied_generation))

    async def remove(self, instance_id: str) -> None:
        await self._db.execute("DELETE FROM guard_instances WHERE id = %s", (instance_id,))

    async def instances(self) -> builtins.list[GuardInstance]:
        rows = await self._db.fetchall(f"SELECT {_COLUMNS} FROM guard_instances ORDER BY started_at, id")
        return [_instance(row) for row in rows]

    async def forget(self, heartbeat_before: float) -> builtins.list[GuardInstance]:
        rows = await self._db.fetchall(
            f"DELETE FROM guard_instances WHERE heartbeat_at < %s RETURNING {_COLUMNS}", (heartbeat_before,))
        return [_instance(row) for row in rows]


def _instance(row: Sequence[Any]) -> GuardInstance:
    return GuardInstance(id=row[0], host=row[1], pid=int(row[2]), started_at=row[3], heartbeat_at=row[4],
                         applied_generation=None if row[5] is None else int(row[5]))

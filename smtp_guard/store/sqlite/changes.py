"""The change generation and the guard instances on SQLite (``change_generation``, ``guard_instances``).

``generation()`` is the statement every running guard process repeats several times a second:
one row by primary key, no write, no lock beyond the WAL read snapshot.
"""

from __future__ import annotations

import builtins
from typing import Any, Sequence

from ...change_model import GuardInstance
from ..base import StoreError
from .db import Database

_COLUMNS = "id, host, pid, started_at, heartbeat_at, applied_generation"


class SQLiteChangeStore:
    """``ChangeStore`` over a shared ``Database``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def bump_generation(self) -> int:
        async with self._db.transaction() as conn:
            async with conn.execute(
                "UPDATE change_generation SET generation = generation + 1 WHERE id = 1 RETURNING generation"
            ) as cursor:
                row = await cursor.fetchone()
        if row is None:
            raise StoreError("the change_generation table has no row; the store was not migrated by smtp-guard")
        return int(row[0])

    async def generation(self) -> int:
        row = await self._db.fetchone("SELECT generation FROM change_generation WHERE id = 1")
        if row is None:
            raise StoreError("the change_generation table has no row; the store was not migrated by smtp-guard")
        return int(row[0])

    async def report(self, instance: GuardInstance) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(
                f"INSERT INTO guard_instances ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, "
                "applied_generation = excluded.applied_generation",
                (instance.id, instance.host, instance.pid, instance.started_at, instance.heartbeat_at,
                 instance.applied_generation))

    async def remove(self, instance_id: str) -> None:
        async with self._db.transaction() as conn:
            await conn.execute("DELETE FROM guard_instances WHERE id = ?", (instance_id,))

    async def instances(self) -> builtins.list[GuardInstance]:
        rows = await self._db.fetchall(f"SELECT {_COLUMNS} FROM guard_instances ORDER BY started_at, id")
        return [_instance(row) for row in rows]

    async def forget(self, heartbeat_before: float) -> builtins.list[GuardInstance]:
        async with self._db.transaction() as conn:
            async with conn.execute(
                f"DELETE FROM guard_instances WHERE heartbeat_at < ? RETURNING {_COLUMNS}", (heartbeat_before,)
            ) as cursor:
                return [_instance(row) for row in await cursor.fetchall()]


def _instance(row: Sequence[Any]) -> GuardInstance:
    return GuardInstance(id=row[0], host=row[1], pid=int(row[2]), started_at=row[3], heartbeat_at=row[4],
                         applied_generation=None if row[5] is None else int(row[5]))

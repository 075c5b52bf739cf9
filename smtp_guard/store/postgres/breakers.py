"""Breaker records and sender baselines on PostgreSQL (tables ``breakers`` and ``baselines``).

As on SQLite (``store/sqlite/breakers.py``): the server's writes only change the status where
the stored ``decided_at`` is the one they were based on, so no guard instance undoes an admin
decision it has not read yet.
"""

from __future__ import annotations

import builtins
from typing import Any, Sequence

from ...breaker.model import Baseline, BreakerRecord, BreakerStatus
from .db import PostgresDatabase

_COLUMNS = ("stream, rule, sender, message_class, status, threshold, ceiling, recipients, tripped_at, "
            "updated_at, decided_by, decided_at")

# Columns the server may change only while no newer admin decision is stored.
_GUARDED = ("rule", "status", "threshold", "tripped_at")


class PostgresBreakerStore:
    """``BreakerStore`` over a ``PostgresDatabase``."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    async def save(self, records: Sequence[BreakerRecord]) -> None:
        if not records:
            return
        guarded = ", ".join(
            f"{column} = CASE WHEN breakers.decided_at IS NOT DISTINCT FROM excluded.decided_at "
            f"THEN excluded.{column} ELSE breakers.{column} END"
            for column in _GUARDED)
        async with self._db.transaction() as conn:
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    f"INSERT INTO breakers ({_COLUMNS}) VALUES ({', '.join(['%s'] * 12)}) "
                    "ON CONFLICT (stream) DO UPDATE SET recipients = excluded.recipients, "
                    f"updated_at = excluded.updated_at, {guarded}",
                    [_row(record) for record in records])

    async def get(self, stream: str) -> BreakerRecord | None:
        row = await self._db.fetchone(f"SELECT {_COLUMNS} FROM breakers WHERE stream = %s", (stream,))
        return None if row is None else BreakerRecord(*row)

    async def list(self, status: BreakerStatus | None = None, limit: int | None = 100) -> builtins.list[BreakerRecord]:
        # LIMIT NULL is no limit.
        if status is None:
            rows = await self._db.fetchall(
                f"SELECT {_COLUMNS} FROM breakers ORDER BY tripped_at DESC, stream LIMIT %s", (limit,))
        else:
            rows = await self._db.fetchall(
                f"SELECT {_COLUMNS} FROM breakers WHERE status = %s ORDER BY tripped_at DESC, stream LIMIT %s",
                (status, limit))
        return [BreakerRecord(*row) for row in rows]

    async def decided_since(self, since: float | None) -> builtins.list[BreakerRecord]:
        rows = await self._db.fetchall(
            f"SELECT {_COLUMNS} FROM breakers WHERE decided_at IS NOT NULL AND decided_at >= %s ORDER BY decided_at",
            (since if since is not None else float("-inf"),))
        return [BreakerRecord(*row) for row in rows]

    async def decide(self, stream: str, status: BreakerStatus, ceiling: int | None, actor: str,
                     now: float) -> BreakerRecord | None:
        row = await self._db.fetchone(
            "UPDATE breakers SET status = %s, ceiling = %s, decided_by = %s, "
            # Strictly later than the decision it replaces: decided_at is the version.
            "decided_at = GREATEST(%s, COALESCE(decided_at, 0) + 0.000001), updated_at = %s WHERE stream = %s "
            f"RETURNING {_COLUMNS}", (status, ceiling, actor, now, now, stream))
        return None if row is None else BreakerRecord(*row)

    async def baselines(self) -> builtins.list[Baseline]:
        rows = await self._db.fetchall("SELECT sender, baseline, streams, updated_at FROM baselines")
        return [Baseline(*row) for row in rows]

    async def baseline(self, sender: str) -> Baseline | None:
        row = await self._db.fetchone(
            "SELECT sender, baseline, streams, updated_at FROM baselines WHERE sender = %s", (sender,))
        return None if row is None else Baseline(*row)

    async def save_baselines(self, baselines: Sequence[Baseline]) -> None:
        if not baselines:
            return
        async with self._db.transaction() as conn:
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO baselines (sender, baseline, streams, updated_at) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (sender) DO UPDATE SET baseline = excluded.baseline, streams = excluded.streams, "
                    "updated_at = excluded.updated_at",
                    [(b.sender, b.baseline, b.streams, b.updated_at) for b in baselines])


def _row(record: BreakerRecord) -> tuple[Any, ...]:
    return (record.stream, record.rule, record.sender, record.message_class, record.status, record.threshold,
            record.ceiling, record.recipients, record.tripped_at, record.updated_at, record.decided_by,
            record.decided_at)

"""Breaker records and sender baselines on SQLite (tables ``breakers`` and ``baselines``).

Two writers share a breaker row: the running server (counts, trips, re-trips) and admins
(approve, cancel). The admin's decision carries ``decided_at``; the server's writes name the
``decided_at`` they were based on and only change the status where it is still the stored
one, so a server that has not yet read a decision can never undo it.
"""

from __future__ import annotations

import builtins
from typing import Any, Sequence

from ...breaker.model import Baseline, BreakerRecord, BreakerStatus
from .db import Database

_COLUMNS = ("stream, rule, sender, message_class, status, threshold, ceiling, recipients, tripped_at, "
            "updated_at, decided_by, decided_at")

# Columns the server may change only while no newer admin decision is stored.
_GUARDED = ("rule", "status", "threshold", "tripped_at")


class SQLiteBreakerStore:
    """``BreakerStore`` over a shared ``Database``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def save(self, records: Sequence[BreakerRecord]) -> None:
        if not records:
            return
        guarded = ", ".join(
            f"{column} = CASE WHEN breakers.decided_at IS excluded.decided_at "
            f"THEN excluded.{column} ELSE breakers.{column} END"
            for column in _GUARDED)
        async with self._db.transaction() as conn:
            await conn.executemany(
                f"INSERT INTO breakers ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (stream) DO UPDATE SET recipients = excluded.recipients, "
                f"updated_at = excluded.updated_at, {guarded}",
                [_row(record) for record in records],
            )

    async def get(self, stream: str) -> BreakerRecord | None:
        row = await self._db.fetchone(f"SELECT {_COLUMNS} FROM breakers WHERE stream = ?", (stream,))
        return None if row is None else _record(row)

    async def list(self, status: BreakerStatus | None = None, limit: int | None = 100) -> builtins.list[BreakerRecord]:
        limit = -1 if limit is None else limit  # SQLite: a negative LIMIT is no limit
        if status is None:
            rows = await self._db.fetchall(
                f"SELECT {_COLUMNS} FROM breakers ORDER BY tripped_at DESC, stream LIMIT ?", (limit,))
        else:
            rows = await self._db.fetchall(
                f"SELECT {_COLUMNS} FROM breakers WHERE status = ? ORDER BY tripped_at DESC, stream LIMIT ?",
                (status, limit))
        return [_record(row) for row in rows]

    async def decided_since(self, since: float | None) -> builtins.list[BreakerRecord]:
        rows = await self._db.fetchall(
            f"SELECT {_COLUMNS} FROM breakers WHERE decided_at IS NOT NULL AND decided_at >= ? ORDER BY decided_at",
            (since if since is not None else float("-inf"),))
        return [_record(row) for row in rows]

    async def decide(self, stream: str, status: BreakerStatus, ceiling: int | None, actor: str,
                     now: float) -> BreakerRecord | None:
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "UPDATE breakers SET status = ?, ceiling = ?, decided_by = ?, "
                # Strictly later than the decision it replaces: decided_at is the version.
                "decided_at = MAX(?, COALESCE(decided_at, 0) + 0.000001), updated_at = ? WHERE stream = ?",
                (status, ceiling, actor, now, now, stream))
            if cursor.rowcount == 0:
                return None
        return await self.get(stream)

    async def baselines(self) -> builtins.list[Baseline]:
        rows = await self._db.fetchall("SELECT sender, baseline, streams, updated_at FROM baselines")
        return [Baseline(*row) for row in rows]

    async def baseline(self, sender: str) -> Baseline | None:
        row = await self._db.fetchone(
            "SELECT sender, baseline, streams, updated_at FROM baselines WHERE sender = ?", (sender,))
        return None if row is None else Baseline(*row)

    async def save_baselines(self, baselines: Sequence[Baseline]) -> None:
        if not baselines:
            return
        async with self._db.transaction() as conn:
            await conn.executemany(
                "INSERT INTO baselines (sender, baseline, streams, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (sender) DO UPDATE SET baseline = excluded.baseline, streams = excluded.streams, "
                "updated_at = excluded.updated_at",
                [(b.sender, b.baseline, b.streams, b.updated_at) for b in baselines])


def _row(record: BreakerRecord) -> tuple[Any, ...]:
    return (record.stream, record.rule, record.sender, record.message_class, record.status, record.threshold,
            record.ceiling, record.recipients, record.tripped_at, record.updated_at, record.decided_by,
            record.decided_at)


def _record(row: Sequence[Any]) -> BreakerRecord:
    return BreakerRecord(*row)

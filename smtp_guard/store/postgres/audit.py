"""The audit trail on PostgreSQL: append batches, query newest first."""

from __future__ import annotations

from typing import Any, Sequence

from ...audit_model import AuditFilter, AuditRecord
from .db import PostgresDatabase

_COLUMNS = "time, kind, verdict, rule, reason, txn_id, client, sender, recipient, actor"


class PostgresAuditStore:
    """``AuditStore`` over a ``PostgresDatabase``."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    async def append(self, records: Sequence[AuditRecord]) -> None:
        if not records:
            return
        async with self._db.transaction() as conn:
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    f"INSERT INTO audit ({_COLUMNS}) VALUES ({', '.join(['%s'] * 10)})",
                    [(r.time, r.kind, r.verdict, r.rule, r.reason, r.txn_id, r.client, r.sender, r.recipient,
                      r.actor) for r in records])

    async def query(self, filters: AuditFilter, limit: int = 100) -> list[AuditRecord]:
        """Records matching every given filter, newest first; ``rule_prefix`` matches rule ids
        by prefix, the rest exactly."""
        where: list[str] = []
        parameters: list[Any] = []
        if filters.since is not None:
            where.append("time >= %s")
            parameters.append(filters.since)
        if filters.until is not None:
            where.append("time < %s")
            parameters.append(filters.until)
        if filters.rule_prefix:
            # left() rather than LIKE: rule ids contain "_", which LIKE treats as a wildcard.
            where.append("left(rule, %s) = %s")
            parameters += [len(filters.rule_prefix), filters.rule_prefix]
        for column, value in (("kind", filters.kind), ("verdict", filters.verdict), ("recipient", filters.recipient),
                              ("sender", filters.sender), ("txn_id", filters.txn_id)):
            if value is not None:
                where.append(f"{column} = %s")
                parameters.append(value)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = await self._db.fetchall(
            f"SELECT {_COLUMNS} FROM audit {clause}ORDER BY time DESC, id DESC LIMIT %s", (*parameters, limit))
        return [AuditRecord(*row) for row in rows]

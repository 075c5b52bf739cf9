"""The hold queue on PostgreSQL: held messages, their recipients' states, the release queue.

The same states and the same forgetting as the SQLite queue (``store/sqlite/holds.py``).
What changes is who competes: every guard instance runs a release worker on the same queue,
so ``claim`` takes recipients with row locks (``FOR UPDATE SKIP LOCKED``): an instance never
waits for, nor takes, a recipient another one is claiming, and a claimed recipient is hidden
from every ``due`` for its lease — each released recipient is attempted by one instance at
a time and delivered once.
"""

from __future__ import annotations

import builtins
import time
from typing import Any, Callable, Sequence

from ...hold.model import HeldMessage, HeldRecipient, HoldStats, NewHold, RecipientState, new_hold_id
from .db import Connection, PostgresDatabase

_MESSAGE_COLUMNS = "id, txn_id, created_at, client, sender, mail_options, size, stream, message_class"
_RECIPIENT_COLUMNS = "address, state, rule, reason, attempts, next_attempt_at, last_reply"


class PostgresHoldStore:
    """``HoldStore`` over a ``PostgresDatabase``."""

    def __init__(self, db: PostgresDatabase, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    async def hold(self, message: NewHold) -> str:
        hold_id = new_hold_id()
        now = self._clock()
        async with self._db.transaction() as conn:
            await conn.execute(
                f"INSERT INTO held_messages ({_MESSAGE_COLUMNS}, content) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (hold_id, message.txn_id, now, message.client, message.sender, " ".join(message.mail_options),
                 len(message.content), message.stream, message.message_class, message.content))
            async with conn.cursor() as cursor:
                # DO NOTHING: a client that names the same recipient twice gets one delivery.
                await cursor.executemany(
                    f"INSERT INTO held_recipients (hold_id, {_RECIPIENT_COLUMNS}) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    [(hold_id, r.address, r.state, r.rule, r.reason, r.attempts,
                      now if r.state == "released" and r.next_attempt_at is None else r.next_attempt_at,
                      r.last_reply)
                     for r in message.recipients])
        return hold_id

    async def list(self, state: RecipientState | None = "held", limit: int = 100) -> builtins.list[HeldMessage]:
        if state is None:
            rows = await self._db.fetchall(
                f"SELECT {_MESSAGE_COLUMNS} FROM held_messages ORDER BY created_at DESC, id LIMIT %s", (limit,))
        else:
            rows = await self._db.fetchall(
                f"SELECT {_MESSAGE_COLUMNS} FROM held_messages m WHERE EXISTS "
                "(SELECT 1 FROM held_recipients r WHERE r.hold_id = m.id AND r.state = %s) "
                "ORDER BY created_at DESC, id LIMIT %s", (state, limit))
        recipients = await self._recipients([row[0] for row in rows])
        return [_message(row, tuple(recipients.get(row[0], ()))) for row in rows]

    async def get(self, hold_id: str) -> HeldMessage | None:
        row = await self._db.fetchone(f"SELECT {_MESSAGE_COLUMNS}, content FROM held_messages WHERE id = %s",
                                      (hold_id,))
        if row is None:
            return None
        recipients = await self._recipients([hold_id])
        return _message(row, tuple(recipients.get(hold_id, ())), content=_bytes(row[9]))

    async def release(self, hold_id: str, now: float, recipients: Sequence[str] | None = None) -> int:
        where, parameters = _recipient_filter(hold_id, recipients)
        return await self._db.execute(
            f"UPDATE held_recipients SET state = 'released', next_attempt_at = %s WHERE {where} AND state = 'held'",
            (now, *parameters))

    async def discard(self, hold_id: str, recipients: Sequence[str] | None = None) -> int:
        where, parameters = _recipient_filter(hold_id, recipients)
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "UPDATE held_recipients SET state = 'discarded', next_attempt_at = NULL "
                f"WHERE {where} AND state IN ('held', 'released')", parameters)
            await _forget_if_finished(conn, hold_id)
            return max(cursor.rowcount, 0)

    async def due(self, now: float, limit: int = 50) -> builtins.list[HeldMessage]:
        rows = await self._db.fetchall(
            "SELECT m.id, m.txn_id, m.created_at, m.client, m.sender, m.mail_options, m.size, m.stream, "
            "m.message_class, m.content, MIN(r.next_attempt_at) AS first_due "
            "FROM held_messages m JOIN held_recipients r ON r.hold_id = m.id "
            "WHERE r.state = 'released' AND r.next_attempt_at <= %s AND m.content IS NOT NULL "
            "GROUP BY m.id ORDER BY first_due, m.created_at LIMIT %s", (now, limit))
        if not rows:
            return []
        ids = [row[0] for row in rows]
        due_rows = await self._db.fetchall(
            f"SELECT hold_id, {_RECIPIENT_COLUMNS} FROM held_recipients WHERE hold_id = ANY(%s) "
            "AND state = 'released' AND next_attempt_at <= %s ORDER BY hold_id, id", (ids, now))
        recipients = _group(due_rows)
        return [_message(row, tuple(recipients.get(row[0], ())), content=_bytes(row[9])) for row in rows]

    async def claim(self, hold_id: str, addresses: Sequence[str], now: float, lease: float) -> builtins.list[str]:
        if not addresses:
            return []
        # Rows another instance is claiming right now are skipped, not waited for; the ones
        # locked here are re-checked (still released, still due) before the lease moves on.
        rows = await self._db.fetchall(
            "UPDATE held_recipients SET next_attempt_at = %s WHERE id IN ("
            "SELECT id FROM held_recipients WHERE hold_id = %s AND address = ANY(%s) AND state = 'released' "
            "AND next_attempt_at <= %s FOR UPDATE SKIP LOCKED) RETURNING address",
            (now + lease, hold_id, list(addresses), now))
        return [row[0] for row in rows]

    async def record_attempt(self, hold_id: str, address: str, state: RecipientState, reply: str,
                             next_attempt_at: float | None) -> None:
        # A retry must not undo an admin's discard made while the attempt was in flight; a
        # final outcome is recorded whatever happened meanwhile: it is what the upstream did.
        only_if_released = " AND state = 'released'" if state == "released" else ""
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE held_recipients SET state = %s, attempts = attempts + 1, next_attempt_at = %s, "
                f"last_reply = %s WHERE hold_id = %s AND address = %s{only_if_released}",
                (state, next_attempt_at, reply, hold_id, address))
            await _forget_if_finished(conn, hold_id)

    async def stats(self) -> HoldStats:
        row = await self._db.fetchone(
            "SELECT COUNT(DISTINCT r.hold_id), COUNT(*), MIN(m.created_at) "
            "FROM held_recipients r JOIN held_messages m ON m.id = r.hold_id "
            "WHERE r.state IN ('held', 'released')")
        return HoldStats(held_messages=int(row[0]), held_recipients=int(row[1]), oldest_held_at=row[2])

    async def release_stream(self, stream: str, rules: Sequence[str], now: float) -> int:
        if not rules:
            return 0
        return await self._db.execute(
            "UPDATE held_recipients SET state = 'released', next_attempt_at = %s "
            "WHERE state = 'held' AND rule = ANY(%s) AND hold_id IN (SELECT id FROM held_messages WHERE stream = %s)",
            (now, list(rules), stream))

    async def discard_stream(self, stream: str, rules: Sequence[str]) -> int:
        if not rules:
            return 0
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "UPDATE held_recipients r SET state = 'discarded', next_attempt_at = NULL FROM held_messages m "
                "WHERE m.id = r.hold_id AND m.stream = %s AND r.state IN ('held', 'released') AND r.rule = ANY(%s) "
                "RETURNING r.hold_id", (stream, list(rules)))
            hold_ids = [row[0] for row in await cursor.fetchall()]
            for hold_id in sorted(set(hold_ids)):
                await _forget_if_finished(conn, hold_id)
            return len(hold_ids)

    async def stream_messages(self, stream: str, limit: int = 3) -> builtins.list[HeldMessage]:
        rows = await self._db.fetchall(
            f"SELECT {_MESSAGE_COLUMNS} FROM held_messages m WHERE stream = %s AND EXISTS "
            "(SELECT 1 FROM held_recipients r WHERE r.hold_id = m.id AND r.state = 'held') "
            "ORDER BY created_at, id LIMIT %s", (stream, limit))
        recipients = await self._recipients([row[0] for row in rows])
        return [_message(row, tuple(recipients.get(row[0], ()))) for row in rows]

    async def stream_counts(self, stream: str) -> dict[RecipientState, int]:
        rows = await self._db.fetchall(
            "SELECT r.state, COUNT(*) FROM held_recipients r JOIN held_messages m ON m.id = r.hold_id "
            "WHERE m.stream = %s GROUP BY r.state", (stream,))
        return {state: int(count) for state, count in rows}

    async def _recipients(self, hold_ids: Sequence[str]) -> dict[str, builtins.list[HeldRecipient]]:
        if not hold_ids:
            return {}
        rows = await self._db.fetchall(
            f"SELECT hold_id, {_RECIPIENT_COLUMNS} FROM held_recipients WHERE hold_id = ANY(%s) ORDER BY hold_id, id",
            (list(hold_ids),))
        return _group(rows)


async def _forget_if_finished(conn: Connection, hold_id: str) -> None:
    """Delete what the guard no longer needs once no recipient waits for delivery."""
    cursor = await conn.execute(
        "SELECT 1 FROM held_recipients WHERE hold_id = %s AND state IN ('held', 'released') LIMIT 1", (hold_id,))
    if await cursor.fetchone() is not None:
        return
    await conn.execute("UPDATE held_messages SET content = NULL WHERE id = %s AND content IS NOT NULL", (hold_id,))
    # The row id keeps the placeholders unique within the (hold_id, address) primary key.
    await conn.execute(
        "UPDATE held_recipients SET address = '(discarded #' || id || ')' "
        "WHERE hold_id = %s AND state = 'discarded' AND address NOT LIKE '(discarded #%%'", (hold_id,))


def _recipient_filter(hold_id: str, recipients: Sequence[str] | None) -> tuple[str, tuple[Any, ...]]:
    if recipients is None:
        return "hold_id = %s", (hold_id,)
    return "hold_id = %s AND address = ANY(%s)", (hold_id, list(recipients))


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _group(rows: Sequence[Any]) -> dict[str, list[HeldRecipient]]:
    grouped: dict[str, list[HeldRecipient]] = {}
    for hold_id, address, state, rule, reason, attempts, next_attempt_at, last_reply in rows:
        grouped.setdefault(hold_id, []).append(
            HeldRecipient(address, state, rule, reason, attempts, next_attempt_at, last_reply))
    return grouped


def _message(row: Sequence[Any], recipients: tuple[HeldRecipient, ...], content: bytes | None = None) -> HeldMessage:
    hold_id, txn_id, created_at, client, sender, mail_options, size, stream, message_class = row[:9]
    return HeldMessage(
        id=hold_id, txn_id=txn_id, created_at=created_at, client=client, sender=sender,
        mail_options=tuple(mail_options.split()), size=size, recipients=recipients, content=content,
        stream=stream, message_class=message_class)

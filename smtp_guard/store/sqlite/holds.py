"""The hold queue on SQLite: held messages, their recipients' states, and the release queue.

A recipient moves ``held`` -> ``released`` (an admin approved it) -> ``delivered`` or
``failed``, or ``held``/``released`` -> ``discarded``. Every write is one transaction on a
WAL database with ``synchronous=FULL``, so when ``hold()`` returns the message is on disk
and the client may get its 250 (docs/design.md, "The relay never loses mail").

Once no recipient of a message waits for delivery any more, the guard stops being a copy of
it: the content is deleted, and so are the addresses of recipients it was never sent to
(discarded ones), which are replaced by a placeholder. Delivered and failed recipients keep
their address and last reply as the operator's record of what happened.
"""

from __future__ import annotations

import builtins
import time
from typing import Any, Callable, Sequence

import aiosqlite

from ...hold.model import HeldMessage, HeldRecipient, HoldStats, NewHold, RecipientState, new_hold_id
from .db import Database

_MESSAGE_COLUMNS = "id, txn_id, created_at, client, sender, mail_options, size, stream, message_class"
_RECIPIENT_COLUMNS = "address, state, rule, reason, attempts, next_attempt_at, last_reply"


class SQLiteHoldStore:
    """``HoldStore`` over a shared ``Database``."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    async def hold(self, message: NewHold) -> str:
        hold_id = new_hold_id()
        now = self._clock()
        async with self._db.transaction() as conn:
            await conn.execute(
                f"INSERT INTO held_messages ({_MESSAGE_COLUMNS}, content) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (hold_id, message.txn_id, now, message.client, message.sender,
                 " ".join(message.mail_options), len(message.content), message.stream, message.message_class,
                 message.content),
            )
            # OR IGNORE: a client that names the same recipient twice gets one delivery,
            # as from any MTA.
            await conn.executemany(
                f"INSERT OR IGNORE INTO held_recipients (hold_id, {_RECIPIENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(hold_id, r.address, r.state, r.rule, r.reason, r.attempts,
                  # A recipient held as already released is due at once; due() needs a time
                  # to use its (state, next_attempt_at) index.
                  now if r.state == "released" and r.next_attempt_at is None else r.next_attempt_at,
                  r.last_reply)
                 for r in message.recipients],
            )
        return hold_id

    async def list(self, state: RecipientState | None = "held", limit: int = 100) -> list[HeldMessage]:
        """Messages with at least one recipient in ``state`` (any state when None), newest
        first, each with all its recipients and without content."""
        if state is None:
            rows = await self._db.fetchall(
                f"SELECT {_MESSAGE_COLUMNS} FROM held_messages ORDER BY created_at DESC, id LIMIT ?", (limit,)
            )
        else:
            rows = await self._db.fetchall(
                f"SELECT {_MESSAGE_COLUMNS} FROM held_messages m WHERE EXISTS "
                "(SELECT 1 FROM held_recipients r WHERE r.hold_id = m.id AND r.state = ?) "
                "ORDER BY created_at DESC, id LIMIT ?",
                (state, limit),
            )
        recipients = await self._recipients([row[0] for row in rows])
        return [_message(row, tuple(recipients.get(row[0], ()))) for row in rows]

    async def get(self, hold_id: str) -> HeldMessage | None:
        row = await self._db.fetchone(
            f"SELECT {_MESSAGE_COLUMNS}, content FROM held_messages WHERE id = ?", (hold_id,)
        )
        if row is None:
            return None
        recipients = await self._recipients([hold_id])
        return _message(row, tuple(recipients.get(hold_id, ())), content=row[9])

    async def release(self, hold_id: str, now: float, recipients: Sequence[str] | None = None) -> int:
        async with self._db.transaction() as conn:
            where, parameters = _recipient_filter(hold_id, recipients)
            cursor = await conn.execute(
                f"UPDATE held_recipients SET state = 'released', next_attempt_at = ? WHERE {where} AND state = 'held'",
                (now, *parameters),
            )
            return cursor.rowcount

    async def discard(self, hold_id: str, recipients: Sequence[str] | None = None) -> int:
        async with self._db.transaction() as conn:
            where, parameters = _recipient_filter(hold_id, recipients)
            cursor = await conn.execute(
                f"UPDATE held_recipients SET state = 'discarded', next_attempt_at = NULL "
                f"WHERE {where} AND state IN ('held', 'released')",
                parameters,
            )
            await _forget_if_finished(conn, hold_id)
            return cursor.rowcount

    async def due(self, now: float, limit: int = 50) -> builtins.list[HeldMessage]:
        rows = await self._db.fetchall(
            "SELECT m.id, m.txn_id, m.created_at, m.client, m.sender, m.mail_options, m.size, m.stream, "
            "m.message_class, m.content "
            "FROM held_messages m JOIN held_recipients r ON r.hold_id = m.id "
            "WHERE r.state = 'released' AND r.next_attempt_at <= ? AND m.content IS NOT NULL "
            "GROUP BY m.id ORDER BY MIN(r.next_attempt_at), m.created_at LIMIT ?",
            (now, limit),
        )
        if not rows:
            return []
        ids = [row[0] for row in rows]
        due_rows = await self._db.fetchall(
            f"SELECT hold_id, {_RECIPIENT_COLUMNS} FROM held_recipients "
            f"WHERE hold_id IN ({_placeholders(ids)}) AND state = 'released' "
            "AND next_attempt_at <= ? ORDER BY hold_id, rowid",
            (*ids, now),
        )
        recipients = _group(due_rows)
        return [_message(row, tuple(recipients.get(row[0], ())), content=row[9]) for row in rows]

    async def claim(self, hold_id: str, addresses: Sequence[str], now: float, lease: float) -> builtins.list[str]:
        # Moving next_attempt_at past the lease hides the rows from every other due(): in this
        # process, another worker process or another instance on the same store.
        if not addresses:
            return []
        async with self._db.transaction() as conn:
            async with conn.execute(
                f"UPDATE held_recipients SET next_attempt_at = ? WHERE hold_id = ? AND address IN "
                f"({_placeholders(addresses)}) AND state = 'released' AND next_attempt_at <= ? RETURNING address",
                (now + lease, hold_id, *addresses, now),
            ) as cursor:
                return [row[0] for row in await cursor.fetchall()]

    async def record_attempt(self, hold_id: str, address: str, state: RecipientState, reply: str,
                             next_attempt_at: float | None) -> None:
        # A retry must not undo an admin's discard that happened while the attempt was in
        # flight; a final outcome (delivered, failed) is recorded whatever happened meanwhile,
        # because it is what the upstream did.
        only_if_released = " AND state = 'released'" if state == "released" else ""
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE held_recipients SET state = ?, attempts = attempts + 1, next_attempt_at = ?, last_reply = ? "
                f"WHERE hold_id = ? AND address = ?{only_if_released}",
                (state, next_attempt_at, reply, hold_id, address),
            )
            await _forget_if_finished(conn, hold_id)

    async def stats(self) -> HoldStats:
        row = await self._db.fetchone(
            "SELECT COUNT(DISTINCT r.hold_id), COUNT(*), MIN(m.created_at) "
            "FROM held_recipients r JOIN held_messages m ON m.id = r.hold_id "
            "WHERE r.state IN ('held', 'released')"
        )
        return HoldStats(held_messages=int(row[0]), held_recipients=int(row[1]), oldest_held_at=row[2])

    async def release_stream(self, stream: str, rules: Sequence[str], now: float) -> int:
        if not rules:
            return 0
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "UPDATE held_recipients SET state = 'released', next_attempt_at = ? "
                f"WHERE state = 'held' AND rule IN ({_placeholders(rules)}) "
                "AND hold_id IN (SELECT id FROM held_messages WHERE stream = ?)",
                (now, *rules, stream),
            )
            return cursor.rowcount

    async def discard_stream(self, stream: str, rules: Sequence[str]) -> int:
        if not rules:
            return 0
        async with self._db.transaction() as conn:
            async with conn.execute(
                "SELECT DISTINCT r.hold_id FROM held_recipients r JOIN held_messages m ON m.id = r.hold_id "
                f"WHERE m.stream = ? AND r.state IN ('held', 'released') AND r.rule IN ({_placeholders(rules)})",
                (stream, *rules),
            ) as cursor:
                hold_ids = [row[0] for row in await cursor.fetchall()]
            changed = 0
            for hold_id in hold_ids:
                cursor = await conn.execute(
                    "UPDATE held_recipients SET state = 'discarded', next_attempt_at = NULL "
                    f"WHERE hold_id = ? AND state IN ('held', 'released') AND rule IN ({_placeholders(rules)})",
                    (hold_id, *rules),
                )
                changed += cursor.rowcount
                await _forget_if_finished(conn, hold_id)
            return changed

    async def stream_messages(self, stream: str, limit: int = 3) -> builtins.list[HeldMessage]:
        rows = await self._db.fetchall(
            f"SELECT {_MESSAGE_COLUMNS} FROM held_messages m WHERE stream = ? AND EXISTS "
            "(SELECT 1 FROM held_recipients r WHERE r.hold_id = m.id AND r.state = 'held') "
            "ORDER BY created_at, id LIMIT ?",
            (stream, limit),
        )
        recipients = await self._recipients([row[0] for row in rows])
        return [_message(row, tuple(recipients.get(row[0], ()))) for row in rows]

    async def stream_counts(self, stream: str) -> dict[RecipientState, int]:
        rows = await self._db.fetchall(
            "SELECT r.state, COUNT(*) FROM held_recipients r JOIN held_messages m ON m.id = r.hold_id "
            "WHERE m.stream = ? GROUP BY r.state",
            (stream,),
        )
        return {state: int(count) for state, count in rows}

    async def _recipients(self, hold_ids: Sequence[str]) -> dict[str, builtins.list[HeldRecipient]]:
        if not hold_ids:
            return {}
        rows = await self._db.fetchall(
            f"SELECT hold_id, {_RECIPIENT_COLUMNS} FROM held_recipients "
            f"WHERE hold_id IN ({_placeholders(hold_ids)}) ORDER BY hold_id, rowid",
            hold_ids,
        )
        return _group(rows)


async def _forget_if_finished(conn: aiosqlite.Connection, hold_id: str) -> None:
    """Delete what the guard no longer needs once no recipient waits for delivery."""
    async with conn.execute(
        "SELECT 1 FROM held_recipients WHERE hold_id = ? AND state IN ('held', 'released') LIMIT 1", (hold_id,)
    ) as cursor:
        if await cursor.fetchone() is not None:
            return
    await conn.execute("UPDATE held_messages SET content = NULL WHERE id = ? AND content IS NOT NULL", (hold_id,))
    # rowid keeps the placeholders unique within the (hold_id, address) primary key.
    await conn.execute(
        "UPDATE held_recipients SET address = '(discarded #' || rowid || ')' "
        "WHERE hold_id = ? AND state = 'discarded' AND address NOT LIKE '(discarded #%'",
        (hold_id,),
    )


def _recipient_filter(hold_id: str, recipients: Sequence[str] | None) -> tuple[str, tuple[Any, ...]]:
    if recipients is None:
        return "hold_id = ?", (hold_id,)
    return f"hold_id = ? AND address IN ({_placeholders(recipients)})", (hold_id, *recipients)


def _placeholders(values: Sequence[Any]) -> str:
    return ", ".join("?" * len(values))


def _group(rows: Sequence[Any]) -> dict[str, list[HeldRecipient]]:
    grouped: dict[str, list[HeldRecipient]] = {}
    for hold_id, address, state, rule, reason, attempts, next_attempt_at, last_reply in rows:
        grouped.setdefault(hold_id, []).append(
            HeldRecipient(address, state, rule, reason, attempts, next_attempt_at, last_reply)
        )
    return grouped


def _message(row: Sequence[Any], recipients: tuple[HeldRecipient, ...], content: bytes | None = None) -> HeldMessage:
    hold_id, txn_id, created_at, client, sender, mail_options, size, stream, message_class = row[:9]
    return HeldMessage(
        id=hold_id, txn_id=txn_id, created_at=created_at, client=client, sender=sender,
        mail_options=tuple(mail_options.split()), size=size, recipients=recipients, content=content,
        stream=stream, message_class=message_class,
    )

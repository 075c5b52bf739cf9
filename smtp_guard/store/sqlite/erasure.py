"""SQLite side of erasure: tombstones, receipts, resurrection attempts, and the purge of one
address from every table that can hold it.

Deleted bytes must leave the disk, not just the tables: ``secure_delete`` (set on every
connection, db.py) overwrites deleted cells and freed pages with zeros, and
``make_unrecoverable`` checkpoints the WAL into the database and truncates it, so old page
images holding the address are gone from the ``-wal`` file too.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import re
import time
from typing import Any, Callable, Sequence

from ...erasure.model import ErasureAttempt, ErasureReceipt, PurgeCount, Tombstone, receipt_from_dict
from ...erasure.scan import Finding
from ..base import StoreError
from ..filters import attempts_where
from .db import Database

_CHECKPOINT_TRIES = 20

# An audit pseudonym is "h:" and 16 lower-case hex digits (erasure/keys.py), as the whole
# recipient or inside a reason.
_PSEUDONYM = "h:" + "[0-9a-f]" * 16
_PSEUDONYM_GLOBS = (_PSEUDONYM, f"*{_PSEUDONYM}*")
_COUNT_PSEUDONYMIZED = "SELECT COUNT(*) FROM audit WHERE recipient GLOB ? OR reason GLOB ?"


class SQLiteErasureStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    # --- keys and tombstones ----------------------------------------------------------------------

    async def key_checks(self) -> dict[str, str]:
        rows = await self._db.fetchall("SELECT id, check_value FROM erasure_keys")
        return {key_id: check for key_id, check in rows}

    async def remember_key(self, key_id: str, check_value: str, now: float) -> None:
        async with self._db.transaction() as connection:
            await connection.execute(
                "INSERT OR IGNORE INTO erasure_keys (id, check_value, created_at) VALUES (?, ?, ?)",
                (key_id, check_value, now))

    async def tombstone_counts(self) -> dict[str, int]:
        rows = await self._db.fetchall("SELECT key_id, COUNT(*) FROM tombstones GROUP BY key_id")
        return {key_id: int(count) for key_id, count in rows}

    async def pseudonymized_audit_records(self) -> int:
        row = await self._db.fetchone(_COUNT_PSEUDONYMIZED, _PSEUDONYM_GLOBS)
        return int(row[0]) if row else 0

    async def forget_keys(self, key_ids: Sequence[str]) -> bool:
        marks = ", ".join("?" * len(key_ids))
        async with self._db.transaction() as connection:
            async with connection.execute(
                    f"SELECT COUNT(*) FROM tombstones WHERE key_id IN ({marks})", tuple(key_ids)) as rows:
                (tombstones,) = await rows.fetchone()  # type: ignore[misc]
            async with connection.execute(_COUNT_PSEUDONYMIZED, _PSEUDONYM_GLOBS) as rows:
                (records,) = await rows.fetchone()  # type: ignore[misc]
            if tombstones or records:
                return False
            await connection.execute(f"DELETE FROM erasure_keys WHERE id IN ({marks})", tuple(key_ids))
        return True

    async def add_tombstone(self, digest: bytes, key_id: str, reference: str, now: float) -> tuple[Tombstone, bool]:
        async with self._db.transaction() as connection:
            cursor = await connection.execute(
                "INSERT OR IGNORE INTO tombstones (digest, key_id, reference, created_at) VALUES (?, ?, ?, ?)",
                (digest, key_id, reference, now))
            created = cursor.rowcount == 1
            async with connection.execute(
                    "SELECT id, digest, key_id, reference, created_at FROM tombstones WHERE digest = ? AND key_id = ?",
                    (digest, key_id)) as rows:
                row = await rows.fetchone()
        assert row is not None
        return Tombstone(*row), created

    async def tombstones_since(self, last_id: int) -> builtins.list[Tombstone]:
        rows = await self._db.fetchall(
            "SELECT id, digest, key_id, reference, created_at FROM tombstones WHERE id > ? ORDER BY id", (last_id,))
        return [Tombstone(*row) for row in rows]

    async def find_tombstone(self, digests: Sequence[tuple[bytes, str]]) -> Tombstone | None:
        for digest, key_id in digests:
            row = await self._db.fetchone(
                "SELECT id, digest, key_id, reference, created_at FROM tombstones WHERE digest = ? AND key_id = ?",
                (digest, key_id))
            if row is not None:
                return Tombstone(*row)
        return None

    # --- purge ------------------------------------------------------------------------------------

    async def purge_address(self, key_hashes: Sequence[int] | None, matches: Callable[[str], bool],
                            audit_pseudonyms: Sequence[str], tombstone_id: int) -> builtins.list[PurgeCount]:
        erased_label = f"erased:{tombstone_id}"
        async with self._db.transaction() as connection:
            if key_hashes is None:
                # Erasure by token: the address is unknown, so every entry is tested (seconds
                # for millions of entries; erasures are rare).
                async with connection.execute(
                        "SELECT key_hash, value FROM suppressions WHERE kind = 'address'") as rows:
                    key_hashes = sorted({h for h, value in await rows.fetchall() if matches(value)})
            suppressions = changes = 0
            for key_hash in key_hashes:
                cursor = await connection.execute(
                    "DELETE FROM suppressions WHERE kind = 'address' AND key_hash = ?", (key_hash,))
                suppressions += cursor.rowcount
                cursor = await connection.execute("DELETE FROM suppression_changes WHERE key_hash = ?", (key_hash,))
                changes += cursor.rowcount
            if suppressions or changes:
                # Running servers must drop the entry from their index: ask for a full reload
                # (a per-key change row would keep the key hash on disk).
                await connection.execute(
                    "INSERT INTO suppression_changes (key_hash, domain, changed_at) VALUES (NULL, NULL, ?)",
                    (time.time(),))

            async with connection.execute("SELECT rowid, hold_id, address FROM held_recipients") as rows:
                held = [(rowid, hold_id) for rowid, hold_id, address in await rows.fetchall() if matches(address)]
            for rowid, _ in held:
                await connection.execute("DELETE FROM held_recipients WHERE rowid = ?", (rowid,))
            emptied = 0
            for hold_id in sorted({hold_id for _, hold_id in held}):
                async with connection.execute(
                        "SELECT COUNT(*) FROM held_recipients WHERE hold_id = ?", (hold_id,)) as rows:
                    (remaining,) = await rows.fetchone()  # type: ignore[misc]
                if remaining == 0:
                    await connection.execute("DELETE FROM held_messages WHERE id = ?", (hold_id,))
                    emptied += 1

            audit_rows = await _erase_pseudonyms(connection, audit_pseudonyms, erased_label)
        return [
            PurgeCount("suppressions", "entries", suppressions),
            PurgeCount("suppression_change_log", "rows", changes),
            PurgeCount("hold_queue", "recipients", len(held)),
            PurgeCount("hold_queue", "messages_deleted", emptied),
            PurgeCount("audit", "pseudonymized_records", audit_rows),
        ]

    async def erase_pseudonyms(self, pseudonyms: Sequence[str], tombstone_id: int) -> int:
        async with self._db.transaction() as connection:
            return await _erase_pseudonyms(connection, pseudonyms, f"erased:{tombstone_id}")

    async def make_unrecoverable(self) -> dict[str, str]:
        """Checkpoint the WAL into the main file and truncate it. A running server may hold a
        read snapshot for a moment, so a busy checkpoint is retried briefly."""
        for attempt in range(_CHECKPOINT_TRIES):
            row = await self._db.fetchone("PRAGMA wal_checkpoint(TRUNCATE)")
            busy = int(row[0]) if row else 1
            if not busy:
                return {"secure_delete": "on (deleted cells and free pages zeroed)",
                        "wal": "checkpointed and truncated"}
            await asyncio.sleep(0.05 * (attempt + 1))
        raise StoreError("could not checkpoint the WAL (the database stayed busy); run the erase again "
                         "or `smtp-guard erase verify` to see what remains")

    async def copies(self, pattern: re.Pattern[bytes]) -> builtins.list[Finding]:
        """Nothing: the database, its WAL and shared-memory files are in the data directory,
        which ``erase verify`` scans byte for byte (free pages included)."""
        return []

    # --- receipts and attempts ----------------------------------------------------------------------

    async def add_receipt(self, receipt: ErasureReceipt) -> None:
        async with self._db.transaction() as connection:
            await connection.execute(
                "INSERT INTO erasure_receipts (id, reference, created_at, tombstone_id, body) VALUES (?, ?, ?, ?, ?)",
                (receipt.id, receipt.reference, receipt.created_at, receipt.tombstone_id,
                 json.dumps(receipt.as_dict())))

    async def receipts(self, limit: int = 100) -> builtins.list[ErasureReceipt]:
        rows = await self._db.fetchall(
            "SELECT body FROM erasure_receipts ORDER BY created_at DESC, id LIMIT ?", (limit,))
        return [receipt_from_dict(json.loads(body)) for (body,) in rows]

    async def receipt(self, receipt_id: str) -> ErasureReceipt | None:
        row = await self._db.fetchone("SELECT body FROM erasure_receipts WHERE id = ?", (receipt_id,))
        return None if row is None else receipt_from_dict(json.loads(row[0]))

    async def record_attempts(self, attempts: Sequence[ErasureAttempt]) -> None:
        async with self._db.transaction() as connection:
            await connection.executemany(
                "INSERT INTO erasure_attempts (time, tombstone_id, reference, client, sender, stream, txn_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(a.time, a.tombstone_id, a.reference, a.client, a.sender, a.stream, a.txn_id) for a in attempts])

    async def attempts(self, since: float | None = None, reference: str | None = None,
                       limit: int = 100) -> builtins.list[ErasureAttempt]:
        where, parameters = attempts_where(since, reference, "?")
        rows = await self._db.fetchall(
            f"SELECT time, tombstone_id, reference, client, sender, stream, txn_id FROM erasure_attempts "
            f"{where} ORDER BY time DESC, id DESC LIMIT ?", (*parameters, limit))
        return [ErasureAttempt(*row) for row in rows]


async def _erase_pseudonyms(connection: Any, pseudonyms: Sequence[str], erased_label: str) -> int:
    """Audit records only ever hold pseudonyms (erasure/pseudonyms.py); the erased person's
    become a pointer to the erasure instead, in the recipient column and inside reasons."""
    changed = 0
    for pseudonym in pseudonyms:
        cursor = await connection.execute("UPDATE audit SET recipient = ? WHERE recipient = ?",
                                          (erased_label, pseudonym))
        changed += cursor.rowcount
        cursor = await connection.execute(
            "UPDATE audit SET reason = replace(reason, ?, ?) WHERE instr(reason, ?) > 0",
            (pseudonym, erased_label, pseudonym))
        changed += cursor.rowcount
    return int(changed)

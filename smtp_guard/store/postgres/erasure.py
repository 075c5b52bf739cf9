"""PostgreSQL side of erasure: tombstones, receipts, attempts, the purge of one address from
every table that can hold it, and the search of every table for a copy (``erase verify``).

What a DELETE leaves behind on PostgreSQL, and what the receipt therefore says:

* the row versions stay in the table and index files until VACUUM removes them; the purge
  runs VACUUM on the tables it changed (outside a transaction, with index cleanup forced on,
  since PostgreSQL 14+ may otherwise skip the indexes that hold the address text). VACUUM
  makes the space reusable; it does not overwrite it, so the bytes remain in the files until
  PostgreSQL writes over them (VACUUM FULL would rewrite the tables, but holds an exclusive
  lock that stops every guard's store access for its duration);
* the write-ahead log holds the rows until its segments are recycled — and archived WAL,
  base backups and dumps hold them until their retention ends; replicas hold them until they
  replay the purge. Those are the operator's to expire (README, "Running several instances").

Tombstones are appended under an EXCLUSIVE table lock: guards follow them by id
(``tombstones_since``), and an id handed out by a transaction that commits after a later one
would be skipped.
"""

from __future__ import annotations

import builtins
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import psycopg

from ...erasure.model import ErasureAttempt, ErasureReceipt, PurgeCount, Tombstone, receipt_from_dict
from ...erasure.scan import Finding
from ..base import StoreError
from ..filters import attempts_where
from .db import Connection, PostgresDatabase
from .schema import TABLES
from .suppressions import lock_change_log

# An audit pseudonym: "h:" and 16 lower-case hex digits (erasure/keys.py), whole or inside a reason.
_PSEUDONYM = "h:[0-9a-f]{16}"
_COUNT_PSEUDONYMIZED = "SELECT COUNT(*) FROM audit WHERE recipient ~ %s OR reason ~ %s"
_PSEUDONYM_PATTERNS = (f"^{_PSEUDONYM}$", _PSEUDONYM)
# The tables a purge changes: VACUUMed after it.
_PURGED_TABLES = ("suppressions", "suppression_changes", "held_recipients", "held_messages", "audit")
_SCAN_CHUNK = 10_000

STORAGE_NOTES = {
    "vacuum": (f"VACUUM (INDEX_CLEANUP ON) ran on {', '.join(_PURGED_TABLES)}: the deleted row versions and "
               "their index entries are gone from the tables; their space is reusable, but the bytes stay in the "
               "database files until PostgreSQL writes over them"),
    "wal": ("the deleted rows remain in PostgreSQL's write-ahead log until its segments are recycled (after the "
            "next checkpoints), and in archived WAL (archive_command, WAL-G, pgBackRest, ...) until its retention "
            "expires"),
    "backups": "base backups and dumps taken before this erasure still hold the address until they expire",
    "replicas": "streaming replicas delete it when they replay this purge; a lagging or delayed replica keeps it "
                "until then",
}


class PostgresErasureStore:
    """``ErasureStore`` over a ``PostgresDatabase``."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    # --- keys and tombstones ----------------------------------------------------------------------

    async def key_checks(self) -> dict[str, str]:
        rows = await self._db.fetchall("SELECT id, check_value FROM erasure_keys")
        return {key_id: check for key_id, check in rows}

    async def remember_key(self, key_id: str, check_value: str, now: float) -> None:
        await self._db.execute(
            "INSERT INTO erasure_keys (id, check_value, created_at) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (key_id, check_value, now))

    async def tombstone_counts(self) -> dict[str, int]:
        rows = await self._db.fetchall("SELECT key_id, COUNT(*) FROM tombstones GROUP BY key_id")
        return {key_id: int(count) for key_id, count in rows}

    async def pseudonymized_audit_records(self) -> int:
        row = await self._db.fetchone(_COUNT_PSEUDONYMIZED, _PSEUDONYM_PATTERNS)
        return int(row[0]) if row else 0

    async def forget_keys(self, key_ids: Sequence[str]) -> bool:
        async with self._db.transaction() as conn:
            # Nobody may add a tombstone or a pseudonym between the counts and the delete.
            await conn.execute("LOCK TABLE tombstones, audit IN SHARE MODE")
            (tombstones,) = await (await conn.execute(
                "SELECT COUNT(*) FROM tombstones WHERE key_id = ANY(%s)", (list(key_ids),))).fetchone() or (0,)
            (records,) = await (await conn.execute(_COUNT_PSEUDONYMIZED, _PSEUDONYM_PATTERNS)).fetchone() or (0,)
            if tombstones or records:
                return False
            await conn.execute("DELETE FROM erasure_keys WHERE id = ANY(%s)", (list(key_ids),))
        return True

    async def add_tombstone(self, digest: bytes, key_id: str, reference: str, now: float) -> tuple[Tombstone, bool]:
        async with self._db.transaction() as conn:
            await conn.execute("LOCK TABLE tombstones IN EXCLUSIVE MODE")
            cursor = await conn.execute(
                "INSERT INTO tombstones (digest, key_id, reference, created_at) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING", (digest, key_id, reference, now))
            created = cursor.rowcount == 1
            row = await (await conn.execute(
                "SELECT id, digest, key_id, reference, created_at FROM tombstones WHERE digest = %s AND key_id = %s",
                (digest, key_id))).fetchone()
        if row is None:
            raise StoreError("a tombstone just written cannot be read back")
        return _tombstone(row), created

    async def tombstones_since(self, last_id: int) -> builtins.list[Tombstone]:
        rows = await self._db.fetchall(
            "SELECT id, digest, key_id, reference, created_at FROM tombstones WHERE id > %s ORDER BY id", (last_id,))
        return [_tombstone(row) for row in rows]

    async def find_tombstone(self, digests: Sequence[tuple[bytes, str]]) -> Tombstone | None:
        for digest, key_id in digests:
            row = await self._db.fetchone(
                "SELECT id, digest, key_id, reference, created_at FROM tombstones WHERE digest = %s AND key_id = %s",
                (digest, key_id))
            if row is not None:
                return _tombstone(row)
        return None

    # --- purge ------------------------------------------------------------------------------------

    async def purge_address(self, key_hashes: Sequence[int] | None, matches: Callable[[str], bool],
                            audit_pseudonyms: Sequence[str], tombstone_id: int) -> builtins.list[PurgeCount]:
        async with self._db.transaction() as conn:
            await lock_change_log(conn)
            if key_hashes is None:
                # Erasure by token: the address is unknown, so every entry is tested.
                rows = await (await conn.execute(
                    "SELECT key_hash, value FROM suppressions WHERE kind = 'address'")).fetchall()
                key_hashes = sorted({h for h, value in rows if matches(value)})
            hashes = list(key_hashes)
            suppressions = (await conn.execute(
                "DELETE FROM suppressions WHERE kind = 'address' AND key_hash = ANY(%s)", (hashes,))).rowcount
            changes = (await conn.execute(
                "DELETE FROM suppression_changes WHERE key_hash = ANY(%s)", (hashes,))).rowcount
            if suppressions or changes:
                # Running guards must drop the entry: a full reload (a per-key change row would
                # keep the key hash).
                await conn.execute("INSERT INTO suppression_changes (key_hash, domain, changed_at) "
                                   "VALUES (NULL, NULL, %s)", (time.time(),))
            held_rows = await (await conn.execute("SELECT id, hold_id, address FROM held_recipients")).fetchall()
            held = [(row_id, hold_id) for row_id, hold_id, address in held_rows if matches(address)]
            await conn.execute("DELETE FROM held_recipients WHERE id = ANY(%s)", ([row_id for row_id, _ in held],))
            emptied = (await conn.execute(
                "DELETE FROM held_messages m WHERE m.id = ANY(%s) AND NOT EXISTS "
                "(SELECT 1 FROM held_recipients r WHERE r.hold_id = m.id)",
                (sorted({hold_id for _, hold_id in held}),))).rowcount
            audit_rows = await _erase_pseudonyms(conn, audit_pseudonyms, f"erased:{tombstone_id}")
        return [
            PurgeCount("suppressions", "entries", max(suppressions, 0)),
            PurgeCount("suppression_change_log", "rows", max(changes, 0)),
            PurgeCount("hold_queue", "recipients", len(held)),
            PurgeCount("hold_queue", "messages_deleted", max(emptied, 0)),
            PurgeCount("audit", "pseudonymized_records", audit_rows),
        ]

    async def erase_pseudonyms(self, pseudonyms: Sequence[str], tombstone_id: int) -> int:
        async with self._db.transaction() as conn:
            return await _erase_pseudonyms(conn, pseudonyms, f"erased:{tombstone_id}")

    async def make_unrecoverable(self) -> dict[str, str]:
        """VACUUM the purged tables (autocommit: VACUUM cannot run in a transaction) and say
        what PostgreSQL may still hold (module docstring)."""
        warnings: list[str] = []
        async with self._db.connection() as conn:
            # A role that may not VACUUM a table gets a WARNING ("skipping ...") and no error:
            # the receipt must not claim what did not happen.
            handler = _notice_collector(warnings)
            conn.add_notice_handler(handler)
            try:
                await conn.execute(f"VACUUM (INDEX_CLEANUP ON) {', '.join(_PURGED_TABLES)}")
            finally:
                conn.remove_notice_handler(handler)
        if warnings:
            raise StoreError(f"VACUUM did not run on every purged table ({'; '.join(warnings)}): the deleted rows stay "
                             "in the database files. Let the guard's role own its tables (it created them when it "
                             "migrated the store), then erase again")
        return dict(STORAGE_NOTES)

    async def copies(self, pattern: re.Pattern[bytes]) -> builtins.list[Finding]:
        """Every text or bytea value of every table of the store that matches ``pattern``,
        read through a server-side cursor per table. Each finding names the table, column and
        row (ctid), and the match's byte offset inside the value."""
        findings: list[Finding] = []
        async with self._db.connection() as conn:
            columns = await (await conn.execute(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = ANY(%s) AND data_type IN ('text', 'bytea') ORDER BY table_name, ordinal_position",
                (list(TABLES),))).fetchall()
            by_table: dict[str, list[str]] = {}
            for table, column in columns:
                by_table.setdefault(table, []).append(column)
            for table, names in by_table.items():
                async with conn.transaction():
                    async with conn.cursor(name=f"scan_{table}") as cursor:
                        await cursor.execute(f"SELECT ctid::text, {', '.join(names)} FROM {table}")
                        while rows := await cursor.fetchmany(_SCAN_CHUNK):
                            for row in rows:
                                findings.extend(_matches(pattern, table, names, row))
        return findings

    # --- receipts and attempts ----------------------------------------------------------------------

    async def add_receipt(self, receipt: ErasureReceipt) -> None:
        await self._db.execute(
            "INSERT INTO erasure_receipts (id, reference, created_at, tombstone_id, body) VALUES (%s, %s, %s, %s, %s)",
            (receipt.id, receipt.reference, receipt.created_at, receipt.tombstone_id, json.dumps(receipt.as_dict())))

    async def receipts(self, limit: int = 100) -> builtins.list[ErasureReceipt]:
        rows = await self._db.fetchall(
            "SELECT body FROM erasure_receipts ORDER BY created_at DESC, id LIMIT %s", (limit,))
        return [receipt_from_dict(json.loads(body)) for (body,) in rows]

    async def receipt(self, receipt_id: str) -> ErasureReceipt | None:
        row = await self._db.fetchone("SELECT body FROM erasure_receipts WHERE id = %s", (receipt_id,))
        return None if row is None else receipt_from_dict(json.loads(row[0]))

    async def record_attempts(self, attempts: Sequence[ErasureAttempt]) -> None:
        if not attempts:
            return
        async with self._db.transaction() as conn:
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO erasure_attempts (time, tombstone_id, reference, client, sender, stream, txn_id) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    [(a.time, a.tombstone_id, a.reference, a.client, a.sender, a.stream, a.txn_id) for a in attempts])

    async def attempts(self, since: float | None = None, reference: str | None = None,
                       limit: int = 100) -> builtins.list[ErasureAttempt]:
        where, parameters = attempts_where(since, reference, "%s")
        rows = await self._db.fetchall(
            f"SELECT time, tombstone_id, reference, client, sender, stream, txn_id FROM erasure_attempts "
            f"{where} ORDER BY time DESC, id DESC LIMIT %s", (*parameters, limit))
        return [ErasureAttempt(*row) for row in rows]


async def _erase_pseudonyms(conn: Connection, pseudonyms: Sequence[str], erased_label: str) -> int:
    """The erased person's audit pseudonyms become a pointer to the erasure, in the recipient
    column and inside reasons."""
    changed = 0
    for pseudonym in pseudonyms:
        cursor = await conn.execute("UPDATE audit SET recipient = %s WHERE recipient = %s", (erased_label, pseudonym))
        changed += max(cursor.rowcount, 0)
        cursor = await conn.execute(
            "UPDATE audit SET reason = replace(reason, %s, %s) WHERE strpos(reason, %s) > 0",
            (pseudonym, erased_label, pseudonym))
        changed += max(cursor.rowcount, 0)
    return changed


def _notice_collector(warnings: list[str]) -> Callable[[psycopg.errors.Diagnostic], None]:
    def collect(notice: psycopg.errors.Diagnostic) -> None:
        if notice.severity_nonlocalized == "WARNING" and notice.message_primary:
            warnings.append(notice.message_primary)
    return collect


def _matches(pattern: re.Pattern[bytes], table: str, columns: Sequence[str], row: Sequence[Any]) -> list[Finding]:
    found = []
    for column, value in zip(columns, row[1:]):
        if value is None:
            continue
        data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
        for match in pattern.finditer(data):
            found.append(Finding(Path(f"postgresql:{table}.{column}"), match.start(),
                                 match.group(0).decode("utf-8", "replace"), row=str(row[0])))
    return found


def _tombstone(row: Sequence[Any]) -> Tombstone:
    return Tombstone(int(row[0]), bytes(row[1]), row[2], row[3], row[4])

"""Suppression lists on SQLite: entries, their change log, and the compact snapshot.

Every write is one transaction that also appends to ``suppression_changes``, so a running
server's ``IndexReloader`` sees each change exactly once: one row per changed key, or one
"reload everything" marker (key_hash and domain both NULL) for a bulk write. A write that
changes nothing (re-importing the same file) logs nothing, so idempotent imports do not
make every server reload its index.

When a key is on several lists, the list that comes first in the configured priority wins;
lists that are not configured any more come after the configured ones, in name order (they
still block: fail closed).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

import aiosqlite

from ...address_table import AddressTable
from ...addresses import key_hash
from ...suppression_model import (
    MAX_DELTA,
    better_list,
    DomainRule,
    EntryKind,
    list_order,
    SuppressionDelta,
    SuppressionEntry,
    SuppressionFilter,
    SuppressionPage,
    SuppressionSnapshot,
)
from ..base import StoreError
from ..filters import LIST_NAMES, live, suppression_where
from .db import Database, connect_sync, store_error
from .snapshot_addresses import address_arrays

# Parameters per IN (...) clause; well under SQLite's limit of 32766 bound variables.
_IN_CHUNK = 500
_QUERY_PAGE = 1000

_COLUMNS = "kind, value, list_name, reason, source, created_at, expires_at, include_subdomains"
_LIVE = live("?")
_UPSERT = (
    "INSERT INTO suppressions (kind, value, key_hash, list_name, reason, source, created_at, expires_at, "
    "include_subdomains) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (kind, value, list_name) DO UPDATE SET reason = excluded.reason, source = excluded.source, "
    "expires_at = excluded.expires_at, include_subdomains = excluded.include_subdomains "
    # Only touch rows that really differ: rowcount then counts real changes, which keeps a
    # re-import out of the change log.
    "WHERE reason IS NOT excluded.reason OR source IS NOT excluded.source "
    "OR expires_at IS NOT excluded.expires_at OR include_subdomains IS NOT excluded.include_subdomains"
)


class SQLiteSuppressionStore:
    """``SuppressionStore`` over a shared ``Database``."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    # --- writes --------------------------------------------------------------------------------

    async def add(self, entries: Sequence[SuppressionEntry], *, bulk: bool = False) -> int:
        """Upsert entries; returns how many were new. An entry with ``created_at`` 0 is
        stamped with the current time; an existing entry keeps its ``created_at``."""
        if not entries:
            return 0
        now = self._clock()
        rows = [_row(entry, now) for entry in entries]
        async with self._db.transaction() as conn:
            if bulk:
                return await self._add_bulk(conn, rows, now)
            new = 0
            changed: list[tuple[Any, ...]] = []
            for row, entry in zip(rows, entries):
                cursor = await conn.execute("SELECT 1 FROM suppressions WHERE kind = ? AND value = ? AND list_name = ?",
                                            (entry.kind, entry.value, entry.list_name))
                existed = await cursor.fetchone() is not None
                cursor = await conn.execute(_UPSERT, row)
                if cursor.rowcount > 0:
                    new += not existed
                    changed.append(_change(entry.kind, entry.value, now))
            await conn.executemany("INSERT INTO suppression_changes (key_hash, domain, changed_at) VALUES (?, ?, ?)",
                                   changed)
            return new

    @staticmethod
    async def _add_bulk(conn: aiosqlite.Connection, rows: list[tuple[Any, ...]], now: float) -> int:
        # New rows get rowids above the current maximum (no AUTOINCREMENT, so max + 1), which
        # counts inserts apart from updates without a look-up per row.
        cursor = await conn.execute("SELECT COALESCE(MAX(id), 0) FROM suppressions")
        (last_id,) = await cursor.fetchone() or (0,)
        cursor = await conn.executemany(_UPSERT, rows)
        if cursor.rowcount <= 0:
            return 0
        cursor = await conn.execute("SELECT COUNT(*) FROM suppressions WHERE id > ?", (last_id,))
        (new,) = await cursor.fetchone() or (0,)
        await conn.execute("INSERT INTO suppression_changes (key_hash, domain, changed_at) VALUES (NULL, NULL, ?)",
                           (now,))
        return int(new)

    async def remove(self, kind: EntryKind, value: str, list_name: str | None = None) -> int:
        now = self._clock()
        async with self._db.transaction() as conn:
            if list_name is None:
                cursor = await conn.execute("DELETE FROM suppressions WHERE kind = ? AND value = ?", (kind, value))
            else:
                cursor = await conn.execute("DELETE FROM suppressions WHERE kind = ? AND value = ? AND list_name = ?",
                                            (kind, value, list_name))
            removed = max(cursor.rowcount, 0)
            if removed:
                await conn.execute("INSERT INTO suppression_changes (key_hash, domain, changed_at) VALUES (?, ?, ?)",
                                   _change(kind, value, now))
        return removed

    async def purge_expired(self, now: float) -> int:
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "SELECT kind, value FROM suppressions WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
            expired = list(await cursor.fetchall())
            if not expired:
                return 0
            await conn.execute("DELETE FROM suppressions WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
            stamp = self._clock()
            if len(expired) > MAX_DELTA:
                changes = [(None, None, stamp)]
            else:
                changes = list(dict.fromkeys(_change(kind, value, stamp) for kind, value in expired))
            await conn.executemany("INSERT INTO suppression_changes (key_hash, domain, changed_at) VALUES (?, ?, ?)",
                                   changes)
        return len(expired)

    # --- reads for admins ----------------------------------------------------------------------

    async def find(self, address_key: str | None, domains: Sequence[str], now: float) -> list[SuppressionEntry]:
        """Live entries for the address (matched by key hash, exactly as the index matches) and
        for any of the domains."""
        where: list[str] = []
        parameters: list[Any] = []
        if address_key is not None:
            where.append("(kind = 'address' AND key_hash = ?)")
            parameters.append(key_hash(address_key))
        if domains:
            where.append(f"(kind = 'domain' AND value IN ({', '.join('?' * len(domains))}))")
            parameters.extend(domains)
        if not where:
            return []
        rows = await self._db.fetchall(
            f"SELECT {_COLUMNS} FROM suppressions WHERE ({' OR '.join(where)}) AND {_LIVE} ORDER BY created_at, id",
            (*parameters, now),
        )
        return [_entry(row) for row in rows]

    async def query(self, filters: SuppressionFilter, now: float,
                    limit: int | None = None) -> AsyncIterator[SuppressionEntry]:
        """Entries matching every filter, oldest first, streamed (an export may be millions).
        ``contains`` matches a substring of the value, ignoring case.

        Read a page at a time, each after the last (created_at, id) seen: no read stays open
        on the shared connection between pages (db.py), so the consumer may write meanwhile.
        """
        where, parameters = _where(filters, now)
        after: tuple[float, int] | None = None
        left = limit
        while left is None or left > 0:
            page = _QUERY_PAGE if left is None else min(_QUERY_PAGE, left)
            clauses = [*where, "(created_at, id) > (?, ?)"] if after is not None else where
            clause = f"WHERE {' AND '.join(clauses)} " if clauses else ""
            rows = await self._db.fetchall(
                f"SELECT {_COLUMNS}, id FROM suppressions {clause}ORDER BY created_at, id LIMIT ?",
                (*parameters, *(after or ()), page))
            for row in rows:
                yield _entry(row[:-1])
            if len(rows) < page:
                return
            after = (rows[-1][5], rows[-1][-1])
            if left is not None:
                left -= len(rows)

    async def page(self, filters: SuppressionFilter, now: float, limit: int, after: int | None = None) -> SuppressionPage:
        """Entries in row id order: the primary key walks straight to ``after`` and stops at the
        page's end, where an order by time would sort the whole table for every page."""
        where, parameters = _where(filters, now)
        if after is not None:
            where.append("id > ?")
            parameters.append(after)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        # One row more than asked says whether another page follows.
        rows = await self._db.fetchall(f"SELECT {_COLUMNS}, id FROM suppressions {clause}ORDER BY id LIMIT ?",
                                       (*parameters, limit + 1))
        more = len(rows) > limit
        return SuppressionPage(tuple(_entry(row[:-1]) for row in rows[:limit]), rows[limit - 1][-1] if more else None)

    async def count_by_list(self, now: float) -> dict[str, int]:
        # A scan of every entry (seconds at ten million): on a private connection in a thread,
        # like the snapshot, so the hold queue's commits and a starting guard's reads on the
        # shared connection never wait behind it.
        try:
            return await asyncio.to_thread(_count_by_list, self._db.path, now, self._db.busy_timeout)
        except sqlite3.Error as error:
            raise store_error(error, "cannot count the suppression lists") from error

    async def next_expiry(self, now: float) -> float | None:
        (first,) = await self._db.fetchone(
            "SELECT MIN(expires_at) FROM suppressions WHERE expires_at > ?", (now,))  # suppressions_by_expiry
        return first  # type: ignore[no-any-return]

    # --- reads for the running server -----------------------------------------------------------

    async def load_snapshot(self, list_priority: Sequence[str], now: float) -> SuppressionSnapshot:
        # A separate connection in a thread: ten million rows must not queue behind, or block,
        # the shared connection that admin writes and the hold queue use.
        try:
            return await asyncio.to_thread(_load_snapshot, self._db.path, tuple(list_priority), now,
                                           self._db.busy_timeout)
        except sqlite3.Error as error:
            raise store_error(error, "cannot load the suppression index") from error

    async def current_seq(self) -> int:
        # MAX of an INTEGER PRIMARY KEY is a look at the last b-tree page, not a scan.
        (latest,) = await self._db.fetchone("SELECT COALESCE(MAX(seq), 0) FROM suppression_changes")
        return int(latest)

    async def changes_since(self, seq: int, list_priority: Sequence[str], now: float) -> SuppressionDelta:
        rows = await self._db.fetchall(
            "SELECT seq, key_hash, domain FROM suppression_changes WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, MAX_DELTA + 1),
        )
        if not rows:
            (latest,) = await self._db.fetchone("SELECT COALESCE(MAX(seq), 0) FROM suppression_changes")
            # A change log behind the index means the store was replaced (restored from a
            # backup): what the index holds is not what the store holds.
            return SuppressionDelta(seq=seq, full_reload=latest < seq)
        if len(rows) > MAX_DELTA or any(h is None and d is None for _, h, d in rows):
            (latest,) = await self._db.fetchone("SELECT MAX(seq) FROM suppression_changes")
            return SuppressionDelta(seq=int(latest), full_reload=True)
        hashes = list(dict.fromkeys(h for _, h, _ in rows if h is not None))
        domains = list(dict.fromkeys(d for _, _, d in rows if d is not None))
        order = list_order(list_priority, ())
        addresses: dict[int, str | None] = dict.fromkeys(hashes)
        expiries: list[float] = []
        for chunk in _chunks(hashes):
            found = await self._db.fetchall(
                f"SELECT key_hash, list_name, expires_at FROM suppressions WHERE kind = 'address' "
                f"AND key_hash IN ({', '.join('?' * len(chunk))}) AND {_LIVE}", (*chunk, now))
            for hash_value, list_name, expires_at in found:
                addresses[hash_value] = better_list(addresses[hash_value], list_name, order)
                if expires_at is not None:
                    expiries.append(expires_at)
        best: dict[str, DomainRule] = {}
        for chunk in _chunks(domains):
            found = await self._db.fetchall(
                f"SELECT value, list_name, include_subdomains, expires_at FROM suppressions WHERE kind = 'domain' "
                f"AND value IN ({', '.join('?' * len(chunk))}) AND {_LIVE}", (*chunk, now))
            for domain, list_name, subdomains, expires_at in found:
                if expires_at is not None:
                    expiries.append(expires_at)
                current = best.get(domain)
                if current is None or better_list(current.list_name, list_name, order) != current.list_name:
                    best[domain] = DomainRule(list_name, bool(subdomains))
        rules: dict[str, DomainRule | None] = {domain: best.get(domain) for domain in domains}
        return SuppressionDelta(seq=rows[-1][0], addresses=addresses, domains=rules,
                                next_expiry=min(expiries, default=None))


def _load_snapshot(path: Any, priority: tuple[str, ...], now: float, busy_timeout: float) -> SuppressionSnapshot:
    """Build the snapshot: the change log position, the list names, domains and next expiry on
    a private connection in one read transaction; the addresses by ``address_arrays`` (in
    parts, on every core, each part a moment later: see there why that still agrees)."""
    connection = connect_sync(path, busy_timeout)
    try:
        connection.execute("BEGIN")
        (seq,) = connection.execute("SELECT COALESCE(MAX(seq), 0) FROM suppression_changes").fetchone()
        names = [name for (name,) in connection.execute(LIST_NAMES)]
        order = list_order(priority, names)
        if len(order) > 256:
            raise StoreError(f"{len(order)} suppression lists; the index holds at most 256")
        hashes, lists = address_arrays(path, order, now, busy_timeout)
        domains: dict[str, DomainRule] = {}
        ranks = {name: i for i, name in enumerate(order)}
        for domain, list_name, subdomains in connection.execute(
                f"SELECT value, list_name, include_subdomains FROM suppressions WHERE kind = 'domain' AND {_LIVE}",
                (now,)):
            current = domains.get(domain)
            if current is None or ranks[list_name] < ranks[current.list_name]:
                domains[domain] = DomainRule(list_name, bool(subdomains))
        (next_expiry,) = connection.execute(
            "SELECT MIN(expires_at) FROM suppressions WHERE expires_at > ?", (now,)).fetchone()
        connection.execute("COMMIT")
    finally:
        connection.close()
    return SuppressionSnapshot(AddressTable.build(hashes, lists), order, domains, seq=int(seq),
                               next_expiry=next_expiry)


def _count_by_list(path: Any, now: float, busy_timeout: float) -> dict[str, int]:
    connection = connect_sync(path, busy_timeout)
    try:
        rows = connection.execute(f"SELECT list_name, COUNT(*) FROM suppressions WHERE {_LIVE} "
                                  "GROUP BY list_name ORDER BY list_name", (now,)).fetchall()
    finally:
        connection.close()
    return {name: count for name, count in rows}


def _where(filters: SuppressionFilter, now: float) -> tuple[list[str], list[Any]]:
    return suppression_where(filters, now, "?", "instr(lower(value), ?) > 0")


def _row(entry: SuppressionEntry, now: float) -> tuple[Any, ...]:
    return (entry.kind, entry.value, key_hash(entry.value), entry.list_name, entry.reason, entry.source,
            entry.created_at or now, entry.expires_at, int(entry.include_subdomains))


def _change(kind: str, value: str, now: float) -> tuple[Any, ...]:
    return (key_hash(value), None, now) if kind == "address" else (None, value, now)


def _entry(row: Sequence[Any]) -> SuppressionEntry:
    kind, value, list_name, reason, source, created_at, expires_at, subdomains = row
    return SuppressionEntry(kind, value, list_name, reason, source, created_at, expires_at, bool(subdomains))


def _chunks(values: list[Any]) -> Iterable[list[Any]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start:start + _IN_CHUNK]

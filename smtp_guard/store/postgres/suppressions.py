"""Suppression lists on PostgreSQL: entries, their change log, and the compact snapshot.

The same contract as the SQLite store (``store/sqlite/suppressions.py``): every write is one
transaction that also appends to ``suppression_changes``, one row per changed key or one
"reload everything" marker for a bulk write, and a write that changes nothing logs nothing.

Several guards write here at once, and a running guard reads the log by position (``seq``):
a position handed out by a transaction that commits after a later one would be skipped for
good. So every transaction that appends to the log first takes the log's table lock in
EXCLUSIVE mode (readers are not blocked): appends are serialized and ``seq`` order is commit
order.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from typing import Any, AsyncIterator, Callable, Sequence

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
from .db import Connection, PostgresDatabase

_FETCH_CHUNK = 50_000
_QUERY_PAGE = 1000

_COLUMNS = "kind, value, list_name, reason, source, created_at, expires_at, include_subdomains"
_LIVE = live("%s")
_UPSERT = (
    "INSERT INTO suppressions (kind, value, key_hash, list_name, reason, source, created_at, expires_at, "
    "include_subdomains) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (kind, value, list_name) DO UPDATE SET reason = excluded.reason, source = excluded.source, "
    "expires_at = excluded.expires_at, include_subdomains = excluded.include_subdomains "
    # Only rows that really differ count as changed: a re-import stays out of the change log.
    "WHERE suppressions.reason IS DISTINCT FROM excluded.reason "
    "OR suppressions.source IS DISTINCT FROM excluded.source "
    "OR suppressions.expires_at IS DISTINCT FROM excluded.expires_at "
    "OR suppressions.include_subdomains IS DISTINCT FROM excluded.include_subdomains "
    "RETURNING (xmax = 0)"  # true for an insert, false for an update
)
_LOG = "INSERT INTO suppression_changes (key_hash, domain, changed_at) VALUES (%s, %s, %s)"


async def lock_change_log(conn: Connection) -> None:
    """Serialize appends to the change log (module docstring)."""
    await conn.execute("LOCK TABLE suppression_changes IN EXCLUSIVE MODE")


class PostgresSuppressionStore:
    """``SuppressionStore`` over a ``PostgresDatabase``."""

    def __init__(self, db: PostgresDatabase, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    # --- writes --------------------------------------------------------------------------------

    async def add(self, entries: Sequence[SuppressionEntry], *, bulk: bool = False) -> int:
        if not entries:
            return 0
        now = self._clock()
        new = 0
        changed: list[tuple[Any, ...]] = []
        async with self._db.transaction() as conn:
            await lock_change_log(conn)
            async with conn.cursor() as cursor:
                await cursor.executemany(_UPSERT, [_row(entry, now) for entry in entries], returning=True)
                for entry in entries:
                    row = await cursor.fetchone()
                    if row is not None:
                        new += bool(row[0])
                        changed.append(_change(entry.kind, entry.value, now))
                    if not cursor.nextset():
                        break
                if changed:
                    await cursor.executemany(_LOG, [(None, None, now)] if bulk else changed)
        return new

    async def remove(self, kind: EntryKind, value: str, list_name: str | None = None) -> int:
        now = self._clock()
        async with self._db.transaction() as conn:
            await lock_change_log(conn)
            if list_name is None:
                cursor = await conn.execute("DELETE FROM suppressions WHERE kind = %s AND value = %s", (kind, value))
            else:
                cursor = await conn.execute("DELETE FROM suppressions WHERE kind = %s AND value = %s AND list_name = %s",
                                            (kind, value, list_name))
            removed = max(cursor.rowcount, 0)
            if removed:
                await conn.execute(_LOG, _change(kind, value, now))
        return removed

    async def purge_expired(self, now: float) -> int:
        async with self._db.transaction() as conn:
            await lock_change_log(conn)
            cursor = await conn.execute(
                "DELETE FROM suppressions WHERE expires_at IS NOT NULL AND expires_at <= %s RETURNING kind, value",
                (now,))
            expired = await cursor.fetchall()
            if not expired:
                return 0
            stamp = self._clock()
            if len(expired) > MAX_DELTA:
                changes = [(None, None, stamp)]
            else:
                changes = list(dict.fromkeys(_change(kind, value, stamp) for kind, value in expired))
            async with conn.cursor() as cursor:
                await cursor.executemany(_LOG, changes)
        return len(expired)

    # --- reads for admins ----------------------------------------------------------------------

    async def find(self, address_key: str | None, domains: Sequence[str], now: float) -> list[SuppressionEntry]:
        where: list[str] = []
        parameters: list[Any] = []
        if address_key is not None:
            where.append("(kind = 'address' AND key_hash = %s)")
            parameters.append(key_hash(address_key))
        if domains:
            where.append("(kind = 'domain' AND value = ANY(%s))")
            parameters.append(list(domains))
        if not where:
            return []
        rows = await self._db.fetchall(
            f"SELECT {_COLUMNS} FROM suppressions WHERE ({' OR '.join(where)}) AND {_LIVE} ORDER BY created_at, id",
            (*parameters, now))
        return [_entry(row) for row in rows]

    async def query(self, filters: SuppressionFilter, now: float,
                    limit: int | None = None) -> AsyncIterator[SuppressionEntry]:
        """Entries matching every filter, oldest first, a page at a time (keyset paging on
        (created_at, id)): no connection stays taken between pages."""
        where, parameters = _where(filters, now)
        after: tuple[float, int] | None = None
        left = limit
        while left is None or left > 0:
            page = _QUERY_PAGE if left is None else min(_QUERY_PAGE, left)
            clauses = [*where, "(created_at, id) > (%s, %s)"] if after is not None else where
            clause = f"WHERE {' AND '.join(clauses)} " if clauses else ""
            rows = await self._db.fetchall(
                f"SELECT {_COLUMNS}, id FROM suppressions {clause}ORDER BY created_at, id LIMIT %s",
                (*parameters, *(after or ()), page))
            for row in rows:
                yield _entry(row[:-1])
            if len(rows) < page:
                return
            after = (rows[-1][5], rows[-1][-1])
            if left is not None:
                left -= len(rows)

    async def page(self, filters: SuppressionFilter, now: float, limit: int, after: int | None = None) -> SuppressionPage:
        where, parameters = _where(filters, now)
        if after is not None:
            where.append("id > %s")
            parameters.append(after)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = await self._db.fetchall(f"SELECT {_COLUMNS}, id FROM suppressions {clause}ORDER BY id LIMIT %s",
                                       (*parameters, limit + 1))
        more = len(rows) > limit
        return SuppressionPage(tuple(_entry(row[:-1]) for row in rows[:limit]), rows[limit - 1][-1] if more else None)

    async def count_by_list(self, now: float) -> dict[str, int]:
        rows = await self._db.fetchall(
            f"SELECT list_name, COUNT(*) FROM suppressions WHERE {_LIVE} GROUP BY list_name ORDER BY list_name",
            (now,))
        return {name: int(count) for name, count in rows}

    async def next_expiry(self, now: float) -> float | None:
        (first,) = await self._db.fetchone(
            "SELECT MIN(expires_at) FROM suppressions WHERE expires_at > %s", (now,))  # suppressions_by_expiry
        return first  # type: ignore[no-any-return]

    # --- reads for the running server -----------------------------------------------------------

    async def load_snapshot(self, list_priority: Sequence[str], now: float) -> SuppressionSnapshot:
        """One REPEATABLE READ transaction, so the change-log position and the entries agree;
        the rows stream from a server-side cursor in key_hash order into two arrays."""
        async with self._db.connection() as conn:
            async with conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                (seq,) = await (await conn.execute("SELECT COALESCE(MAX(seq), 0) FROM suppression_changes")).fetchone() \
                    or (0,)
                names = [name for (name,) in await (await conn.execute(LIST_NAMES)).fetchall()]
                order = list_order(list_priority, names)
                if len(order) > 256:
                    raise StoreError(f"{len(order)} suppression lists; the index holds at most 256")
                rank = "CASE list_name " + " ".join(f"WHEN %s THEN {i}" for i in range(len(order))) + " END"
                hashes, lists = array("q"), array("B")
                async with conn.cursor(name="snapshot") as cursor:
                    cursor.itersize = _FETCH_CHUNK
                    await cursor.execute(
                        f"SELECT key_hash, MIN({rank}) FROM suppressions WHERE kind = 'address' AND {_LIVE} "
                        "GROUP BY key_hash ORDER BY key_hash", (*order, now))
                    while chunk := await cursor.fetchmany(_FETCH_CHUNK):
                        hashes.extend(row[0] for row in chunk)
                        lists.extend(row[1] for row in chunk)
                ranks = {name: i for i, name in enumerate(order)}
                domains: dict[str, DomainRule] = {}
                for domain, list_name, subdomains in await (await conn.execute(
                        f"SELECT value, list_name, include_subdomains FROM suppressions "
                        f"WHERE kind = 'domain' AND {_LIVE}", (now,))).fetchall():
                    current = domains.get(domain)
                    if current is None or ranks[list_name] < ranks[current.list_name]:
                        domains[domain] = DomainRule(list_name, bool(subdomains))
                (next_expiry,) = await (await conn.execute(
                    "SELECT MIN(expires_at) FROM suppressions WHERE expires_at > %s", (now,))).fetchone() or (None,)
        # Half a second at ten million addresses: in a thread, not in the event loop's.
        addresses = await asyncio.to_thread(AddressTable.build, hashes, lists)
        return SuppressionSnapshot(addresses, order, domains, seq=int(seq), next_expiry=next_expiry)

    async def current_seq(self) -> int:
        (latest,) = await self._db.fetchone("SELECT COALESCE(MAX(seq), 0) FROM suppression_changes")
        return int(latest)

    async def changes_since(self, seq: int, list_priority: Sequence[str], now: float) -> SuppressionDelta:
        rows = await self._db.fetchall(
            "SELECT seq, key_hash, domain FROM suppression_changes WHERE seq > %s ORDER BY seq LIMIT %s",
            (seq, MAX_DELTA + 1))
        if not rows:
            latest = await self.current_seq()
            # A change log behind the index: the store was replaced (restored from a backup).
            return SuppressionDelta(seq=seq, full_reload=latest < seq)
        if len(rows) > MAX_DELTA or any(h is None and d is None for _, h, d in rows):
            return SuppressionDelta(seq=await self.current_seq(), full_reload=True)
        hashes = list(dict.fromkeys(h for _, h, _ in rows if h is not None))
        domains = list(dict.fromkeys(d for _, _, d in rows if d is not None))
        order = list_order(list_priority, ())
        addresses: dict[int, str | None] = dict.fromkeys(hashes)
        expiries: list[float] = []
        if hashes:
            for hash_value, list_name, expires_at in await self._db.fetchall(
                    f"SELECT key_hash, list_name, expires_at FROM suppressions WHERE kind = 'address' "
                    f"AND key_hash = ANY(%s) AND {_LIVE}", (hashes, now)):
                addresses[hash_value] = better_list(addresses[hash_value], list_name, order)
                if expires_at is not None:
                    expiries.append(expires_at)
        best: dict[str, DomainRule] = {}
        if domains:
            for domain, list_name, subdomains, expires_at in await self._db.fetchall(
                    f"SELECT value, list_name, include_subdomains, expires_at FROM suppressions WHERE kind = 'domain' "
                    f"AND value = ANY(%s) AND {_LIVE}", (domains, now)):
                if expires_at is not None:
                    expiries.append(expires_at)
                current = best.get(domain)
                if current is None or better_list(current.list_name, list_name, order) != current.list_name:
                    best[domain] = DomainRule(list_name, bool(subdomains))
        rules: dict[str, DomainRule | None] = {domain: best.get(domain) for domain in domains}
        return SuppressionDelta(seq=int(rows[-1][0]), addresses=addresses, domains=rules,
                                next_expiry=min(expiries, default=None))


def _where(filters: SuppressionFilter, now: float) -> tuple[list[str], list[Any]]:
    return suppression_where(filters, now, "%s", "strpos(lower(value), %s) > 0")


def _row(entry: SuppressionEntry, now: float) -> tuple[Any, ...]:
    return (entry.kind, entry.value, key_hash(entry.value), entry.list_name, entry.reason, entry.source,
            entry.created_at or now, entry.expires_at, entry.include_subdomains)


def _change(kind: str, value: str, now: float) -> tuple[Any, ...]:
    return (key_hash(value), None, now) if kind == "address" else (None, value, now)


def _entry(row: Sequence[Any]) -> SuppressionEntry:
    kind, value, list_name, reason, source, created_at, expires_at, subdomains = row
    return SuppressionEntry(kind, value, list_name, reason, source, created_at, expires_at, bool(subdomains))

"""The PostgreSQL database: a connection pool (psycopg 3), migrations, and error translation.

One pool per guard process (``[store] pool_size`` connections at most), shared by every
sub-store; every statement runs on a connection taken from it for that statement or that
transaction only, so a slow read never holds up the hold queue's commits as the single SQLite
connection would. Connections are checked when taken: after a database restart the dead ones
are replaced instead of failing the next call.

Durability: a COMMIT returns once PostgreSQL has flushed it to its WAL (``synchronous_commit``,
forced back ``on`` for the guard's sessions if the server's default is ``off``) — the
guarantee the hold queue needs before the client gets its 250.

Errors are translated where they enter: a full disk (SQLSTATE 53100) becomes ``StoreFull``;
a lock not granted within ``[store] busy_timeout`` (``lock_timeout``), a serialization
failure, a deadlock, or no free connection in time becomes ``StoreBusy``; anything else —
a lost connection, a server that is down — ``StoreError``. Messages never carry the
password: the URL is printed without it (``config.redact_url``).
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterable

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ...config import redact_url
from ..base import StoreBusy, StoreError, StoreFull
from .schema import MIGRATIONS, Migration, migrate, schema_version

Connection = psycopg.AsyncConnection[Any]
QueryObserver = Callable[[str, float], None]  # ("statement" or "transaction", seconds)
PoolObserver = Callable[[int, int], None]  # (connections in use, idle)

_BUSY = (pg_errors.LockNotAvailable, pg_errors.SerializationFailure, pg_errors.DeadlockDetected,
         pg_errors.QueryCanceled)


def store_error(error: BaseException, url: str, context: str = "") -> StoreError:
    """The StoreError for a driver error, with PostgreSQL's own words and no password."""
    text = " ".join(str(error).split()) or type(error).__name__
    password = psycopg.conninfo.conninfo_to_dict(url).get("password") if url else None
    if password:
        text = text.replace(str(password), "***")
    if context:
        text = f"{context}: {text}"
    if isinstance(error, pg_errors.DiskFull):
        return StoreFull(text)
    if isinstance(error, _BUSY):
        return StoreBusy(text)
    if isinstance(error, PoolTimeout):
        return StoreBusy(f"{context or 'PostgreSQL'}: no connection within [store] busy_timeout (the server is "
                         "down or unreachable, or every pooled connection stayed busy)")
    return StoreError(text)


class PostgresDatabase:
    """A pool of connections to one PostgreSQL database, migrated (or checked) on open."""

    def __init__(self, url: str, *, pool_size: int = 10, busy_timeout: float = 5.0,
                 on_query: QueryObserver | None = None, on_pool: PoolObserver | None = None) -> None:
        self.url = url
        self.location = redact_url(url)
        self.busy_timeout = busy_timeout
        self._on_query = on_query
        self._on_pool = on_pool
        self._in_use = 0
        self._pool = AsyncConnectionPool(
            url, min_size=1, max_size=pool_size, open=False, timeout=busy_timeout,
            kwargs={"autocommit": True}, configure=self._configure, check=AsyncConnectionPool.check_connection,
            # Keep trying to reconnect while the server is away: the guard answers 451 meanwhile
            # and must resume by itself.
            reconnect_timeout=24 * 3600.0, name="smtp-guard")

    def __repr__(self) -> str:
        stats = self._pool.get_stats()
        return (f"<PostgresDatabase {self.location} size={stats.get('pool_size', 0)} "
                f"available={stats.get('pool_available', 0)} in_use={self._in_use}>")

    async def open(self, *, migrate_schema: bool) -> list[Migration]:
        """Connect (one plain connection first, so a refused connection or a wrong password
        is reported in PostgreSQL's words, not as a pool time-out), then migrate the schema
        (``migrate_schema``: the guard's start, ``init``, ``store migrate``) or check that it
        is current (admin commands). Returns the migrations applied."""
        async with self._direct() as conn:
            if migrate_schema:
                applied = await migrate(conn)
            else:
                applied = []
                await self._check_schema(conn)
        await self._pool.open(wait=False)
        return applied

    async def version(self) -> int:
        """The schema version of the database (0: smtp-guard never migrated it)."""
        async with self._direct() as conn:
            return await schema_version(conn)

    async def is_current(self) -> bool:
        """Reachable and migrated to this smtp-guard's schema (StoreError when unreachable, or
        when newer than this smtp-guard)."""
        async with self._direct() as conn:
            await self._check_schema(conn, missing_ok=True)
            return await schema_version(conn) == len(MIGRATIONS)

    @asynccontextmanager
    async def _direct(self) -> AsyncIterator[Connection]:
        """One connection outside the pool, for opening, migrating and checking."""
        try:
            async with await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=max(1, round(self.busy_timeout))) as conn:
                yield conn
        except psycopg.Error as error:
            raise store_error(error, self.url, f"cannot open the store at {self.location}") from error

    async def _check_schema(self, conn: Connection, *, missing_ok: bool = False) -> None:
        version = await schema_version(conn)
        if version < len(MIGRATIONS) and not missing_ok:
            raise StoreError(f"the store at {self.location} is at schema version {version}, this smtp-guard needs "
                             f"{len(MIGRATIONS)}: run `smtp-guard store migrate` (or start the guard) first")
        if version > len(MIGRATIONS):
            raise StoreError(f"the store at {self.location} has schema version {version}, newer than this "
                             f"smtp-guard ({len(MIGRATIONS)}); upgrade smtp-guard")

    async def close(self) -> None:
        await self._pool.close()

    async def _configure(self, conn: Connection) -> None:
        await conn.execute(f"SET lock_timeout = {max(1, int(self.busy_timeout * 1000))}")
        cursor = await conn.execute("SHOW synchronous_commit")
        row = await cursor.fetchone()
        if row is not None and row[0] == "off":
            await conn.execute("SET synchronous_commit = on")

    @asynccontextmanager
    async def connection(self, kind: str = "statement") -> AsyncIterator[Connection]:
        """A pooled connection (autocommit) for one statement or one piece of work; driver
        errors become StoreError. ``kind`` (statement, transaction) labels the time metric."""
        started = time.monotonic()
        try:
            async with self._pool.connection() as conn:
                self._in_use += 1
                self._report_pool()
                try:
                    yield conn
                finally:
                    self._in_use -= 1
        except (psycopg.Error, PoolTimeout) as error:
            raise store_error(error, self.url) from error
        finally:
            self._report_pool()
            if self._on_query is not None:
                self._on_query(kind, time.monotonic() - started)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """BEGIN ... COMMIT on one pooled connection (ROLLBACK on error)."""
        async with self.connection("transaction") as conn:
            async with conn.transaction():
                yield conn

    async def execute(self, sql: str, parameters: Iterable[Any] = ()) -> int:
        """One statement in its own transaction; returns the rows it changed."""
        async with self.connection() as conn:
            cursor = await conn.execute(sql, tuple(parameters))
            return max(cursor.rowcount, 0)

    async def fetchall(self, sql: str, parameters: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        async with self.connection() as conn:
            cursor = await conn.execute(sql, tuple(parameters))
            return list(await cursor.fetchall())

    async def fetchone(self, sql: str, parameters: Iterable[Any] = ()) -> Any:
        async with self.connection() as conn:
            cursor = await conn.execute(sql, tuple(parameters))
            return await cursor.fetchone()

    def _report_pool(self) -> None:
        if self._on_pool is not None:
            size = int(self._pool.get_stats().get("pool_size", 0))
            self._on_pool(self._in_use, max(0, size - self._in_use))

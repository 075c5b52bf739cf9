"""The SQLite database: connection settings, schema migrations, and one shared connection.

Durability: WAL journal with ``synchronous=FULL``, so a COMMIT has been fsync'd to the WAL
when it returns — the guarantee the hold queue needs before the client gets its 250.
``secure_delete`` is on so that deleted rows are overwritten, not left in free pages (erasure).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

import aiosqlite

from ..base import StoreError

# Each entry upgrades the schema by one version (PRAGMA user_version). Never edit a shipped
# migration; append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE suppressions (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('address', 'domain')),
        value TEXT NOT NULL,
        key_hash INTEGER NOT NULL,
        list_name TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        expires_at REAL,
        include_subdomains INTEGER NOT NULL DEFAULT 0,
        UNIQUE (kind, value, list_name)
    );
    CREATE INDEX suppressions_by_hash ON suppressions (key_hash);
    CREATE INDEX suppressions_by_list ON suppressions (list_name);
    CREATE INDEX suppressions_by_expiry ON suppressions (expires_at) WHERE expires_at IS NOT NULL;

    -- Change log read by running servers to update their in-memory index. key_hash NULL and
    -- domain NULL together mean "reload everything" (written once per bulk import).
    CREATE TABLE suppression_changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        key_hash INTEGER,
        domain TEXT,
        changed_at REAL NOT NULL
    );

    CREATE TABLE held_messages (
        id TEXT PRIMARY KEY,
        txn_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        client TEXT NOT NULL,
        sender TEXT NOT NULL,
        mail_options TEXT NOT NULL DEFAULT '',
        size INTEGER NOT NULL,
        content BLOB
    );
    CREATE TABLE held_recipients (
        hold_id TEXT NOT NULL REFERENCES held_messages (id) ON DELETE CASCADE,
        address TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('held', 'released', 'delivered', 'failed', 'discarded')),
        rule TEXT NOT NULL,
        reason TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        last_reply TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (hold_id, address)
    );
    CREATE INDEX held_recipients_due ON held_recipients (state, next_attempt_at);

    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        kind TEXT NOT NULL,
        verdict TEXT NOT NULL,
        rule TEXT NOT NULL,
        reason TEXT NOT NULL,
        txn_id TEXT NOT NULL DEFAULT '',
        client TEXT NOT NULL DEFAULT '',
        sender TEXT NOT NULL DEFAULT '',
        recipient TEXT NOT NULL DEFAULT '',
        actor TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX audit_by_time ON audit (time);
    CREATE INDEX audit_by_recipient ON audit (recipient) WHERE recipient != '';
    """,
    """
    -- Verifiable erasure (docs/design.md, first incident). No table here holds an address.
    CREATE TABLE erasure_keys (
        id TEXT PRIMARY KEY,
        check_value TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE tombstones (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        digest BLOB NOT NULL,
        key_id TEXT NOT NULL REFERENCES erasure_keys (id),
        reference TEXT NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE (digest, key_id)
    );
    CREATE TABLE erasure_receipts (
        id TEXT PRIMARY KEY,
        reference TEXT NOT NULL,
        created_at REAL NOT NULL,
        tombstone_id INTEGER NOT NULL REFERENCES tombstones (id),
        body TEXT NOT NULL
    );
    CREATE TABLE erasure_attempts (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        tombstone_id INTEGER NOT NULL,
        reference TEXT NOT NULL,
        client TEXT NOT NULL,
        sender TEXT NOT NULL,
        stream TEXT NOT NULL,
        txn_id TEXT NOT NULL
    );
    CREATE INDEX erasure_attempts_by_time ON erasure_attempts (time);
    """,
    """
    -- Bulk-send protection (docs/design.md, second incident).
    ALTER TABLE held_messages ADD COLUMN stream TEXT NOT NULL DEFAULT '';
    ALTER TABLE held_messages ADD COLUMN message_class TEXT NOT NULL DEFAULT '';
    CREATE INDEX held_messages_by_stream ON held_messages (stream);

    -- One row per stream whose breaker or approval gate tripped. The server writes counts;
    -- admins (CLI/API) write the decision (approved with a new ceiling, or cancelled).
    CREATE TABLE breakers (
        stream TEXT PRIMARY KEY,
        rule TEXT NOT NULL,
        sender TEXT NOT NULL,
        message_class TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('tripped', 'approved', 'cancelled')),
        threshold INTEGER NOT NULL,
        ceiling INTEGER,
        recipients INTEGER NOT NULL,
        tripped_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        decided_by TEXT NOT NULL DEFAULT '',
        decided_at REAL
    );
    -- Learned size of a sender's streams (exponentially decayed average of finished streams).
    CREATE TABLE baselines (
        sender TEXT PRIMARY KEY,
        baseline REAL NOT NULL,
        streams INTEGER NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    """
    -- Read-your-writes: an admin change, once committed, moves the store-wide change generation
    -- (one row); every running guard process has a row saying which generation it has applied.
    CREATE TABLE change_generation (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        generation INTEGER NOT NULL
    );
    INSERT INTO change_generation (id, generation) VALUES (1, 0);
    CREATE TABLE guard_instances (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        applied_generation INTEGER  -- NULL until the instance's first refresh
    );
    """,
)

PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
    "PRAGMA secure_delete = ON",
    "PRAGMA busy_timeout = 10000",
)


def connect_sync(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """A plain sqlite3 connection with the same settings (for bulk work in a thread)."""
    connection = sqlite3.connect(path, isolation_level=None)
    for pragma in PRAGMAS:
        connection.execute(pragma)
    return connection


class Database:
    """One aiosqlite connection, migrated on open. Sub-stores share it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._connection: aiosqlite.Connection | None = None
        # The connection is shared by concurrent coroutines: a multi-statement transaction
        # holds this lock so no other coroutine's statement lands inside it.
        self._write_lock = asyncio.Lock()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); sqlite errors become StoreError."""
        async with self._write_lock:
            connection = self.connection
            try:
                await connection.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise StoreError(str(error)) from error
            try:
                yield connection
            except BaseException as error:
                await connection.execute("ROLLBACK")
                if isinstance(error, sqlite3.Error):
                    raise StoreError(str(error)) from error
                raise
            else:
                try:
                    await connection.execute("COMMIT")
                except sqlite3.Error as error:
                    await connection.execute("ROLLBACK")
                    raise StoreError(str(error)) from error

    async def open(self) -> "Database":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._connection = await aiosqlite.connect(self.path, isolation_level=None)
            for pragma in PRAGMAS:
                await self._connection.execute(pragma)
            await self._migrate()
        except (sqlite3.Error, OSError) as error:
            raise StoreError(f"cannot open the store at {self.path}: {error}") from error
        return self

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def __aenter__(self) -> "Database":
        return await self.open()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    @property
    def connection(self) -> aiosqlite.Connection:
        if self._connection is None:
            raise StoreError("the store is not open")
        return self._connection

    async def _migrate(self) -> None:
        connection = self.connection
        async with connection.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"the store at {self.path} has schema version {version}, newer than this smtp-guard "
                f"({len(MIGRATIONS)}); upgrade smtp-guard"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await connection.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")

    async def execute(self, sql: str, parameters: Iterable[Any] = ()) -> None:
        try:
            await self.connection.execute(sql, tuple(parameters))
        except sqlite3.Error as error:
            raise StoreError(str(error)) from error

    async def fetchall(self, sql: str, parameters: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            async with self.connection.execute(sql, tuple(parameters)) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.Error as error:
            raise StoreError(str(error)) from error

    async def fetchone(self, sql: str, parameters: Iterable[Any] = ()) -> Any:
        try:
            async with self.connection.execute(sql, tuple(parameters)) as cursor:
                return await cursor.fetchone()
        except sqlite3.Error as error:
            raise StoreError(str(error)) from error

"""The SQLite database: connection settings, schema migrations, and one shared connection.

Durability: WAL journal with ``synchronous=FULL``, so a COMMIT has been fsync'd to the WAL
when it returns — the guarantee the hold queue needs before the client gets its 250.
``secure_delete`` is on so that deleted rows are overwritten, not left in free pages (erasure).

Concurrency: one aiosqlite connection is shared by every coroutine of a process, and every
statement on it — reads included — runs under one lock, from execute to the last fetched
row. A read cursor left open while another coroutine's ``BEGIN IMMEDIATE`` runs makes that
BEGIN an upgrade of an open read transaction, which SQLite answers with SQLITE_BUSY at once,
without waiting ``busy_timeout``, whenever another process holds the write lock (or
SQLITE_BUSY_SNAPSHOT when it has committed since the read began): the ``database is locked``
the breaker sync used to hit while the CLI wrote. Waiting for the lock and for SQLite's busy
handler together take at most ``busy_timeout``; past it a call fails with ``StoreBusy``.

Errors: sqlite errors are translated where they enter — SQLITE_FULL (or ENOSPC) becomes
``StoreFull``, SQLITE_BUSY/LOCKED ``StoreBusy``, anything else ``StoreError``.

Privacy: the store holds addresses, so its directory is created 0700 and the database file
0600 before SQLite opens it; SQLite gives the ``-wal`` and ``-shm`` files the database
file's mode. A store found readable by others is tightened at open, with a warning.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import sqlite3
import stat
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

import aiosqlite

from ...private_directory import DIRECTORY_MODE, make_private_directory
from ..base import StoreBusy, StoreError, StoreFull

log = logging.getLogger(__name__)

DEFAULT_BUSY_TIMEOUT = 5.0
FILE_MODE = 0o600
# Files next to the database that SQLite creates with the database file's mode.
_COMPANIONS = ("-wal", "-shm", "-journal")

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
    """
    -- The suppression snapshot (store/sqlite/suppressions.py _load_snapshot) read in key_hash
    -- order from this index alone: no table look-up, no sort. 1.6x faster at a million
    -- addresses than the sequential scan and sort it replaces; about 35 bytes per address.
    CREATE INDEX suppressions_snapshot ON suppressions (key_hash, list_name, expires_at)
        WHERE kind = 'address';
    """,
)

PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
    "PRAGMA secure_delete = ON",
)


def _busy_pragma(seconds: float) -> str:
    return f"PRAGMA busy_timeout = {max(0, int(seconds * 1000))}"


def store_error(error: sqlite3.Error | OSError, context: str = "") -> StoreError:
    """The StoreError for a sqlite or OS error, keeping SQLite's own message."""
    text = f"{context}: {error}" if context else str(error)
    name = getattr(error, "sqlite_errorname", "") or ""
    if name == "SQLITE_FULL" or (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)):
        return StoreFull(text)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return StoreBusy(text)
    return StoreError(text)


def prepare_files(path: Path) -> None:
    """Create the store's directory (0700) and database file (0600) before SQLite does, so
    their modes do not depend on the umask; tighten an existing store that others can read."""
    directory = path.parent
    if not directory.exists():
        make_private_directory(directory)
    elif _is_open_to_others(directory) and _is_dedicated(directory, path):
        log.warning("store directory %s was accessible to other users (mode %o); set it to 0700",
                    directory, stat.S_IMODE(directory.stat().st_mode))
        os.chmod(directory, DIRECTORY_MODE)
    elif _is_open_to_others(directory):
        # Not only the guard's files in it (e.g. /var/lib): changing it could break others.
        log.warning("store directory %s is accessible to other users; give the store a directory of "
                    "its own, mode 0700 (the store files themselves are 0600)", directory)
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        pass
    else:
        try:
            os.fchmod(descriptor, FILE_MODE)
        finally:
            os.close(descriptor)
    for file in (path, *(path.with_name(path.name + suffix) for suffix in _COMPANIONS)):
        tighten_file(file)


def tighten_file(file: Path) -> None:
    """Mode 0600 for a store file that others can read or write (with a warning)."""
    try:
        mode = stat.S_IMODE(file.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("store file %s was accessible to other users (mode %o); set it to 0600", file, mode)
        os.chmod(file, FILE_MODE)


def _is_open_to_others(path: Path) -> bool:
    return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def _is_dedicated(directory: Path, path: Path) -> bool:
    """Whether the directory holds nothing but the guard's own files (store, sandbox, key)."""
    return directory.stat().st_uid == os.geteuid() and all(
        name.startswith(path.name) or name in ("sandbox", "erasure.key", "erasure.key.tmp")
        for name in os.listdir(directory))


def connect_sync(path: str | os.PathLike[str], busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> sqlite3.Connection:
    """A plain sqlite3 connection with the same settings (for bulk work in a thread)."""
    connection = sqlite3.connect(path, isolation_level=None)
    # The busy timeout first: the other pragmas already need the database's locks.
    connection.execute(_busy_pragma(busy_timeout))
    for pragma in PRAGMAS:
        connection.execute(pragma)
    return connection


class Database:
    """One aiosqlite connection, migrated on open. Sub-stores share it."""

    def __init__(self, path: str | os.PathLike[str], busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._connection: aiosqlite.Connection | None = None
        # Every use of the shared connection, reads included, holds this lock (module docstring).
        self._lock = asyncio.Lock()
        self._busy_setting = busy_timeout  # the connection's current PRAGMA busy_timeout

    def __repr__(self) -> str:
        return f"<Database {self.path} busy_timeout={self.busy_timeout}s locked={self._lock.locked()}>"

    @asynccontextmanager
    async def _locked(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection, alone, within ``busy_timeout`` of asking (lock wait included)."""
        connection = self.connection
        deadline = time.monotonic() + self.busy_timeout
        try:
            async with asyncio.timeout(self.busy_timeout):
                await self._lock.acquire()
        except TimeoutError:
            raise StoreBusy(f"the store at {self.path} stayed busy for {self.busy_timeout:g}s") from None
        try:
            # SQLite's busy handler gets what is left of the time, so the total stays bounded.
            remaining = max(0.0, deadline - time.monotonic())
            wanted = self.busy_timeout if remaining > self.busy_timeout - 0.05 else remaining
            if wanted != self._busy_setting:
                await connection.execute(_busy_pragma(wanted))
                self._busy_setting = wanted
            yield connection
        finally:
            self._lock.release()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); sqlite errors become StoreError."""
        async with self._locked() as connection:
            try:
                await connection.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise store_error(error) from error
            try:
                yield connection
            except BaseException as error:
                await _rollback(connection)
                if isinstance(error, sqlite3.Error):
                    raise store_error(error) from error
                raise
            else:
                try:
                    await connection.execute("COMMIT")
                except sqlite3.Error as error:
                    await _rollback(connection)
                    raise store_error(error) from error

    async def open(self) -> "Database":
        """Connect, set the pragmas and migrate. Cancelled part way (a stop signal during
        start-up), it still waits for the step aiosqlite's thread is running and closes what it
        opened: that thread finishes its step whatever the caller does, and if the event loop
        has closed by then it dies with "Event loop is closed" on stderr."""
        opening = asyncio.ensure_future(self._open())
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            await asyncio.wait({opening})
            if not opening.cancelled() and opening.exception() is None:
                await self.close()
            raise

    async def _open(self) -> "Database":
        try:
            prepare_files(self.path)
            self._connection = await aiosqlite.connect(self.path, isolation_level=None)
            await self._connection.execute(_busy_pragma(self.busy_timeout))
            await self._set_up()
        except (sqlite3.Error, OSError) as error:
            await self.close()
            raise store_error(error, f"cannot open the store at {self.path}") from error
        except BaseException:  # a store too new for this version, say: nobody would close it
            await self.close()
            raise
        return self

    async def _set_up(self) -> None:
        """Pragmas and migrations. Two processes opening a new store together (a CLI command
        and a starting guard) can collide on the switch to WAL: a lock upgrade SQLite refuses
        at once instead of waiting in its busy handler. Retried with a random pause within
        busy_timeout."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                for pragma in PRAGMAS:
                    await self.connection.execute(pragma)
                await self._migrate()
                return
            except sqlite3.OperationalError as error:
                if not isinstance(store_error(error), StoreBusy) or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(random.uniform(0.01, 0.1))

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
        version = await self._schema_version()
        while version < len(MIGRATIONS):
            # The version is read again under the write lock: another process (a CLI command
            # and the server starting together) may have migrated meanwhile.
            await connection.execute("BEGIN IMMEDIATE")
            try:
                version = await self._schema_version()
                statements = list(_statements(MIGRATIONS[version])) if version < len(MIGRATIONS) else []
                for statement in statements:
                    await connection.execute(statement)
                if statements:
                    await connection.execute(f"PRAGMA user_version = {version + 1}")
                await connection.execute("COMMIT")
            except BaseException:
                await _rollback(connection)
                raise
            version = await self._schema_version()
        if version > len(MIGRATIONS):
            raise StoreError(
                f"the store at {self.path} has schema version {version}, newer than this smtp-guard "
                f"({len(MIGRATIONS)}); upgrade smtp-guard"
            )

    async def version(self) -> int:
        """The schema version (``PRAGMA user_version``) the open store is at."""
        return await self._schema_version()

    @staticmethod
    def version_of(path: str | os.PathLike[str]) -> int:
        """The schema version of a store file without opening it for writing; 0 if there is none."""
        if not Path(path).is_file():
            return 0
        connection = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        try:
            return int(connection.execute("PRAGMA user_version").fetchone()[0])
        finally:
            connection.close()

    async def _schema_version(self) -> int:
        async with self.connection.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def execute(self, sql: str, parameters: Iterable[Any] = ()) -> None:
        async with self._locked() as connection:
            try:
                await connection.execute(sql, tuple(parameters))
            except sqlite3.Error as error:
                raise store_error(error) from error

    async def fetchall(self, sql: str, parameters: Iterable[Any] = ()) -> list[sqlite3.Row]:
        async with self._locked() as connection:
            try:
                async with connection.execute(sql, tuple(parameters)) as cursor:
                    return list(await cursor.fetchall())
            except sqlite3.Error as error:
                raise store_error(error) from error

    async def fetchone(self, sql: str, parameters: Iterable[Any] = ()) -> Any:
        async with self._locked() as connection:
            try:
                async with connection.execute(sql, tuple(parameters)) as cursor:
                    return await cursor.fetchone()
            except sqlite3.Error as error:
                raise store_error(error) from error


async def _rollback(connection: aiosqlite.Connection) -> None:
    """ROLLBACK if a transaction is still open: SQLite has already rolled back after some
    errors (SQLITE_FULL, SQLITE_IOERR, a busy COMMIT), and a second ROLLBACK would fail and
    hide the error that matters."""
    if connection.in_transaction:
        try:
            await connection.execute("ROLLBACK")
        except sqlite3.Error as error:
            log.warning("store: rollback failed: %s", error)


def _statements(script: str) -> Iterable[str]:
    """The statements of a migration script, one at a time (executescript would COMMIT the
    migration's own transaction first)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                yield pending.strip()
            pending = ""
    if pending.strip() and not all(line.strip().startswith("--") or not line.strip()
                                   for line in pending.splitlines()):
        raise StoreError(f"incomplete statement in a migration: {pending.strip()[:60]}")

"""The backends: every store and shared counter, built from config in one place.

The server's roles (front, background) and every admin operation (CLI, API) get their stores
here, so there is one wiring of the store to keep right — and one seam where the engines plug
in: ``open_stores`` builds the SQLite stores (``[store] path``) or the PostgreSQL ones
(``[store] url``); everything above only sees the Protocols.

Opening the backends also loads every erasure tombstone with a key ring that can verify them:
acting on a store whose erasures are not enforceable would hide the problem, for the server
and for admin commands alike.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable

from .addresses import AddressNormalizer
from .audit_model import AuditStore
from .breaker.tally import StreamTallies
from .config import Config
from .counters import InMemoryCounters, RateCounters
from .metrics import Metrics
from .shared_counters import SharedCounters
from .erasure.index import TombstoneIndex
from .erasure.keys import ErasureKeyError, open_key_ring
from .erasure.pseudonyms import Pseudonymizer, PseudonymizingAuditStore
from .erasure.tombstone_file import TombstoneFileError, map_tombstones, write_tombstones
from .private_directory import make_private_directory
from .startup import naming_setting
from .breaker.model import BreakerStore
from .change_model import ChangeStore
from .erasure.model import ErasureStore
from .hold.model import HoldStore
from .store.base import StoreError
from .services.context import AdminContext
from .suppression_model import SuppressionStore
from .store.sqlite.audit import SQLiteAuditStore
from .store.sqlite.breakers import SQLiteBreakerStore
from .store.sqlite.changes import SQLiteChangeStore
from .store.sqlite.db import Database
from .store.sqlite.erasure import SQLiteErasureStore
from .store.sqlite.holds import SQLiteHoldStore
from .store.sqlite.suppressions import SQLiteSuppressionStore

if TYPE_CHECKING:  # imported where a PostgreSQL store is used: psycopg costs every process memory
    from .store.copy import CopiedTable
    from .store.postgres.db import PostgresDatabase
    from .store.postgres.schema import Migration


@dataclass(frozen=True)
class Stores:
    """One store's interfaces, whatever the engine."""

    suppressions: SuppressionStore
    holds: HoldStore
    erasure: ErasureStore
    breakers: BreakerStore
    changes: ChangeStore
    audit: AuditStore  # stores what it is given: wrap it (PseudonymizingAuditStore) before use


@asynccontextmanager
async def open_stores(config: Config, *, migrate: bool, metrics: Metrics | None = None) -> AsyncIterator[Stores]:
    """The stores ``[store]`` names, open. ``migrate``: the schema may be created or upgraded
    (the guard's start, ``init``, ``store migrate``); without it a PostgreSQL store must
    already be current (admin commands never create one). A SQLite store is migrated whenever
    it is opened: its file exists (``store_exists``) before an admin command gets here.
    ``metrics``: the PostgreSQL pool and query-time metrics of a guard process."""
    if config.store.is_postgresql:
        if migrate:
            make_private_directory(config.store.data_dir)
        from .store.postgres.audit import PostgresAuditStore
        from .store.postgres.breakers import PostgresBreakerStore
        from .store.postgres.changes import PostgresChangeStore
        from .store.postgres.erasure import PostgresErasureStore
        from .store.postgres.holds import PostgresHoldStore
        from .store.postgres.suppressions import PostgresSuppressionStore

        db = postgres_database(config, metrics)
        await db.open(migrate_schema=migrate)
        try:
            yield Stores(PostgresSuppressionStore(db), PostgresHoldStore(db), PostgresErasureStore(db),
                         PostgresBreakerStore(db), PostgresChangeStore(db), PostgresAuditStore(db))
        finally:
            await db.close()
    else:
        async with Database(config.store.path, config.store.busy_timeout) as sqlite:
            yield Stores(SQLiteSuppressionStore(sqlite), SQLiteHoldStore(sqlite), SQLiteErasureStore(sqlite),
                         SQLiteBreakerStore(sqlite), SQLiteChangeStore(sqlite), SQLiteAuditStore(sqlite))


def postgres_database(config: Config, metrics: Metrics | None = None) -> PostgresDatabase:
    from .store.postgres.db import PostgresDatabase

    store = config.store
    return PostgresDatabase(
        store.url, pool_size=store.pool_size, busy_timeout=store.busy_timeout,
        on_query=None if metrics is None else (lambda kind, seconds: metrics.store_query_seconds.labels(kind)
                                               .observe(seconds)),
        on_pool=None if metrics is None else metrics.set_store_pool)


@dataclass(frozen=True)
class Backends:
    suppressions: SuppressionStore
    holds: HoldStore
    erasure: ErasureStore
    breakers: BreakerStore
    changes: ChangeStore
    # Everyone writes the audit trail through this one: recipients only as pseudonyms.
    audit: PseudonymizingAuditStore
    tombstones: TombstoneIndex  # every erasure, verified with the key ring
    normalizer: AddressNormalizer
    counters: RateCounters  # rate-limit buckets and pacing; shared by every worker process

    def admin_context(self, config: Config, actor: str) -> AdminContext:
        """An admin operation on these backends (a CLI command's own, or a running guard's for
        the admin API and unsubscribes, whose tombstones follow erasures made anywhere)."""
        return AdminContext(
            config=config, suppressions=self.suppressions, holds=self.holds, breakers=self.breakers,
            audit=self.audit, erasure=self.erasure, key_ring=self.tombstones.ring, tombstones=self.tombstones,
            normalizer=self.normalizer, actor=actor, changes=self.changes,
        )


async def store_exists(config: Config) -> bool:
    """Whether the guard created the store: the SQLite file exists, or the PostgreSQL database
    is reachable and migrated (StoreError when it cannot be reached)."""
    if not config.store.is_postgresql:
        return Path(config.store.path).is_file()
    return await postgres_database(config).is_current()


async def migrate_store(config: Config) -> tuple[int, list[Migration]]:
    """Create or upgrade the schema (``store migrate``, ``init``): the version before, and the
    migrations applied. A SQLite store is migrated by opening it (db.py), one version each."""
    if config.store.is_postgresql:
        db = postgres_database(config)
        before = await db.version()
        applied = await db.open(migrate_schema=True)
        await db.close()
        return before, applied
    before = Database.version_of(config.store.path)
    async with Database(config.store.path, config.store.busy_timeout) as sqlite:
        after = await sqlite.version()
    from .store.postgres.schema import Migration

    return before, [Migration(version, "SQLite schema") for version in range(before + 1, after + 1)]


@asynccontextmanager
async def open_backends(config: Config, *, server: bool, counters: RateCounters | None = None,
                        metrics: Metrics | None = None, shared_tombstones: SharedTombstones | None = None,
                        ) -> AsyncIterator[Backends]:
    """The backends for one guard process (``server``: a start-up failure names the setting
    to fix, the schema may be migrated and the erasure key created) or one admin operation
    (the store must exist: callers check ``store_exists`` first, so an admin command never
    creates one).

    ``counters``: the worker processes' shared buckets (the supervisor created them); by
    default this process's own. ``metrics``: a guard process's, for the store's own.
    ``shared_tombstones``: the file a multi-worker guard's processes share them through."""
    async with AsyncExitStack() as opened:
        with naming_setting(config.store.setting, server, StoreError, OSError):
            stores = await opened.enter_async_context(open_stores(config, migrate=server, metrics=metrics))
        with naming_setting(f"[erasure] key_file {config.erasure_key_file}", server, ErasureKeyError, OSError):
            tombstones = await load_tombstones(config, stores.erasure, may_replace=server, shared=shared_tombstones)
            if server and tombstones.broken:
                raise ErasureKeyError(f"{tombstones.broken}; restore the key file from backup")
        normalizer = AddressNormalizer(config.addresses)
        pseudonymizer = Pseudonymizer(normalizer, lambda: tombstones.ring, tombstones.lookup_token)
        yield Backends(
            suppressions=stores.suppressions,
            holds=stores.holds,
            erasure=stores.erasure,
            breakers=stores.breakers,
            changes=stores.changes,
            audit=PseudonymizingAuditStore(stores.audit, pseudonymizer),
            tombstones=tombstones,
            normalizer=normalizer,
            counters=counters if counters is not None else InMemoryCounters(),
        )


@asynccontextmanager
async def open_counters(config: Config, metrics: Metrics, *, shared: Path | None = None, create: bool = False,
                        ) -> AsyncIterator[RateCounters]:
    """The rate counters of one guard process (docs/design.md, "Scale"): in Redis when
    ``[counters] url`` is set — the same buckets for every process of every guard instance;
    else the worker processes' table in shared memory at ``shared`` (the supervisor
    ``create``s it, each worker attaches to it); else this process's own, in memory."""
    if config.counters.url:
        from .redis_counters import RedisCounters  # redis-py: only in the processes that use it

        with naming_setting("[counters] url", True, ValueError):
            redis_counters = RedisCounters.connect(config.counters, metrics)
        try:
            yield redis_counters
        finally:
            await redis_counters.close()
    elif shared is not None:
        with naming_setting(f"[smtp] workers {config.smtp.workers} (run directory {shared.parent})", True, OSError):
            table = SharedCounters.create(shared, config.smtp.rate_limit_keys) if create else SharedCounters.attach(shared)
        try:
            yield table
        finally:
            table.close()
    else:
        yield InMemoryCounters()


def stream_tallies(config: Config, counters: RateCounters) -> StreamTallies | None:
    """Where the breaker counts streams: with ``[counters] url``, in Redis beside the rate
    counters and over their connections — every guard instance counts a stream once; else None:
    in the memory of the process that decides the end of DATA (the guard, or its supervisor)."""
    if not config.counters.url:
        return None
    from .breaker.redis_tally import RedisTallies
    from .redis_counters import RedisCounters

    if not isinstance(counters, RedisCounters):
        raise TypeError(f"[counters] url is set but the rate counters are {counters!r}")
    return RedisTallies(counters.connection)


@asynccontextmanager
async def open_change_store(config: Config) -> AsyncIterator[ChangeStore]:
    """Only the change generation and the running guards: what an admin command needs to wait
    for its change to be in force, without loading the key ring and every tombstone again."""
    async with open_stores(config, migrate=False) as stores:
        yield stores.changes


async def copy_sqlite_store(source: Path, url: str, progress: Callable[[CopiedTable], None]) -> list[CopiedTable]:
    """``store copy``: the SQLite store at ``source`` into the empty PostgreSQL store at ``url``."""
    if not source.is_file():
        raise StoreError(f"no SQLite store at {source}; name the guard's [store] path")
    from .store.copy import copy_store
    from .store.postgres.db import PostgresDatabase

    return await copy_store(source, PostgresDatabase(url), progress)


async def init_store(config: Config) -> bool:
    """Create (or migrate) the store and the erasure key where the config says, as the guard's
    first start would (``smtp-guard init``). Returns False when the store already existed."""
    existed = await store_exists(config)
    async with open_stores(config, migrate=True) as stores:
        await load_tombstones(config, stores.erasure, may_replace=True)
    return not existed


@dataclass(frozen=True)
class SharedTombstones:
    """Where a multi-worker guard's processes share the tombstones (``erasure/tombstone_file.py``):
    the supervisor ``build``s the file at start, every worker maps it."""

    path: Path
    build: bool
    setting: str  # named when the file cannot be written or read


async def load_tombstones(config: Config, erasure: ErasureStore, *, may_replace: bool,
                          shared: SharedTombstones | None = None) -> TombstoneIndex:
    """Every tombstone, with a key ring that can verify them: a missing, replaced or too-open
    key file stops here (ErasureKeyError). Only ``may_replace`` (the guard's start, ``init``)
    replaces a key nothing was made with. With ``shared``, those in its file are mapped and
    only later ones read into this process's memory."""
    ring = await open_key_ring(config.erasure_key_file, erasure, config.store.data_dir, may_replace=may_replace)
    if shared is None:
        return TombstoneIndex(ring, await erasure.tombstones_since(0))
    with naming_setting(shared.setting, True, OSError, TombstoneFileError):
        if shared.build:
            await asyncio.to_thread(write_tombstones, await erasure.tombstones_since(0), shared.path)
        mapped = await asyncio.to_thread(map_tombstones, shared.path)
    return TombstoneIndex(ring, await erasure.tombstones_since(mapped.last_id), shared=mapped)

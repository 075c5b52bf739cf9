"""The backends: every store and shared counter, built from config in one place.

The server's roles (front, background) and every admin operation (CLI, API) get their stores
here, so there is one wiring of the store to keep right — and one seam where other engines
(PostgreSQL for the stores, Redis for the counters) plug in: a second branch in
``open_backends``, nothing else changes, since everything above only sees the Protocols.

Opening the backends also loads every erasure tombstone with a key ring that can verify them:
acting on a store whose erasures are not enforceable would hide the problem, for the server
and for admin commands alike.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from .addresses import AddressNormalizer
from .breaker.tally import StreamTallies
from .config import Config
from .counters import InMemoryCounters, RateCounters
from .metrics import Metrics
from .shared_counters import SharedCounters
from .erasure.index import TombstoneIndex
from .erasure.keys import ErasureKeyError, open_key_ring
from .erasure.pseudonyms import Pseudonymizer, PseudonymizingAuditStore
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


def store_exists(config: Config) -> bool:
    return Path(config.store.path).is_file()


@asynccontextmanager
async def open_backends(config: Config, *, server: bool, counters: RateCounters | None = None,
                        ) -> AsyncIterator[Backends]:
    """The backends for one guard process (``server``: a start-up failure names the setting
    to fix, and the erasure key may be created) or one admin operation (the store must exist:
    callers check ``store_exists`` first, so an admin command never creates one).

    ``counters``: the worker processes' shared buckets (the supervisor created them); by
    default this process's own."""
    with naming_setting(f"[store] path {config.store.path}", server, StoreError, OSError):
        db = await Database(config.store.path, config.store.busy_timeout).open()
    try:
        erasure = SQLiteErasureStore(db)
        with naming_setting(f"[erasure] key_file {config.erasure_key_file}", server, ErasureKeyError, OSError):
            tombstones = await load_tombstones(config, erasure, may_replace=server)
            if server and tombstones.broken:
                raise ErasureKeyError(f"{tombstones.broken}; restore the key file from backup")
        normalizer = AddressNormalizer(config.addresses)
        pseudonymizer = Pseudonymizer(normalizer, lambda: tombstones.ring, tombstones.lookup_token)
        yield Backends(
            suppressions=SQLiteSuppressionStore(db),
            holds=SQLiteHoldStore(db),
            erasure=erasure,
            breakers=SQLiteBreakerStore(db),
            changes=SQLiteChangeStore(db),
            audit=PseudonymizingAuditStore(SQLiteAuditStore(db), pseudonymizer),
            tombstones=tombstones,
            normalizer=normalizer,
            counters=counters if counters is not None else InMemoryCounters(),
        )
    finally:
        await db.close()


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
    async with Database(config.store.path, config.store.busy_timeout) as db:
        yield SQLiteChangeStore(db)


async def load_tombstones(config: Config, erasure: SQLiteErasureStore, *, may_replace: bool) -> TombstoneIndex:
    """Every tombstone, with a key ring that can verify them: a missing, replaced or too-open
    key file stops here (ErasureKeyError). Only ``may_replace`` (the guard's start, ``init``)
    replaces a key nothing was made with."""
    ring = await open_key_ring(config.erasure_key_file, erasure, config.store.data_dir, may_replace=may_replace)
    return TombstoneIndex(ring, await erasure.tombstones_since(0))

"""Composition root: config -> stores -> index -> pipeline -> upstream -> hold worker -> listeners.

The only module that builds concrete stores, pools and servers. ``Guard`` is the running
service (uvicorn-style: one config, start-up, time-limited graceful shutdown);
``open_admin_context`` gives the CLI and API the same stores for one admin operation.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable, Sequence

from .addresses import AddressNormalizer
from .admin.http import HTTPListener
from .audit import AuditLog
from .breaker_state import BreakerState
from .breaker_sync import BreakerSync
from .classify import MessageClassifier
from .config import Config
from .counters import InMemoryCounters
from .erasure.index import TombstoneIndex, TombstoneReloader
from .erasure.keys import ErasureKeyError, load_key_ring, open_key_ring
from .erasure.pseudonyms import Pseudonymizer, PseudonymizingAuditStore
from .hold.worker import ReleaseWorker
from .index import IndexReloader, SuppressionIndex
from .logs import configure_logging
from .metrics import Metrics
from .periodic import Periodic
from .policy.default import default_pipeline
from .relay.base import Upstream
from .relay.pool import SMTPUpstream
from .relay.sandbox import SandboxUpstream
from .services.context import AdminContext
from .smtp.access import AccessControl
from .smtp.auth import Authenticator
from .smtp.handler import GuardHandler
from .smtp.server import SMTPServer
from .store.base import AuditRecord, Tombstone
from .store.sqlite.audit import SQLiteAuditStore
from .store.sqlite.breakers import SQLiteBreakerStore
from .store.sqlite.db import Database
from .store.sqlite.erasure import SQLiteErasureStore
from .store.sqlite.holds import SQLiteHoldStore
from .store.sqlite.suppressions import SQLiteSuppressionStore

log = logging.getLogger("smtp_guard")

STATS_INTERVAL = 5.0
LIST_SIZES_INTERVAL = 60.0


async def load_tombstones(config: Config, erasure: SQLiteErasureStore) -> TombstoneIndex:
    """Every tombstone, with a key ring that can verify them: a missing, replaced or too-open
    key file stops here (ErasureKeyError) — for the server and for every admin command, since
    acting on a store whose erasures are not enforceable would hide the problem."""
    return TombstoneIndex(await open_key_ring(config.erasure_key_file, erasure), await erasure.tombstones_since(0))


def pseudonymizing_audit_store(db: Database, normalizer: AddressNormalizer,
                               tombstones: TombstoneIndex) -> PseudonymizingAuditStore:
    """The audit store as everyone writes to it: recipients only as pseudonyms (or erased:<id>)."""
    pseudonymizer = Pseudonymizer(normalizer, lambda: tombstones.ring, tombstones.lookup_token)
    return PseudonymizingAuditStore(SQLiteAuditStore(db), pseudonymizer)


@asynccontextmanager
async def open_admin_context(config: Config, actor: str) -> AsyncIterator[AdminContext]:
    """Stores for one admin operation (CLI command or API request)."""
    async with Database(config.store.path, config.store.busy_timeout) as db:
        erasure = SQLiteErasureStore(db)
        tombstones = await load_tombstones(config, erasure)
        normalizer = AddressNormalizer(config.addresses)
        yield AdminContext(
            config=config,
            suppressions=SQLiteSuppressionStore(db),
            holds=SQLiteHoldStore(db),
            breakers=SQLiteBreakerStore(db),
            audit=pseudonymizing_audit_store(db, normalizer, tombstones),
            erasure=erasure,
            key_ring=tombstones.ring,
            tombstones=tombstones,
            normalizer=normalizer,
            actor=actor,
        )


def build_upstream(config: Config) -> Upstream:
    if config.upstream.mode == "sandbox":
        return SandboxUpstream(config.store.data_dir / "sandbox")
    return SMTPUpstream(config.upstream)


def build_listener_tls(config: Config) -> ssl.SSLContext | None:
    tls = config.smtp.tls
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    return context


class Guard:
    """The running relay. ``await start()`` binds every listener; ``await stop()`` drains."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.metrics = Metrics()
        self._db = Database(config.store.path, config.store.busy_timeout)
        self._loops: list[Periodic] = []
        self._started = False
        self.ready = False

    async def start(self) -> None:
        config = self.config
        await self._db.open()
        self.suppressions = SQLiteSuppressionStore(self._db)
        self.holds = SQLiteHoldStore(self._db)
        self.erasure = SQLiteErasureStore(self._db)
        self.normalizer = AddressNormalizer(config.addresses)

        key_file = config.erasure_key_file
        self.tombstones = await load_tombstones(config, self.erasure)
        if self.tombstones.broken:
            raise ErasureKeyError(f"{key_file}: {self.tombstones.broken}; restore the key file from backup")
        self.tombstone_reloader = TombstoneReloader(self.tombstones, self.erasure, lambda: load_key_ring(key_file),
                                                    on_new=self._sweep_after_erasure)
        self.audit_store = pseudonymizing_audit_store(self._db, self.normalizer, self.tombstones)

        self.index = SuppressionIndex()
        self.reloader = IndexReloader(self.index, self.suppressions, config.list_priority,
                                      config.store.reload_interval, clock=self.clock)
        self.reloader.on_reload = self.metrics.index_reloads.inc
        await self.reloader.load()
        self.breaker_state = BreakerState(config.breaker)
        # Embedded, per process; a shared implementation (Redis) plugs in here (counters.py).
        self.rate_counters = InMemoryCounters()
        self.pipeline = default_pipeline(config, self.tombstones, self.index, breakers=self.breaker_state,
                                         counters=self.rate_counters, clock=self.clock)

        self.upstream = build_upstream(config)
        self.audit = AuditLog(self.audit_store, config.audit, on_dropped=self.metrics.audit_dropped.inc)
        self.breakers = SQLiteBreakerStore(self._db)
        self.breaker_sync = BreakerSync(self.breaker_state, self.breakers, self.holds, self.metrics,
                                        self.audit.record, config.store.reload_interval, clock=self.clock,
                                        rate_limit_names=[limit.name for limit in config.rate_limits])
        await self.breaker_sync.load()
        self.release_worker = ReleaseWorker(self.holds, self.upstream, config.hold,
                                            record=self._record_delivery, clock=self.clock)
        handler = GuardHandler(
            smtp_config=config.smtp, access=AccessControl(config.access.allow_networks),
            auth_enabled=bool(config.smtp.auth.users), normalizer=self.normalizer, pipeline=self.pipeline,
            upstream=self.upstream, holds=self.holds, audit=self.audit, metrics=self.metrics, clock=self.clock,
            record_erasure_attempts=self.erasure.record_attempts,
            classifier=MessageClassifier(config.classify, config.streams), strip=config.streams.strip_headers,
        )
        authenticator = Authenticator(config.smtp.auth.users) if config.smtp.auth.users else None
        self.smtp = SMTPServer(handler, config.smtp, self.metrics, build_listener_tls(config), authenticator)
        self.http = HTTPListener(self.metrics.registry, is_ready=lambda: self.ready)

        self.audit.start()
        self.reloader.start()
        self.release_worker.start()
        self.breaker_sync.start()
        self._loops = [
            Periodic("stats", STATS_INTERVAL, self.update_stats, "could not read hold/suppression statistics",
                     run_first=True),
            # Counting entries scans the suppression table (seconds at ten million rows, on the
            # connection the hold queue commits through), so list sizes are read less often.
            Periodic("list-sizes", LIST_SIZES_INTERVAL, self.update_list_sizes, "could not count list entries",
                     run_first=True),
            Periodic("tombstones", config.store.reload_interval, self.tombstone_reloader.refresh,
                     "tombstone refresh failed; keeping the current tombstones"),
        ]
        for loop in self._loops:
            loop.start()
        if config.metrics.listen is not None:
            await self.http.start(config.metrics.listen.host, config.metrics.listen.port)
        await self.smtp.start()
        self._started = True
        self.ready = True
        log.info("smtp-guard listening on %s:%d (upstream %r, config %s)", *self.smtp_address,
                 self.upstream, config.source)

    async def _sweep_after_erasure(self, tombstones: Sequence[Tombstone]) -> None:
        """Between an erasure's purge and this server learning of it, audit records about the
        person may have been written under their pseudonym: write what is buffered (now as
        ``erased:<id>``), then replace the pseudonym in what was already written."""
        await self.audit.flush()
        for tombstone in tombstones:
            key = self.tombstones.ring.by_id(tombstone.key_id)
            if key is not None:
                await self.erasure.erase_pseudonyms([key.pseudonym_of_digest(tombstone.digest)], tombstone.id)

    def _record_delivery(self, record: AuditRecord) -> None:
        self.metrics.hold_deliveries.labels(record.verdict).inc()
        self.audit.record(record)

    @property
    def smtp_address(self) -> tuple[str, int]:
        return self.smtp.address

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return self.http.address

    async def stop(self) -> None:
        """Stop accepting, let sessions in flight finish within the grace period, then stop
        the workers and flush the audit trail."""
        self.ready = False
        if not self._started:
            await self._db.close()
            return
        await self.smtp.stop(self.config.smtp.shutdown_grace)
        await self.release_worker.stop()
        await self.breaker_sync.stop()  # persists trips and counts for the next start
        await self.reloader.stop()
        for loop in self._loops:
            await loop.stop()
        await self.audit.stop()
        await self.upstream.close()
        await self.http.stop()
        await self._db.close()
        self._started = False
        log.info("smtp-guard stopped")

    async def update_stats(self) -> None:
        """Refresh the gauges that come from the store (hold queue, list sizes)."""
        self.metrics.tombstones.set(len(self.tombstones))
        stats = await self.holds.stats()
        self.metrics.hold_messages.set(stats.held_messages)
        self.metrics.hold_recipients.set(stats.held_recipients)
        self.metrics.hold_oldest_age.set(0 if stats.oldest_held_at is None else self.clock() - stats.oldest_held_at)

    async def update_list_sizes(self) -> None:
        for list_name, count in (await self.suppressions.count_by_list(self.clock())).items():
            self.metrics.suppression_entries.labels(list_name).set(count)


def serve_forever(config: Config) -> None:
    """``smtp-guard serve``: run until SIGTERM/SIGINT, then shut down gracefully."""
    configure_logging(config.logging)

    async def main() -> None:
        guard = Guard(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await guard.start()
        if config.upstream.mode == "sandbox":
            log.warning("upstream is the SANDBOX: mail is captured in %s and not delivered; "
                        "set [upstream] mode = \"smtp\" and host to relay for real", config.store.data_dir / "sandbox")
        await stop.wait()
        log.info("shutting down: no new sessions; up to %.0fs for sessions in flight", config.smtp.shutdown_grace)
        await guard.stop()

    asyncio.run(main())

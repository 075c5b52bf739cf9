"""Composition root: config -> stores -> index -> pipeline -> upstream -> hold worker -> listeners.

The only module that builds concrete stores, pools and servers. ``Guard`` is the running
service (uvicorn-style: one config, start-up, time-limited graceful shutdown);
``open_admin_context`` gives the CLI and API the same stores for one admin operation.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import ssl
import time
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Sequence

from .addresses import AddressNormalizer
from .admin.http import HTTPListener
from .audit import AuditLog
from .audit_model import AuditRecord
from .breaker.state import BreakerState
from .breaker.sync import BreakerSync
from .change_sync import ChangeSync
from .classify import MessageClassifier
from .config import Config
from .counters import InMemoryCounters
from .erasure.index import TombstoneIndex, TombstoneReloader
from .erasure.keys import ErasureKeyError, load_key_ring, open_key_ring
from .erasure.model import Tombstone
from .erasure.pseudonyms import Pseudonymizer, PseudonymizingAuditStore
from .hold.worker import ReleaseWorker
from .index import IndexReloader, SuppressionIndex
from .logs import PseudonymFilter, configure_logging
from .metrics import Metrics
from .periodic import Periodic
from .policy.default import default_pipeline
from .readiness import Readiness, probe_store, probe_upstream
from .relay.base import Upstream
from .relay.pool import SMTPUpstream
from .relay.sandbox import SandboxUpstream
from .services.context import AdminContext, StoreNotFound
from .smtp.access import AccessControl
from .smtp.auth import Authenticator
from .smtp.handler import GuardHandler
from .smtp.server import SMTPServer
from .store.base import StoreError
from .store.sqlite.audit import SQLiteAuditStore
from .store.sqlite.breakers import SQLiteBreakerStore
from .store.sqlite.changes import SQLiteChangeStore
from .store.sqlite.db import Database
from .store.sqlite.erasure import SQLiteErasureStore
from .store.sqlite.holds import SQLiteHoldStore
from .store.sqlite.suppressions import SQLiteSuppressionStore

log = logging.getLogger("smtp_guard")

# Where packages and the image put the guard's config: named in an admin command's error when
# it ran on the embedded defaults and found no store.
WELL_KNOWN_CONFIGS = (Path("/etc/smtp-guard/smtp-guard.toml"),)

STATS_INTERVAL = 5.0
PROBE_INTERVAL = 2.0  # how often readiness checks that the store answers
LIST_SIZES_INTERVAL = 60.0


async def load_tombstones(config: Config, erasure: SQLiteErasureStore, *, may_replace: bool) -> TombstoneIndex:
    """Every tombstone, with a key ring that can verify them: a missing, replaced or too-open
    key file stops here (ErasureKeyError) — for the server and for every admin command, since
    acting on a store whose erasures are not enforceable would hide the problem. Only
    ``may_replace`` (the guard's start, ``init``) replaces a key nothing was made with."""
    ring = await open_key_ring(config.erasure_key_file, erasure, config.store.data_dir, may_replace=may_replace)
    return TombstoneIndex(ring, await erasure.tombstones_since(0))


def pseudonymizing_audit_store(db: Database, normalizer: AddressNormalizer,
                               tombstones: TombstoneIndex) -> PseudonymizingAuditStore:
    """The audit store as everyone writes to it: recipients only as pseudonyms (or erased:<id>)."""
    pseudonymizer = Pseudonymizer(normalizer, lambda: tombstones.ring, tombstones.lookup_token)
    return PseudonymizingAuditStore(SQLiteAuditStore(db), pseudonymizer)


async def init_store(config: Config) -> bool:
    """Create the store and the erasure key where the config says, as the guard's first start
    would (``smtp-guard init``). Returns False when the store already existed."""
    existed = Path(config.store.path).is_file()
    async with Database(config.store.path, config.store.busy_timeout) as db:
        await load_tombstones(config, SQLiteErasureStore(db), may_replace=True)
    return not existed


@asynccontextmanager
async def open_admin_context(config: Config, actor: str) -> AsyncIterator[AdminContext]:
    """Stores for one admin operation (CLI command or API request), on the store the guard
    created (StoreNotFound when there is none)."""
    if not Path(config.store.path).is_file():
        raise StoreNotFound(config, WELL_KNOWN_CONFIGS)
    async with Database(config.store.path, config.store.busy_timeout) as db:
        erasure = SQLiteErasureStore(db)
        tombstones = await load_tombstones(config, erasure, may_replace=False)
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
            changes=SQLiteChangeStore(db),
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


class StartupError(Exception):
    """The guard cannot start; the message names the setting to fix (one line)."""


@contextmanager
def _setting(name: str, *errors: type[BaseException]) -> Iterator[None]:
    """Turn a start-up failure into a StartupError that names the setting behind it."""
    try:
        yield
    except StartupError:
        raise
    except errors as error:
        text = _one_line(error)
        value = name.split(" ", 2)[-1]  # "[section] key VALUE": the path or address itself
        raise StartupError(f"{name}: {text.removeprefix(f'{value}: ')}") from error


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
        return "address already in use; stop the other process or choose another port"
    if isinstance(error, OSError) and error.errno == errno.EADDRNOTAVAIL:
        return "no such address on this machine; listen on one of its own addresses"
    if isinstance(error, OSError) and error.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges; files need the guard's user)"
    return " ".join(str(error).split()) or type(error).__name__


class Guard:
    """The running relay. ``await start()`` binds every listener; ``await stop()`` drains.

    A start that fails part way stops what it had started (open store, background loops) and
    raises StartupError naming the setting, so a broken start never leaves a half-alive process.
    """

    def __init__(self, config: Config, clock: Callable[[], float] = time.time,
                 log_pseudonyms: PseudonymFilter | None = None) -> None:
        self.config = config
        self.clock = clock
        self._log_pseudonyms = log_pseudonyms
        self.metrics = Metrics()
        self.readiness = Readiness()
        self._db = Database(config.store.path, config.store.busy_timeout)
        # Everything started is registered here; stop() unwinds it in reverse order.
        self._running = AsyncExitStack()

    @property
    def ready(self) -> bool:
        return self.readiness.is_ready

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._running.aclose()
            raise

    async def _start(self) -> None:
        config = self.config
        run = self._running
        with _setting(f"[store] path {config.store.path}", StoreError, OSError):
            await self._db.open()
        run.push_async_callback(self._db.close)
        self.suppressions = SQLiteSuppressionStore(self._db)
        self.holds = SQLiteHoldStore(self._db)
        self.erasure = SQLiteErasureStore(self._db)
        self.normalizer = AddressNormalizer(config.addresses)

        key_file = config.erasure_key_file
        with _setting(f"[erasure] key_file {key_file}", ErasureKeyError, OSError):
            self.tombstones = await load_tombstones(config, self.erasure, may_replace=True)
            if self.tombstones.broken:
                raise ErasureKeyError(f"{self.tombstones.broken}; restore the key file from backup")
        self.tombstone_reloader = TombstoneReloader(self.tombstones, self.erasure, lambda: load_key_ring(key_file),
                                                    on_new=self._sweep_after_erasure)
        self.audit_store = pseudonymizing_audit_store(self._db, self.normalizer, self.tombstones)
        if self._log_pseudonyms is not None:  # logs name people as the audit trail does, from here on
            self._log_pseudonyms.use(self.audit_store.pseudonymizer)

        self.index = SuppressionIndex()
        self.reloader = IndexReloader(self.index, self.suppressions, config.list_priority,
                                      config.store.reload_interval, clock=self.clock)
        self.reloader.on_reload = self.metrics.index_reloads.inc
        with _setting(f"[store] path {config.store.path}", StoreError):
            await self.reloader.load()
        self.readiness.set("index", None)
        self.breaker_state = BreakerState(config.breaker)
        # Embedded, per process; a shared implementation (Redis) plugs in here (counters.py).
        self.rate_counters = InMemoryCounters()
        self.pipeline = default_pipeline(config, self.tombstones, self.index, breakers=self.breaker_state,
                                         counters=self.rate_counters, clock=self.clock)

        with _setting(f"[store] path {config.store.path} (sandbox Maildir)", OSError):
            self.upstream = build_upstream(config)
        run.push_async_callback(self.upstream.close)
        self.audit = AuditLog(self.audit_store, config.audit, on_dropped=self.metrics.audit_dropped.inc)
        self.breakers = SQLiteBreakerStore(self._db)
        self.breaker_sync = BreakerSync(self.breaker_state, self.breakers, self.holds, self.metrics,
                                        self.audit.record, config.store.reload_interval, clock=self.clock,
                                        rate_limit_names=[limit.name for limit in config.rate_limits])
        with _setting(f"[store] path {config.store.path}", StoreError):
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
        with _setting("[smtp.tls] cert and key", OSError, ssl.SSLError):
            tls = build_listener_tls(config)
        self.smtp = SMTPServer(handler, config.smtp, self.metrics, tls, authenticator, self.clock)
        self.http = HTTPListener(self.metrics.registry, self.readiness)

        # Stopped in reverse order: the audit trail is flushed after the last decision.
        self.audit.start()
        run.push_async_callback(self.audit.stop)
        self.reloader.start()
        run.push_async_callback(self.reloader.stop)
        self._start_loop(Periodic(
            "stats", STATS_INTERVAL, self.update_stats, "could not read hold/suppression statistics",
            run_first=True))
        # Counting entries scans the suppression table (seconds at ten million rows, on the
        # connection the hold queue commits through), so list sizes are read less often.
        self._start_loop(Periodic("list-sizes", LIST_SIZES_INTERVAL, self.update_list_sizes,
                                  "could not count list entries", run_first=True))
        self._start_loop(Periodic("tombstones", config.store.reload_interval, self.tombstone_reloader.refresh,
                                  "tombstone refresh failed; keeping the current tombstones"))
        self.breaker_sync.start()
        run.push_async_callback(self.breaker_sync.stop)  # persists trips and counts for the next start
        self.release_worker.start()
        run.push_async_callback(self.release_worker.stop)
        if config.metrics.listen is not None:
            with _setting(f"[metrics] listen {config.metrics.listen}", OSError):
                await self.http.start(config.metrics.listen.host, config.metrics.listen.port)
            run.push_async_callback(self.http.stop)
        # Read-your-writes: registered and up to date before the first client connects; removed
        # after the listener stopped (the exit stack unwinds in reverse order). Each step
        # finishes its own follow-up before it returns (the tombstones' audit sweep, a breaker
        # decision's hold sweep), so a confirmed change has had its effects here.
        self.change_sync = ChangeSync(SQLiteChangeStore(self._db), [
            self.reloader.refresh, self.tombstone_reloader.refresh, self.breaker_sync.sync,
        ], config.store.change_poll_interval)
        run.push_async_callback(self.change_sync.stop)
        await self.change_sync.start()
        with _setting(f"[smtp] listen {config.smtp.listen}", OSError):
            await self.smtp.start()
        run.push_async_callback(self._stop_smtp)
        self.readiness.set("listener", None)
        # Probed once before start() returns (after binding, so that a slow upstream never
        # delays a start-up error), so /readyz tells the truth from its first answer.
        await asyncio.gather(self._probe_store(), self._probe_upstream())
        self._start_loop(Periodic("store-probe", PROBE_INTERVAL, self._probe_store, "store probe failed"))
        self._start_loop(Periodic("upstream-probe", config.upstream.probe_interval, self._probe_upstream,
                                  "upstream probe failed"))
        up = config.upstream
        upstream = ("the sandbox (captured, not delivered)" if up.mode == "sandbox"
                    else f"{up.host}:{up.port} (tls {up.tls})")
        log.info("smtp-guard listening on %s:%d, relaying to %s; store %s; config %s", *self.smtp_address,
                 upstream, config.store.path, config.source)

    def _start_loop(self, loop: Periodic) -> None:
        loop.start()
        self._running.push_async_callback(loop.stop)

    async def _stop_smtp(self) -> None:
        self.readiness.set("listener", "shutting down")
        await self.smtp.stop(self.config.smtp.shutdown_grace)

    async def _probe_store(self) -> None:
        self.readiness.set("store", await probe_store(self.holds.stats))

    async def _probe_upstream(self) -> None:
        self.readiness.set("upstream", await probe_upstream(self.config.upstream,
                                                            self.config.store.data_dir / "sandbox"))

    async def _sweep_after_erasure(self, tombstones: Sequence[Tombstone]) -> None:
        """Between an erasure's purge and this server learning of it, audit records about the
        person may have been written under their pseudonym: write what is buffered (now as
        ``erased:<id>``), then replace the pseudonym in what was already written."""
        await self.audit.flush()
        for tombstone in tombstones:
            key = self.tombstones.ring.by_id(tombstone.key_id)
            if key is None:
                # Fails the refresh, so the sweep is retried once the key file is restored and
                # this guard does not confirm the erasure meanwhile (it defers all mail anyway).
                raise ErasureKeyError(f"the key file lacks key {tombstone.key_id} of erasure {tombstone.reference}: "
                                      "its audit records cannot be swept until the key file is restored")
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
        await self._running.aclose()
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
    log_pseudonyms = configure_logging(config.logging)

    async def main() -> None:
        guard = Guard(config, log_pseudonyms=log_pseudonyms)
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

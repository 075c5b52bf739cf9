"""Composition root: config -> backends -> enforcement -> background -> pipeline -> front.

The only module (with ``backends``) that builds concrete stores, pools and servers. ``Guard``
is the running service in one process (one config, start-up, time-limited graceful
shutdown); ``open_admin_context`` gives the CLI and API the same backends for one admin
operation.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Callable

from .admin.http import HTTPListener
from .backends import Backends, load_tombstones, open_backends, store_exists
from .change_sync import ChangeSync
from .config import Config
from .logs import PseudonymFilter, configure_logging
from .metrics import Metrics
from .policy.default import default_pipeline
from .readiness import Readiness
from .relay.base import Upstream
from .relay.pool import SMTPUpstream
from .relay.sandbox import SandboxUpstream
from .roles.background import Background
from .roles.enforcement import Enforcement
from .roles.front import Front
from .services.context import AdminContext, StoreNotFound
from .startup import naming_setting
from .store.sqlite.db import Database
from .store.sqlite.erasure import SQLiteErasureStore

log = logging.getLogger("smtp_guard")

# Where packages and the image put the guard's config: named in an admin command's error when
# it ran on the embedded defaults and found no store.
WELL_KNOWN_CONFIGS = (Path("/etc/smtp-guard/smtp-guard.toml"),)


async def init_store(config: Config) -> bool:
    """Create the store and the erasure key where the config says, as the guard's first start
    would (``smtp-guard init``). Returns False when the store already existed."""
    existed = store_exists(config)
    async with Database(config.store.path, config.store.busy_timeout) as db:
        await load_tombstones(config, SQLiteErasureStore(db), may_replace=True)
    return not existed


@asynccontextmanager
async def open_admin_context(config: Config, actor: str) -> AsyncIterator[AdminContext]:
    """Backends for one admin operation (CLI command or API request), on the store the guard
    created (StoreNotFound when there is none)."""
    if not store_exists(config):
        raise StoreNotFound(config, WELL_KNOWN_CONFIGS)
    async with open_backends(config, server=False) as backends:
        yield AdminContext(
            config=config, suppressions=backends.suppressions, holds=backends.holds, breakers=backends.breakers,
            audit=backends.audit, erasure=backends.erasure, key_ring=backends.tombstones.ring,
            tombstones=backends.tombstones, normalizer=backends.normalizer, actor=actor, changes=backends.changes,
        )


def build_upstream(config: Config) -> Upstream:
    with naming_setting(f"[store] path {config.store.path} (sandbox Maildir)", True, OSError):
        if config.upstream.mode == "sandbox":
            return SandboxUpstream(config.store.data_dir / "sandbox")
        return SMTPUpstream(config.upstream)


class Guard:
    """The running relay in one process. ``await start()`` binds every listener; ``await
    stop()`` drains.

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
        self.http = HTTPListener(self.metrics.registry, self.readiness)
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
        config, run = self.config, self._running
        self.backends: Backends = await run.enter_async_context(open_backends(config, server=True))
        if self._log_pseudonyms is not None:  # logs name people as the audit trail does, from here on
            self._log_pseudonyms.use(self.backends.audit.pseudonymizer)
        self.enforcement = Enforcement(config, self.backends, self.metrics, self.readiness, self.clock)
        await self.enforcement.start(run)
        self.upstream = upstream = build_upstream(config)
        run.push_async_callback(upstream.close)
        self.background = Background(config, self.backends, self.enforcement, upstream, self.metrics,
                                     self.readiness, self.http, self.clock)
        await self.background.start(run)
        pipeline = default_pipeline(config, self.backends.tombstones, self.enforcement.index,
                                    breakers=self.background.breaker_state, counters=self.backends.counters,
                                    clock=self.clock)
        self.front = Front(config, self.backends, self.enforcement, pipeline, upstream, self.metrics,
                           self.readiness, self.clock)
        # Read-your-writes: registered and up to date before the first client connects; removed
        # after the listener stopped (the exit stack unwinds in reverse order). Each step
        # finishes its own follow-up before it returns (the tombstones' audit sweep, a breaker
        # decision's hold sweep), so a confirmed change has had its effects here.
        self.change_sync = ChangeSync(self.backends.changes,
                                      [*self.enforcement.change_steps, *self.background.change_steps],
                                      config.store.change_poll_interval)
        run.push_async_callback(self.change_sync.stop)
        await self.change_sync.start()
        await self.front.start(run)
        await self.background.start_probes(run)
        up = config.upstream
        relaying_to = ("the sandbox (captured, not delivered)" if up.mode == "sandbox"
                       else f"{up.host}:{up.port} (tls {up.tls})")
        log.info("smtp-guard listening on %s:%d, relaying to %s; store %s; config %s", *self.smtp_address,
                 relaying_to, config.store.path, config.source)

    @property
    def smtp_address(self) -> tuple[str, int]:
        return self.front.smtp.address

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return self.http.address

    async def stop(self) -> None:
        """Stop accepting, let sessions in flight finish within the grace period, then stop
        the workers and flush the audit trail."""
        await self._running.aclose()
        log.info("smtp-guard stopped")


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

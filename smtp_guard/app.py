"""Composition root: config -> backends -> enforcement -> background -> pipeline -> front.

The only module (with ``backends``) that builds concrete stores, pools and servers:

* ``Guard``: the running service in one process (``[smtp] workers = 1``): every role;
* ``Supervisor`` and ``Worker`` (``workers`` > 1): the supervisor runs the background role,
  the end-of-DATA decisions of every worker (``decision_service``) and ``/metrics`` for all
  of them, and starts the workers (``workers.py``); each worker runs an SMTP front. They meet
  in a private run directory (``run_directory.py``): the shared rate counters, the shared suppression
  snapshot, the decision socket and the metrics files;
* ``open_admin_context``: the same backends for one admin operation (CLI, API).
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import signal
import time
from contextlib import AsyncExitStack, asynccontextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable, Protocol, Sequence

from prometheus_client import CollectorRegistry

from . import event_loop
from .backends import Backends, SharedTombstones, open_backends, open_counters, store_exists, stream_tallies
from .change_sync import ChangeSync, Step
from .config import Config
from .counters import RateCounters
from .decision_service import DEFAULT_TIMEOUT as DECISION_TIMEOUT
from .decision_service import DecisionServer, DecisionServiceError, LocalDecider, RemoteDecider, frame_limit
from .fork_server import ForkServer
from .index_share import SharedSnapshots
from .logs import PseudonymFilter, configure_logging
from .malloc_tuning import return_large_blocks
from .metrics import Metrics, forget_process, multiprocess_registry, use_multiprocess_files
from .policy.default import default_pipeline
from .prctl import name_process
from .readiness import Readiness
from .relay.base import Upstream
from .relay.pool import SMTPUpstream
from .relay.sandbox import SandboxUpstream
from .roles.background import Background
from .roles.enforcement import Enforcement
from .roles.front import Front
from .run_directory import RunDirectory, RunPaths, hold_while_alive
from .services.context import AdminContext, StoreNotFound
from .services.propagation import STALE_AFTER
from .startup import StartupError, naming_setting
from .store.base import StoreError
from .workers import WorkerPool, heartbeat, ready_to_beat

if TYPE_CHECKING:
    from .admin.http import HTTPListener
    from .admin.server import AdminListener
    from .unsubscribe.http import UnsubscribeListener

log = logging.getLogger("smtp_guard")

# Where packages and the image put the guard's config: named in an admin command's error when
# it ran on the embedded defaults and found no store.
WELL_KNOWN_CONFIGS = (Path("/etc/smtp-guard/smtp-guard.toml"),)


@asynccontextmanager
async def open_admin_context(config: Config, actor: str) -> AsyncIterator[AdminContext]:
    """Backends for one admin command, on the store the guard created (StoreNotFound when
    there is none)."""
    if not await store_exists(config):
        raise StoreNotFound(config, WELL_KNOWN_CONFIGS)
    async with open_backends(config, server=False) as backends:
        yield backends.admin_context(config, actor)


def build_upstream(config: Config, metrics: Metrics) -> Upstream:
    """The upstream every relay and release goes through; DKIM-signing when keys are configured."""
    upstream: Upstream
    with naming_setting(f"{config.store.setting} (sandbox Maildir in {config.store.data_dir})", True, OSError):
        if config.upstream.mode == "sandbox":
            upstream = SandboxUpstream(config.store.data_dir / "sandbox")
        else:
            upstream = SMTPUpstream(config.upstream)
    if not config.dkim.keys:
        return upstream
    # Imported only when signing: dkimpy, cryptography and PyNaCl cost every process memory.
    from .dkim.keys import DKIMKeyError
    from .dkim.signer import DKIMSigner
    from .relay.signing import SigningUpstream

    try:
        signer = DKIMSigner.from_config(config.dkim)
    except DKIMKeyError as error:
        raise StartupError(str(error)) from error
    return SigningUpstream(upstream, signer, metrics)


def _http_listener(registry: CollectorRegistry, readiness: Readiness) -> HTTPListener:
    """The metrics and health listener, imported here: aiohttp is about 10 MiB of every process
    that imports it, and worker processes never serve HTTP."""
    from .admin.http import HTTPListener

    return HTTPListener(registry, readiness)


class _GuardProcess:
    """What the three kinds of guard process share: ``await start()`` (a start that fails part
    way stops what it had started — open store, background loops — and raises StartupError
    naming the setting, so a broken start never leaves a half-alive process) and ``await
    stop()``, which unwinds everything started, in reverse order."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time,
                 log_pseudonyms: PseudonymFilter | None = None) -> None:
        self.config = config
        self.clock = clock
        self._log_pseudonyms = log_pseudonyms
        self.readiness = Readiness()
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
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop accepting, let sessions in flight finish within the grace period, then stop
        everything else and flush the audit trail (what was started, in reverse order)."""
        await self._running.aclose()
        log.info("%s stopped", self._name)

    @property
    def _name(self) -> str:
        return "smtp-guard"

    async def _enforce(self, metrics: Metrics, counters: RateCounters, shared: RunPaths | None = None,
                       supervisor: bool = False) -> tuple[Backends, Enforcement, Upstream]:
        """The steps every guard process starts with: its backends, the index and tombstones
        it enforces from, and its upstream. ``counters``: this process's (``open_counters``);
        ``shared``: where the processes of a multi-worker guard share the suppression snapshot
        and the tombstones (the ``supervisor`` writes the tombstones' file, before any worker)."""
        run = self._running
        tombstones = None if shared is None else SharedTombstones(
            shared.tombstones, build=supervisor,
            setting=f"[smtp] workers {self.config.smtp.workers} (shared tombstones {shared.tombstones})")
        backends = await run.enter_async_context(open_backends(self.config, server=True, counters=counters,
                                                               metrics=metrics, shared_tombstones=tombstones))
        if self._log_pseudonyms is not None:  # logs name people as the audit trail does, from here on
            self._log_pseudonyms.use(backends.audit.pseudonymizer)
        snapshots = None if shared is None else SharedSnapshots(shared.index, backends.suppressions)
        enforcement = Enforcement(self.config, backends, metrics, self.readiness, self.clock, snapshots)
        await enforcement.start(run)
        upstream = build_upstream(self.config, metrics)
        run.push_async_callback(upstream.close)
        return backends, enforcement, upstream

    async def _follow_changes(self, backends: Backends, steps: Sequence[Step]) -> None:
        """Read-your-writes: registered and up to date before the first client connects;
        removed after the listener stopped (the exit stack unwinds in reverse order). Each step
        finishes its own follow-up before it returns (the tombstones' audit sweep, a breaker
        decision's hold sweep), so a confirmed change has had its effects here."""
        change_sync = ChangeSync(backends.changes, steps, self.config.store.change_poll_interval)
        self._running.push_async_callback(change_sync.stop)
        await change_sync.start()
        self.change_sync = change_sync

    async def _serve_admin(self, backends: Backends, metrics: Metrics) -> None:
        """The admin API and console (``[admin] listen``), acting on this process's backends.
        Started after the change sync: a change it makes is confirmed by this guard too."""
        config = self.config
        self.admin: AdminListener | None = None
        if config.admin.listen is None:
            return
        from .admin.server import AdminListener  # aiohttp: only processes that serve HTTP import it

        listener = AdminListener(config, lambda actor: backends.admin_context(config, actor), self.readiness,
                                 metrics, self.clock)
        await listener.start()
        self._running.push_async_callback(listener.stop)
        self.admin = listener

    async def _serve_unsubscribe(self, backends: Backends, metrics: Metrics) -> None:
        """The one-click listener (``[unsubscribe] listen``): once per guard, like the admin API."""
        self.unsubscribe: UnsubscribeListener | None = None
        if not self.config.unsubscribe.enabled:
            return
        from .roles.front import unsubscriber_for
        from .unsubscribe.http import UnsubscribeListener

        listener = UnsubscribeListener(self.config.unsubscribe,
                                       unsubscriber_for(self.config, backends, metrics, self.clock))
        await listener.start()
        self._running.push_async_callback(listener.stop)
        self.unsubscribe = listener


class Guard(_GuardProcess):
    """The running relay in one process (``[smtp] workers = 1``): every role. ``await start()``
    binds every listener; ``await stop()`` drains."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time,
                 log_pseudonyms: PseudonymFilter | None = None) -> None:
        super().__init__(config, clock, log_pseudonyms)
        self.metrics = Metrics()
        self.http = _http_listener(self.metrics.registry, self.readiness)

    async def _start(self) -> None:
        config, run = self.config, self._running
        counters = await run.enter_async_context(open_counters(config, self.metrics))
        self.backends, self.enforcement, self.upstream = await self._enforce(self.metrics, counters)
        self.background = Background(config, self.backends, self.enforcement, self.upstream, self.metrics,
                                     self.readiness, self.http, self.clock, stream_tallies(config, counters))
        await self.background.start(run)
        pipeline = default_pipeline(config, self.backends.tombstones, self.enforcement.index,
                                    breakers=self.background.breaker_state, counters=self.backends.counters,
                                    clock=self.clock)
        self.front = Front(config, self.backends, self.enforcement, pipeline, LocalDecider(pipeline), self.upstream,
                           self.metrics, self.readiness, self.clock)
        await self._follow_changes(self.backends, [*self.enforcement.change_steps, *self.background.change_steps])
        await self.front.start(run)
        await self._serve_admin(self.backends, self.metrics)
        await self._serve_unsubscribe(self.backends, self.metrics)
        await self.background.start_probes(run)
        log.info("smtp-guard listening on %s:%d, relaying to %s; store %s; config %s", *self.smtp_address,
                 _upstream_text(config), config.store.location, config.source)

    @property
    def smtp_address(self) -> tuple[str, int]:
        return self.front.smtp.address

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return self.http.address


class Supervisor(_GuardProcess):
    """The guard with ``[smtp] workers`` > 1, minus the workers' fronts: backends, enforcement
    (for the end-of-DATA decisions), the background role, the decision service and /metrics
    for all processes; then the workers. Runs in ``smtp-guard serve`` only: it switches this
    process's metrics to multiprocess files. ``fork_server``: forked by ``serve`` before anything
    started (``fork_server.py``); the supervisor owns it. Without one, the pool starts a fresh
    interpreter as its fork server: the workers then share less with the supervisor."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time,
                 log_pseudonyms: PseudonymFilter | None = None, fork_server: ForkServer | None = None) -> None:
        super().__init__(config, clock, log_pseudonyms)
        self._fork_server = fork_server

    async def _start(self) -> None:
        config, run = self.config, self._running
        if self._fork_server is not None:
            run.push_async_callback(self._fork_server.close)  # the pool ends it too, unless the start fails first
        run_directory = RunDirectory(config.smtp.listen)
        paths = run_directory.claim()
        run.callback(run_directory.release)
        with naming_setting(f"[smtp] workers {config.smtp.workers} (run directory {paths.root})", True, OSError):
            paths.metrics.mkdir(mode=0o700)
            use_multiprocess_files(paths.metrics)
            self.metrics = Metrics()
        counters = await run.enter_async_context(open_counters(config, self.metrics, shared=paths.counters,
                                                               create=True))
        self.http = _http_listener(multiprocess_registry(paths.metrics), self.readiness)
        self.backends, self.enforcement, upstream = await self._enforce(self.metrics, counters, paths, supervisor=True)
        self.background = Background(config, self.backends, self.enforcement, upstream, self.metrics,
                                     self.readiness, self.http, self.clock, stream_tallies(config, counters))
        await self.background.start(run)
        pipeline = default_pipeline(config, self.backends.tombstones, self.enforcement.index,
                                    breakers=self.background.breaker_state, counters=counters, clock=self.clock)
        decisions = DecisionServer(pipeline, paths.decisions, max_frame=frame_limit(config.smtp),
                                   expire_after=DECISION_TIMEOUT, clock=self.clock)
        with naming_setting(f"[smtp] workers {config.smtp.workers} (decision socket)", True, DecisionServiceError):
            await decisions.start()
        run.push_async_callback(decisions.stop)
        await self._follow_changes(self.backends, [*self.enforcement.change_steps, *self.background.change_steps])
        self.workers = WorkerPool(config.smtp.workers, run_worker, (config, paths), config.smtp.shutdown_grace,
                                  on_exit=lambda pid, instance_id: self._worker_gone(paths, pid, instance_id),
                                  on_change=self._workers_accepting, fork_server=self._fork_server)
        await self.workers.start()
        run.push_async_callback(self._stop_workers)
        await self._serve_admin(self.backends, self.metrics)
        await self._serve_unsubscribe(self.backends, self.metrics)
        await self.background.start_probes(run)
        log.info("smtp-guard supervisor: %d workers listening on %s, relaying to %s; store %s; config %s",
                 config.smtp.workers, config.smtp.listen, _upstream_text(config), config.store.location, config.source)

    async def _stop_workers(self) -> None:
        self.readiness.set("listener", "shutting down")
        await self.workers.stop()

    def _workers_accepting(self, accepting: int) -> None:
        """The port is open while one worker accepts; not ready only when none does."""
        total = self.config.smtp.workers
        if accepting == 0:
            self.readiness.set("listener", f"no worker is accepting connections (0 of {total}); restarting")
            return
        self.readiness.set("listener", None)
        if accepting < total:
            log.warning("%d of %d workers accepting connections (the port still works); restarting the others",
                        accepting, total)

    async def _worker_gone(self, paths: RunPaths, pid: int, instance_id: str | None) -> None:
        """Drop what a dead worker left: its metrics files (its counts stay in the scrape)
        and its change-sync row, which would otherwise stay fresh for STALE_AFTER and make an
        admin command wait for a process that is gone."""
        forget_process(pid, paths.metrics)
        if instance_id is None:
            return
        try:
            await self.backends.changes.remove(instance_id)
        except StoreError as error:
            log.warning("could not remove the dead worker (pid %d) from the store's running guards (%s); "
                        "admin commands skip it once its heartbeat is %.0fs old", pid, error, STALE_AFTER)


class Worker(_GuardProcess):
    """One SMTP front of a multi-worker guard: its own store connection and index overlay,
    the shared counters and snapshot, end-of-DATA decisions asked of the supervisor."""

    def __init__(self, config: Config, paths: RunPaths, clock: Callable[[], float] = time.time,
                 log_pseudonyms: PseudonymFilter | None = None) -> None:
        super().__init__(config, clock, log_pseudonyms)  # its readiness is the roles' only: the supervisor answers
        self.paths = paths
        self.metrics = Metrics()  # recorded into the supervisor's multiprocess files (run_worker)

    @property
    def _name(self) -> str:
        return f"smtp-guard worker (pid {os.getpid()})"

    async def _start(self) -> None:
        config, paths, run = self.config, self.paths, self._running
        counters = await run.enter_async_context(open_counters(config, self.metrics, shared=paths.counters))
        backends, enforcement, upstream = await self._enforce(self.metrics, counters, paths)
        pipeline = default_pipeline(config, backends.tombstones, enforcement.index, counters=counters,
                                    clock=self.clock)
        decider = RemoteDecider(paths.decisions, timeout=DECISION_TIMEOUT, max_frame=frame_limit(config.smtp))
        run.push_async_callback(decider.close)
        front = Front(config, backends, enforcement, pipeline, decider, upstream, self.metrics, self.readiness,
                      self.clock)
        await self._follow_changes(backends, enforcement.change_steps)
        await front.start(run)


def run_worker(number: int, ready: Connection, config: Config, paths: RunPaths) -> None:
    """A worker process's main (started by WorkerPool): serve until SIGTERM, then drain.

    It shares the supervisor's process group: Ctrl-C (SIGINT) and a closed terminal (SIGHUP)
    reach it as well as the supervisor, which then stops it with SIGTERM. Ignored first, so a
    worker never stops on its own while the supervisor is about to restart it or drain it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log_pseudonyms = configure_logging(config.logging)
    hold_while_alive(paths)  # a supervisor started while this one drains is refused
    use_multiprocess_files(paths.metrics)  # forked before the supervisor chose the directory
    worker = Worker(config, paths, log_pseudonyms=log_pseudonyms)

    def started(error: StartupError | None) -> None:
        # "ready" carries its change-sync row, which the supervisor removes if it dies
        try:
            ready.send(("ready", worker.change_sync.instance.id) if error is None
                       else ("failed", f"worker {number}: {error}"))
        except BrokenPipeError:
            # The supervisor gave this start up (it is stopping, or gave up waiting) and its
            # SIGTERM is on the way: stop as if it had come already.
            log.info("worker %d: the supervisor no longer waits for this start; stopping", number)
            os.kill(os.getpid(), signal.SIGTERM)
            ready.close()
            return
        if error is not None:
            ready.close()
            return
        ready_to_beat(ready)  # the same pipe carries its heartbeats from now on

    _run_until_signalled(worker, config, started, orphaned=_on_its_own(os.getppid(), ready),
                         stop_signals=(signal.SIGTERM,))


def _on_its_own(parent: int, ready: Connection) -> Callable[[], bool]:
    """Called every ORPHAN_CHECK_INTERVAL once the worker is ready: its heartbeat to the
    supervisor (``workers.heartbeat``); True once nobody supervises it any more, and it drains
    and exits. Either its parent, the fork server, is gone (the supervisor has already started
    replacements from a new one: a worker without either would keep the port and defer every
    message), or the supervisor is (SIGKILLed while the fork server, stopped, could not end
    the workers itself)."""
    return lambda: os.getppid() != parent or ready.closed or not heartbeat(ready)


class _Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


ORPHAN_CHECK_INTERVAL = 1.0


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _run_until_signalled(service: _Service, config: Config,
                         started: Callable[[StartupError | None], None] = lambda error: None,
                         orphaned: Callable[[], bool] = lambda: False,
                         stop_signals: Sequence[signal.Signals] = STOP_SIGNALS) -> None:
    """Start ``service``, serve until one of ``stop_signals``, then stop it gracefully. A stop
    signal during the start cancels the start (which unwinds what it had started) and returns
    quietly: a slow start must not outlast ``docker stop``'s grace and end in SIGKILL."""
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in stop_signals:
            loop.add_signal_handler(signum, stop.set)
        starting = asyncio.create_task(service.start(), name="start")
        stopping = asyncio.create_task(stop.wait(), name="stop signal")
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("stop signal during start-up: undoing the start")
            starting.cancel()
            try:
                await starting
            except asyncio.CancelledError:
                pass
            except StartupError:
                pass  # it failed while unwinding; stopping was asked for anyway
            return
        stopping.cancel()
        try:
            starting.result()
        except StartupError as error:
            started(error)
            raise
        started(None)
        # What the start built (~55,000 objects: modules, config, indexes) lives as long as
        # the process. Frozen, it is out of the collector's sight: a full collection then
        # scans only what serving allocated, 0.6 ms instead of 15-19 ms, a pause every reply
        # in flight would wait behind.
        gc.freeze()
        while not stop.is_set():
            try:
                async with asyncio.timeout(ORPHAN_CHECK_INTERVAL):
                    await stop.wait()
            except TimeoutError:
                if orphaned():
                    log.error("the supervisor is gone; this worker stops (its sessions drain first)")
                    break
        log.info("shutting down: no new sessions; up to %.0fs for sessions in flight", config.smtp.shutdown_grace)
        await service.stop()

    event_loop.run(main(), config.smtp.event_loop)


def _upstream_text(config: Config) -> str:
    up = config.upstream
    return "the sandbox (captured, not delivered)" if up.mode == "sandbox" else f"{up.host}:{up.port} (tls {up.tls})"


def _import_what_workers_import(config: Config) -> None:
    """Import what each worker would otherwise import for itself as it starts, so that the
    fork server's image has it and every worker shares one copy: 1.4 MiB per worker
    (bench/README.md; tests/test_workers.py checks that the fork server has the event loop)."""
    event_loop.loop_factory(config.smtp.event_loop)  # uvloop (a StartupError now if it is asked for and missing)
    importlib.import_module("concurrent.futures.thread")  # asyncio's default executor (to_thread)
    importlib.import_module("encodings.idna")  # host names, as listeners bind and upstreams connect


def serve_forever(config: Config) -> None:
    """``smtp-guard serve``: run until SIGTERM, SIGINT or SIGHUP, then shut down gracefully."""
    return_large_blocks()  # the snapshot's arrays, once freed, go back to the system
    name_process("smtp-guard")
    log_pseudonyms = configure_logging(config.logging)
    if config.upstream.mode == "sandbox":
        log.warning("upstream is the SANDBOX: mail is captured in %s and not delivered; "
                    "set [upstream] mode = \"smtp\" and host to relay for real", config.store.data_dir / "sandbox")
    service: _Service
    if config.smtp.workers > 1:
        # Now, while this process runs no thread and no event loop: the workers are forked
        # from this copy of it and share what it has imported.
        _import_what_workers_import(config)
        with naming_setting(f"[smtp] workers {config.smtp.workers} (fork server)", True, OSError):
            fork_server = ForkServer.fork_here()
        service = Supervisor(config, log_pseudonyms=log_pseudonyms, fork_server=fork_server)
    else:
        service = Guard(config, log_pseudonyms=log_pseudonyms)
    _run_until_signalled(service, config)

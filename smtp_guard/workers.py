"""The supervisor's worker processes: start N, restart one that dies, drain them all on stop.

Workers are started fresh (``spawn``), never forked from the supervisor's running event loop,
with a pipe on which each says once whether it started: ``("ready", "")`` after its listener
is bound, or ``("failed", message)`` with the one-line StartupError. A start succeeds only
when every worker is ready; a worker that fails at the first start fails the whole start
(the operator sees its message and the exit status), so a broken setting never leaves a
supervisor running without workers.

Later, a worker that exits without being asked to is started again at once, or after a
pause that doubles (up to ``MAX_BACKOFF``) while it keeps dying within ``STABLE_AFTER``
seconds of its start: a worker that crashes on every start must not spin the machine.

``stop()`` sends SIGTERM to every worker — each stops accepting and gives the sessions in
flight ``[smtp] shutdown_grace`` to finish — and SIGKILLs any still running past that and a
margin.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Callable

from .periodic import Periodic
from .startup import StartupError

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # a worker imports, opens the store, maps the index and binds within this
STABLE_AFTER = 10.0
MAX_BACKOFF = 30.0
WATCH_INTERVAL = 0.2
KILL_MARGIN = 5.0


@dataclass
class _Worker:
    number: int
    process: BaseProcess
    started_at: float
    ready: Connection
    failures: int = 0  # deaths in a row within STABLE_AFTER of their start


class WorkerPool:
    """``target(number, ready_connection, *args)`` is the worker's main (a module-level
    function: it is pickled into the new process); ``on_exit`` is told a worker's pid once
    it is gone; ``grace`` is ``[smtp] shutdown_grace``."""

    def __init__(self, count: int, target: Callable[..., Any], args: tuple[Any, ...], grace: float,
                 on_exit: Callable[[int], None] = lambda pid: None) -> None:
        self.count = count
        self.target = target
        self.args = args
        self.grace = grace
        self.on_exit = on_exit
        self._workers: dict[int, _Worker] = {}
        self._stopping = False
        self._restarting: set[int] = set()
        self._watch: Periodic | None = None

    @property
    def alive(self) -> int:
        return sum(1 for worker in self._workers.values() if worker.process.is_alive())

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers.values() if w.process.pid is not None]

    async def start(self) -> None:
        """Start every worker and wait until each is ready (StartupError if one is not)."""
        try:
            for number in range(1, self.count + 1):
                self._workers[number] = self._spawn(number)
            for worker in list(self._workers.values()):
                await self._wait_ready(worker)
        except BaseException:
            await self.stop()
            raise
        self._watch = Periodic("workers", WATCH_INTERVAL, self._check, "could not check the worker processes")
        self._watch.start()

    def _spawn(self, number: int) -> _Worker:
        context = multiprocessing.get_context("spawn")
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=self.target, args=(number, send, *self.args),
                                  name=f"smtp-guard worker {number}")
        process.start()
        send.close()  # the worker holds its end; ours would keep the pipe open after it died
        log.info("worker %d started (pid %s)", number, process.pid)
        return _Worker(number, process, time.monotonic(), receive)

    async def _wait_ready(self, worker: _Worker) -> None:
        status, message = await self._first_word(worker)
        if status != "ready":
            raise StartupError(message or f"worker {worker.number} exited while starting "
                                          f"(exit status {worker.process.exitcode}); see its log above")
        log.info("worker %d ready (pid %s)", worker.number, worker.process.pid)

    async def _first_word(self, worker: _Worker) -> tuple[str, str]:
        """What the worker said on its pipe, or ("failed", "") when it exited or stayed silent."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if worker.ready.poll():
                try:
                    status, message = worker.ready.recv()
                    return str(status), str(message)
                except EOFError:  # exited before saying anything
                    return "failed", ""
            await asyncio.sleep(0.02)
        return "failed", f"worker {worker.number} did not start within {START_TIMEOUT:.0f}s"

    async def _check(self) -> None:
        for number, worker in list(self._workers.items()):
            if self._stopping or worker.process.is_alive() or number in self._restarting:
                continue
            self._restarting.add(number)
            try:
                await self._restart(worker)
            finally:
                self._restarting.discard(number)

    async def _restart(self, worker: _Worker) -> None:
        lived = time.monotonic() - worker.started_at
        failures = worker.failures + 1 if lived < STABLE_AFTER else 0
        pause = 0.0 if failures == 0 else min(MAX_BACKOFF, 2.0 ** (failures - 1))
        log.error("worker %d (pid %s) exited with status %s after %.0fs; starting it again%s", worker.number,
                  worker.process.pid, worker.process.exitcode, lived, f" in {pause:.0f}s" if pause else "")
        worker.ready.close()
        if worker.process.pid is not None:
            self.on_exit(worker.process.pid)
        await asyncio.sleep(pause)
        if self._stopping:
            return
        replacement = self._spawn(worker.number)
        replacement.failures = failures
        self._workers[worker.number] = replacement
        status, message = await self._first_word(replacement)
        if status == "ready":
            log.info("worker %d ready again (pid %s)", worker.number, replacement.process.pid)
        else:
            log.error("worker %d did not start again: %s", worker.number, message or "it exited")

    async def stop(self) -> None:
        """SIGTERM every worker, wait for the drain, SIGKILL what is left."""
        self._stopping = True
        if self._watch is not None:
            await self._watch.stop()
        workers = list(self._workers.values())
        for worker in workers:
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + self.grace + KILL_MARGIN
        while any(w.process.is_alive() for w in workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for worker in workers:
            if worker.process.is_alive():
                log.warning("worker %d (pid %s) still running %.0fs after SIGTERM; killing it",
                            worker.number, worker.process.pid, self.grace + KILL_MARGIN)
                worker.process.kill()
            worker.process.join(timeout=5)
            worker.ready.close()
            if worker.process.pid is not None:
                self.on_exit(worker.process.pid)
        self._workers.clear()

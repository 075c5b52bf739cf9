"""The supervisor's worker processes: start N, restart one that dies, drain them all on stop.

Workers are forked by the fork server (``fork_server.py``), an idle copy of the supervisor made
before its event loop started, never from the supervisor's running loop: each shares the
imported package with it. A fork server that is gone (killed: its workers drain on their
own) is replaced by a fresh one, and its workers count as dead. Each worker gets a pipe on which
it says once whether it started: ``("ready", instance_id)`` after its listener is bound
(``instance_id``: its change-sync row in the store, "" if it has none), or ``("failed",
message)`` with the one-line StartupError. A start succeeds only when every worker is ready;
a worker that fails at the first start fails the whole start (the operator sees its message
and the exit status), so a broken setting never leaves a supervisor running without workers.

Later, a worker that exits without being asked to is started again at once, or after a
pause that doubles (up to ``MAX_BACKOFF``) while it keeps dying within ``STABLE_AFTER``
seconds of becoming ready: a worker that crashes on every start must not spin the machine.
A replacement that does not say "ready" within ``start_timeout`` (hung: a locked store, a
stopped process) is terminated, killed if it does not exit, and counts as one more death.
Each worker number has at most one restart in flight, and restarts of different numbers run
side by side: a worker in its backoff pause never delays another's restart.

Hung processes are found by their silence. A ready worker writes a heartbeat on its pipe
every second (``heartbeat``); one silent for HUNG_AFTER (stopped, or its event loop stuck) is
killed and started again like a dead one. The fork server is pinged every PING_INTERVAL; one
that does not answer (stopped: it would report no worker's death) is killed and replaced, and
its workers count as dead. A worker whose heartbeat finds nobody reading (the supervisor was
killed while its fork server could not pass that on) drains and exits.

``on_exit`` hears of every worker that is gone (its pid and change-sync row id), so the
supervisor can drop what the dead process left behind; ``on_change`` hears the number of
workers accepting connections (ready and alive) whenever it changes, for ``/readyz``.

``stop()`` sends SIGTERM to every worker — each stops accepting and gives the sessions in
flight ``[smtp] shutdown_grace`` to finish — and SIGKILLs any still running past that and a
margin.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Awaitable, Callable

from .fork_server import ForkedProcess, ForkServer, ForkServerGone
from .periodic import Periodic
from .prctl import name_process
from .startup import StartupError

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # a worker imports, opens the store, maps the index and binds within this
STABLE_AFTER = 10.0
MAX_BACKOFF = 30.0
WATCH_INTERVAL = 0.2
KILL_MARGIN = 5.0
PING_INTERVAL = 5.0  # how often the fork server is asked for a sign of life
HUNG_AFTER = 10.0  # a ready worker silent this long (no heartbeat) is stopped or hung: killed
HEARTBEAT = b"."
# A worker's shared files (metrics, rate counters, the index) are memory maps in the run
# directory; a page the file system cannot give when first written is a SIGBUS, not an error.
_SIGBUS_HINT = (" (SIGBUS: a file it maps could not grow; is the file system of its run directory, "
                "/dev/shm by default, full? See df)")


def _forked_main(ready_fd: int, target: Callable[..., Any], number: int, args: tuple[Any, ...]) -> None:
    """A worker process's entry, in the process the fork server forked: ``ready_fd`` is the
    write end of the pipe it says "ready" or "failed" on."""
    name_process(f"smtp-guard-w{number}")
    target(number, Connection(ready_fd, readable=False), *args)


def heartbeat(ready: Connection) -> bool:
    """A ready worker's sign of life, written on its pipe at least every second: one silent for
    HUNG_AFTER is killed. Call ``ready_to_beat`` after sending "ready". False once the
    supervisor is gone (nobody reads the pipe any more), even while the fork server, stopped,
    cannot say so."""
    try:
        os.write(ready.fileno(), HEARTBEAT)
    except BlockingIOError:
        pass  # the supervisor is not reading (stopped, or busy): gone it is not
    except BrokenPipeError:
        return False
    return True


def ready_to_beat(ready: Connection) -> None:
    """After "ready": heartbeats never wait for a supervisor that does not read them."""
    os.set_blocking(ready.fileno(), False)


@dataclass
class _Worker:
    number: int
    process: ForkedProcess
    ready: Connection
    ready_at: float | None = None  # when it said "ready"; None while it starts
    heard_at: float = 0.0  # when its last heartbeat (or "ready") was read
    instance_id: str | None = None  # its change-sync row, from its "ready"
    failures: int = 0  # deaths in a row within STABLE_AFTER of becoming ready (or before it)

    @property
    def is_accepting(self) -> bool:
        return self.ready_at is not None and self.process.is_alive()

    def is_silent(self, now: float) -> bool:
        """Ready, and no heartbeat for HUNG_AFTER: stopped (SIGSTOP), or its event loop stuck."""
        if self.ready_at is None:
            return False
        while self.ready.poll():  # what it wrote since the last look (or the end of the pipe)
            try:
                if not os.read(self.ready.fileno(), 4096):
                    break  # exited: the fork server reports it
            except OSError:
                break
            self.heard_at = now
        return now - self.heard_at > HUNG_AFTER


async def _nothing(pid: int, instance_id: str | None) -> None:
    return None


class WorkerPool:
    """``target(number, ready_connection, *args)`` is the worker's main (a module-level
    function: it is pickled, by name, into the new process, and so are ``args``); ``grace`` is
    ``[smtp] shutdown_grace``; ``on_exit(pid, instance_id)`` is awaited once a worker is gone;
    ``on_change(accepting)`` is called when the number of ready, alive workers changes.
    ``fork_server``: the one ``smtp-guard serve`` forked before its event loop started; without
    it (or once it is gone), a fresh one that imports ``target``'s module. The pool owns it and
    ends it at ``stop()``."""

    def __init__(self, count: int, target: Callable[..., Any], args: tuple[Any, ...], grace: float,
                 on_exit: Callable[[int, str | None], Awaitable[None]] = _nothing,
                 on_change: Callable[[int], None] = lambda accepting: None,
                 start_timeout: float = START_TIMEOUT, fork_server: ForkServer | None = None) -> None:
        self.count = count
        self.target = target
        self.args = args
        self.grace = grace
        self.on_exit = on_exit
        self.on_change = on_change
        self.start_timeout = start_timeout
        self._workers: dict[int, _Worker] = {}
        self._stopping = False
        self._restarts: dict[int, asyncio.Task[None]] = {}
        self._accepting: int | None = None  # as last told to on_change
        self._watch: Periodic | None = None
        self._ping: Periodic | None = None
        self._fork_server = fork_server

    def __repr__(self) -> str:
        return (f"<WorkerPool {self.accepting}/{self.count} accepting, "
                f"restarting={sorted(self._restarts)} stopping={self._stopping}>")

    @property
    def accepting(self) -> int:
        return sum(1 for worker in self._workers.values() if worker.is_accepting)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers.values()]

    async def start(self) -> None:
        """Start every worker and wait until each is ready (StartupError if one is not)."""
        try:
            for number in range(1, self.count + 1):
                self._workers[number] = await self._spawn(number)
            for worker in list(self._workers.values()):
                await self._wait_ready(worker)
        except BaseException:
            await self.stop()
            raise
        self._report_accepting()
        self._watch = Periodic("workers", WATCH_INTERVAL, self._check, "could not check the worker processes")
        self._watch.start()
        self._ping = Periodic("fork-server", PING_INTERVAL, self._ping_fork_server, "could not ask the fork server")
        self._ping.start()

    async def _spawn(self, number: int) -> _Worker:
        server = await self._server()
        receive, send = os.pipe()
        try:
            process = await server.fork(_forked_main, (self.target, number, self.args), send)
        except (ForkServerGone, OSError) as error:
            os.close(receive)
            raise StartupError(f"[smtp] workers: could not start worker {number}: {error}") from None
        except BaseException:
            os.close(receive)
            raise
        finally:
            os.close(send)  # the worker holds its end; ours would keep the pipe open after it died
        log.info("worker %d started (pid %s)", number, process.pid)
        return _Worker(number, process, Connection(receive, writable=False))

    async def _server(self) -> ForkServer:
        """The fork server; a fresh one if there is none or it is gone."""
        if self._fork_server is not None and self._fork_server.alive:
            return self._fork_server
        if self._fork_server is not None:
            await self._fork_server.close()  # reaps it
        self._fork_server = ForkServer.start_fresh(preload=(self.target.__module__,))
        log.info("fork server started (pid %s, a fresh interpreter)", self._fork_server.pid)
        return self._fork_server

    async def _wait_ready(self, worker: _Worker) -> None:
        status, message = await self._first_word(worker)
        if status != "ready":
            if not message:
                await worker.process.wait(1.0)  # its exit status comes from the fork server
            raise StartupError(message or f"worker {worker.number} exited while starting "
                                          f"(exit status {worker.process.exitcode}); see its log above")
        log.info("worker %d ready (pid %s)", worker.number, worker.process.pid)

    async def _first_word(self, worker: _Worker) -> tuple[str, str]:
        """What the worker said on its pipe, or ("failed", "") when it exited or stayed silent.
        On "ready", the worker is marked ready and its instance id kept."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if worker.ready.poll():
                try:
                    status, message = worker.ready.recv()
                except EOFError:  # exited before saying anything
                    return "failed", ""
                if status == "ready":
                    worker.ready_at = worker.heard_at = time.monotonic()
                    worker.instance_id = str(message) or None
                return str(status), str(message)
            await asyncio.sleep(0.02)
        return "failed", f"worker {worker.number} did not start within {self.start_timeout:g}s"

    def _report_accepting(self) -> None:
        if self._stopping:
            return  # the supervisor says "shutting down" meanwhile
        accepting = self.accepting
        if accepting != self._accepting:
            self._accepting = accepting
            self.on_change(accepting)

    async def _check(self) -> None:
        now = time.monotonic()
        for number, worker in list(self._workers.items()):
            if self._stopping:
                return
            if number in self._restarts:
                continue
            if worker.process.is_alive():
                if worker.is_silent(now):
                    log.error("worker %d (pid %s) has sent no heartbeat for %.0fs (stopped, or its event loop "
                              "is stuck); killing it", number, worker.process.pid, now - worker.heard_at)
                    worker.process.kill()  # its exit, once reported, starts it again
                    worker.heard_at = now
                continue
            task = asyncio.create_task(self._restart(worker), name=f"restart worker {number}")
            self._restarts[number] = task
            task.add_done_callback(functools.partial(self._restart_done, number))
        self._report_accepting()

    async def _ping_fork_server(self) -> None:
        """A fork server that stopped answering is killed (``ForkServer.ping``): its workers
        then count as dead, the next check restarts them from a new one."""
        server = self._fork_server
        if server is not None and server.alive:
            with contextlib.suppress(ForkServerGone):  # logged where it was found gone
                await server.ping()

    def _restart_done(self, number: int, task: asyncio.Task[None]) -> None:
        if self._restarts.get(number) is task:
            del self._restarts[number]
        if not task.cancelled() and task.exception() is not None:
            log.error("could not start worker %d again; trying at the next check", number,
                      exc_info=task.exception())

    async def _restart(self, worker: _Worker) -> None:
        """Start ``worker``'s number again (it is dead), until a replacement says "ready". A
        start that fails before there is a process (the fork server could not fork) counts as
        one more death of that number, with its pause; the dead worker is forgotten once."""
        self._report_accepting()
        failures, pause = self._after_death(worker)
        await self._forget(worker)
        while True:
            await asyncio.sleep(pause)
            if self._stopping:
                return
            try:
                replacement = await self._spawn(worker.number)
            except StartupError as error:
                failures += 1
                pause = _backoff(failures)
                log.error("%s; trying again in %.0fs", error, pause)
                continue
            replacement.failures = failures
            self._workers[worker.number] = replacement
            status, message = await self._first_word(replacement)
            if status == "ready":
                log.info("worker %d ready again (pid %s)", worker.number, replacement.process.pid)
                self._report_accepting()
                return
            log.error("worker %d did not start again: %s", worker.number, message or "it exited")
            await self._end(replacement, KILL_MARGIN)
            self._report_accepting()
            failures, pause = self._after_death(replacement)
            await self._forget(replacement)
            worker = replacement

    def _after_death(self, worker: _Worker) -> tuple[int, float]:
        """Log the death; the deaths in a row it makes and the pause before the next start.
        Its life counts from "ready": a start that takes long is not a life that lasted."""
        now = time.monotonic()
        lived = None if worker.ready_at is None else now - worker.ready_at
        failures = 0 if lived is not None and lived >= STABLE_AFTER else worker.failures + 1
        pause = _backoff(failures)
        how_long = "before it was ready" if lived is None else f"after {lived:.0f}s"
        status = "unknown (its fork server is gone)" if worker.process.exitcode is None else worker.process.exitcode
        log.error("worker %d (pid %s) exited with status %s %s; starting it again%s%s", worker.number,
                  worker.process.pid, status, how_long, f" in {pause:.0f}s" if pause else "",
                  _SIGBUS_HINT if worker.process.exitcode == -signal.SIGBUS else "")
        return failures, pause

    async def _forget(self, worker: _Worker) -> None:
        """Tell ``on_exit`` that ``worker`` is gone (a failing callback does not stop a restart)."""
        worker.ready.close()
        try:
            await self.on_exit(worker.process.pid, worker.instance_id)
        except Exception:
            log.exception("worker %d (pid %s): could not clean up after it", worker.number, worker.process.pid)

    async def _end(self, worker: _Worker, wait: float) -> None:
        """SIGTERM, then SIGKILL if still running after ``wait`` seconds; joined when this returns."""
        if worker.process.is_alive():
            worker.process.terminate()
        deadline = time.monotonic() + wait
        while worker.process.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await _kill(worker, wait)

    async def stop(self) -> None:
        """SIGTERM every worker, wait for the drain, SIGKILL what is left."""
        self._stopping = True
        for loop in (self._watch, self._ping):
            if loop is not None:
                await loop.stop()
        restarts = list(self._restarts.values())
        for task in restarts:
            task.cancel()
        await asyncio.gather(*restarts, return_exceptions=True)
        workers = list(self._workers.values())
        for worker in workers:
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + self.grace + KILL_MARGIN
        while any(w.process.is_alive() for w in workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for worker in workers:
            await _kill(worker, self.grace + KILL_MARGIN)
            await self._forget(worker)
        self._workers.clear()
        if self._fork_server is not None:
            await self._fork_server.close()


def _backoff(failures: int) -> float:
    """The pause before the next start after ``failures`` deaths in a row: none after the
    first death of a worker that had lived, then 1, 2, 4 … seconds up to ``MAX_BACKOFF``."""
    return 0.0 if failures == 0 else min(MAX_BACKOFF, 2.0 ** (failures - 1))


async def _kill(worker: _Worker, waited: float) -> None:
    """SIGKILL ``worker`` if it is still running ``waited`` seconds after SIGTERM; join it."""
    if worker.process.is_alive():
        log.warning("worker %d (pid %s) still running %.0fs after SIGTERM; killing it",
                    worker.number, worker.process.pid, waited)
        worker.process.kill()
    await worker.process.wait(5)

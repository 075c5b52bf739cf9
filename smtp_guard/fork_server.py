"""The fork server: an idle copy of the supervisor that forks the worker processes.

A worker started as a fresh interpreter imports the whole package again and keeps ~25 MiB
of its own that no sharing removes. Forked from a process that has imported it, a worker
shares those pages with that process, copy-on-write, and keeps ~11 MiB of its own
(bench/README.md, "whole guard at ten million addresses"). The supervisor cannot fork itself once it runs, though: its
event loop, the store's threads and their locks would be copied mid-use. So ``smtp-guard
serve`` forks this server before the supervisor starts anything (``ForkServer.fork_here``),
and the server forks every worker, the first ones and each restart. Started any other way
(``ForkServer.start_fresh``: when the first one is gone, and in tests), it is a fresh
interpreter that imports the modules it is told to first; its workers share its pages.

The workers are the server's children. Only a process's parent knows when its pid is reaped
and free for another process, so the server reports each worker's exit to the supervisor
and sends the supervisor's signals on, to a worker it has not reaped yet.

If the supervisor is gone (the server's socket ends), the server sends SIGTERM to its workers
(they drain, as on a normal stop) and exits. If the server is gone, the kernel sends its
workers SIGTERM (PR_SET_PDEATHSIG; elsewhere they see their parent change, ``app._parent_gone``)
and they drain; the supervisor hears the socket end, counts each of them as exited and starts
them again from a new server.

Protocol: one SOCK_SEQPACKET socket pair, one pickled tuple per packet. A process is known
by the request it was forked for, never by its pid alone (a reaped pid may be reused).
* supervisor to server: ``("fork", request, pickled (function, args))`` with one file
  descriptor (SCM_RIGHTS), run as ``function(fd, *args)`` in the new process (a payload the
  server cannot load is a "failed" answer, not the server's end); ``("signal", request, (pid,
  signum))``; ``("ping", request, None)``, which the supervisor sends every few seconds: a
  server that does not answer it within REPLY_TIMEOUT (stopped or hung: its workers' exits
  would go unreported) is killed and replaced.
* server to supervisor: ``("forked", request, pid)``, ``("failed", request, reason)``,
  ``("exited", request, exit status)`` (minus the signal's number if a signal ended it),
  ``("pong", request, None)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import itertools
import logging
import os
import pickle
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, NoReturn, Sequence

from . import child_process
from .malloc_tuning import give_back_free_memory
from .prctl import name_process, signal_when_parent_dies

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20  # a request carries the worker's config: a few kB
REPLY_TIMEOUT = 10.0  # a fork takes milliseconds; a server that says nothing this long is stuck
CLOSE_TIMEOUT = 5.0


class ForkServerGone(Exception):
    """The fork server exited, or stopped answering."""


class ForkedProcess:
    """A process the fork server forked, as the supervisor sees it."""

    def __init__(self, pid: int, request: int, server: "ForkServer") -> None:
        self.pid = pid
        self.request = request  # what the server knows it by: a pid alone may be reused
        self._server = server
        self.exitcode: int | None = None  # from the server's report; None while it runs or if unknown
        self._ended = asyncio.Event()

    def is_alive(self) -> bool:
        return not self._ended.is_set()

    def terminate(self) -> None:
        """SIGTERM, then SIGCONT: a stopped process acts on the SIGTERM only once it runs again
        (systemd sends the same pair)."""
        self._server.signal(self, signal.SIGTERM)
        self._server.signal(self, signal.SIGCONT)

    def kill(self) -> None:
        self._server.signal(self, signal.SIGKILL)

    async def wait(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._ended.wait()
        except TimeoutError:
            pass

    def ended(self, exitcode: int | None) -> None:
        self.exitcode = exitcode
        self._ended.set()


class ForkServer:
    """The supervisor's end of a fork server (see the module's docstring).

    Its socket never blocks the supervisor's event loop: a server that stops reading (stopped
    with SIGSTOP, hung) or answering within ``REPLY_TIMEOUT`` is killed and counts as gone;
    its processes, told by the kernel (PR_SET_PDEATHSIG), drain and stop."""

    def __init__(self, sock: socket.socket, poll: Callable[[], int | None], pid: int, how: str) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._poll = poll  # the server process's exit status, None while it runs (reaps it)
        self.pid = pid
        self._how = how
        self._requests: dict[int, asyncio.Future[tuple[str, Any]]] = {}
        self._children: dict[int, ForkedProcess] = {}  # by request
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.alive = True

    def __repr__(self) -> str:
        return f"<ForkServer pid {self.pid} ({self._how}), {len(self._children)} children, alive={self.alive}>"

    @classmethod
    def fork_here(cls) -> "ForkServer":
        """Fork the server from this process. Only before this process starts a thread or an
        event loop: the server is a copy of it as it is now."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Frozen before the fork, the objects this process has (the imported package) are out
        # of the collector's sight on both sides: collections here would otherwise write to
        # every one of them and copy the pages this process shares with the workers. What the
        # imports left as garbage goes first, and the pages it freed go back to the system,
        # not into the copy every worker starts from (1 MiB, bench/README.md).
        gc.collect()
        give_back_free_memory()
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            ours.close()
            _serve(theirs)
        theirs.close()
        exited: list[int] = []

        def poll() -> int | None:
            """As ``Popen.poll``: the exit status once reaped, and again after (waitpid answers once)."""
            if not exited:
                reaped, status = os.waitpid(pid, os.WNOHANG)
                if reaped:
                    exited.append(os.waitstatus_to_exitcode(status))
            return exited[0] if exited else None
        return cls(ours, poll, pid, "forked from the supervisor")

    @classmethod
    def start_fresh(cls, preload: Sequence[str]) -> "ForkServer":
        """Start the server as a new interpreter that imports the modules ``preload`` names."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = child_process.start(f"{__name__}:serve_inherited", [str(theirs.fileno()), *preload],
                                          pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        return cls(ours, process.poll, process.pid, "a fresh interpreter")

    # --- forking and signalling ---------------------------------------------------------------

    async def fork(self, function: Callable[..., Any], args: tuple[Any, ...], fd: int) -> ForkedProcess:
        """Run ``function(fd, *args)`` in a new process forked by the server (``function`` and
        ``args`` are pickled: module-level names). ``fd`` stays open here."""
        # A request cancelled once it is out (a start cancelled by SIGTERM) may yet fork a
        # process for a caller that is gone: it is told to stop as soon as its pid is known.
        kind, value = await self._ask("fork", pickle.dumps((function, args)), [fd], if_cancelled=self._unwanted)
        if kind == "failed":
            raise OSError(f"the fork server could not fork: {value}")
        process: ForkedProcess = value
        return process

    async def ping(self) -> None:
        """Ask the server for a sign of life. One that does not answer within REPLY_TIMEOUT
        (stopped, or hung) is killed, and this raises ForkServerGone: without it, the workers'
        exits would go unreported and their replacements unforked."""
        await self._ask("ping", None)

    async def _ask(self, kind: str, detail: Any, fds: Sequence[int] = (),
                   if_cancelled: Callable[[asyncio.Future[tuple[str, Any]]], None] | None = None) -> tuple[str, Any]:
        """Send a request; its answer, or ForkServerGone (the server is killed if it gives none
        within REPLY_TIMEOUT)."""
        self._attach()
        request = next(self._ids)
        self._send((kind, request, detail), fds)
        reply: asyncio.Future[tuple[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[request] = reply  # before the answer can be read: not before this returns
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                return await asyncio.shield(reply)
        except asyncio.CancelledError:
            if if_cancelled is not None:
                reply.add_done_callback(if_cancelled)
            raise
        except TimeoutError:
            if not reply.done():  # the answer may have come in the same turn of the loop
                self._give_up(f"it did not answer a {kind} within {REPLY_TIMEOUT:g}s")
            return reply.result()  # ForkServerGone if given up

    def signal(self, process: ForkedProcess, signum: int) -> None:
        if process.is_alive() and self.alive:  # else reaped, or lost with the server
            with contextlib.suppress(ForkServerGone):  # then it has ended here too
                self._send(("signal", process.request, (process.pid, signum)))

    def _send(self, message: tuple[Any, ...], fds: Sequence[int] = ()) -> None:
        if not self.alive:
            raise ForkServerGone(f"the fork server (pid {self.pid}) is gone")
        try:
            socket.send_fds(self._sock, [pickle.dumps(message)], list(fds))
        except BlockingIOError:
            self._give_up("it stopped reading its socket (stopped or hung)")
        except OSError as error:
            self._gone(f"its socket failed ({error})")
        if not self.alive:
            raise ForkServerGone(f"the fork server (pid {self.pid}) is gone")

    # --- the server's reports -----------------------------------------------------------------

    def _attach(self) -> None:
        if self._loop is None and self.alive:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._sock.fileno(), self._receive)

    def _receive(self) -> None:
        try:
            data = self._sock.recv(MAX_MESSAGE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._gone("it exited")
            return
        kind, request, value = pickle.loads(data)
        if kind == "exited":
            process = self._children.pop(request, None)
            if process is not None:
                process.ended(value)
            return
        if kind == "forked":
            # Known from now on: its exit may be the very next report, before fork() resumes.
            process = self._children[request] = ForkedProcess(value, request, self)
            value = process
        if (reply := self._requests.pop(request, None)) is not None and not reply.done():
            reply.set_result((kind, value))

    def _unwanted(self, reply: asyncio.Future[tuple[str, Any]]) -> None:
        if reply.cancelled() or reply.exception() is not None or reply.result()[0] != "forked":
            return
        process: ForkedProcess = reply.result()[1]
        log.info("pid %s was forked for a start given up meanwhile; stopping it", process.pid)
        process.terminate()

    def _give_up(self, why: str) -> None:
        """Kill a server that no longer serves; its processes get SIGTERM from the kernel."""
        if self.alive:
            os.kill(self.pid, signal.SIGKILL)  # not reaped yet (only close() reaps): still ours
            self._gone(f"{why}; killed")

    def _gone(self, why: str) -> None:
        """The server is gone. What it forked is on its own now (and drains, told by the kernel
        or seeing its parent change); none of it can be waited for or signalled any more."""
        if not self.alive:
            return
        self.alive = False
        self._detach()
        log.error("the fork server (pid %s) is gone: %s; its %d workers stop on their own and are "
                  "started again from a new one", self.pid, why, len(self._children))
        for process in self._children.values():
            process.ended(None)
        self._children.clear()
        for reply in self._requests.values():
            if not reply.done():
                reply.set_exception(ForkServerGone(f"the fork server (pid {self.pid}) is gone: {why}"))
        self._requests.clear()

    def _detach(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop = None

    async def close(self) -> None:
        """End the server (it SIGTERMs any process of its still running) and wait for it."""
        self.alive = False
        self._detach()
        self._sock.close()
        deadline, killed = time.monotonic() + CLOSE_TIMEOUT, False
        while self._poll() is None:
            if not killed and time.monotonic() > deadline:
                log.warning("the fork server (pid %s) did not exit within %.0fs; killing it", self.pid, CLOSE_TIMEOUT)
                os.kill(self.pid, signal.SIGKILL)
                killed = True
            await asyncio.sleep(0.02)


# --- the server process -------------------------------------------------------------------------

def serve_inherited(fd: str, *preload: str) -> NoReturn:
    """The fresh interpreter's entry (``child_process``): import ``preload``, then serve."""
    for module in preload:
        importlib.import_module(module)
    _serve(socket.socket(fileno=int(fd)))


def _serve(sock: socket.socket) -> NoReturn:
    """Fork on request until the supervisor's end of ``sock`` closes; never returns."""
    try:
        _Server(sock).run()
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(1)


class _Server:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid = os.getpid()
        self.children: dict[int, int] = {}  # pid -> the request it was forked for, until reaped
        name_process("smtp-guard-fork")
        # Ctrl-C, a closed terminal and `systemctl stop` (SIGTERM to the whole control group)
        # reach every process: the supervisor decides, and still needs this server to signal
        # and wait for its workers. It ends when the supervisor's end of the socket closes.
        # Blocked, not ignored: a process just forked inherits the mask, and a SIGTERM sent to
        # it before it unblocks waits for it instead of being discarded.
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGHUP, signal.SIGTERM})
        _stdin_from_devnull()
        self.wake, wake_write = socket.socketpair()
        for end in (self.wake, wake_write):
            end.setblocking(False)
        self._wake_write = wake_write
        signal.set_wakeup_fd(wake_write.fileno())  # a SIGCHLD wakes select() below
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        self.selector.register(self.wake, selectors.EVENT_READ)
        # Everything imported so far is shared with the workers: out of the collector's sight,
        # a worker's collections do not write to (and so copy) those pages.
        gc.freeze()

    def run(self) -> NoReturn:
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is self.wake:
                    while _drain(self.wake):
                        pass
                else:
                    self._request()
            self._reap()

    def _request(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 1)
        except ConnectionResetError:
            data, fds = b"", []
        if not data:
            self._orphaned()
        kind, request, detail = pickle.loads(data)
        try:
            if kind == "ping":
                self._send(("pong", request, None))
            elif kind == "signal":
                pid, signum = detail
                # Only a child not reaped yet, forked for that request: a pid reaped since may
                # already be another process's.
                if self.children.get(pid) == request:
                    os.kill(pid, signum)
            else:
                self._fork(request, detail, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _fork(self, request: int, payload: bytes, fds: list[int]) -> None:
        try:
            function, args = pickle.loads(payload)
            pid = os.fork()
        except Exception as error:  # a payload this copy cannot load, or no process left
            self._send(("failed", request, f"{error.__class__.__name__}: {error}"))
            return
        if pid == 0:
            self._become(function, (fds[0], *args))
        self.children[pid] = request
        self._send(("forked", request, pid))

    def _become(self, function: Callable[..., Any], args: tuple[Any, ...]) -> NoReturn:
        """In the new process: drop the server's ends and signal handling, run ``function``."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.selector.close()
        for end in (self.sock, self.wake, self._wake_write):
            end.close()
        # The server killed: this process drains now (SIGTERM), not at its next look at its
        # parent; and if that happened already, before the line above, it stops here.
        signal_when_parent_dies(signal.SIGTERM)
        if os.getppid() != self.pid:
            os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)  # what came meanwhile is delivered now
        _run(function, args)

    def _reap(self) -> None:
        while self.children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            request = self.children.pop(pid)
            self._send(("exited", request, os.waitstatus_to_exitcode(status)))

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self.sock.send(pickle.dumps(message))
        except OSError:
            self._orphaned()

    def _orphaned(self) -> NoReturn:
        """The supervisor is gone: its workers drain (SIGTERM) and this server exits."""
        for pid in self.children:
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)
        os._exit(0)


def _run(function: Callable[..., Any], args: tuple[Any, ...]) -> NoReturn:
    """Run ``function`` and exit with the status ``sys.exit`` would give, as a fresh interpreter
    running it would: a traceback and 1 for an exception. Non-daemon threads are joined first,
    as at interpreter exit; the atexit handlers inherited from the supervisor never run."""
    code = 1
    try:
        function(*args)
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            for thread in threading.enumerate():
                if thread is not threading.current_thread() and not thread.daemon:
                    thread.join()
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _stdin_from_devnull() -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def _drain(wake: socket.socket) -> bool:
    try:
        return bool(wake.recv(512))
    except BlockingIOError:
        return False


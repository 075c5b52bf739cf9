"""The private run directory where the processes of one multi-worker guard meet.

It holds what the supervisor and its workers share: the rate-limit table, the suppression
snapshot, the decision socket and the metrics files. It lives in shared memory (``/dev/shm``
when the system has it: these are memory that several processes map, never disk I/O), is
private to the guard's user (0700) and is emptied at every start and removed at the end.

Its name comes from ``[smtp] listen`` (``smtp-guard.127.0.0.1-2525``), and the supervisor holds
a lock on it for its whole life. That does two jobs:

* **one supervisor per address.** Workers bind with SO_REUSEPORT, which would let a second
  guard started with the same ``listen`` share the port silently — each with its own rate-limit
  table, breaker and release worker, so every limit would double. The second start is refused,
  naming the first one's pid. The same port written as another address (``localhost``,
  ``0.0.0.0``) has another directory: a test bind of the port refuses it;
* **nothing left behind.** A supervisor killed with SIGKILL cannot remove its directory (up to
  a whole suppression snapshot); the next start on that address finds it unlocked and empties it.

Its workers cannot hold the supervisor's lock (they are forked from a fork server made before
it), so each holds a shared lock on ``workers.lock`` for its life (``hold_while_alive``). The
workers of a supervisor killed with SIGKILL drain for up to ``shutdown_grace``, still using the
directory; a start in that time finds that lock held and is refused, instead of emptying the
directory under them (a second rate-limit table, counts split between two).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import ListenAddress
from .file_lock import try_lock
from .startup import StartupError

_UNSAFE = re.compile(r"[^A-Za-z0-9.-]")
LOCK_NAME = "supervisor.lock"
WORKERS_LOCK_NAME = "workers.lock"
CLAIM_ATTEMPTS = 3  # a directory removed under a start that is claiming it is claimed again


@dataclass(frozen=True)
class RunPaths:
    """Where each shared piece lives; handed to every worker (a path, never an open object)."""

    root: Path

    @property
    def counters(self) -> Path:
        return self.root / "counters"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def tombstones(self) -> Path:
        return self.root / "tombstones"

    @property
    def decisions(self) -> Path:
        return self.root / "decisions" / "socket"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def workers_lock(self) -> Path:
        return self.root / WORKERS_LOCK_NAME


class RunDirectory:
    """Claimed by the supervisor at start (``claim``), released at the end (``release``)."""

    def __init__(self, listen: ListenAddress, parent: Path | None = None) -> None:
        if parent is None:
            shm = Path("/dev/shm")
            parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
        self.paths = RunPaths(parent / f"smtp-guard.{_UNSAFE.sub('_', listen.host)}-{listen.port}")
        self._listen = listen
        self._lock: int | None = None

    def claim(self) -> RunPaths:
        """Take the directory for this supervisor, empty, or raise StartupError."""
        root = self.paths.root
        setting = f"[smtp] listen {self._listen} (run directory {root})"
        for _ in range(CLAIM_ATTEMPTS):
            try:
                root.mkdir(mode=0o700, exist_ok=True)
                self._check_private(root, setting)
                lock = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except OSError as error:
                raise StartupError(f"{setting}: {error.strerror or error}") from error
            if not try_lock(lock):
                other = os.pread(lock, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(lock)
                raise StartupError(f"[smtp] listen {self._listen}: another smtp-guard (pid {other}) already "
                                   "serves this address with workers; stop it first, or choose another address")
            if _is_linked_at(lock, root / LOCK_NAME):
                break
            # The supervisor that held it removed the directory between this open and this lock
            # (``release``): a lock on the removed file would exclude nobody. Once more.
            os.close(lock)
        else:
            raise StartupError(f"{setting}: removed again and again while this start claimed it; try again")
        try:
            draining = _is_held(self.paths.workers_lock)
        except OSError as error:
            os.close(lock)
            raise StartupError(f"{setting}: {error.strerror or error}") from error
        if draining:
            os.close(lock)  # not release(): the directory is theirs until they are done
            raise StartupError(
                f"[smtp] listen {self._listen}: workers of an earlier smtp-guard on this address (stopped "
                "without stopping them, e.g. killed with SIGKILL) are still finishing their sessions; they "
                "exit within its [smtp] shutdown_grace: start again then (systemd's Restart= does)")
        self._lock = lock
        try:
            _refuse_if_port_taken(self._listen)
        except StartupError:
            self.release()
            raise
        try:
            os.ftruncate(lock, 0)
            os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
            for leftover in root.iterdir():  # from a supervisor that was killed
                if leftover.name == LOCK_NAME:
                    continue
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
        except OSError as error:
            self.release()
            raise StartupError(f"{setting}: {error.strerror or error}") from error
        return self.paths

    @staticmethod
    def _check_private(root: Path, setting: str) -> None:
        # A world-writable parent (/dev/shm, /tmp): someone else may have made this name first.
        info = os.lstat(root)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise StartupError(f"{setting}: not a private directory of this user (mode 0700); "
                               "remove it, or choose another address")

    def release(self) -> None:
        """Remove the directory, then drop the lock (a new start may claim it from then on)."""
        if self._lock is None:
            return
        shutil.rmtree(self.paths.root, ignore_errors=True)
        os.close(self._lock)
        self._lock = None


def hold_while_alive(paths: RunPaths) -> None:
    """Take a shared lock on the run directory's ``workers.lock`` for the rest of this worker's
    life: its descriptor is never closed, and the kernel drops the lock when the process ends.
    A start that tests the lock holds it exclusively for an instant only, so waiting here is
    short."""
    descriptor = os.open(paths.workers_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    fcntl.flock(descriptor, fcntl.LOCK_SH)


def _is_held(path: Path) -> bool:
    """Some process (a worker, ``hold_while_alive``) holds a lock on ``path``."""
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        return not try_lock(descriptor)
    finally:
        os.close(descriptor)  # drops the lock try_lock may have taken


def _is_linked_at(descriptor: int, path: Path) -> bool:
    """Whether the open file is (still) the one at ``path``."""
    try:
        here, there = os.fstat(descriptor), os.lstat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _refuse_if_port_taken(listen: ListenAddress) -> None:
    """StartupError if something already listens where the workers would bind.

    The lock covers a second guard with the same ``listen``; this covers the same port written
    otherwise (``localhost`` for ``127.0.0.1``, ``0.0.0.0`` over any address), whose run
    directory has another name. A socket bound without SO_REUSEPORT is refused wherever any
    socket listens on an overlapping address and port; addresses that do not overlap (two
    guards on two IP addresses of one host) stay possible. Two such starts within the same
    moment can still both pass."""
    if listen.port == 0:
        return
    try:
        addresses = socket.getaddrinfo(listen.host or None, listen.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise StartupError(f"[smtp] listen {listen}: {error.strerror}") from None
    for family, kind, protocol, _, address in addresses:
        try:
            probe = socket.socket(family, kind, protocol)
        except OSError:
            continue  # a family this host lacks (no IPv6): asyncio skips it when binding too
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what asyncio's listeners set
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds it
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    raise StartupError(f"[smtp] listen {listen}: {error.strerror or error}") from None
                raise StartupError(
                    f"[smtp] listen {listen}: port {listen.port} is in use on {address[0]} already (another "
                    "smtp-guard with workers, written as another address, or another server); stop it "
                    "first, or choose another port") from None

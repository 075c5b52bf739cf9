"""One suppression snapshot for every worker process: built once, mapped by all.

With ``[smtp] workers = N`` each worker would otherwise load its own 60 MiB address table (at
ten million addresses). ``SharedSnapshots`` keeps the snapshot as a file in a directory of its own
(``index_file.py`` format, one file, always the same name) and hands out read-only maps of it:
the pages sit once in the page cache and are shared by every process that maps them.

``get`` takes an exclusive ``flock`` on a lock file in that directory (polled without blocking,
so the event loop goes on serving while another process builds), then maps the file when it
can serve the caller, else loads a snapshot from the store, writes it over the file, and maps
that. So whichever process needs a snapshot first builds it; the others, queued on the lock,
find it current and map it. A file can serve when it was built for the same list priority,
has not reached its ``next_expiry`` (its content depends on the time it was built: expired
entries are left out), is at or past the caller's ``at_least`` position and not past the
store's (a store restored from a backup is behind the file), and nothing that needs a full
reload (a bulk import, an erasure, too many changes) was logged since its position. The
caller applies the few changes logged since (``IndexReloader`` does, before it swaps).

Old snapshots need no clean-up: the new file is renamed over the old one, and a process
still mapping the old one keeps its pages (Linux keeps an unlinked inode until its last
mapping goes) until it swaps. The directory is in the supervisor's run directory, which is
emptied at every start (``run_directory.py``), so a file never outlives the run that built it
(a restored store or an erased address does not come back from a file of an earlier run).

The directory must be on a local file system (``flock`` between processes of one host).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Sequence

from .file_lock import lock_polled
from .index_file import SnapshotFileError, SnapshotHeader, map_snapshot, read_header, write_snapshot
from .store.base import StoreError, StoreFull
from .suppression_model import SuppressionSnapshot, SuppressionStore

log = logging.getLogger(__name__)

SNAPSHOT_NAME = "suppressions.snapshot"
LOCK_NAME = "suppressions.lock"
DIRECTORY_MODE = 0o700
_LOCK_POLL_FIRST = 0.005
_LOCK_POLL_MAX = 0.1  # seconds between attempts while another process builds (seconds long)


class SharedSnapshots:
    """The snapshot source of the worker processes of one guard (``IndexReloader(snapshots=)``)."""

    def __init__(self, directory: str | os.PathLike[str], store: SuppressionStore) -> None:
        self.directory = Path(directory)
        self.path = self.directory / SNAPSHOT_NAME
        self._lock_path = self.directory / LOCK_NAME
        self._store = store
        # Coroutines of one process queue here rather than each polling the file lock.
        self._local = asyncio.Lock()
        self.builds = 0  # snapshots this process loaded from the store and wrote
        self.maps = 0  # snapshots this process mapped from a file another get() wrote

    def __repr__(self) -> str:
        return f"<SharedSnapshots {self.path} builds={self.builds} maps={self.maps}>"

    async def get(self, list_priority: Sequence[str], now: float, at_least: int = 0) -> SuppressionSnapshot:
        """A mapped snapshot of the store for ``list_priority`` at ``now``, at change-log
        position ``at_least`` or later: the shared file when it can serve, else a new one
        built from the store. Raises ``StoreError`` when the store cannot be read or the file
        cannot be written; a damaged file is logged and replaced, never used."""
        priority = tuple(list_priority)
        try:
            async with self._locked():
                latest = await self._store.current_seq()
                snapshot = await self._map_current(priority, now, at_least, latest)
                if snapshot is None:
                    snapshot = await self._build(priority, now)
                return snapshot
        except OSError as error:  # the directory, the lock file, writing or mapping the file
            problem = f"shared suppression index in {self.directory}: {error}"
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(problem) from error
            raise StoreError(problem) from error

    # --- internals -----------------------------------------------------------------------------

    @asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        async with self._local:
            self._prepare_directory()
            descriptor = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                await lock_polled(descriptor, _LOCK_POLL_FIRST, _LOCK_POLL_MAX)
                yield
            finally:
                os.close(descriptor)  # releases the lock

    async def _map_current(self, priority: tuple[str, ...], now: float, at_least: int,
                           latest: int) -> SuppressionSnapshot | None:
        try:
            header = await asyncio.to_thread(read_header, self.path)
        except FileNotFoundError:
            return None
        except SnapshotFileError as error:
            log.warning("%s; building a new one", error)
            return None
        if not _can_serve(header, priority, now, at_least, latest):
            return None
        if header.seq != latest and (await self._store.changes_since(header.seq, priority, now)).full_reload:
            return None
        try:
            snapshot = await asyncio.to_thread(map_snapshot, self.path)
        except SnapshotFileError as error:
            log.warning("%s; building a new one", error)
            return None
        self.maps += 1
        return snapshot

    async def _build(self, priority: tuple[str, ...], now: float) -> SuppressionSnapshot:
        started = time.monotonic()
        built = await self._store.load_snapshot(priority, now)
        loaded = time.monotonic()
        await asyncio.to_thread(self._write, built, priority, now)
        count, seq = len(built.addresses), built.seq
        del built  # the arrays go; the map below replaces them
        snapshot = await asyncio.to_thread(map_snapshot, self.path)
        self.builds += 1
        log.info("suppression index built for all workers: %d addresses at change %d in %.2fs "
                 "(store %.2fs, file %.2fs) -> %s", count, seq, time.monotonic() - started, loaded - started,
                 time.monotonic() - loaded, self.path)
        return snapshot

    def _write(self, snapshot: SuppressionSnapshot, priority: tuple[str, ...], now: float) -> None:
        self._remove_temporaries()  # under the lock, so no other writer is running
        write_snapshot(snapshot, self.path, list_priority=priority, built_at=now)

    def _remove_temporaries(self) -> None:
        for leftover in self.directory.glob(f".{SNAPSHOT_NAME}.*.tmp"):
            leftover.unlink(missing_ok=True)

    def _prepare_directory(self) -> None:
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, mode=DIRECTORY_MODE, exist_ok=True)
            os.chmod(self.directory, DIRECTORY_MODE)  # mkdir's mode is filtered by the umask


def _can_serve(header: SnapshotHeader, priority: tuple[str, ...], now: float, at_least: int, latest: int) -> bool:
    """Whether a file (before asking the change log) can stand for the store at ``now``.

    A file built a moment after ``now`` (another process's clock read later) still serves:
    it only lacks entries that expired in between.
    """
    return (header.list_priority == priority
            and (header.next_expiry is None or header.next_expiry > now)
            and at_least <= header.seq <= latest)

"""The address part of the suppression snapshot, read from SQLite on several cores.

At ten million addresses, reading the snapshot's ``(key_hash, best list)`` rows took 12–14 s in
one thread: about 5 s of SQLite grouping the rows by hash and 6–7 s of Python turning 10M rows
into tuples and copying them into arrays. Threads do not help (the Python half holds the GIL,
and two threads handing it to and fro took twice as long), so the hash range is cut into
parts and each part is read by a process of its own, which leaves its two arrays in a file.
Parts cover disjoint, ascending ranges of the signed 64-bit hash, so their arrays simply
concatenate, still sorted.

Each part reads in its own transaction, a moment after the caller read the change position
(``seq``) in its own: a part may already hold changes made after ``seq``. That is harmless,
because the index then applies every change after ``seq`` again, and applying a change
re-reads the entry's current state from the store (``changes_since``).

A small list is read in the calling thread: starting processes costs ~0.3 s.

The spawned processes import this module, and with it only the SQLite store's ``db`` module.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import shutil
import tempfile
from array import array
from operator import itemgetter
from typing import Sequence

from ..filters import live
from .db import connect_sync

FETCH_CHUNK = 50_000
PARALLEL_FROM = 1_000_000  # rows (by the table's largest rowid) from which parts run in processes
MAX_PARTS = 4

_LOWEST, _PAST_HIGHEST = -(2 ** 63), 2 ** 63
_PARTS_PREFIX = ".snapshot-parts-"


def address_arrays(path: str | os.PathLike[str], order: Sequence[str], now: float, busy_timeout: float) -> tuple[array[int], array[int]]:
    """The live address entries as two parallel arrays: sorted unique key hashes (int64) and
    the rank in ``order`` of the best list each is on (uint8)."""
    parts = _parts(path, busy_timeout)
    jobs = [(os.fspath(path), tuple(order), now, busy_timeout, low, high) for low, high in _ranges(parts)]
    if parts == 1:
        return _rows(*jobs[0])
    hashes, lists = array("q"), array("B")
    # Each part leaves its arrays in a file that this thread appends from. Sent back through
    # pipes instead, the 20-40 MB results left 16-20 MB of heap that glibc kept after they
    # were freed (a pool's or this thread's). The files sit in the store's own directory, in
    # a directory named after this process: one a killed process left is removed here.
    directory = os.path.dirname(os.path.abspath(path))
    _remove_abandoned(directory)
    with tempfile.TemporaryDirectory(prefix=f"{_PARTS_PREFIX}{os.getpid()}-", dir=directory) as parts_dir:
        outputs = [os.path.join(parts_dir, f"part{number}") for number in range(parts)]
        with concurrent.futures.ProcessPoolExecutor(parts, mp_context=multiprocessing.get_context("spawn")) as pool:
            counts = list(pool.map(_read_part, *zip(*[(*job, output) for job, output in zip(jobs, outputs)])))
        for output, count in zip(outputs, counts):  # in range order
            with open(output, "rb") as part:
                hashes.fromfile(part, count)
                lists.fromfile(part, count)
    return hashes, lists


def _remove_abandoned(directory: str) -> None:
    """Remove the parts directories of processes that no longer run (killed while loading):
    90 MB at ten million addresses, and hashes of addresses that may since have been erased."""
    for name in os.listdir(directory):
        if not name.startswith(_PARTS_PREFIX):
            continue
        pid = name[len(_PARTS_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _parts(path: str | os.PathLike[str], busy_timeout: float) -> int:
    connection = connect_sync(path, busy_timeout)
    try:
        (rows,) = connection.execute("SELECT COALESCE(MAX(rowid), 0) FROM suppressions").fetchone()
    finally:
        connection.close()
    if rows < PARALLEL_FROM:
        return 1
    return max(1, min(MAX_PARTS, _cores()))


def _cores() -> int:
    """The cores this process may run on (a container's cpuset, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _ranges(parts: int) -> list[tuple[int, int]]:
    """``parts`` half-open ranges [low, high) covering every signed 64-bit value, ascending."""
    step = (_PAST_HIGHEST - _LOWEST) // parts
    bounds = [_LOWEST + i * step for i in range(parts)] + [_PAST_HIGHEST]
    return list(zip(bounds, bounds[1:]))


def _read_part(path: str, order: tuple[str, ...], now: float, busy_timeout: float, low: int, high: int,
               output: str) -> int:
    """A part's process: its range's arrays written to ``output`` (the hashes, then the list
    ranks); returns how many."""
    hashes, lists = _rows(path, order, now, busy_timeout, low, high)
    with open(output, "wb") as part:
        hashes.tofile(part)
        lists.tofile(part)
    return len(hashes)


def _rows(path: str, order: tuple[str, ...], now: float, busy_timeout: float, low: int,
          high: int) -> tuple[array[int], array[int]]:
    """One hash range's rows: SQLite ranks each row's list and keeps the best per hash, so
    Python only copies two integer columns. The covering index (migration 5) hands the rows
    over in key_hash order from the index alone: no table look-up per row and no sort."""
    rank = "CASE list_name " + " ".join(f"WHEN ? THEN {i}" for i in range(len(order))) + " END"
    upper, parameters = ("", ()) if high == _PAST_HIGHEST else (" AND key_hash < ?", (high,))
    connection = connect_sync(path, busy_timeout)
    try:
        cursor = connection.execute(
            f"SELECT key_hash, MIN({rank}) FROM suppressions INDEXED BY suppressions_snapshot "
            f"WHERE kind = 'address' AND {live('?')} AND key_hash >= ?{upper} "
            f"GROUP BY key_hash ORDER BY key_hash", (*order, now, low, *parameters))
        hashes, lists = array("q"), array("B")
        first, second = itemgetter(0), itemgetter(1)
        while chunk := cursor.fetchmany(FETCH_CHUNK):
            hashes.extend(map(first, chunk))
            lists.extend(map(second, chunk))
    finally:
        connection.close()
    return hashes, lists

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

The parts are plain child processes running this module (``child_process.py``), not a
multiprocessing pool, whose resource tracker would stay beside the guard for its whole life
(8 MiB, 5 % of a one-process guard at ten million addresses). A part imports this module, and
with it only the SQLite store's ``db`` module. A part that fails reports the SQLite or OS error
on its standard output, and the caller raises it again, so a locked or full store is still
told apart from other failures.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
from array import array
from operator import itemgetter
from typing import Any, Sequence

from ... import child_process
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
        processes = [_start_part(job, output) for job, output in zip(jobs, outputs)]
        try:
            for process in processes:
                _finished(process)
        finally:
            for process in processes:  # one failed: the others are of no use
                if process.poll() is None:
                    process.kill()
                    process.wait()
        for output in outputs:  # in range order
            count = os.path.getsize(output) // 9  # 8 bytes of hash, 1 of list rank per address
            with open(output, "rb") as part:
                hashes.fromfile(part, count)
                lists.fromfile(part, count)
    return hashes, lists


def _start_part(job: tuple[Any, ...], output: str) -> subprocess.Popen[bytes]:
    return child_process.start(f"{__name__}:_part_main", [json.dumps([*job, output])],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finished(process: subprocess.Popen[bytes]) -> None:
    """Wait for a part; raise what made it fail (SQLite and OS errors as themselves)."""
    report, errors = process.communicate()
    if process.returncode == 0:
        return
    try:
        failure = json.loads(report)
    except ValueError:
        failure = None
    if isinstance(failure, dict) and failure.get("kind") == "sqlite":
        error = sqlite3.OperationalError(failure["message"])
        error.sqlite_errorname = failure["name"]
        raise error
    if isinstance(failure, dict) and failure.get("kind") == "os":
        raise OSError(failure["errno"], failure["message"])
    last = errors.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {process.returncode}"]
    raise RuntimeError(f"a snapshot part process failed: {last[0]}")


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


def _read_part(path: str, order: Sequence[str], now: float, busy_timeout: float, low: int, high: int,
               output: str) -> None:
    """A part's process: its range's arrays written to ``output`` (the hashes, then the list
    ranks)."""
    hashes, lists = _rows(path, tuple(order), now, busy_timeout, low, high)
    with open(output, "wb") as part:
        hashes.tofile(part)
        lists.tofile(part)


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


def _part_main(job: str) -> int:
    """A part process's main: the job as JSON; a failure reported as JSON on stdout."""
    try:
        _read_part(*json.loads(job))
    except sqlite3.Error as error:
        print(json.dumps({"kind": "sqlite", "name": getattr(error, "sqlite_errorname", "") or "", "message": str(error)}))
        return 1
    except OSError as error:
        print(json.dumps({"kind": "os", "errno": error.errno, "message": error.strerror or str(error)}))
        return 1
    return 0


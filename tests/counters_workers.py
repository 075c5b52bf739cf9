"""Worker processes for test_shared_counters.py: what one guard worker does with a shared table.

Each runs in a child process (spawn: a fresh interpreter that attaches by path; fork: the
parent's object, inherited) and reports through a queue: ``(index, result)``, or
``(index, "error: ...")`` so that a failing child fails the test instead of hanging it.
"""

from __future__ import annotations

import fcntl
import signal
import traceback
from multiprocessing.synchronize import Barrier, Event
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any, Callable

from smtp_guard.counters import Take
from smtp_guard.shared_counters import SharedCounters


def report(queue: Queue[tuple[int, Any]], index: int, work: Callable[..., Any], *args: Any) -> None:
    try:
        queue.put((index, work(*args)))
    except BaseException:
        queue.put((index, "error: " + traceback.format_exc()))


def hammer(counters: SharedCounters | Path, start: Barrier, key: str, rate: float, burst: float,
           t0: float, steps: int, step: float, per_step: int) -> int:
    """``per_step`` takes at each of ``steps`` times ``step`` apart; how many were granted."""
    shared = counters if isinstance(counters, SharedCounters) else SharedCounters.attach(counters)
    start.wait()
    granted = 0
    for i in range(steps):
        now = t0 + i * step
        for _ in range(per_step):
            granted += shared.take(key, rate, burst, now)
    return granted


def take_pairs(path: Path, start: Barrier, takes: list[Take], now: float, tries: int) -> int:
    """``tries`` all-or-nothing takes of ``takes``; how many succeeded."""
    with SharedCounters.attach(path) as shared:
        start.wait()
        return sum(shared.take_all(takes, now) is None for _ in range(tries))


def reserve(path: Path, start: Barrier, key: str, rate: float, burst: float, now: float, count: int) -> list[float]:
    """``count`` pacing reservations; their due times."""
    with SharedCounters.attach(path) as shared:
        start.wait()
        return [shared.schedule(key, rate, burst, now) for _ in range(count)]


def take_once(path: Path, key: str, rate: float, burst: float, now: float, amount: int) -> bool:
    with SharedCounters.attach(path) as shared:
        return shared.take(key, rate, burst, now, amount)


def take_then_wait(path: Path, ready: Event, key: str, rate: float, burst: float, now: float, amount: int) -> None:
    """Take, say so, and wait to be killed (holding no lock)."""
    shared = SharedCounters.attach(path)
    assert shared.take(key, rate, burst, now, amount)
    ready.set()
    wait_to_be_killed()


def lock_then_wait(path: Path, ready: Event) -> None:
    """Take the table's lock as a call does, say so, and wait to be killed holding it."""
    shared = SharedCounters.attach(path)
    fcntl.flock(shared._fd, fcntl.LOCK_EX)
    ready.set()
    wait_to_be_killed()


def wait_to_be_killed() -> None:
    while True:
        signal.pause()

#!/usr/bin/env python3
"""What a shared rate counter costs: ns per take() for InMemoryCounters and SharedCounters.

    python3 bench/shared_counters.py [--ops 200000] [--keys 10000] [--processes 1,2,4] [--seconds 2] \
        [--capacity 100000]

1. **one process**, best of 5 runs of ``--ops`` calls each: ``take`` on one hot key, on
   ``--keys`` keys in turn, ``take_all`` of three keys and ``schedule``, for
   ``InMemoryCounters``, ``SharedCounters`` on tmpfs (/dev/shm) and on a file in the temp dir
   (its file system is printed: a disk one here). Next to them, the parts of a shared take:
   the ``flock`` pair alone, and the key hash (blake2b) a take computes when its key is not in
   its process's hash cache.
2. **contention**: N spawned processes call ``take`` on one hot key of one /dev/shm table for
   ``--seconds`` each: calls/s over all of them and ns per call in each.
3. **a full table** (``--capacity``): a new key past 7/8 of the capacity (the sweep hand moves
   16 slots), a key refused with ``CountersFull`` when no bucket can be full again yet, one
   refused after the hand looked at 256 slots, and ``sweep()`` of the whole table.

No peer: Postfix's counterpart, anvil(8), is one server process that every smtpd asks over a
UNIX socket, and counts connections and commands per client, not tokens per rule. This is a
benchmark, not a test: it is not part of the pytest suite (project rule).
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing
import os
import tempfile
import time
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Callable

from checkout import code_version, cpu_model  # also puts this checkout first on sys.path

from smtp_guard.addresses import key_hash
from smtp_guard.counters import CountersFull, InMemoryCounters, Take
from smtp_guard.shared_counters import SharedCounters

T0 = 1_700_000_000.0
RATE, BURST = 1e9, 1e9  # never short: every call does the whole take


def filesystem(path: Path) -> str:
    """``path``'s file system type, from /proc/mounts (the longest mount point above it)."""
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype = line.split()[:3]
        if str(path).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, fstype
    return f"{path.parent} ({kind})"


def best_ns(run: Callable[[int], None], ops: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        run(ops)
        best = min(best, (time.perf_counter_ns() - start) / ops)
    return best


def workloads(counters: InMemoryCounters | SharedCounters, keys: list[str]) -> dict[str, Callable[[int], None]]:
    def hot(ops: int) -> None:
        take = counters.take
        for i in range(ops):
            take("ratelimit.client:192.0.2.1", RATE, BURST, T0 + i * 1e-6)

    def many(ops: int) -> None:
        take, n = counters.take, len(keys)
        for i in range(ops):
            take(keys[i % n], RATE, BURST, T0 + i * 1e-6)

    triple = [Take("ratelimit.client:192.0.2.1", RATE, BURST), Take("ratelimit.sender:news@shop.test", RATE, BURST),
              Take("ratelimit.domain:example.com", RATE, BURST)]

    def take_all(ops: int) -> None:
        for i in range(ops):
            counters.take_all(triple, T0 + i * 1e-6)

    def schedule(ops: int) -> None:
        for i in range(ops):
            counters.schedule("ratelimit.hold:s1", RATE, BURST, T0 + i * 1e-6)

    return {"take, one key": hot, f"take, {len(keys)} keys": many, "take_all, 3 keys": take_all,
            "schedule": schedule}


def hammer(path: Path, start: Barrier, seconds: float, results: "multiprocessing.Queue[tuple[int, float]]") -> None:
    with SharedCounters.attach(path) as counters:
        start.wait()
        calls, began = 0, time.perf_counter()
        deadline = began + seconds
        while True:
            for _ in range(1000):
                counters.take("ratelimit.client:192.0.2.1", RATE, BURST, time.time())
            calls += 1000
            if time.perf_counter() >= deadline:
                break
        results.put((calls, time.perf_counter() - began))


def contention(path: Path, processes: int, seconds: float) -> tuple[float, float]:
    """(calls/s over all processes, mean ns per call in one process)."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(processes)
    results: multiprocessing.Queue[tuple[int, float]] = context.Queue()
    children = [context.Process(target=hammer, args=(path, start, seconds, results)) for _ in range(processes)]
    for child in children:
        child.start()
    measured = [results.get(timeout=seconds + 120) for _ in children]
    for child in children:
        child.join()
    calls = sum(c for c, _ in measured)
    return calls / max(s for _, s in measured), sum(s * 1e9 / c for c, s in measured) / len(measured)


def full_table(directory: Path, capacity: int) -> dict[str, float]:
    """µs per call of what a table near or at its capacity does, each case set up on purpose.
    Every bucket below is full again 100 s after its take (rate 1/s, 100 of 200 tokens taken)."""
    figures = {}

    def timed(counters: SharedCounters, keys: list[str], now: float) -> float:
        start = time.perf_counter_ns()
        for key in keys:
            try:
                counters.take(key, 1.0, 200.0, now, 100)
            except CountersFull:
                pass
        return (time.perf_counter_ns() - start) / len(keys) / 1000

    high = capacity * 7 // 8 + 1
    with SharedCounters.create(directory / "filling", capacity) as counters:
        counters.take("early", 1.0, 200.0, T0, amount=1)  # full again at T0 + 1
        timed(counters, [f"live{i}" for i in range(high - 1)], T0)
        # Past 7/8, a bucket full again somewhere: each new key moves the hand over 16 slots.
        figures["new key past 7/8 (the hand moves 16 slots)"] = timed(
            counters, [f"new{i}" for i in range(capacity - high + 1)], T0 + 2)
        assert len(counters) == capacity
        # Full, and no bucket can be full again yet (below the lower bound): refused at once.
        figures["refused, no bucket can be full again yet"] = timed(
            counters, [f"refused{i}" for i in range(1000)], T0 + 3)
        assert counters.refused == 1000
    with SharedCounters.create(directory / "renewed", capacity) as counters:
        # Full; every bucket was first left full again at T0 + 1 (the lower bound), then
        # renewed until T0 + 100: past the bound, the hand looks at 256 slots before each
        # refusal, until its round ends and tightens the bound.
        for i in range(capacity):
            counters.take(f"live{i}", 1.0, 200.0, T0, amount=1)
            counters.take(f"live{i}", 1.0, 200.0, T0, amount=99)
        figures["refused after looking at 256 slots"] = timed(
            counters, [f"refused{i}" for i in range(max(1, min(100, capacity // 256)))], T0 + 2)
        start = time.perf_counter_ns()
        evicted = counters.sweep(T0 + 1000)
        figures[f"sweep() of all {2 * capacity} slots, evicting {evicted}"] = (time.perf_counter_ns() - start) / 1000
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=200_000, help="calls per run (default 200000)")
    parser.add_argument("--keys", type=int, default=10_000, help="distinct keys of the many-keys run (default 10000)")
    parser.add_argument("--processes", default="1,2,4", help="process counts of the contention runs (default 1,2,4)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each contention run (default 2)")
    parser.add_argument("--capacity", type=int, default=100_000, help="capacity of the full-table runs (default 100000)")
    args = parser.parse_args()

    print(f"code: {code_version()}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    keys = [f"ratelimit.domain:d{i}.example" for i in range(args.keys)]
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm, tempfile.TemporaryDirectory() as disk:
        shm_path, disk_path = Path(shm) / "rate-counters", Path(disk) / "rate-counters"
        implementations: dict[str, InMemoryCounters | SharedCounters] = {
            "InMemoryCounters": InMemoryCounters(),
            "SharedCounters /dev/shm": SharedCounters.create(shm_path, capacity=4 * args.keys),
            f"SharedCounters {filesystem(Path(disk))}": SharedCounters.create(disk_path, capacity=4 * args.keys),
        }
        print(f"\n1. one process, ns per call (best of 5 x {args.ops}):")
        names = list(workloads(implementations["InMemoryCounters"], keys))
        print(f"   {'':32}" + "".join(f"{name:>20}" for name in names))
        for label, counters in implementations.items():
            figures = [best_ns(run, args.ops) for run in workloads(counters, keys).values()]
            print(f"   {label[:32]:32}" + "".join(f"{ns:>20.0f}" for ns in figures))
        fd = os.open(shm_path, os.O_RDWR)

        def lock_pair(ops: int) -> None:
            for _ in range(ops):
                fcntl.flock(fd, fcntl.LOCK_EX)
                fcntl.flock(fd, fcntl.LOCK_UN)

        def hashing(ops: int) -> None:
            for i in range(ops):
                key_hash(keys[i % len(keys)])

        print(f"   parts of a shared take: flock pair {best_ns(lock_pair, args.ops):.0f} ns, "
              f"key hash when not cached {best_ns(hashing, args.ops):.0f} ns")
        os.close(fd)

        print(f"\n2. contention: processes calling take() on one key of one /dev/shm table, {args.seconds:g} s:")
        for processes in (int(p) for p in args.processes.split(",")):
            rate, ns = contention(shm_path, processes, args.seconds)
            print(f"   {processes} process{'es' if processes > 1 else '  '}: {rate:>10,.0f} calls/s in all, "
                  f"{ns:>6,.0f} ns per call in each")
        for counters in implementations.values():
            if isinstance(counters, SharedCounters):
                counters.close()

        print(f"\n3. a full table (capacity {args.capacity}, /dev/shm):")
        for label, us in full_table(Path(shm), args.capacity).items():
            print(f"   {label}: {us:,.1f} µs")


if __name__ == "__main__":
    main()

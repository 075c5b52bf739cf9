#!/usr/bin/env python3
"""What read-your-writes costs: the change-generation poll every guard process repeats.

    python3 bench/change_poll.py [--polls 10000] [--seconds 10] [--confirmations 30]

1. **poll**: ``--polls`` calls of the real ``SQLiteChangeStore.generation()`` (aiosqlite, a real
   WAL SQLite file with the guard's pragmas): wall and CPU µs per poll. Next to it, the floor
   (the same SELECT on a plain ``sqlite3`` connection, no thread hop) and the alternative
   design — lowering ``[store] reload_interval`` so that the existing refresh round (suppression
   change log, tombstones, breaker sync) runs as often — timed on a running guard.
2. **heartbeat**: ``SQLiteChangeStore.report()`` (one committed, fsync'd write), µs per write.
3. **idle CPU**: a real ``Guard`` (sandbox upstream, loopback port 0) left idle for ``--seconds``
   with ``[store] change_poll_interval`` = 0.05 / 0.1 / 0.25 / 1 s, against the same guard with
   the change poll effectively off (3600 s): the difference is what the poll loop and its
   heartbeat cost, in % of one core. ``reload_interval`` is 3600 s in every run, so the older
   periodic loops do not blur it.
4. **confirmation**: on a guard at change_poll_interval 0.1 s and 0.25 s,
   ``services.propagation.in_force`` from a second connection (what ``smtp-guard suppress add``
   does after its write), changes spaced by a random pause so they fall at any phase of the
   guard's poll: time from bumping the generation to every guard having confirmed.

This is a benchmark, not a test: it is not part of the pytest suite (project rule).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from checkout import code_version, cpu_model  # also puts this checkout first on sys.path

from smtp_guard.app import Guard
from smtp_guard.change_model import GuardInstance
from smtp_guard.config import Config, build_config
from smtp_guard.services.propagation import in_force
from smtp_guard.store.sqlite.changes import SQLiteChangeStore
from smtp_guard.store.sqlite.db import Database, connect_sync

INTERVALS = (0.05, 0.1, 0.25, 1.0)
OFF = 3600.0


def guard_config(directory: Path, poll_interval: float) -> Config:
    return build_config({
        "smtp": {"listen": "127.0.0.1:0"},
        "metrics": {"listen": ""},
        "store": {"path": str(directory / "guard.sqlite3"), "reload_interval": OFF,
                  "change_poll_interval": poll_interval},
        "upstream": {"mode": "sandbox"},
        "logging": {"level": "warning"},
    }, "bench")


def cpu() -> float:
    return time.process_time()


async def measure_polls(path: Path, polls: int) -> dict[str, float]:
    async with Database(path) as db:
        store = SQLiteChangeStore(db)
        await store.generation()  # warm up the connection
        wall, used = time.perf_counter(), cpu()
        for _ in range(polls):
            await store.generation()
        poll_wall, poll_cpu = time.perf_counter() - wall, cpu() - used

        writes = max(polls // 20, 50)
        instance = GuardInstance("bench", "bench-host", os.getpid(), time.time(), time.time(), 0)
        wall = time.perf_counter()
        for number in range(writes):
            await store.report(GuardInstance(instance.id, instance.host, instance.pid, instance.started_at,
                                             time.time(), number))
        report_wall = time.perf_counter() - wall
        await store.remove(instance.id)

    connection = connect_sync(path)
    try:
        wall = time.perf_counter()
        for _ in range(polls):
            connection.execute("SELECT generation FROM change_generation WHERE id = 1").fetchone()
        raw_wall = time.perf_counter() - wall
    finally:
        connection.close()
    return {"poll_wall_us": poll_wall / polls * 1e6, "poll_cpu_us": poll_cpu / polls * 1e6,
            "raw_wall_us": raw_wall / polls * 1e6, "report_wall_us": report_wall / writes * 1e6}


async def measure_refresh_round(directory: Path, rounds: int) -> float:
    """µs for one round of the refreshes the guard ran before (what a 0.1 s reload_interval would
    repeat ten times a second), on an idle guard."""
    guard = Guard(guard_config(directory, OFF))
    await guard.start()
    try:
        wall = time.perf_counter()
        for _ in range(rounds):
            await guard.enforcement.reloader.refresh()
            await guard.enforcement.tombstone_reloader.refresh()
            await guard.background.breaker_sync.sync()
        return (time.perf_counter() - wall) / rounds * 1e6
    finally:
        await guard.stop()


async def idle_cpu(directory: Path, poll_interval: float, seconds: float) -> float:
    """Percent of one core the whole guard process used while idle."""
    guard = Guard(guard_config(directory, poll_interval))
    await guard.start()
    try:
        await asyncio.sleep(1.0)  # let start-up work settle
        wall, used = time.perf_counter(), cpu()
        await asyncio.sleep(seconds)
        return (cpu() - used) / (time.perf_counter() - wall) * 100
    finally:
        await guard.stop()


async def confirmation_latency(directory: Path, interval: float, count: int) -> list[float]:
    config = guard_config(directory, interval)
    guard = Guard(config)
    await guard.start()
    try:
        async with Database(config.store.path) as db:
            admin: Any = SimpleNamespace(changes=SQLiteChangeStore(db), clock=time.time, config=config)
            latencies = []
            for _ in range(count):
                result = await in_force(admin, timeout=5.0)
                assert result.is_confirmed, result
                latencies.append(result.waited)
                await asyncio.sleep(random.uniform(0, interval))
            return latencies
    finally:
        await guard.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="idle time measured per interval")
    parser.add_argument("--confirmations", type=int, default=30)
    args = parser.parse_args()
    print(f"code: {code_version()}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}")

    with tempfile.TemporaryDirectory(prefix="change-poll-") as temp:
        directory = Path(temp)
        async with Database(directory / "guard.sqlite3"):
            pass  # migrated
        figures = await measure_polls(directory / "guard.sqlite3", args.polls)
        print(f"\n1. generation poll, {args.polls} calls: {figures['poll_wall_us']:.1f} µs wall, "
              f"{figures['poll_cpu_us']:.1f} µs CPU per poll (aiosqlite); "
              f"{figures['raw_wall_us']:.1f} µs on a plain sqlite3 connection")
        refresh = await measure_refresh_round(directory, max(args.polls // 10, 100))
        print(f"   the refresh round the guard already had (index + tombstones + breaker sync), idle store: "
              f"{refresh:.0f} µs = {refresh / figures['poll_wall_us']:.1f}x a generation poll")
        print(f"2. heartbeat / applied report (committed, fsync'd write): {figures['report_wall_us']:.0f} µs")

        print(f"\n3. idle guard process CPU over {args.seconds:g} s (% of one core):")
        baseline = await idle_cpu(directory, OFF, args.seconds)
        print(f"   change poll off ({OFF:g} s): {baseline:.2f} %")
        for interval in INTERVALS:
            used = await idle_cpu(directory, interval, args.seconds)
            print(f"   change_poll_interval {interval:g} s: {used:.2f} %  (poll loop: {used - baseline:+.2f} %; "
                  f"the polls alone: {figures['poll_cpu_us'] / interval / 1e4:.2f} %)")

        print(f"\n4. in_force (bump, then wait for the guard), {args.confirmations} changes per interval:")
        for interval in (0.1, 0.25):
            latencies = await confirmation_latency(directory, interval, args.confirmations)
            print(f"   change_poll_interval {interval:g} s: median {statistics.median(latencies) * 1000:.0f} ms, "
                  f"max {max(latencies) * 1000:.0f} ms")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

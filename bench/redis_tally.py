#!/usr/bin/env python3
"""What counting a message into its stream in Redis costs the end of DATA ([counters] url).

    python3 bench/redis_tally.py [--url redis://HOST:6379/0] [--messages 200]

One ``RedisTallies.count`` per message — the breaker's one round trip — for messages of 1, 10,
100 and 1000 recipients, each new to its stream (the most work: every recipient is added),
without and with a body counted (a class with a fan-out detector): median and p90 in ms. With
no ``--url`` a throwaway redis-server (Debian's package) runs on a loopback port for the run,
so the figures are loopback's: on a LAN add the network's round trip once per message.

This is a benchmark, not a test: it is not part of the pytest suite (project rule).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

from checkout import code_version, cpu_model  # also puts this checkout first on sys.path

from smtp_guard.breaker.redis_tally import RedisTallies
from smtp_guard.breaker.tally import Bound, CountRequest
from smtp_guard.config import CountersConfig
from smtp_guard.metrics import Metrics
from smtp_guard.redis_connection import RedisConnection

SIZES = (1, 10, 100, 1000)
NEVER = (Bound("breaker.volume", "window", 10**9),)  # compared at every recipient, never exceeded


@contextmanager
def throwaway_redis() -> Iterator[str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
                                    "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait()


async def measure(url: str, messages: int) -> None:
    tallies = RedisTallies(RedisConnection.connect(CountersConfig(url=url), Metrics()))
    try:
        for body in (None, "body"):
            for size in SIZES:
                times = []
                for number in range(messages):
                    recipients = tuple(range(number * size, (number + 1) * size))
                    request = CountRequest(f"bench-{size}-{body}", recipients, body, time.time(), 3600.0, 1800.0,
                                           10**7, 0, None, NEVER)
                    started = time.perf_counter()
                    await tallies.count(request)
                    times.append(time.perf_counter() - started)
                times.sort()
                print(f"{size:5d} recipient(s){' + body' if body else '       '}: median "
                      f"{times[len(times) // 2] * 1000:6.3f} ms, p90 {times[int(len(times) * 0.9)] * 1000:6.3f} ms")
    finally:
        await tallies._connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a Redis to measure against (default: a throwaway redis-server)")
    parser.add_argument("--messages", type=int, default=200, help="messages per size")
    args = parser.parse_args()
    print(f"smtp-guard {code_version()}; CPU {cpu_model()}")
    if args.url:
        asyncio.run(measure(args.url, args.messages))
        return
    with throwaway_redis() as url:
        asyncio.run(measure(url, args.messages))


if __name__ == "__main__":
    main()

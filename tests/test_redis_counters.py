"""redis_counters.py against a real redis-server: the Lua script is counters.py's arithmetic.

The property test is the proof that matters: on random sequences of requests (all-or-nothing
takes, shadowed groups, reservations into debt, clocks that stand still, jump or step back)
``RedisCounters`` settles exactly as ``InMemoryCounters`` does, to the last bit of every
release time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtp_guard.config import CountersConfig
from smtp_guard.counters import CountersUnavailable, InMemoryCounters, Request, Settlement, Take
from smtp_guard.metrics import Metrics
from smtp_guard.redis_counters import EXPIRY_MARGIN_MS, RedisCounters

T0 = 1_700_000_000.0

# A bucket key always comes with the same rate and burst (its rule's); these are the rules.
BUCKETS = {
    "ratelimit.client:192.0.2.1": (2.0, 3.0),
    "ratelimit.domain:example.com": (1 / 3600, 1.0),
    "ratelimit.slow:news@shop.test": (0.5, 5.0),
    "ratelimit.pace:s1": (10.0, 1.0),
    "ratelimit.odd:x": (1 / 7, 2.5),
}


def counters_for(url: str, metrics: Metrics | None = None, **overrides: Any) -> RedisCounters:
    return RedisCounters.connect(CountersConfig(url=url, **overrides), metrics or Metrics())


takes = st.builds(lambda key, amount: Take(key, *BUCKETS[key], amount),
                  st.sampled_from(sorted(BUCKETS)), st.integers(min_value=1, max_value=4))
requests = st.builds(
    lambda take_all, groups, reserve: Request(tuple(take_all), tuple(tuple(g) for g in groups), tuple(reserve)),
    st.lists(takes, max_size=3), st.lists(st.lists(takes, min_size=1, max_size=2), max_size=2),
    st.lists(takes, max_size=3))
# The clock: stands still, moves by fractions or a lot, or steps back (a wall-clock adjustment).
steps = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=5.0), st.sampled_from([1 / 3, 0.1, 3600.0]),
                  st.floats(min_value=-2.0, max_value=0.0))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(st.tuples(steps, requests), min_size=1, max_size=25))
def test_lua_settles_exactly_as_counters_py(redis_server: Any, sequence: list[tuple[float, Request]]) -> None:
    async def run() -> tuple[list[Settlement], list[Settlement]]:
        redis_counters = counters_for(redis_server.url)
        try:
            await redis_counters.connection.client.flushdb()
            embedded = InMemoryCounters()
            now, expected, got = T0, [], []
            for step, request in sequence:
                now += step
                expected.append(await embedded.settle(request, now))
                got.append(await redis_counters.settle(request, now))
            return expected, got
        finally:
            await redis_counters.close()

    expected, got = asyncio.run(run())
    assert got == expected, sequence


async def test_a_limit_holds_across_clients_and_their_restarts(redis_server: Any) -> None:
    request = Request(take_all=(Take("ratelimit.client:192.0.2.1", 1 / 60, 2.0),))
    first, second = counters_for(redis_server.url), counters_for(redis_server.url)
    try:
        assert (await first.settle(request, T0)).short is None
        assert (await second.settle(request, T0 + 1)).short is None
        assert (await first.settle(request, T0 + 2)).short == request.take_all[0]
    finally:
        await first.close()
        await second.close()
    again = counters_for(redis_server.url)
    try:
        assert (await again.settle(request, T0 + 3)).short == request.take_all[0], "the bucket outlived its clients"
        assert (await again.settle(request, T0 + 62)).short is None, "one token back after a minute"
    finally:
        await again.close()


async def test_keys_hold_no_address_and_expire_once_full_again(redis_server: Any) -> None:
    counters = counters_for(redis_server.url)
    try:
        # 0.5 tokens per second, burst 5: after three takes the bucket is full again in 6 s.
        request = Request(take_all=(Take("ratelimit.slow:news@shop.test", 0.5, 5.0, 3),))
        await counters.settle(request, time.time())
        keys = await counters.connection.client.keys("*")
        assert keys == [counters.bucket_key("ratelimit.slow:news@shop.test").encode()]
        assert b"shop.test" not in keys[0] and keys[0].startswith(b"smtp-guard:rl:")
        ttl = await counters.connection.client.pttl(keys[0])
        assert 6000 < ttl <= 6000 + EXPIRY_MARGIN_MS
    finally:
        await counters.close()


async def test_an_unreachable_redis_is_unavailable_and_counted(redis_server: Any) -> None:
    metrics = Metrics()
    counters = counters_for(redis_server.url, metrics, timeout=0.5)
    request = Request(take_all=(Take("k", 1.0, 1.0),))
    try:
        assert await counters.probe() is None
        redis_server.stop()
        with pytest.raises(CountersUnavailable, match=r"Redis at 127\.0\.0\.1:\d+ \(\[counters\] url\): .*"):
            await counters.settle(request, T0)
        assert "Connection refused" in (await counters.probe() or "")
        assert metrics.redis_errors.labels("settle", "connection")._value.get() == 1
        assert metrics.redis_errors.labels("ping", "connection")._value.get() == 1
        redis_server.start()  # empty, without the script: loaded again on first use (NOSCRIPT)
        assert await counters.settle(request, T0) == Settlement(None)
        assert await counters.probe() is None
    finally:
        await counters.close()


async def test_a_redis_that_does_not_answer_in_time_is_unavailable() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, reads, never answers: a Redis that hangs
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    metrics = Metrics()
    counters = counters_for(f"redis://127.0.0.1:{port}/0", metrics, timeout=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(CountersUnavailable, match=r"no answer within \[counters\] timeout"):
            await counters.settle(Request(take_all=(Take("k", 1.0, 1.0),)), T0)
        assert time.monotonic() - started < 1.0
        assert metrics.redis_errors.labels("settle", "timeout")._value.get() == 1
    finally:
        await counters.close()
        server.close()
        await server.wait_closed()

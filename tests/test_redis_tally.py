"""breaker/redis_tally.py against a real redis-server: the Lua scripts are tally.py's arithmetic.

The property test is the proof that matters: on random sequences of operations — messages of a
few streams and bodies counted with changing caps, carried audiences, admin decisions and
limits; streams ended; audiences read; a clock that stands still, jumps past the window and the
idle time, or steps back — ``RedisTallies`` answers exactly as ``MemoryTallies`` does.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from smtp_guard.breaker.redis_tally import BODY_EXPIRY_MARGIN, TALLY_EXPIRY_MARGIN, RedisTallies
from smtp_guard.breaker.tally import Bound, CountRequest, MemoryTallies, StreamTallies
from smtp_guard.config import CountersConfig
from smtp_guard.metrics import Metrics
from smtp_guard.redis_connection import RedisConnection

T0 = 1_700_000_000.0
WINDOW = 10.0
IDLE = 25.0
STREAMS = ("spring-sale", "news@shop.test|weekly news")
RECIPIENTS = (1, -2, 3, 2**62, -(2**63), 17, 5, 6, 7, 8)


def tallies_for(url: str, metrics: Metrics | None = None, **overrides: Any) -> RedisTallies:
    return RedisTallies(RedisConnection.connect(CountersConfig(url=url, **overrides), metrics or Metrics()))


bounds = st.builds(Bound, st.sampled_from(["gate.sanction", "breaker.volume", "breaker.fanout"]),
                   st.sampled_from(["window", "size", "body"]), st.integers(min_value=0, max_value=9))
counts = st.builds(
    lambda stream, recipients, body, cap, carry, basis, limits: ("count", stream, tuple(recipients), body, cap,
                                                                 carry, basis, tuple(limits)),
    st.sampled_from(STREAMS), st.lists(st.sampled_from(RECIPIENTS), min_size=1, max_size=6),
    st.sampled_from([None, "body-1", "body-2"]), st.sampled_from([2, 4, 1000]), st.sampled_from([0, 6]),
    st.sampled_from([None, 5.0, 9.5]), st.lists(bounds, max_size=3))
endings = st.builds(lambda streams: ("finish", tuple(streams)), st.lists(st.sampled_from(STREAMS), max_size=2))
audiences = st.builds(lambda streams: ("sizes", tuple(streams)), st.lists(st.sampled_from(STREAMS), max_size=2))
# The clock: stands still, moves by fractions, past the window or the idle time, or steps back.
steps = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=4.0), st.sampled_from([1 / 3, WINDOW, IDLE, IDLE + 1]),
                  st.floats(min_value=-12.0, max_value=0.0))
Operation = tuple[Any, ...]


async def apply(tallies: StreamTallies, now: float, operation: tuple[Any, ...]) -> Any:
    if operation[0] == "count":
        _, stream, recipients, body, cap, carry, basis, limits = operation
        return await tallies.count(CountRequest(stream, recipients, body, now, WINDOW, IDLE, cap, carry, basis,
                                                limits))
    if operation[0] == "finish":
        return await tallies.finish(list(dict.fromkeys(operation[1])), now, IDLE)
    return await tallies.sizes(list(dict.fromkeys(operation[1])))


BODY_AGAIN = ("count", STREAMS[0], (1,), "body-1", 1000, 0, None, ())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# The edges, exactly: a body and a window entry seen a window ago still count; a stream idle for
# exactly stream_idle ends.
@example(sequence=[(0.0, BODY_AGAIN), (WINDOW, ("count", STREAMS[0], (2,), "body-1", 1000, 0, None, ())),
                   (0.0, ("count", STREAMS[0], (3,), "body-1", 1000, 0, None, (Bound("r", "body", 2),)))])
@example(sequence=[(0.0, BODY_AGAIN), (IDLE, ("finish", (STREAMS[0],)))])
@given(sequence=st.lists(st.tuples(steps, st.one_of(counts, counts, counts, endings, audiences)),
                         min_size=1, max_size=30))
def test_lua_counts_exactly_as_tally_py(redis_server: Any, sequence: Sequence[tuple[float, Operation]]) -> None:
    async def run() -> tuple[list[Any], list[Any]]:
        redis_tallies = tallies_for(redis_server.url)
        try:
            await redis_tallies._connection.client.flushdb()
            embedded = MemoryTallies()
            now, expected, got = T0, [], []
            for step, operation in sequence:
                now += step
                expected.append(await apply(embedded, now, operation))
                got.append(await apply(redis_tallies, now, operation))
            return expected, got
        finally:
            await redis_tallies._connection.close()

    expected, got = asyncio.run(run())
    assert got == expected, sequence


async def test_two_guards_counting_one_stream_claim_one_trip(redis_server: Any) -> None:
    first, second = tallies_for(redis_server.url), tallies_for(redis_server.url)
    limit = (Bound("breaker.volume", "window", 4),)
    try:
        claims = []
        for i in range(6):  # two recipients a message, the guards taking turns
            tallies = (first, second)[i % 2]
            counted = await tallies.count(CountRequest("s", (2 * i, 2 * i + 1), None, T0 + i, 3600.0, 1800.0, 1000,
                                                       0, None, limit))
            claims.append((counted.claimed, counted.trip is not None))
        # The fifth recipient trips it (the first of the third message): counted on the first
        # guard, which claims it; every later message, on either guard, finds the trip.
        assert claims == [(None, False), (None, False), (0, True), (None, True), (None, True), (None, True)]
        # An approval (decided at T0 + 10) makes that trip stale for a guard that knows it.
        counted = await second.count(CountRequest("s", (99,), None, T0 + 11, 3600.0, 1800.0, 1000, 0, T0 + 10,
                                                  (Bound("breaker.volume", "size", 20),)))
        assert (counted.trip, counted.claimed, counted.size) == (None, None, (13,))
    finally:
        await first._connection.close()
        await second._connection.close()


async def test_keys_hold_no_stream_body_or_address_and_expire(redis_server: Any) -> None:
    tallies = tallies_for(redis_server.url)
    try:
        await tallies.count(CountRequest("news@shop.test|weekly", (42,), "body-hash", time.time(), 60.0, 120.0,
                                         1000, 0, None, ()))
        keys = sorted(await tallies._connection.client.keys("*"))
        stream_key, window_key = tallies.keys("news@shop.test|weekly")
        assert keys == sorted(k.encode() for k in (stream_key, window_key,
                                                   tallies.body_key("news@shop.test|weekly", "body-hash")))
        assert all(b"shop.test" not in key and b"body-hash" not in key for key in keys)
        for key in (stream_key, window_key):
            ttl = await tallies._connection.client.pttl(key)
            assert 120_000 < ttl <= (120 + TALLY_EXPIRY_MARGIN) * 1000
        ttl = await tallies._connection.client.pttl(tallies.body_key("news@shop.test|weekly", "body-hash"))
        assert 60_000 < ttl <= (60 + BODY_EXPIRY_MARGIN) * 1000
    finally:
        await tallies._connection.close()

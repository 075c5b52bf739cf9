"""counters.py: token-bucket arithmetic with an explicit clock (``now`` is passed in).

The behaviour tests run against every ``RateCounters``: the embedded ``InMemoryCounters`` and
the shared-memory ``SharedCounters`` (test_shared_counters.py has its processes and capacity).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from smtp_guard.counters import InMemoryCounters, RateCounters, Request, Settlement, Take
from smtp_guard.shared_counters import SharedCounters

T0 = 1_700_000_000.0

Counters = InMemoryCounters | SharedCounters


@pytest.fixture(params=["in_memory", "shared"])
def counters(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Counters]:
    if request.param == "in_memory":
        yield InMemoryCounters()
        return
    with SharedCounters.create(tmp_path / "rate-counters", capacity=64) as shared:
        yield shared


async def test_counters_satisfy_the_interface(counters: Counters) -> None:
    interface: RateCounters = counters
    request = Request(take_all=(Take("k", 1.0, 1.0),), groups=((Take("g", 1.0, 1.0),),), reserve=(Take("p", 1.0, 1.0),))
    assert await interface.settle(request, T0) == Settlement(None, (True,), (T0,))


async def test_a_settlement_short_of_one_take_does_nothing_else(counters: Counters) -> None:
    assert counters.take("k", 1.0, 1.0, T0)
    short = Take("k", 1.0, 1.0)
    request = Request(take_all=(Take("a", 1.0, 1.0), short), groups=((Take("g", 1.0, 1.0),),),
                      reserve=(Take("p", 1.0, 1.0),))
    assert await counters.settle(request, T0) == Settlement(short)
    assert counters.take("a", 1.0, 1.0, T0) and counters.take("g", 1.0, 1.0, T0)
    assert counters.schedule("p", 1.0, 1.0, T0) == T0, "nothing was reserved"


async def test_a_settlement_reserves_in_order_into_debt(counters: Counters) -> None:
    request = Request(groups=((Take("g", 1.0, 1.0, amount=2),), (Take("h", 1.0, 2.0, amount=2),)),
                      reserve=(Take("p", 2.0, 1.0),) * 3)
    assert await counters.settle(request, T0) == Settlement(None, (True, True), (T0, T0 + 0.5, T0 + 1.0))


def test_burst_then_refill_at_rate(counters: Counters) -> None:
    assert [counters.take("k", 2.0, 3.0, T0) for _ in range(4)] == [True, True, True, False]
    assert not counters.take("k", 2.0, 3.0, T0 + 0.49)  # 0.98 of a token
    assert counters.take("k", 2.0, 3.0, T0 + 0.5)  # one token back after 1/rate
    assert not counters.take("k", 2.0, 3.0, T0 + 0.5)
    # Refill stops at burst: a long pause gives back burst tokens, not more.
    assert [counters.take("k", 2.0, 3.0, T0 + 100) for _ in range(4)] == [True, True, True, False]


def test_keys_are_independent(counters: Counters) -> None:
    assert counters.take("a", 1.0, 1.0, T0)
    assert not counters.take("a", 1.0, 1.0, T0)
    assert counters.take("b", 1.0, 1.0, T0)


def test_failed_take_takes_nothing(counters: Counters) -> None:
    assert counters.take("k", 1.0, 5.0, T0, amount=3)
    assert not counters.take("k", 1.0, 5.0, T0, amount=3)  # only 2 left
    assert counters.take("k", 1.0, 5.0, T0, amount=2)


def test_request_larger_than_burst_passes_only_from_a_full_bucket_and_leaves_debt(counters: Counters) -> None:
    assert counters.take("k", 1.0, 2.0, T0, amount=5)
    assert not counters.take("k", 1.0, 2.0, T0 + 3.9)  # -3 + 3.9 < 1
    assert counters.take("k", 1.0, 2.0, T0 + 4.0)  # the average rate still holds
    assert not counters.take("k", 1.0, 2.0, T0 + 4.0, amount=5)  # not full again yet


def test_take_all_is_all_or_nothing_across_keys(counters: Counters) -> None:
    assert counters.take("b", 1.0, 1.0, T0)  # b is empty now
    short = counters.take_all([Take("a", 1.0, 2.0), Take("b", 1.0, 1.0)], T0)
    assert short == Take("b", 1.0, 1.0)
    assert counters.take("a", 1.0, 2.0, T0, amount=2), "nothing was taken from a"
    assert counters.take_all([Take("c", 1.0, 3.0), Take("c", 1.0, 3.0)], T0) is None
    assert counters.take_all([Take("c", 1.0, 3.0), Take("c", 1.0, 3.0)], T0) == Take("c", 1.0, 3.0)


def test_schedule_spaces_a_backlog_by_one_over_rate(counters: Counters) -> None:
    times = [counters.schedule("k", 5.0, 2.0, T0) for _ in range(6)]
    assert times[:2] == [T0, T0]  # the burst goes at once
    assert times[2:] == pytest.approx([T0 + 0.2, T0 + 0.4, T0 + 0.6, T0 + 0.8])
    # Reservations are tokens spent: nothing else gets through before the backlog drains.
    assert not counters.take("k", 5.0, 2.0, T0 + 0.79)
    assert counters.schedule("k", 5.0, 2.0, T0 + 0.5) == pytest.approx(T0 + 1.0)
    # Never more than burst + rate x elapsed by any time.
    for i, at in enumerate(times, start=1):
        assert i <= 2 + 5.0 * (at - T0) + 1e-6  # float rounding at wall-clock magnitudes


def test_schedule_after_a_pause_is_immediate_again(counters: Counters) -> None:
    for _ in range(3):
        counters.schedule("k", 1.0, 1.0, T0)  # due at T0, T0+1, T0+2
    assert counters.schedule("k", 1.0, 1.0, T0 + 10) == T0 + 10


def test_clock_stepping_back_adds_no_tokens(counters: Counters) -> None:
    assert counters.take("k", 1.0, 1.0, T0)
    assert not counters.take("k", 1.0, 1.0, T0 - 100)
    assert not counters.take("k", 1.0, 1.0, T0 + 0.5)
    assert counters.take("k", 1.0, 1.0, T0 + 1.0)


def test_buckets_full_again_are_evicted_and_memory_stays_bounded() -> None:
    counters = InMemoryCounters(min_sweep=4)
    for i in range(4):
        counters.take(f"old{i}", 1.0, 2.0, T0)  # each full again at T0 + 1
    assert len(counters) == 4
    counters.take("busy", 1.0, 2.0, T0 + 0.5)  # the 5th key triggers a sweep: nothing full yet
    assert len(counters) == 5
    assert counters.sweep(T0 + 1.0) == 4  # old* are full again; busy is not (until T0 + 1.5)
    assert len(counters) == 1
    # An evicted bucket is a full one: eviction changes no answer.
    assert counters.take("old0", 1.0, 2.0, T0 + 1.0, amount=2)
    # A steady stream of one-off keys never grows past twice the live buckets.
    for i in range(1000):
        counters.take(f"once{i}", 10.0, 1.0, T0 + 10 + i)  # each full again 0.1 s later
    assert len(counters) <= 8


def test_sweep_keeps_buckets_in_debt(counters: Counters) -> None:
    for _ in range(10):
        counters.schedule("k", 1.0, 1.0, T0)  # 9 tokens of debt: full again at T0 + 10
    assert counters.sweep(T0 + 9.9) == 0
    assert counters.schedule("k", 1.0, 1.0, T0 + 9.9) == pytest.approx(T0 + 10.0)

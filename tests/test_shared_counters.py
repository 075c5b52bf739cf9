"""shared_counters.py: one table of buckets for every worker process of a machine.

Real processes (tests/counters_workers.py) hammer one file: a limit holds across them exactly,
take_all stays all-or-nothing, pacing is global, and a worker killed by SIGKILL — holding the
lock or not — leaves the table usable. A full table refuses new keys with ``CountersFull``
(the pipeline defers: 451 4.3.5) and gives the slots of buckets full again to new keys. The
token-bucket behaviour itself is tests/test_counters.py's, run against both implementations;
here property tests check that the two answer alike, op for op.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import pickle
import signal
import stat
import tempfile
from contextlib import contextmanager
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtp_guard import replies
from smtp_guard.addresses import key_hash, parse_mailbox
from smtp_guard.config import build_config
from smtp_guard.counters import CountersFull, InMemoryCounters, Take
from smtp_guard.policy.base import RecipientContext, Verdict
from smtp_guard.policy.pipeline import Pipeline
from smtp_guard.policy.ratelimit import RateLimitPolicy
from smtp_guard.shared_counters import _H_EARLIEST, _H_HAND, _H_ROUND_MIN, _HEADER_WORDS, _SLOT_WORDS, SharedCounters

import counters_workers as workers

T0 = 1_700_000_000.0
CHILD_LIMIT = 120.0  # seconds a child may take; they need well under one


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "rate-counters"


@pytest.fixture
def table(path: Path) -> Iterator[SharedCounters]:
    """Room for 8 buckets, to be filled on purpose."""
    with SharedCounters.create(path, capacity=8) as shared:
        yield shared


@pytest.fixture
def roomy(path: Path) -> Iterator[SharedCounters]:
    with SharedCounters.create(path, capacity=64) as shared:
        yield shared


@contextmanager
def scratch_table(capacity: int) -> Iterator[SharedCounters]:
    """A table in a fresh temp dir (hypothesis runs many examples in one test function)."""
    with tempfile.TemporaryDirectory() as directory, \
            SharedCounters.create(Path(directory) / "rate-counters", capacity) as shared:
        yield shared


def run_all(context: BaseContext, jobs: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[Any]:
    """Run each ``(work, args)`` in its own child process at once; their results, in order."""
    queue = context.Queue()
    children = [context.Process(target=workers.report, args=(queue, index, work, *args))
                for index, (work, args) in enumerate(jobs)]
    for child in children:
        child.start()
    try:
        results = dict(queue.get(timeout=CHILD_LIMIT) for _ in children)
    finally:
        for child in children:
            child.join(CHILD_LIMIT)
            if child.is_alive():
                child.kill()
    failures = [result for result in results.values() if isinstance(result, str) and result.startswith("error: ")]
    assert not failures, failures[0]
    return [results[index] for index in range(len(children))]


# --- across processes ----------------------------------------------------------------------------

@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_a_limit_holds_across_processes(roomy: SharedCounters, path: Path, start_method: str) -> None:
    """Four workers over-asking at every step get exactly burst + rate x elapsed between them.
    Spawned workers attach by path; forked ones use the parent's object, inherited."""
    context = multiprocessing.get_context(start_method)
    workers_ = 4
    start = context.Barrier(workers_)
    # 8 tokens/s, a step of 1/8 s: one token back per step, far fewer than the 4 x 25 asked.
    # (Which worker gets them depends on who runs ahead: a worker behind the latest time
    # refills nothing, as when a clock steps back.)
    steps, step, rate, burst = 400, 0.125, 8.0, 50.0
    target = roomy if start_method == "fork" else path
    granted = run_all(context, [(workers.hammer, (target, start, "ratelimit.r:k", rate, burst, T0, steps, step, 25))]
                      * workers_)
    assert sum(granted) == burst + rate * step * (steps - 1)


def test_take_all_is_all_or_nothing_across_processes(roomy: SharedCounters, path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(4)
    pair = [Take("a", 1.0, 1000.0), Take("b", 1.0, 100_000.0)]
    granted = run_all(context, [(workers.take_pairs, (path, start, pair, T0, 1000))] * 4)
    assert sum(granted) == 1000
    # b was charged exactly once per granted pair: 99,000 left, no more.
    assert roomy.take("b", 1.0, 100_000.0, T0, amount=99_000)
    assert not roomy.take("b", 1.0, 100_000.0, T0)


def test_pacing_is_global(roomy: SharedCounters, path: Path) -> None:
    """Three workers reserving from one paced bucket get one timeline: the burst at once,
    then one release every 1/rate, none twice."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(3)
    due = run_all(context, [(workers.reserve, (path, start, "ratelimit.hold:s1", 8.0, 4.0, T0, 1000))] * 3)
    assert sorted(t for times in due for t in times) == [T0] * 4 + [T0 + k / 8 for k in range(1, 2997)]
    assert roomy.schedule("ratelimit.hold:s1", 8.0, 4.0, T0) == T0 + 2997 / 8


def test_a_worker_started_later_sees_the_buckets_and_is_seen(table: SharedCounters, path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    assert table.take("k", 1.0, 3.0, T0, amount=3)
    assert run_all(context, [(workers.take_once, (path, "k", 1.0, 3.0, T0, 1)),
                             (workers.take_once, (path, "other", 1.0, 3.0, T0, 3))]) == [False, True]
    assert not table.take("other", 1.0, 3.0, T0)
    with SharedCounters.attach(path) as again:
        assert not again.take("k", 1.0, 3.0, T0 + 0.5)
        assert again.take("k", 1.0, 3.0, T0 + 1.0)


def test_a_worker_killed_holding_nothing_leaves_its_takes_and_a_usable_table(table: SharedCounters,
                                                                              path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    child = context.Process(target=workers.take_then_wait, args=(path, ready, "k", 1.0, 10.0, T0, 6))
    child.start()
    try:
        assert ready.wait(CHILD_LIMIT)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(CHILD_LIMIT)
    assert child.exitcode == -signal.SIGKILL
    assert table.take("k", 1.0, 10.0, T0, amount=4)
    assert not table.take("k", 1.0, 10.0, T0)
    assert run_all(context, [(workers.take_once, (path, "k", 1.0, 10.0, T0 + 1, 1))]) == [True]


def test_a_worker_killed_holding_the_lock_does_not_block_the_others(table: SharedCounters, path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    child = context.Process(target=workers.lock_then_wait, args=(path, ready))
    child.start()
    probe = os.open(path, os.O_RDWR)
    try:
        assert ready.wait(CHILD_LIMIT)
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.kill(child.pid, signal.SIGKILL)
        child.join(CHILD_LIMIT)
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel dropped the dead worker's lock
        fcntl.flock(probe, fcntl.LOCK_UN)
    finally:
        os.close(probe)
        if child.is_alive():
            child.kill()
    assert table.take("k", 1.0, 1.0, T0)


async def test_settle_waits_for_the_lock_without_blocking_the_loop_and_gives_up_after_a_while(
        table: SharedCounters, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker stopped while holding the lock (SIGSTOP) must not freeze the others' event loops:
    their sessions and heartbeats go on, and the request is deferred (451) after LOCK_WAIT."""
    import asyncio

    from smtp_guard import shared_counters
    from smtp_guard.counters import CountersUnavailable, Request

    monkeypatch.setattr(shared_counters, "LOCK_WAIT", 0.3)
    request = Request(take_all=(Take("k", 1.0, 5.0),))
    holder = os.open(path, os.O_RDWR)  # another open file description: another process's lock
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(CountersUnavailable, match="lock was held for over 0.3s"):
            await table.settle(request, T0)
        assert ticks >= 10, "the event loop ran while the request waited"
        asyncio.get_running_loop().call_later(0.05, fcntl.flock, holder, fcntl.LOCK_UN)  # a short hold
        assert (await table.settle(request, T0)).short is None
    finally:
        ticker.cancel()
        os.close(holder)


# --- capacity ------------------------------------------------------------------------------------

def test_a_full_table_refuses_new_keys_and_takes_nothing(table: SharedCounters) -> None:
    for i in range(8):
        assert table.take(f"k{i}", 1.0, 2.0, T0)  # each full again at T0 + 1
    with pytest.raises(CountersFull, match=r"all 8 buckets in .*rate-counters are still refilling"):
        table.take("new", 1.0, 2.0, T0 + 0.5)
    with pytest.raises(CountersFull):
        table.take_all([Take("k0", 1.0, 2.0), Take("new", 1.0, 2.0)], T0 + 0.5)
    assert table.refused == 2
    # Known keys are still counted, and the refused take_all took nothing from k0.
    assert table.take("k0", 1.0, 2.0, T0 + 0.5, amount=1)
    assert not table.take("k0", 1.0, 2.0, T0 + 0.5)
    assert table.schedule("k1", 1.0, 2.0, T0 + 0.5) == T0 + 0.5


def test_buckets_full_again_give_their_slots_to_new_keys(table: SharedCounters) -> None:
    for i in range(7):
        assert table.take(f"k{i}", 1.0, 2.0, T0)  # full again at T0 + 1
    assert table.take("slow", 1.0, 2.0, T0, amount=2)  # full again at T0 + 2
    for i in range(7):
        assert table.take(f"new{i}", 1.0, 2.0, T0 + 1.0)
    assert len(table) == 8
    assert table.evicted == 7
    assert not table.take("slow", 1.0, 2.0, T0 + 1.0, amount=2), "a refilling bucket is kept"
    # An evicted bucket was a full one: eviction changes no answer.
    assert table.take("k0", 1.0, 2.0, T0 + 3.0, amount=2)


def test_buckets_in_debt_are_kept(table: SharedCounters) -> None:
    for _ in range(10):
        table.schedule("paced", 1.0, 1.0, T0)  # full again at T0 + 10
    for i in range(7):
        table.take(f"k{i}", 1.0, 1.0, T0)
    assert table.sweep(T0 + 9.9) == 7
    assert table.schedule("paced", 1.0, 1.0, T0 + 9.9) == pytest.approx(T0 + 10.0)


async def test_a_full_table_defers_the_recipient_through_the_pipeline(table: SharedCounters,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    for i in range(8):
        table.take(f"other{i}", 1.0, 2.0, T0)
    rules = build_config({"rate_limits": [{"name": "client", "key": "client", "rate": "1/h"}]}, "test").rate_limits
    pipeline = Pipeline([RateLimitPolicy(rules, lambda: T0)], counters=table)
    mailbox = parse_mailbox("someone@example.com")
    recipient = RecipientContext(mailbox=mailbox, key=mailbox.text, key_hash=key_hash(mailbox.text),
                                 domain_chain=("example.com",), sender="news@shop.test", client_ip="192.0.2.1",
                                 auth_user=None)
    with caplog.at_level(logging.ERROR):
        decision = await pipeline.decide(recipient)
    assert (decision.verdict, decision.rule, decision.reply) == (Verdict.DEFER, "ratelimit.error",
                                                                 replies.POLICY_FAILED)
    assert "rate counters full: all 8 buckets" in caplog.text and "raise [smtp] rate_limit_keys" in caplog.text


# --- the file --------------------------------------------------------------------------------------

def test_create_replaces_any_file_with_a_private_empty_table(path: Path) -> None:
    with SharedCounters.create(path, capacity=8) as first:
        first.take("k", 1.0, 1.0, T0)
    previous = os.umask(0)
    try:
        second = SharedCounters.create(path, capacity=16)
    finally:
        os.umask(previous)
    with second:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert (len(second), second.capacity) == (0, 16)
        assert second.take("k", 1.0, 1.0, T0)
        assert path.stat().st_size == 8 * (_HEADER_WORDS + _SLOT_WORDS * 32)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "no scratch file left"


def test_attach_refuses_what_is_not_a_table(path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        SharedCounters.attach(path)
    path.write_bytes(b"x" * 4096)
    with pytest.raises(ValueError, match=r"rate-counters is not a rate counters table .*SharedCounters.create"):
        SharedCounters.attach(path)
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="SharedCounters.create"):
        SharedCounters.attach(path)


def test_the_object_is_not_passed_between_processes(table: SharedCounters) -> None:
    with pytest.raises(TypeError, match=r"SharedCounters.attach\(path\)"):
        pickle.dumps(table)


def test_repr_shows_the_table(table: SharedCounters, path: Path) -> None:
    table.take("k", 1.0, 1.0, T0)
    assert repr(table) == f"<SharedCounters {path} buckets=1/8 evicted=0 refused=0>"
    table.close()
    assert repr(table) == f"<SharedCounters {path} closed>"


# --- the same answers as InMemoryCounters ----------------------------------------------------------

KEYS = [f"ratelimit.r:{i}" for i in range(40)]
RATES = (0.5, 1.0, 2.0, 4.0)  # with steps of 1/4 s, every token count and time stays exact
BURSTS = (1.0, 2.0, 3.0, 5.0, 8.0)


def request(index: int, amount: int) -> Take:
    return Take(KEYS[index], RATES[index % len(RATES)], BURSTS[index % len(BURSTS)], amount)


def operations(keys: int, steps: tuple[float, ...], min_size: int = 0) -> st.SearchStrategy[list[Any]]:
    """(kind, [(key index, amount)], clock step) lists over the first ``keys`` keys."""
    return st.lists(st.tuples(
        st.sampled_from(["take", "take_all", "schedule"]),
        st.lists(st.tuples(st.integers(0, keys - 1), st.integers(1, 9)), min_size=1, max_size=3),
        st.sampled_from(steps)), min_size=min_size, max_size=max(100, 2 * min_size))


def apply(counters: InMemoryCounters | SharedCounters, kind: str, takes: list[Take], now: float) -> object:
    if kind == "take":
        return counters.take(takes[0].key, takes[0].rate, takes[0].burst, now, takes[0].amount)
    if kind == "take_all":
        return counters.take_all(takes, now)
    return counters.schedule(takes[0].key, takes[0].rate, takes[0].burst, now)


def stored(table: SharedCounters) -> dict[int, tuple[int, float]]:
    """Slot -> (key hash, full-again time) of every occupied slot, read from the mapping."""
    words, floats = table._table._words, table._table._floats
    return {slot: (words[w], floats[w + 3]) for slot in range(table._table.slots)
            if words[w := _HEADER_WORDS + _SLOT_WORDS * slot]}


def assert_table_invariants(table: SharedCounters) -> None:
    """Linear probing's invariant: every key sits at its home slot or after it with no empty
    slot between; each key once; the header counts them. And the bounds that let a full table
    refuse without looking: no bucket is full again before the header's lower bound, nor
    before its round's bound in the slots the hand has passed."""
    slots = stored(table)
    n = table._table.slots
    hashes = [h for h, _ in slots.values()]
    assert len(set(hashes)) == len(hashes) == len(table)
    for slot, (h, _) in slots.items():
        between = h % n
        while between != slot:
            assert between in slots, f"slot {slot} unreachable from its home {h % n}"
            between = (between + 1) % n
    floats, hand = table._table._floats, table._table.header(_H_HAND)
    assert all(full_at >= floats[_H_EARLIEST] for _, full_at in slots.values())
    assert all(full_at >= floats[_H_ROUND_MIN] for slot, (_, full_at) in slots.items() if slot < hand)


@settings(max_examples=300, deadline=None)
@given(operations(keys=10, steps=(0.0, 0.0, 0.25, 0.5, 1.0, 4.0, -0.5, -3.0)))
def test_same_answers_as_in_memory_counters_with_room_for_every_key(ops: list[Any]) -> None:
    """With room for every key (and no two on one probe chain, so nothing is ever evicted),
    every answer is the in-memory one, clock stepping back included."""
    with scratch_table(capacity=64) as shared:
        n = shared._table.slots
        homes = sorted((key_hash(key) or 1) % n for key in KEYS[:10])
        assert all(b - a > 1 for a, b in zip(homes, homes[1:])), "the test needs keys on separate chains"
        reference = InMemoryCounters()
        now = T0
        for kind, requested, step in ops:
            now += step
            takes = [request(index, amount) for index, amount in requested]
            assert apply(shared, kind, takes, now) == apply(reference, kind, takes, now)
        assert shared.evicted == 0


@pytest.mark.parametrize("capacity, keys", [(4, 10), (20, 40)])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_a_small_table_evicts_and_refuses_exactly_when_it_must(capacity: int, keys: int, data: st.DataObject) -> None:
    """More keys than room, time going forward: chains and bounds stay right through
    evictions (at capacity 20, the hand's 16-slot steps leave it mid-table); a new key is
    refused only when every other bucket is still refilling; otherwise every answer is the
    in-memory one (a refused call took nothing, so the reference skips it)."""
    # Short steps forward: many buckets still refilling, so the table fills up.
    ops = data.draw(operations(keys, steps=(0.0, 0.0, 0.25, 0.5, 2.0), min_size=2 * capacity))
    with scratch_table(capacity) as shared:
        reference = InMemoryCounters()
        now = T0
        for kind, requested, step in ops:
            now += step
            takes = [request(index, amount) for index, amount in requested]
            try:
                answer = apply(shared, kind, takes, now)
            except CountersFull:
                own = {key_hash(take.key) or 1 for take in takes}
                assert len(shared) == capacity
                assert all(full_at > now for h, full_at in stored(shared).values() if h not in own)
            else:
                assert answer == apply(reference, kind, takes, now)
            assert_table_invariants(shared)

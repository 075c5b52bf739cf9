"""Rate-limit counters: token buckets behind a small interface (docs/design.md, "Scale").

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second; an absent
bucket is a full one. Time is the ``now`` the caller gives (the policies' clock), so
time-dependent behaviour is tested with an injected clock.

A policy never calls the counters itself (policies do no I/O): it asks for a ``Request`` —
everything one recipient or one message needs, in one atomic step — and the pipeline has it
``settle``d (policy/pipeline.py). Three implementations:

* ``InMemoryCounters``: one process, no I/O (here);
* ``SharedCounters``: the worker processes of one machine (shared_counters.py: a table in
  shared memory);
* ``RedisCounters``: every process of every guard instance (redis_counters.py: one Lua script
  per request, so one round trip, atomic across all the request's buckets).

``backends.open_counters`` chooses; nothing else changes: policies only see the Protocol. The
token-bucket rules are written once, here (``Bucket``, ``take_from``, ``reserve_from``,
``settle_on``): the two embedded implementations only say where buckets are kept (``Buckets``)
and make each call atomic. Redis runs them as Lua, a line-for-line translation that
tests/test_redis_counters.py holds to this one (the same operations, the same answers, to the
last bit).

An implementation with a fixed capacity may raise ``CountersFull`` for a key it cannot track;
one that cannot be reached raises ``CountersUnavailable``. The pipeline fails closed on both.

Pacing (hold-and-pace) uses the same buckets: a reservation takes a token now and may leave
the bucket in debt, so the n-th reservation of a backlog is due (n - tokens) / rate seconds
from now — releases are spaced by 1/rate and never exceed ``burst + rate x elapsed``, however
deep the backlog (the generic cell rate algorithm, expressed with a token count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

# A token due within this many seconds counts as there: at wall-clock magnitudes (1.7e9 s) a
# float time is only exact to about 2e-7 s, and "exactly 1/rate later" must not fall short.
SLACK = 1e-6


@dataclass(frozen=True)
class Take:
    """One request for ``amount`` tokens from the bucket ``key`` (``rate`` per second, ``burst``)."""

    key: str
    rate: float
    burst: float
    amount: int = 1


@dataclass(frozen=True)
class Request:
    """What one decision needs from the counters, settled in one atomic step:

    1. ``take_all``: every take, or none (the enforced "defer" rules). If one is short, the
       settlement names it and nothing else is done;
    2. ``groups``: each group all-or-nothing on its own (rules in shadow mode: what they would
       have done);
    3. ``reserve``: one token reserved from each, in order (the "hold" rules: pacing).

    A request larger than ``burst`` succeeds when the bucket is full and leaves it in debt
    (the average rate still holds); otherwise such a request could never pass.
    """

    take_all: tuple[Take, ...] = ()
    groups: tuple[tuple[Take, ...], ...] = ()
    reserve: tuple[Take, ...] = ()  # their amounts are not read: a reservation is one token


@dataclass(frozen=True)
class Settlement:
    """What became of a ``Request``: ``short``, the first take of ``take_all`` that could not be
    met (then nothing was taken and the rest is empty); else, per group, whether it was met,
    and per reservation when its token is (or was) there: ``now``, or later for a bucket in debt."""

    short: Take | None
    met: tuple[bool, ...] = ()
    due: tuple[float, ...] = ()


class RateCounters(Protocol):
    """Token buckets shared by every policy that limits a rate."""

    async def settle(self, request: Request, now: float) -> Settlement:
        """Settle ``request`` atomically at ``now``. Raises ``CountersFull`` or
        ``CountersUnavailable``; the request may then have been settled in part (tokens taken
        and not given back: the limits err on the slow side)."""

    async def probe(self) -> str | None:
        """What keeps the counters from answering right now (for ``/readyz``), or None."""


@dataclass(slots=True)
class Bucket:
    """One token bucket: ``tokens`` as of ``updated``. Negative tokens are debt (pacing)."""

    tokens: float
    updated: float

    def refill(self, rate: float, burst: float, now: float) -> None:
        # A clock that steps back (wall-clock adjustment) neither adds nor removes tokens.
        if now > self.updated:
            self.tokens = min(burst, self.tokens + (now - self.updated) * rate)
            self.updated = now

    def can_take(self, amount: float, rate: float, burst: float) -> bool:
        return self.tokens + rate * SLACK >= min(amount, burst)

    def full_at(self, rate: float, burst: float) -> float:
        """When the bucket is full again, and so the same as no bucket (eviction)."""
        return self.updated + max(0.0, burst - self.tokens) / rate

    def due(self, rate: float, now: float) -> float:
        """When the last token taken is there: ``now``, or once the debt is paid back."""
        if self.tokens + rate * SLACK >= 0:
            return now
        return now + (-self.tokens) / rate


class CountersFull(Exception):
    """A ``RateCounters`` of fixed capacity cannot track one more key: every bucket it holds
    is still refilling. Nothing was taken. The pipeline defers (451 4.3.5, fail closed): a
    limiter that cannot count a key must neither let that key's mail through nor crash."""


class CountersUnavailable(Exception):
    """The counters cannot be reached (Redis down, too slow, refusing): the request may or may
    not have been settled. The pipeline defers the recipient (451 4.3.0) unless ``[counters]
    on_error = "allow"``; never silently unlimited. The text says what failed, for the log."""


class Buckets(Protocol):
    """Where a ``RateCounters`` keeps its buckets, for ``take_from`` and ``reserve_from``.

    The caller makes one ``take_from`` or ``reserve_from`` atomic (a lock, or one thread).
    """

    def load(self, key: str, rate: float, burst: float, now: float) -> Bucket:
        """The bucket ``key`` refilled to ``now``, kept so; created full if there is none.
        May raise ``CountersFull`` (then nothing has been taken)."""

    def save(self, key: str, bucket: Bucket, rate: float, burst: float) -> None:
        """Keep ``bucket``, loaded earlier in the same operation, with its tokens now."""


def take_from(buckets: Buckets, takes: Sequence[Take], now: float) -> Take | None:
    """All-or-nothing on ``buckets``: every take, or none; the first short one (None: all were
    taken). Every bucket is loaded before any is changed,
    so a short bucket (or ``CountersFull``) leaves every bucket as it was."""
    # Requests for the same key add up before checking (two rules may share a bucket only
    # by name, but one rule may ask for the same key twice, e.g. two recipients' domain).
    needed: dict[str, float] = {}
    first: dict[str, Take] = {}
    for take in takes:
        needed[take.key] = needed.get(take.key, 0.0) + take.amount
        first.setdefault(take.key, take)
    loaded = {key: buckets.load(key, take.rate, take.burst, now) for key, take in first.items()}
    for key, bucket in loaded.items():
        if not bucket.can_take(needed[key], first[key].rate, first[key].burst):
            return first[key]
    for key, bucket in loaded.items():
        bucket.tokens -= needed[key]
        buckets.save(key, bucket, first[key].rate, first[key].burst)
    return None


def reserve_from(buckets: Buckets, key: str, rate: float, burst: float, now: float) -> float:
    """One reservation on ``buckets``: take a token, into debt if need be; when it is due."""
    bucket = buckets.load(key, rate, burst, now)
    bucket.tokens -= 1
    buckets.save(key, bucket, rate, burst)
    return bucket.due(rate, now)


def settle_on(buckets: Buckets, request: Request, now: float) -> Settlement:
    """``RateCounters.settle`` on ``buckets`` (the caller makes the whole of it atomic)."""
    short = take_from(buckets, request.take_all, now)
    if short is not None:
        return Settlement(short)
    met = tuple(take_from(buckets, group, now) is None for group in request.groups)
    due = tuple(reserve_from(buckets, take.key, take.rate, take.burst, now) for take in request.reserve)
    return Settlement(None, met, due)


class InMemoryCounters:
    """The embedded ``RateCounters``: a dict of buckets, synchronous, no I/O.

    Memory stays bounded: a bucket that has been idle long enough to be full again is the
    same as no bucket, and is evicted. Eviction sweeps run when the number of buckets has
    doubled since the last sweep (amortized O(1) per call), so memory is at most twice the
    buckets still refilling — those touched within their own ``burst / rate`` seconds.
    """

    def __init__(self, min_sweep: int = 1024) -> None:
        self._buckets: dict[str, Bucket] = {}
        # Full-again time per bucket, for eviction (rate and burst come with each call).
        self._full_at: dict[str, float] = {}
        self._min_sweep = min_sweep
        self._sweep_at = min_sweep

    def __len__(self) -> int:
        return len(self._buckets)

    def __repr__(self) -> str:
        return f"<InMemoryCounters buckets={len(self._buckets)} next_sweep_at={self._sweep_at}>"

    async def settle(self, request: Request, now: float) -> Settlement:
        return settle_on(self, request, now)  # never suspends: the loop is its lock

    async def probe(self) -> str | None:
        return None

    # The same operations one at a time, synchronously (tests and benchmarks).

    def take(self, key: str, rate: float, burst: float, now: float, amount: int = 1) -> bool:
        return take_from(self, (Take(key, rate, burst, amount),), now) is None

    def take_all(self, takes: Sequence[Take], now: float) -> Take | None:
        return take_from(self, takes, now)

    def schedule(self, key: str, rate: float, burst: float, now: float) -> float:
        return reserve_from(self, key, rate, burst, now)

    def sweep(self, now: float) -> int:
        """Evict the buckets that are full again by ``now``; returns how many."""
        idle = [key for key, full_at in self._full_at.items() if full_at <= now]
        for key in idle:
            del self._buckets[key]
            del self._full_at[key]
        self._sweep_at = max(self._min_sweep, 2 * len(self._buckets))
        return len(idle)

    def load(self, key: str, rate: float, burst: float, now: float) -> Bucket:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.refill(rate, burst, now)
            return bucket
        if len(self._buckets) >= self._sweep_at:
            self.sweep(now)
        bucket = self._buckets[key] = Bucket(tokens=burst, updated=now)
        self._full_at[key] = now
        return bucket

    def save(self, key: str, bucket: Bucket, rate: float, burst: float) -> None:
        # A sweep while loading a later key of the same take_all may have evicted this one
        # (it was full then): it comes back with the tokens taken.
        self._buckets[key] = bucket
        self._full_at[key] = bucket.full_at(rate, burst)

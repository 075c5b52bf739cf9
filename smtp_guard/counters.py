"""Rate-limit counters: token buckets behind a small interface (docs/design.md, "Scale").

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second; an absent
bucket is a full one. Policies call the interface synchronously with the time (``now``) they
were given, so time-dependent behaviour is tested with an injected clock.

``InMemoryCounters`` is the embedded implementation: one process, no I/O. Several worker
processes or guard instances need one shared state instead; that is a second implementation
of ``RateCounters`` (Redis: one hash per key with ``tokens`` and ``updated``, each method one
Lua script so that ``take_all`` stays all-or-nothing across keys), chosen in ``app.py``.
Nothing else changes: policies only see the Protocol.

Pacing (hold-and-pace) uses the same buckets: ``schedule`` reserves a token now and may leave
the bucket in debt, so the n-th reservation of a backlog is due (n - tokens) / rate seconds
from now — releases are spaced by 1/rate and never exceed ``burst + rate x elapsed``, however
deep the backlog (the generic cell rate algorithm, expressed with a token count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

# A token due within this many seconds counts as there: at wall-clock magnitudes (1.7e9 s) a
# float time is only exact to about 2e-7 s, and "exactly 1/rate later" must not fall short.
_SLACK = 1e-6


@dataclass(frozen=True)
class Take:
    """One request for ``amount`` tokens from the bucket ``key`` (``rate`` per second, ``burst``)."""

    key: str
    rate: float
    burst: float
    amount: int = 1


class RateCounters(Protocol):
    """Token buckets shared by every policy that limits a rate.

    A request larger than ``burst`` succeeds when the bucket is full and leaves it in debt
    (the average rate still holds); otherwise such a request could never pass.
    """

    def take(self, key: str, rate: float, burst: float, now: float, amount: int = 1) -> bool:
        """Take ``amount`` tokens if they are there; False (and nothing taken) otherwise."""

    def take_all(self, takes: Sequence[Take], now: float) -> Take | None:
        """All-or-nothing: take every request, or none. Returns None when all were taken,
        else the first request that could not be met (nothing was taken)."""

    def schedule(self, key: str, rate: float, burst: float, now: float) -> float:
        """Reserve one token; return when it is (or was) available: ``now`` if a token is
        there, else a later time. Reservations queue up: the bucket goes into debt."""


@dataclass
class _Bucket:
    tokens: float
    updated: float

    def refill(self, rate: float, burst: float, now: float) -> None:
        # A clock that steps back (wall-clock adjustment) neither adds nor removes tokens.
        if now > self.updated:
            self.tokens = min(burst, self.tokens + (now - self.updated) * rate)
            self.updated = now

    def can_take(self, amount: float, rate: float, burst: float) -> bool:
        return self.tokens + rate * _SLACK >= min(amount, burst)

    def full_at(self, rate: float, burst: float) -> float:
        return self.updated + max(0.0, burst - self.tokens) / rate


class InMemoryCounters:
    """The embedded ``RateCounters``: a dict of buckets, synchronous, no I/O.

    Memory stays bounded: a bucket that has been idle long enough to be full again is the
    same as no bucket, and is evicted. Eviction sweeps run when the number of buckets has
    doubled since the last sweep (amortized O(1) per call), so memory is at most twice the
    buckets still refilling — those touched within their own ``burst / rate`` seconds.
    """

    def __init__(self, min_sweep: int = 1024) -> None:
        self._buckets: dict[str, _Bucket] = {}
        # Full-again time per bucket, for eviction (rate and burst come with each call).
        self._full_at: dict[str, float] = {}
        self._min_sweep = min_sweep
        self._sweep_at = min_sweep

    def __len__(self) -> int:
        return len(self._buckets)

    def __repr__(self) -> str:
        return f"<InMemoryCounters buckets={len(self._buckets)} next_sweep_at={self._sweep_at}>"

    def take(self, key: str, rate: float, burst: float, now: float, amount: int = 1) -> bool:
        return self.take_all([Take(key, rate, burst, amount)], now) is None

    def take_all(self, takes: Sequence[Take], now: float) -> Take | None:
        # Requests for the same key add up before checking (two rules may share a bucket only
        # by name, but one rule may ask for the same key twice, e.g. two recipients' domain).
        needed: dict[str, float] = {}
        first: dict[str, Take] = {}
        for take in takes:
            needed[take.key] = needed.get(take.key, 0.0) + take.amount
            first.setdefault(take.key, take)
        buckets = {key: self._refilled(key, t.rate, t.burst, now) for key, t in first.items()}
        for key, bucket in buckets.items():
            if not bucket.can_take(needed[key], first[key].rate, first[key].burst):
                return first[key]
        for key, bucket in buckets.items():
            bucket.tokens -= needed[key]
            self._store(key, bucket, first[key].rate, first[key].burst)
        return None

    def schedule(self, key: str, rate: float, burst: float, now: float) -> float:
        bucket = self._refilled(key, rate, burst, now)
        bucket.tokens -= 1
        self._store(key, bucket, rate, burst)
        if bucket.tokens + rate * _SLACK >= 0:
            return now
        return now + (-bucket.tokens) / rate

    def sweep(self, now: float) -> int:
        """Evict the buckets that are full again by ``now``; returns how many."""
        idle = [key for key, full_at in self._full_at.items() if full_at <= now]
        for key in idle:
            del self._buckets[key]
            del self._full_at[key]
        self._sweep_at = max(self._min_sweep, 2 * len(self._buckets))
        return len(idle)

    def _refilled(self, key: str, rate: float, burst: float, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            return _Bucket(tokens=burst, updated=now)
        bucket.refill(rate, burst, now)
        return bucket

    def _store(self, key: str, bucket: _Bucket, rate: float, burst: float) -> None:
        if key not in self._buckets and len(self._buckets) >= self._sweep_at:
            self.sweep(bucket.updated)
        self._buckets[key] = bucket
        self._full_at[key] = bucket.full_at(rate, burst)

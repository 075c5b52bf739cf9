"""A stream's counts for the breaker, and the claim of its trip: the arithmetic, kept in memory.

The breaker policy never counts itself (policies do no I/O): for each message it asks for one
``CountRequest`` — these recipients (64-bit key hashes, in order) of stream S, and of body B
when a fan-out detector counts bodies — and the pipeline has it counted in one step by the
guard's ``StreamTallies`` (docs/design.md, "Scale"):

* ``MemoryTallies`` (here): one process — the guard's, or a multi-worker guard's supervisor's;
* ``RedisTallies`` (``redis_tally.py``): every guard instance on one Redis, one Lua script per
  message, so a stream spread over several guards is counted once. The script is this module
  translated function by function; tests/test_redis_tally.py holds the two to the same answers.

Per stream, a **tally**: the recipients seen within the sliding ``window`` (with the time each
was last seen), ``size`` (recipients new to the window since the stream started: its audience)
and when it last counted one. Memory is bounded: past ``cap`` remembered recipients — far past
every limit — new ones are only counted (``overflow``), so a runaway stream of millions costs a
counter, not a set. Per (stream, body), the distinct recipients of that exact body, forgotten
once the body has not been seen for ``window``.

A tally's time never goes back: a request whose ``now`` is behind the tally's last count (a
clock stepped back, or a guard whose clock is behind another's) counts at the tally's time.

**The trip is claimed where the counts are.** A request carries ``bounds``, the limits of the
rules in force (``rules.py``); after counting each recipient, the first bound its count exceeds
trips the stream, and the tally records the trip (``Trip``) unless one is recorded already. A
trip is recorded on top of the admin decision the asking guard knew (``basis``, the decision's
``decided_at``), so an approval makes older trips stale and the stream can trip again past its
new ceiling; a trip on top of a decision the asking guard has not seen yet is newer than what it
knows, and binds it too. So, whichever guards count a stream, it trips once, and each guard
learns of the trip with its next message of the stream.

**A stream ends** when it has counted no recipient for ``stream_idle``: ``finish`` removes it
(its audience teaches the sender's baseline, ``state.py``) and tells exactly one caller so.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence

# Bodies remembered in memory for the fan-out detector. A fan-out is the same body many times
# in a short while, so forgetting the least recently seen bodies past this loses nothing. (In
# Redis each body expires on its own instead.)
MAX_BODIES = 100_000

Measure = Literal["window", "size", "body"]


@dataclass(frozen=True)
class Bound:
    """Trip the stream once its ``measure`` exceeds ``limit``: the rule ``rule``'s threshold."""

    rule: str
    measure: Measure
    limit: int


@dataclass(frozen=True)
class Trip:
    """A stream's trip as its tally records it: which rule, past which limit, when, and on top
    of which admin decision (``basis``, its ``decided_at``; None for a stream never decided)."""

    rule: str
    threshold: int
    at: float
    basis: float | None


@dataclass(frozen=True)
class CountRequest:
    """Count ``recipients`` (key hashes, in order) into ``stream`` at ``now`` and, with ``body``,
    into that body's recipients; trip the stream at the first recipient past one of ``bounds``
    unless it has a trip on top of ``basis`` (or newer) already."""

    stream: str
    recipients: tuple[int, ...]
    body: str | None
    now: float
    window: float
    stream_idle: float  # how long an idle tally must be kept (Redis lets it expire some time later)
    cap: int  # recipients remembered exactly
    carry: int  # the audience a new tally starts from: a tripped stream's, which keeps growing
    basis: float | None
    bounds: tuple[Bound, ...]


@dataclass(frozen=True)
class Counted:
    """The counts just after each recipient was counted, in the request's order; the stream's
    trip (at the request's basis or newer), and ``claimed``: the position of the recipient at
    which this request tripped it (None: it was tripped before, or is not)."""

    window: tuple[int, ...]
    size: tuple[int, ...]
    body: tuple[int, ...]  # zeros when no body was counted
    last_seen: float
    trip: Trip | None
    claimed: int | None


@dataclass(frozen=True)
class Ending:
    """What ``finish`` found for one stream: ``finished`` by this call (with its audience),
    still ``active`` (its last recipient counted at ``last_seen``), or ``gone`` already
    (finished by another guard, or expired)."""

    state: Literal["finished", "active", "gone"]
    size: int = 0
    last_seen: float = 0.0


class StreamTallies(Protocol):
    """Where the breaker counts streams (``BreakerState.tallies``)."""

    async def count(self, request: CountRequest) -> Counted:
        """Count one message's recipients, atomically. Raises ``CountersUnavailable`` when
        the tallies cannot be reached (they may then have counted it or not)."""

    async def sizes(self, streams: Sequence[str]) -> dict[str, int]:
        """The audience of each of ``streams`` that has a tally."""

    async def finish(self, streams: Sequence[str], now: float, stream_idle: float) -> dict[str, Ending]:
        """End each of ``streams`` that has counted no recipient for ``stream_idle``."""


def version(basis: float | None) -> float:
    """A trip's basis as a version: any admin decision is newer than none."""
    return float("-inf") if basis is None else basis


def is_current(trip: Trip | None, basis: float | None) -> bool:
    """Whether ``trip`` binds a guard that knows the decision ``basis``: it was recorded on top
    of that decision or a newer one (older trips were superseded by the decision)."""
    return trip is not None and version(trip.basis) >= version(basis)


def exceeded(bounds: Sequence[Bound], window: int, size: int, body: int) -> Bound | None:
    """The first bound the counts exceed."""
    for bound in bounds:
        value = window if bound.measure == "window" else size if bound.measure == "size" else body
        if value > bound.limit:
            return bound
    return None


@dataclass
class StreamTally:
    last_seen: float
    size: int = 0  # recipients new to the window since the stream started: its audience
    overflow: int = 0  # new recipients counted but not remembered (past the cap)
    trip: Trip | None = None
    _seen: OrderedDict[int, float] = field(default_factory=OrderedDict, repr=False)  # key hash -> last seen

    def add(self, key_hash: int, now: float, window: float, cap: int) -> None:
        """Count one recipient at ``now`` (never before ``last_seen``)."""
        self.last_seen = now
        self._forget_before(now - window)
        if key_hash in self._seen:
            self._seen[key_hash] = now
            self._seen.move_to_end(key_hash)
            return
        if len(self._seen) < cap:
            self._seen[key_hash] = now
        else:
            self.overflow += 1
        self.size += 1

    def in_window(self) -> int:
        """Distinct recipients seen within the window as of the last count (approximate once
        past the cap)."""
        return len(self._seen) + self.overflow

    def _forget_before(self, horizon: float) -> None:
        # Times only grow along the dict (a tally's time never goes back), so the front holds
        # the oldest: everything before the horizon is there.
        while self._seen:
            key, seen = next(iter(self._seen.items()))
            if seen >= horizon:
                return
            del self._seen[key]


@dataclass
class _Body:
    last_seen: float
    recipients: set[int] = field(default_factory=set)


class MemoryTallies:
    """The embedded ``StreamTallies``: synchronous, no I/O; the event loop makes each call atomic."""

    def __init__(self) -> None:
        self.tallies: dict[str, StreamTally] = {}
        self._bodies: OrderedDict[tuple[str, str], _Body] = OrderedDict()

    def __repr__(self) -> str:
        return f"<MemoryTallies streams={len(self.tallies)} bodies={len(self._bodies)}>"

    async def count(self, request: CountRequest) -> Counted:
        tally = self.tallies.get(request.stream)
        if tally is None:
            tally = self.tallies[request.stream] = StreamTally(request.now, size=request.carry)
        now = max(request.now, tally.last_seen)
        trip = tally.trip if is_current(tally.trip, request.basis) else None
        claimed: int | None = None
        window: list[int] = []
        size: list[int] = []
        body: list[int] = []
        for position, key_hash in enumerate(request.recipients):
            tally.add(key_hash, now, request.window, request.cap)
            window.append(tally.in_window())
            size.append(tally.size)
            body.append(0 if request.body is None else self._add_body(
                request.stream, request.body, key_hash, now, request.window, request.cap))
            if trip is None and (bound := exceeded(request.bounds, window[-1], size[-1], body[-1])) is not None:
                trip = tally.trip = Trip(bound.rule, bound.limit, now, request.basis)
                claimed = position
        return Counted(tuple(window), tuple(size), tuple(body), tally.last_seen, trip, claimed)

    async def sizes(self, streams: Sequence[str]) -> dict[str, int]:
        return {stream: self.tallies[stream].size for stream in streams if stream in self.tallies}

    async def finish(self, streams: Sequence[str], now: float, stream_idle: float) -> dict[str, Ending]:
        endings: dict[str, Ending] = {}
        for stream in streams:
            tally = self.tallies.get(stream)
            if tally is None:
                endings[stream] = Ending("gone")
            elif now - tally.last_seen < stream_idle:
                endings[stream] = Ending("active", last_seen=tally.last_seen)
            else:
                del self.tallies[stream]
                endings[stream] = Ending("finished", size=tally.size)
        return endings

    def _add_body(self, stream: str, body_hash: str, key_hash: int, now: float, window: float, cap: int) -> int:
        """Count one recipient of one exact body; returns the body's distinct recipients."""
        key = (stream, body_hash)
        body = self._bodies.pop(key, None)
        if body is None or body.last_seen < now - window:  # new, or not seen for a window: counted anew
            while len(self._bodies) >= MAX_BODIES:
                self._bodies.popitem(last=False)
            body = _Body(now)
        body.last_seen = now
        self._bodies[key] = body  # the most recently seen, at the end
        if len(body.recipients) < cap:
            body.recipients.add(key_hash)
        return len(body.recipients)

"""The hot state of the volume breaker, approval gates and fan-out detector, in memory.

Policies read and update it synchronously at the end of DATA (no I/O on the hot path); the
breaker sync task (``sync.py``) persists trips and learned baselines and reads admin
decisions back. Per stream it keeps:

* a **tally**: the recipients seen (64-bit key hashes, with the time each was last seen, for
  the sliding window) and the stream's size (distinct recipients since it started). Memory is
  bounded: past ``cap`` remembered recipients — far past every limit — new ones are only
  counted (``overflow``), so a runaway stream of millions costs a counter, not a set;
* a **trip** (``BreakerRecord``) once a rule tripped: tripped, approved (with a ceiling) or
  cancelled. Trips are few (each is an incident) and stay in memory;
* for personal classes, per body hash, the distinct recipients of that exact body (bounded
  to the most recent ``MAX_BODIES`` bodies within the window).

Baselines (a sender's usual stream size) are learned when a stream has been idle for
``stream_idle``: its size is folded into an exponentially decayed average.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Iterable, Protocol

from ..config import BreakerConfig
from .model import Baseline, BreakerRecord

# Bodies remembered for the fan-out detector. A fan-out is the same body many times in a short
# while, so evicting bodies seen once long ago loses nothing.
MAX_BODIES = 100_000


class BreakerObserver(Protocol):
    """Told about trips and decisions (metrics and audit); must not block."""

    def tripped(self, record: BreakerRecord) -> None: ...

    def decided(self, verdict: str, rule: str, message_class: str, recipients: int) -> None: ...


@dataclass
class StreamTally:
    stream: str
    sender: str
    message_class: str
    last_seen: float
    size: int = 0  # distinct recipients since the stream started: the audience size
    overflow: int = 0  # new recipients counted but not remembered (past the cap)
    _seen: OrderedDict[int, float] = field(default_factory=OrderedDict, repr=False)  # key hash -> last seen

    def add(self, key_hash: int, now: float, window: float, cap: int) -> bool:
        """Count one recipient; True when it is new to the stream."""
        self.last_seen = now
        self._forget_before(now - window)
        if key_hash in self._seen:
            self._seen[key_hash] = now
            self._seen.move_to_end(key_hash)
            return False
        if len(self._seen) < cap:
            self._seen[key_hash] = now
        else:
            self.overflow += 1
        self.size += 1
        return True

    def in_window(self, now: float, window: float) -> int:
        """Distinct recipients seen within the window (approximate once past the cap)."""
        self._forget_before(now - window)
        return len(self._seen) + self.overflow

    def _forget_before(self, horizon: float) -> None:
        while self._seen:
            key, seen = next(iter(self._seen.items()))
            if seen >= horizon:
                return
            del self._seen[key]


@dataclass
class _Body:
    last_seen: float
    recipients: set[int] = field(default_factory=set)


class BreakerState:
    def __init__(self, config: BreakerConfig, observer: BreakerObserver | None = None) -> None:
        self.config = config
        self.tallies: dict[str, StreamTally] = {}
        self.trips: dict[str, BreakerRecord] = {}
        # Trips of rules in shadow mode: never enforced or persisted, only reported.
        self.shadow_trips: dict[str, str] = {}  # stream -> rule
        self.baselines: dict[str, Baseline] = {}
        self.observer = observer
        self._bodies: OrderedDict[tuple[str, str], _Body] = OrderedDict()
        self._dirty: set[str] = set()

    def __repr__(self) -> str:
        return (f"<BreakerState streams={len(self.tallies)} tripped={self.tripped_count()} "
                f"baselines={len(self.baselines)} bodies={len(self._bodies)}>")

    # --- hot path (synchronous) ----------------------------------------------------------

    def tally(self, stream: str, sender: str, message_class: str, now: float) -> StreamTally:
        tally = self.tallies.get(stream)
        if tally is None:
            trip = self.trips.get(stream)
            # A tripped stream's audience keeps growing across restarts and pauses; an
            # approved one that went idle starts a new send under its ceiling.
            size = 0
            if trip is not None and (trip.status != "approved" or now - trip.updated_at < self.config.stream_idle):
                size = trip.recipients
            tally = self.tallies[stream] = StreamTally(stream, sender, message_class, now, size=size)
        return tally

    def add_body(self, stream: str, body_hash: str, key_hash: int, now: float, cap: int) -> int:
        """Count one recipient of one exact body; returns the body's distinct recipients."""
        horizon = now - self.config.window
        while self._bodies and (len(self._bodies) >= MAX_BODIES or next(iter(self._bodies.values())).last_seen < horizon):
            self._bodies.popitem(last=False)
        key = (stream, body_hash)
        body = self._bodies.get(key)
        if body is None:
            body = self._bodies[key] = _Body(now)
        body.last_seen = now
        self._bodies.move_to_end(key)
        if len(body.recipients) < cap:
            body.recipients.add(key_hash)
        return len(body.recipients)

    def baseline(self, sender: str) -> float | None:
        known = self.baselines.get(sender)
        return None if known is None else known.baseline

    def trip(self, tally: StreamTally, rule: str, threshold: int, now: float) -> BreakerRecord:
        """The stream tripped (first time, or again past an approved ceiling)."""
        previous = self.trips.get(tally.stream)
        record = BreakerRecord(
            stream=tally.stream, rule=rule if previous is None else previous.rule, sender=tally.sender,
            message_class=tally.message_class, status="tripped", threshold=threshold,
            ceiling=None if previous is None else previous.ceiling, recipients=tally.size, tripped_at=now,
            updated_at=now,
            # The decision this trip is based on: the store keeps a newer one if an admin made it.
            decided_by="" if previous is None else previous.decided_by,
            decided_at=None if previous is None else previous.decided_at,
        )
        self.trips[tally.stream] = record
        self._dirty.add(tally.stream)
        if self.observer is not None:
            self.observer.tripped(record)
        return record

    def decided(self, verdict: str, rule: str, message_class: str, recipients: int) -> None:
        if self.observer is not None and recipients:
            self.observer.decided(verdict, rule, message_class, recipients)

    def tripped_count(self) -> int:
        return sum(1 for trip in self.trips.values() if trip.status == "tripped")

    # --- sync (called by the sync task, between messages) --------------------------------

    def load(self, records: list[BreakerRecord], baselines: list[Baseline]) -> None:
        self.trips = {record.stream: record for record in records}
        self.baselines = {baseline.sender: baseline for baseline in baselines}

    def apply(self, record: BreakerRecord) -> BreakerRecord | None:
        """Take an admin decision read from the store; returns the previous record when it
        changed anything (None: already known)."""
        known = self.trips.get(record.stream)
        if known is not None and known.decided_at is not None and record.decided_at is not None \
                and record.decided_at <= known.decided_at:
            return None
        if known is None:
            self.trips[record.stream] = record
            return record
        self.trips[record.stream] = replace(
            known, status=record.status, ceiling=record.ceiling, decided_by=record.decided_by,
            decided_at=record.decided_at)
        return known

    def dirty(self, now: float) -> list[BreakerRecord]:
        """Trips whose counts changed since the last call, with their current audience size."""
        for stream, trip in self.trips.items():
            tally = self.tallies.get(stream)
            if tally is not None and tally.size != trip.recipients:
                self.trips[stream] = replace(trip, recipients=tally.size, updated_at=now)
                self._dirty.add(stream)
        records = [self.trips[stream] for stream in sorted(self._dirty) if stream in self.trips]
        self._dirty.clear()
        return records

    def mark_dirty(self, streams: Iterable[str]) -> None:
        """Write these again next time (the store refused them)."""
        self._dirty.update(streams)

    def finish_idle(self, now: float) -> list[Baseline]:
        """Forget streams idle for ``stream_idle``; fold the size of each one that went out
        (no trip, an approved one, or only a shadow trip) into its sender's baseline."""
        learned: dict[str, Baseline] = {}
        for stream, tally in list(self.tallies.items()):
            if now - tally.last_seen < self.config.stream_idle:
                continue
            del self.tallies[stream]
            self.shadow_trips.pop(stream, None)
            trip = self.trips.get(stream)
            if trip is not None and trip.status != "approved":
                continue  # cancelled, or still waiting for an admin: not what the sender usually sends
            learned[tally.sender] = self.learn(tally.sender, tally.size, now)
        return list(learned.values())

    def learn(self, sender: str, size: int, now: float) -> Baseline:
        known = self.baselines.get(sender)
        rate = self.config.learning_rate
        if known is None:
            baseline = Baseline(sender, float(size), 1, now)
        else:
            baseline = Baseline(sender, (1 - rate) * known.baseline + rate * size, known.streams + 1, now)
        self.baselines[sender] = baseline
        return baseline

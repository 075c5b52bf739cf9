"""The breaker's state in one guard: trips, shadow trips, learned baselines, and the streams it
counts.

The breaker policy reads and updates it synchronously at the end of DATA; the breaker sync task
(``sync.py``) persists trips and learned baselines and reads admin decisions, and trips made by
other guards, back. The counts themselves are kept by ``tallies`` (``tally.py``): in this
process, or in Redis for every guard instance. Here:

* **trips** (``BreakerRecord``): tripped, approved (with a ceiling) or cancelled. Trips are
  few (each is an incident) and stay in memory. A trip this guard claimed is reported (metrics,
  audit trail); one another guard claimed is only adopted — it was reported there;
* **shadow trips**: rules in shadow mode that would have tripped a stream, reported with each
  later recipient; never enforced or persisted, and each guard's own;
* **active streams**: the ones this guard has counted and not seen end — with the sender and
  class of the first message it counted (for the trip record and the baseline), and the time
  and audience of the last count;
* **baselines**: a sender's usual stream size, learned when a stream has been idle for
  ``stream_idle`` — its size is folded into an exponentially decayed average.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Protocol

from ..config import BreakerConfig
from .model import Baseline, BreakerRecord
from .tally import Counted, Ending, MemoryTallies, StreamTallies, Trip, version


class BreakerObserver(Protocol):
    """Told about trips and decisions (metrics and audit); must not block."""

    def tripped(self, record: BreakerRecord) -> None: ...

    def decided(self, verdict: str, rule: str, message_class: str, recipients: int) -> None: ...


@dataclass
class ActiveStream:
    sender: str
    message_class: str
    last_seen: float  # the tally's time at the last count (or as ``finish`` last found it)
    size: int  # the audience after the last count


@dataclass(frozen=True)
class Ended:
    """Streams that ended: ``learn`` (sender, audience) of each one this guard finished and
    that went out; the senders of streams another guard finished (``elsewhere``)."""

    learn: tuple[tuple[str, int], ...]
    elsewhere: frozenset[str]


class BreakerState:
    def __init__(self, config: BreakerConfig, observer: BreakerObserver | None = None,
                 tallies: StreamTallies | None = None) -> None:
        """``tallies``: where streams are counted (Redis, shared by every guard instance); by
        default in this process."""
        self.config = config
        self.tallies: StreamTallies = tallies if tallies is not None else MemoryTallies()
        self.active: dict[str, ActiveStream] = {}
        self.trips: dict[str, BreakerRecord] = {}
        # Trips of rules in shadow mode: never enforced or persisted, only reported.
        self.shadow_trips: dict[str, str] = {}  # stream -> rule
        self.baselines: dict[str, Baseline] = {}
        self.observer = observer
        self._dirty: set[str] = set()

    def __repr__(self) -> str:
        return (f"<BreakerState streams={len(self.active)} tripped={self.tripped_count()} "
                f"baselines={len(self.baselines)} {self.tallies!r}>")

    # --- hot path (synchronous) ----------------------------------------------------------

    def carry(self, stream: str, now: float) -> int:
        """The audience a new tally of ``stream`` starts from."""
        trip = self.trips.get(stream)
        # A tripped stream's audience keeps growing across restarts and pauses; an approved one
        # that went idle starts a new send under its ceiling.
        if trip is not None and (trip.status != "approved" or now - trip.updated_at < self.config.stream_idle):
            return trip.recipients
        return 0

    def counted(self, stream: str, sender: str, message_class: str, counted: Counted) -> ActiveStream:
        """One message of ``stream`` was counted."""
        active = self.active.get(stream)
        if active is None:
            active = self.active[stream] = ActiveStream(sender, message_class, counted.last_seen, counted.size[-1])
        else:
            active.last_seen, active.size = counted.last_seen, counted.size[-1]
        return active

    def baseline(self, sender: str) -> float | None:
        known = self.baselines.get(sender)
        return None if known is None else known.baseline

    def trip(self, stream: str, active: ActiveStream, trip: Trip, recipients: int, now: float) -> BreakerRecord:
        """This guard's count tripped the stream (first time, or again past an approved
        ceiling): recorded and reported, once for all guards."""
        previous = self.trips.get(stream)
        if previous is not None and version(previous.decided_at) > version(trip.basis):
            return previous  # an admin decided while the count was on its way: the decision stands
        record = _tripped(stream, active, trip, recipients, now, previous)
        self._enforce(record)
        if self.observer is not None:
            self.observer.tripped(record)
        return record

    def adopt(self, stream: str, active: ActiveStream, trip: Trip, recipients: int, now: float) -> BreakerRecord:
        """Another guard's count tripped the stream (it reported the trip): in force here too,
        from this message on."""
        known = self.trips.get(stream)
        if known is not None and (known.status != "approved" or version(known.decided_at) > version(trip.basis)):
            return known  # tripped or cancelled here already, or decided since that trip
        record = _tripped(stream, active, trip, recipients, now, known)
        # Written to the store by this guard as well: the same record, whoever writes it first.
        self._enforce(record)
        return record

    def _enforce(self, record: BreakerRecord) -> None:
        self.trips[record.stream] = record
        self.shadow_trips.pop(record.stream, None)
        self._dirty.add(record.stream)

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

    def adopt_stored(self, record: BreakerRecord) -> None:
        """A trip read from the store: another guard's, for a stream this guard may not have
        counted since (or a re-trip past the ceiling of a decision it knows)."""
        known = self.trips.get(record.stream)
        if known is None or (known.status == "approved" and known.decided_at == record.decided_at):
            self.trips[record.stream] = record
            self.shadow_trips.pop(record.stream, None)

    def counted_trips(self) -> list[str]:
        """Tripped or decided streams this guard counts: their audience is its to write."""
        return [stream for stream in self.trips if stream in self.active]

    def dirty(self, now: float, sizes: Mapping[str, int]) -> list[BreakerRecord]:
        """Trips whose counts changed since the last call, with ``sizes``, their audience now."""
        for stream, size in sizes.items():
            trip = self.trips.get(stream)
            if trip is not None and size != trip.recipients:
                self.trips[stream] = replace(trip, recipients=size, updated_at=now)
                self._dirty.add(stream)
        records = [self.trips[stream] for stream in sorted(self._dirty) if stream in self.trips]
        self._dirty.clear()
        return records

    def mark_dirty(self, streams: Iterable[str]) -> None:
        """Write these again next time (the store refused them)."""
        self._dirty.update(streams)

    def idle(self, now: float) -> list[str]:
        """Streams whose last count here is ``stream_idle`` ago: maybe ended (``tallies.finish``)."""
        return [stream for stream, active in self.active.items()
                if now - active.last_seen >= self.config.stream_idle]

    def ended(self, endings: Mapping[str, Ending]) -> Ended:
        """Forget the streams that ended; those this guard finished and that went out (no trip,
        an approved one, or only a shadow trip) teach their sender's baseline."""
        learn: list[tuple[str, int]] = []
        elsewhere: set[str] = set()
        for stream, ending in endings.items():
            active = self.active[stream]
            if ending.state == "active":
                active.last_seen = ending.last_seen  # counted by another guard since
                continue
            del self.active[stream]
            self.shadow_trips.pop(stream, None)
            if ending.state == "gone":
                elsewhere.add(active.sender)
                continue
            trip = self.trips.get(stream)
            if trip is not None and trip.status != "approved":
                continue  # cancelled, or still waiting for an admin: not what the sender usually sends
            learn.append((active.sender, ending.size))
        return Ended(tuple(learn), frozenset(elsewhere))

    def learn(self, sender: str, size: int, now: float) -> Baseline:
        known = self.baselines.get(sender)
        rate = self.config.learning_rate
        if known is None:
            baseline = Baseline(sender, float(size), 1, now)
        else:
            baseline = Baseline(sender, (1 - rate) * known.baseline + rate * size, known.streams + 1, now)
        self.baselines[sender] = baseline
        return baseline

    def take_baseline(self, stored: Baseline) -> None:
        """A baseline read from the store: kept when it is newer than this guard's (another guard
        learned from a stream since)."""
        known = self.baselines.get(stored.sender)
        if known is None or stored.updated_at > known.updated_at:
            self.baselines[stored.sender] = stored


def _tripped(stream: str, active: ActiveStream, trip: Trip, recipients: int, now: float,
             previous: BreakerRecord | None) -> BreakerRecord:
    """The stream's record once ``trip`` is in force. It keeps the previous record's approved
    ceiling and the decision it is based on: the store keeps a newer one if an admin made it."""
    return BreakerRecord(
        stream=stream, rule=trip.rule, sender=active.sender, message_class=active.message_class,
        status="tripped", threshold=trip.threshold, ceiling=None if previous is None else previous.ceiling,
        recipients=recipients, tripped_at=trip.at, updated_at=now,
        decided_by="" if previous is None else previous.decided_by,
        decided_at=None if previous is None else previous.decided_at,
    )

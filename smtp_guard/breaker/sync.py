"""Keeps the breaker's state, its stream tallies and the store in step, off the hot path.

Every ``[store] reload_interval``, at once when an admin change moves the store's change
generation (``change_sync.py``), and once more at shutdown, it:

1. writes new trips, re-trips and audience sizes to ``breakers`` (the audience of the tripped
   streams this guard counts, read from its tallies);
2. reads admin decisions (approve with a ceiling, cancel) made since the last one it saw and
   applies them to the running policy. It then releases (approve) or discards (cancel) once
   more the stream's held recipients, for mail held between the admin's action and this
   server taking it up;
3. takes up the trips other guards wrote, for streams this guard has not counted since they
   tripped (one it counts learns of the trip from the tallies with its next message);
4. ends the streams idle for ``[breaker] stream_idle`` and writes the baselines they taught:
   the tallies end each stream once, for the one guard that learns from it, on top of its
   sender's baseline as stored — other guards may have learned from the sender's other
   streams — and every guard that counted the stream takes the new baseline up at its next sync.

With the tallies in Redis, a sync that cannot reach Redis still does everything else (admin
decisions above all); audience sizes and ended streams wait for the next one.

``BreakerReport`` is the state's observer: every trip is counted and written to the audit
trail, and so are the recipients the breaker held, deferred or refused (by rule and class).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Sequence

from ..audit_model import AuditRecord
from ..counters import CountersUnavailable
from ..hold.model import HoldStore
from ..metrics import Metrics
from ..periodic import Periodic
from .model import Baseline, BreakerRecord, BreakerStore
from .rules import cancelling_rules, holding_rules
from .state import BreakerState

log = logging.getLogger(__name__)


class BreakerSync:
    def __init__(self, state: BreakerState, store: BreakerStore, holds: HoldStore, metrics: Metrics,
                 record: Callable[[AuditRecord], None], interval: float,
                 clock: Callable[[], float] = time.time, rate_limit_names: Sequence[str] = ()) -> None:
        self._rate_limit_names = tuple(rate_limit_names)
        self._state = state
        self._store = store
        self._holds = holds
        self._metrics = metrics
        self._record = record
        self._clock = clock
        self._cursor: float | None = None  # newest admin decision seen (the admin's clock)
        self._pending_baselines: dict[str, Baseline] = {}
        self._learned_elsewhere: set[str] = set()  # senders whose baseline another guard updated
        self._untaken: dict[str, BreakerRecord] = {}  # decisions applied whose holds are not swept yet
        self._tallies_failing = False  # said once per outage, not at every sync
        self._lock = asyncio.Lock()
        self._loop = Periodic("breaker-sync", interval, self.sync,
                              "sync failed; keeping the state in memory and trying again")

    def __repr__(self) -> str:
        return f"<BreakerSync running={self._loop.is_running} {self._state!r}>"

    async def load(self) -> None:
        """Trips and baselines from the store, before the server takes mail."""
        records = await self._store.list(None, limit=None)
        self._state.load(records, await self._store.baselines())
        decided = [r.decided_at for r in records if r.decided_at is not None]
        self._cursor = max(decided, default=None)
        self._metrics.breakers_tripped.set(self._state.tripped_count())

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        """Stop the loop and persist what is in memory (call after the listener stopped)."""
        await self._loop.stop()
        await self.sync()

    async def sync(self) -> None:
        async with self._lock:
            now = self._clock()
            dirty = self._state.dirty(now, await self._audiences())
            try:
                await self._store.save(dirty)
            except Exception:
                self._state.mark_dirty(r.stream for r in dirty)
                raise
            for record in await self._store.decided_since(self._cursor):
                assert record.decided_at is not None
                self._cursor = max(self._cursor or record.decided_at, record.decided_at)
                if self._state.apply(record) is not None:
                    self._untaken[record.stream] = record
            # A sweep that failed (store locked or full) is tried again at the next sync: the
            # decision is already in force here, but mail held meanwhile still waits for it.
            for stream, record in list(self._untaken.items()):
                await self._take_up(record, now)
                del self._untaken[stream]
            for record in await self._store.list("tripped", limit=None):
                self._state.adopt_stored(record)
            await self._finish_idle(now)
            if self._pending_baselines:
                await self._store.save_baselines(list(self._pending_baselines.values()))
                self._pending_baselines.clear()
            self._metrics.breakers_tripped.set(self._state.tripped_count())

    async def _audiences(self) -> dict[str, int]:
        """The audience of each tripped stream this guard counts (it may have grown elsewhere)."""
        streams = self._state.counted_trips()
        if not streams:
            return {}
        try:
            sizes = await self._state.tallies.sizes(streams)
        except CountersUnavailable as error:
            self._tallies_failed(error)
            return {}
        self._tallies_answered()
        return sizes

    async def _finish_idle(self, now: float) -> None:
        idle = self._state.idle(now)
        # The baselines as stored, read before any stream ends: a stream the tallies end is ended
        # for every guard, so nothing may fail between its end and its learning.
        for sender in self._learned_elsewhere | {self._state.active[stream].sender for stream in idle}:
            stored = await self._store.baseline(sender)
            if stored is not None:
                self._state.take_baseline(stored)
        self._learned_elsewhere.clear()
        if not idle:
            return
        try:
            endings = await self._state.tallies.finish(idle, now, self._state.config.stream_idle)
        except CountersUnavailable as error:
            self._tallies_failed(error)
            return
        self._tallies_answered()
        ended = self._state.ended(endings)
        # Read at the next sync: the guard that ended the stream writes its baseline meanwhile.
        self._learned_elsewhere |= ended.elsewhere
        for sender, size in ended.learn:
            self._pending_baselines[sender] = self._state.learn(sender, size, now)

    def _tallies_failed(self, error: CountersUnavailable) -> None:
        if not self._tallies_failing:
            self._tallies_failing = True
            log.warning("breaker sync: %s; tripped streams' audiences and idle streams wait for the counters "
                        "(admin decisions are taken up all the same)", error)

    def _tallies_answered(self) -> None:
        if self._tallies_failing:
            self._tallies_failing = False
            log.info("breaker sync: the counters answer again")

    async def _take_up(self, record: BreakerRecord, now: float) -> None:
        """An admin decision reached this server: count it, and sweep the stream's holds."""
        rules = holding_rules(record.rule, record.message_class)
        if record.status == "approved":
            action, changed = "approve", await self._holds.release_stream(record.stream, rules, now)
        elif record.status == "cancelled":
            action, changed = "cancel", await self._holds.discard_stream(
                record.stream, cancelling_rules(record.rule, record.message_class, self._rate_limit_names))
        else:
            return
        self._metrics.breaker_admin_actions.labels(action, record.rule, record.message_class).inc()
        log.info("breaker: stream %r %sd by %s (ceiling %s)", record.stream, action, record.decided_by,
                 record.ceiling)
        if changed:
            # Mail held while the decision was on its way to this server.
            self._record(AuditRecord(
                time=now, kind="admin", verdict=f"breaker.{action}", rule=record.rule,
                reason=f"stream {record.stream!r}: {changed} more held recipient(s) "
                       f"{'released' if action == 'approve' else 'discarded'} after {record.decided_by}'s decision",
                sender=record.sender, actor="server"))


class BreakerReport:
    """The breaker state's observer (``BreakerObserver``): metrics, log and audit trail."""

    def __init__(self, metrics: Metrics, record: Callable[[AuditRecord], None]) -> None:
        self._metrics = metrics
        self._record = record

    def tripped(self, record: BreakerRecord) -> None:
        self._metrics.breaker_trips.labels(record.rule, record.message_class).inc()
        again = " again (past its approved ceiling)" if record.decided_at is not None else ""
        log.warning("breaker: stream %r of %s tripped%s: %s, more than %d recipients", record.stream,
                    record.sender or "<>", again, record.rule, record.threshold)
        self._record(AuditRecord(
            time=record.tripped_at, kind="decision", verdict="trip", rule=record.rule,
            reason=f"stream {record.stream!r} (class {record.message_class}) tripped{again}: "
                   f"more than {record.threshold} recipients",
            sender=record.sender))

    def decided(self, verdict: str, rule: str, message_class: str, recipients: int) -> None:
        self._metrics.breaker_recipients.labels(verdict, rule, message_class).inc(recipients)

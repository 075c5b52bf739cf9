"""Keeps the in-memory breaker state and the store in step, off the hot path.

Every ``[store] reload_interval``, at once when an admin change moves the store's change
generation (``change_sync.py``), and once more at shutdown, it:

1. writes new trips, re-trips and audience sizes to ``breakers``;
2. reads admin decisions (approve with a ceiling, cancel) made since the last one it saw and
   applies them to the running policy. It then releases (approve) or discards (cancel) once
   more the stream's held recipients, for mail held between the admin's action and this
   server taking it up;
3. finishes streams idle for ``[breaker] stream_idle`` and writes the baselines they taught.

``BreakerReport`` is the state's observer: every trip is counted and written to the audit
trail, and so are the recipients the breaker held, deferred or refused (by rule and class).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Sequence

from ..audit_model import AuditRecord
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
        self._untaken: dict[str, BreakerRecord] = {}  # decisions applied whose holds are not swept yet
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
            dirty = self._state.dirty(now)
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
            for baseline in self._state.finish_idle(now):
                self._pending_baselines[baseline.sender] = baseline
            if self._pending_baselines:
                await self._store.save_baselines(list(self._pending_baselines.values()))
                self._pending_baselines.clear()
            self._metrics.breakers_tripped.set(self._state.tripped_count())

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

"""The duties that run once per guard, however many worker processes serve SMTP: releasing
held mail, the breaker's sync with the store, statistics from the store, the readiness probes
(store, rate counters, upstream) and the metrics and health listener.

It also owns the breaker's stream state: the end-of-DATA decisions of every worker are taken
against it, so a stream spread over several workers is counted once — in its memory, or in
Redis with ``[counters] url``, where several guard instances count it once.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Callable, Sequence

from ..backends import Backends
from ..audit_model import AuditRecord
from ..breaker.state import BreakerState
from ..breaker.sync import BreakerReport, BreakerSync
from ..breaker.tally import StreamTallies
from ..change_sync import Step
from ..config import Config
from ..hold.worker import ReleaseWorker
from ..metrics import Metrics
from ..periodic import Periodic
from ..readiness import Readiness, probe_store, probe_upstream
from ..relay.base import Upstream
from ..startup import naming_setting
from ..store.base import StoreError
from .enforcement import Enforcement

if TYPE_CHECKING:  # aiohttp is imported only by the processes that serve HTTP (app.py)
    from ..admin.http import HTTPListener

STATS_INTERVAL = 5.0
PROBE_INTERVAL = 2.0  # how often readiness checks that the store answers
LIST_SIZES_INTERVAL = 60.0


class Background:
    def __init__(self, config: Config, backends: Backends, enforcement: Enforcement, upstream: Upstream,
                 metrics: Metrics, readiness: Readiness, http: HTTPListener,
                 clock: Callable[[], float] = time.time, tallies: StreamTallies | None = None) -> None:
        """``tallies``: where the breaker counts streams (``backends.stream_tallies``)."""
        self._config = config
        self._backends = backends
        self._enforcement = enforcement
        self._metrics = metrics
        self._readiness = readiness
        self._clock = clock
        self.http = http
        self.breaker_state = BreakerState(config.breaker, BreakerReport(metrics, enforcement.audit.record), tallies)
        self.breaker_sync = BreakerSync(self.breaker_state, backends.breakers, backends.holds, metrics,
                                        enforcement.audit.record, config.store.reload_interval, clock=clock,
                                        rate_limit_names=[limit.name for limit in config.rate_limits])
        self.release_worker = ReleaseWorker(backends.holds, upstream, config.hold,
                                            record=self._record_delivery, clock=clock)
        # (change-log position, first expiry after it) of the last list count; lists it reported
        self._list_sizes_valid: tuple[int, float | None] | None = None
        self._listed: set[str] = set()

    @property
    def change_steps(self) -> Sequence[Step]:
        return (self.breaker_sync.sync,)

    async def start(self, running: AsyncExitStack) -> None:
        config = self._config
        with naming_setting(config.store.setting, True, StoreError):
            await self.breaker_sync.load()
        self._start_loop(running, Periodic(
            "stats", STATS_INTERVAL, self.update_stats, "could not read hold/suppression statistics",
            run_first=True))
        # Counting entries scans the suppression table (seconds at ten million rows, on the
        # connection the hold queue commits through), so list sizes are read less often.
        self._start_loop(running, Periodic("list-sizes", LIST_SIZES_INTERVAL, self.update_list_sizes,
                                           "could not count list entries", run_first=True))
        self.breaker_sync.start()
        running.push_async_callback(self.breaker_sync.stop)  # persists trips and counts for the next start
        self.release_worker.start()
        running.push_async_callback(self.release_worker.stop)
        if config.metrics.listen is not None:
            await self.http.start(config.metrics.listen)
            running.push_async_callback(self.http.stop)

    async def start_probes(self, running: AsyncExitStack) -> None:
        """Probe the store and the upstream once, then periodically. Called once the listener
        is bound, so a slow upstream never delays a start-up error, and /readyz tells the
        truth from its first answer."""
        await asyncio.gather(self._probe_store(), self._probe_counters(), self._probe_upstream())
        self._start_loop(running, Periodic("store-probe", PROBE_INTERVAL, self._probe_store, "store probe failed"))
        self._start_loop(running, Periodic("counters-probe", PROBE_INTERVAL, self._probe_counters,
                                           "rate counters probe failed"))
        self._start_loop(running, Periodic("upstream-probe", self._config.upstream.probe_interval,
                                           self._probe_upstream, "upstream probe failed"))

    @staticmethod
    def _start_loop(running: AsyncExitStack, loop: Periodic) -> None:
        loop.start()
        running.push_async_callback(loop.stop)

    async def _probe_store(self) -> None:
        self._readiness.set("store", await probe_store(self._backends.holds.stats))

    async def _probe_counters(self) -> None:
        self._readiness.set("counters", await self._backends.counters.probe())

    async def _probe_upstream(self) -> None:
        self._readiness.set("upstream", await probe_upstream(self._config.upstream,
                                                             self._config.store.data_dir / "sandbox"))

    def _record_delivery(self, record: AuditRecord) -> None:
        self._metrics.hold_deliveries.labels(record.verdict).inc()
        self._enforcement.audit.record(record)

    async def update_stats(self) -> None:
        """Refresh the gauges that come from the store (hold queue, tombstones)."""
        self._metrics.tombstones.set(len(self._backends.tombstones))
        stats = await self._backends.holds.stats()
        self._metrics.hold_messages.set(stats.held_messages)
        self._metrics.hold_recipients.set(stats.held_recipients)
        self._metrics.hold_oldest_age.set(0 if stats.oldest_held_at is None else self._clock() - stats.oldest_held_at)

    async def update_list_sizes(self) -> None:
        """Entries per list. Counting scans the whole table (2.6 s of CPU at ten million
        entries, bench/README.md), so it is skipped while the counts cannot have changed: no
        change logged since the last count, and no entry expired since."""
        suppressions = self._backends.suppressions
        now = self._clock()
        seq = await suppressions.current_seq()  # before counting: a change in between is counted again
        if self._list_sizes_valid is not None:
            counted_seq, next_expiry = self._list_sizes_valid
            if seq == counted_seq and (next_expiry is None or now < next_expiry):
                return
        counts = await suppressions.count_by_list(now)
        next_expiry = await suppressions.next_expiry(now)
        for list_name in self._listed - counts.keys():  # emptied: 0, not its last count
            self._metrics.suppression_entries.labels(list_name).set(0)
        for list_name, count in counts.items():
            self._metrics.suppression_entries.labels(list_name).set(count)
        self._listed |= counts.keys()
        self._list_sizes_valid = (seq, next_expiry)

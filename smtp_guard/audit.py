"""The audit log the running server writes to: buffered in memory, flushed in batches.

The SMTP hot path calls ``record()``, which only appends to a buffer: a slow or broken audit
store must never delay or fail mail. A background task writes the buffer to the
``AuditStore`` every ``[audit] flush_interval`` seconds, or sooner once ``batch_size`` records
wait. When the store fails the records stay buffered and are retried; past ``max_buffer``
the oldest are dropped and counted (``on_dropped``), so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Callable

from .audit_model import AuditRecord, AuditStore
from .config import AuditConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_BUFFER = 100_000


class AuditLog:
    """Buffered writer of ``AuditRecord`` values; ``start()`` it, ``await stop()`` it."""

    def __init__(self, store: AuditStore, config: AuditConfig, *, max_buffer: int = DEFAULT_MAX_BUFFER,
                 on_dropped: Callable[[int], None] | None = None) -> None:
        self._store = store
        self._interval = config.flush_interval
        self._batch_size = max(1, config.batch_size)
        self._max_buffer = max(self._batch_size, max_buffer)
        self._on_dropped = on_dropped
        self._buffer: collections.deque[AuditRecord] = collections.deque()
        self._dropped = 0
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        # One writer at a time, so the background flush and stop()'s final flush keep order.
        self._flush_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<AuditLog pending={self.pending} dropped={self.dropped}>"

    @property
    def pending(self) -> int:
        """Records waiting to be written."""
        return len(self._buffer)

    @property
    def dropped(self) -> int:
        """Records lost since start because the buffer was full."""
        return self._dropped

    def record(self, record: AuditRecord) -> None:
        """Queue one record. Never blocks, never raises for store trouble."""
        self._buffer.append(record)
        self._trim()
        if len(self._buffer) >= self._batch_size:
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name="audit-flush")

    async def stop(self) -> None:
        """Stop the background task and write what is left (once; a failure is logged)."""
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        if not await self.flush() and self._buffer:
            log.error("audit: %d record(s) could not be written before shutdown and are lost", len(self._buffer))

    async def flush(self) -> bool:
        """Write everything buffered. Returns False if the store failed (records kept)."""
        async with self._flush_lock:
            while self._buffer:
                batch = [self._buffer.popleft() for _ in range(min(self._batch_size, len(self._buffer)))]
                try:
                    await self._store.append(batch)
                except Exception as error:
                    # Back to the front, in order, so they are retried first; records that
                    # arrived meanwhile stay behind them.
                    self._buffer.extendleft(reversed(batch))
                    self._trim()
                    log.error("audit: cannot write %d record(s), keeping %d buffered: %s",
                              len(batch), len(self._buffer), error)
                    return False
        return True

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stopping.is_set():
                return
            if not await self.flush():
                # Wait a full interval before retrying a failing store, even if the buffer
                # keeps filling: retrying on every new record would hammer it.
                try:
                    async with asyncio.timeout(self._interval):
                        await self._stopping.wait()
                except TimeoutError:
                    pass

    def _trim(self) -> None:
        excess = len(self._buffer) - self._max_buffer
        if excess <= 0:
            return
        for _ in range(excess):
            self._buffer.popleft()
        self._dropped += excess
        if self._on_dropped is not None:
            self._on_dropped(excess)

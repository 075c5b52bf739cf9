"""A background step repeated at a fixed interval, started and stopped with the server.

Used by every loop that keeps in-memory state in step with the store (suppression index,
tombstones, breaker sync, statistics). A step that fails is logged and tried again at the
next interval: the server keeps working with the state it has.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


class Periodic:
    def __init__(self, name: str, interval: float, step: Callable[[], Awaitable[None]],
                 on_failure: str, *, run_first: bool = False) -> None:
        self.name = name
        self._interval = interval
        self._step = step
        self._on_failure = on_failure
        self._run_first = run_first  # step at once, then every interval (else wait first)
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Periodic {self.name} every {self._interval}s running={self.is_running}>"

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        # A library may swallow a cancellation that lands just as its own wait finishes
        # (Python 3.11's wait_for does): cancel again until the task has really ended, so a
        # shutdown can never hang on a loop that went on.
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s ended with an error", self.name, exc_info=task.exception())

    async def _run(self) -> None:
        if not self._run_first:
            await asyncio.sleep(self._interval)
        while True:
            try:
                await self._step()
            except Exception:
                log.exception("%s: %s", self.name, self._on_failure)
            await asyncio.sleep(self._interval)

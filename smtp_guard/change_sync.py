"""Read-your-writes, server side: apply an admin change as soon as it is committed, and say so.

Every ``[store] change_poll_interval`` the guard reads the store-wide change generation (one
single-row read). When it moved, the guard runs its refresh steps (suppression index,
tombstones, breaker decisions) and only then reports the generation it read as applied: every
change committed before that generation was reached is in its memory by then. The admin side
(``services.propagation``) waits for that report from every running guard.

The same loop writes the heartbeat (about once a second) that tells admins this process is
alive. It registers the process before the guard accepts mail, applying once inline, so no
admin can see the guard serving from state older than the last change it was told about;
``stop()`` removes the row after the listener has stopped.

A refresh step that fails is logged, the heartbeat still goes out with the old applied
generation, and the step is retried at the next poll: admins then read "alive but not
applied" and say so, instead of mistaking the guard for a dead one.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from dataclasses import replace
from typing import Awaitable, Callable, Sequence

from .change_model import ChangeStore, GuardInstance
from .periodic import Periodic
from .store.base import StoreError

log = logging.getLogger(__name__)

# How often a guard writes its heartbeat. Admins treat a guard silent for STALE_AFTER
# (services/propagation.py) as stopped; keep that many heartbeats apart.
HEARTBEAT_INTERVAL = 1.0

Step = Callable[[], Awaitable[None]]


class ChangeSync:
    """Follows the store's change generation for one guard process."""

    def __init__(self, store: ChangeStore, steps: Sequence[Step], interval: float,
                 clock: Callable[[], float] = time.time, heartbeat_interval: float = HEARTBEAT_INTERVAL) -> None:
        self._store = store
        self._steps = tuple(steps)
        self._clock = clock
        self._heartbeat_interval = heartbeat_interval
        self.instance = GuardInstance(id=secrets.token_hex(8), host=socket.gethostname(), pid=os.getpid(),
                                      started_at=clock(), heartbeat_at=clock(), applied_generation=None)
        self._reported_at: float | None = None
        self._registered = False
        self._loop = Periodic("change-sync", interval, self.poll,
                              "cannot read the change generation; trying again")

    def __repr__(self) -> str:
        return (f"<ChangeSync {self.instance.name} applied={self.applied_generation} "
                f"running={self._loop.is_running}>")

    @property
    def applied_generation(self) -> int | None:
        return self.instance.applied_generation

    async def start(self) -> None:
        """Register, apply what is pending, then poll in the background. Call before the
        listener starts."""
        self._registered = True
        await self._report(None)
        await self.poll()
        self._loop.start()

    async def stop(self) -> None:
        """Stop polling and remove this process from the store (after the listener stopped).
        A store that cannot be written does not stop the shutdown: admins then see this
        process fall silent and stop waiting for it after a few seconds."""
        await self._loop.stop()
        if self._registered:
            self._registered = False
            try:
                await self._store.remove(self.instance.id)
            except StoreError as error:
                log.warning("change-sync: could not remove guard %s from the store (%s); admin commands "
                            "will report it as silent until they forget it", self.instance.name, error)

    async def poll(self) -> None:
        generation = await self._store.generation()
        applied = self.instance.applied_generation
        if generation != applied:
            try:
                for step in self._steps:
                    await step()
            except Exception:
                log.exception("change-sync: could not apply change generation %d; still at %s, trying again",
                              generation, applied)
            else:
                applied = generation
        if applied != self.instance.applied_generation or self._heartbeat_due():
            await self._report(applied)

    def _heartbeat_due(self) -> bool:
        return self._reported_at is None or self._clock() - self._reported_at >= self._heartbeat_interval

    async def _report(self, applied: int | None) -> None:
        # Remembered only once written: after a failed write the next poll applies and reports again.
        now = self._clock()
        instance = replace(self.instance, heartbeat_at=now, applied_generation=applied)
        await self._store.report(instance)
        self.instance = instance
        self._reported_at = now

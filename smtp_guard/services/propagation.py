"""Read-your-writes, admin side: after a change, wait until every running guard enforces it.

Every admin operation that changes what a guard enforces (suppress add/remove/import, erase,
breaker approve/cancel, hold release/discard) calls ``in_force`` once its change committed.
It moves the store's change generation to G, then waits up to ``[store] confirm_timeout`` until
every live guard process reports G as applied (``change_sync.py`` is the other half). The
result says who confirmed, who did not, and which guards were not waited for:

- a guard whose heartbeat is older than ``STALE_AFTER`` was killed or is hung: waiting for it
  would only delay the answer, so it is not waited for, but it is named (if it still runs, it
  does not enforce the change); its row is deleted once silent for ``FORGET_AFTER``;
- no live guard at all: nothing relays from this store now, and a guard that starts loads
  everything before it accepts mail. It is still worth saying: a command that finds no guard
  often writes to another store than the server's.

Heartbeats are compared with this process's clock: on one host (SQLite) that is the guards'
clock too; guard instances on other hosts sharing a PostgreSQL store write theirs with their
own clocks, so the hosts' clocks must agree to well within STALE_AFTER (NTP; README, "Running
several instances").
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

from ..change_model import ChangeStore, GuardInstance

STALE_AFTER = 10.0  # seconds without a heartbeat (guards write one a second)
FORGET_AFTER = 3600.0
POLL_INTERVAL = 0.02  # how often the admin side re-reads the instances while it waits


@dataclass(frozen=True)
class Propagation:
    """Which running guards enforce change generation ``generation``, after waiting ``waited`` s."""

    generation: int
    confirmed: tuple[GuardInstance, ...]
    unconfirmed: tuple[GuardInstance, ...]  # alive (fresh heartbeat) but not applied in time
    silent: tuple[GuardInstance, ...]  # no heartbeat for STALE_AFTER: not waited for
    timeout: float
    waited: float
    checked_at: float  # when the instances were last read (heartbeat ages are relative to it)

    @property
    def is_confirmed(self) -> bool:
        """At least one guard runs on the store, and every one that runs enforces the change."""
        return bool(self.confirmed) and not self.unconfirmed

    @property
    def has_running_guard(self) -> bool:
        return bool(self.confirmed or self.unconfirmed)

    def heartbeat_age(self, instance: GuardInstance) -> float:
        return max(0.0, self.checked_at - instance.heartbeat_at)


async def in_force(changes: ChangeStore, timeout: float, clock: Callable[[], float] = time.time) -> Propagation:
    """Announce a committed change and wait until every live guard applied it (or ``timeout``,
    ``[store] confirm_timeout``, passed). Never raises for a guard that does not answer: the
    result says so."""
    limit = timeout
    generation = await changes.bump_generation()
    started = time.monotonic()
    await changes.forget(clock() - FORGET_AFTER)
    while True:
        now = clock()
        instances = await changes.instances()
        live = [i for i in instances if now - i.heartbeat_at <= STALE_AFTER]
        silent = tuple(i for i in instances if i not in live)
        confirmed = tuple(i for i in live if has_applied(i, generation))
        unconfirmed = tuple(i for i in live if not has_applied(i, generation))
        waited = time.monotonic() - started
        if not unconfirmed or waited >= limit:
            return Propagation(generation, confirmed, unconfirmed, silent, limit, waited, now)
        await asyncio.sleep(POLL_INTERVAL)


def has_applied(instance: GuardInstance, generation: int) -> bool:
    return instance.applied_generation is not None and instance.applied_generation >= generation

"""Read-your-writes: the running guards as they report themselves, and the change store.

Plain data (a frozen dataclass) and a Protocol; ``store/sqlite/changes.py`` implements it,
``change_sync.py`` (guard side) and ``services/propagation.py`` (admin side) use it.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class GuardInstance:
    """One running guard process as it reports itself to the store."""

    id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float  # the instance's own clock
    applied_generation: int | None  # None until its first refresh

    @property
    def name(self) -> str:
        """How an operator finds the process: ``host:pid``."""
        return f"{self.host}:{self.pid}"


class ChangeStore(Protocol):
    """A store-wide change generation and the guards that follow it.

    An admin change, once committed, moves the generation; a guard that read generation G and
    then refreshed its in-memory state from the store has seen every change committed before
    G was reached, and reports G as applied. Being a table in the store, it works the same
    for every worker process and every instance that shares the store (no signals, no sockets).
    """

    async def bump_generation(self) -> int:
        """Call after an admin change committed: moves the generation on, returns the new one."""

    async def generation(self) -> int:
        """The current generation (one single-row read: guards poll it often)."""

    async def report(self, instance: GuardInstance) -> None:
        """Insert or update the instance's row (registration, heartbeat, applied generation)."""

    async def remove(self, instance_id: str) -> None:
        """The instance stopped cleanly."""

    async def instances(self) -> builtins.list[GuardInstance]: ...

    async def forget(self, heartbeat_before: float) -> builtins.list[GuardInstance]:
        """Delete the rows whose last heartbeat is older than ``heartbeat_before`` (guards that
        were killed, or hung for that long); returns them."""

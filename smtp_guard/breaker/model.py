"""Trips, admin decisions and learned baselines of the breaker, and the store interface.

Plain data (frozen dataclasses) and a Protocol; ``store/sqlite/breakers.py`` implements it.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

BreakerStatus = Literal["tripped", "approved", "cancelled"]


@dataclass(frozen=True)
class BreakerRecord:
    """A stream whose volume breaker, fan-out detector or approval gate tripped. The server
    writes the counts; an admin writes the decision (``approved`` with a ceiling, or
    ``cancelled``), versioned by ``decided_at``."""

    stream: str
    rule: str  # "breaker.volume", "breaker.fanout", "gate.<class>"
    sender: str
    message_class: str
    status: BreakerStatus
    threshold: int  # the count the stream exceeded
    ceiling: int | None  # set by an approval: the stream may grow to this many recipients
    recipients: int  # distinct recipients seen (the audience size)
    tripped_at: float
    updated_at: float
    decided_by: str = ""
    decided_at: float | None = None


@dataclass(frozen=True)
class Baseline:
    """A sender's usual stream size: an exponentially decayed average of finished streams."""

    sender: str
    baseline: float
    streams: int
    updated_at: float


class BreakerStore(Protocol):
    async def save(self, records: Sequence[BreakerRecord]) -> None:
        """Server side: insert new trips and update counts. Status, rule and threshold are
        only overwritten where the stored ``decided_at`` is the one the record carries, so a
        server never undoes an admin decision it has not seen yet."""

    async def get(self, stream: str) -> BreakerRecord | None: ...

    async def list(self, status: BreakerStatus | None = None, limit: int | None = 100) -> builtins.list[BreakerRecord]:
        """Newest trip first (every one when ``limit`` is None)."""

    async def decided_since(self, since: float | None) -> builtins.list[BreakerRecord]:
        """Records whose admin decision is at or after ``since`` (every decided one if None)."""

    async def decide(self, stream: str, status: BreakerStatus, ceiling: int | None, actor: str,
                     now: float) -> BreakerRecord | None:
        """Admin side: record a decision. None when the stream has no breaker record."""

    async def baselines(self) -> builtins.list[Baseline]: ...

    async def baseline(self, sender: str) -> Baseline | None: ...

    async def save_baselines(self, baselines: Sequence[Baseline]) -> None: ...

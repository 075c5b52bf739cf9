"""Audit records, the filter admins query them by, and the store interface.

Plain data (frozen dataclasses) and a Protocol; ``store/sqlite/audit.py`` implements it and
``audit.py`` writes to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

AuditKind = Literal["decision", "admin", "delivery"]


@dataclass(frozen=True)
class AuditRecord:
    time: float
    kind: AuditKind
    verdict: str  # pass/reject/defer/hold/drop for decisions; the verb for admin actions
    rule: str
    reason: str
    txn_id: str = ""
    client: str = ""
    sender: str = ""
    recipient: str = ""
    actor: str = ""  # who did an admin action (cli:user, api:token-name)


@dataclass(frozen=True)
class AuditFilter:
    since: float | None = None
    until: float | None = None
    kind: AuditKind | None = None
    verdict: str | None = None
    rule_prefix: str | None = None
    recipient: str | None = None
    sender: str | None = None
    txn_id: str | None = None


class AuditStore(Protocol):
    async def append(self, records: Sequence[AuditRecord]) -> None: ...

    async def query(self, filters: AuditFilter, limit: int = 100) -> list[AuditRecord]:
        """Newest first."""

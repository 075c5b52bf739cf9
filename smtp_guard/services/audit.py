"""Reading the audit trail, shared by the CLI and the HTTP API.

Times given by an operator are either relative ("90s", "30m", "1h", "2d", "1w": that long
ago) or ISO 8601 ("2024-05-01", "2024-05-01T12:30", "2024-05-01T12:30:00+02:00"); an ISO
time without a zone is UTC, like every time the audit trail shows.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from ..audit_model import AuditFilter, AuditRecord
from .context import AdminContext

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class BadTime(ValueError):
    """A time an operator typed that is neither relative nor ISO 8601; the message says what
    to write instead."""


def parse_time(text: str, now: float) -> float:
    """A point in time as epoch seconds, from "1h" (an hour before ``now``) or an ISO date."""
    relative = _RELATIVE.match(text)
    if relative:
        return now - float(relative.group(1)) * _UNITS[relative.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadTime(
            f"{text!r} is not a time; write a duration ago such as 30m, 1h, 2d, 1w, "
            "or an ISO date such as 2024-05-01 or 2024-05-01T12:30 (UTC)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def format_time(epoch: float) -> str:
    """How the audit trail shows a time: ISO 8601 in UTC, to the second."""
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def query_audit(ctx: AdminContext, filters: AuditFilter, limit: int = 100) -> list[AuditRecord]:
    """Records matching the filters, newest first."""
    return await ctx.audit.query(filters, limit)

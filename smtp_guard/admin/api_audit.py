"""``/api/v1/audit``: the audit trail — every recipient decision, delivery of held mail and admin
action — filtered as ``smtp-guard audit list`` filters it. Recipients are keyed pseudonyms."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from ..audit_model import AuditFilter, AuditKind, AuditRecord
from ..services.audit import format_time, query_audit
from .query import Query
from .requests import context

KINDS: tuple[AuditKind, ...] = ("decision", "admin", "delivery")


def routes(prefix: str) -> list[web.RouteDef]:
    return [web.get(f"{prefix}/audit", list_audit, allow_head=False)]


async def list_audit(request: web.Request) -> web.Response:
    """GET /audit?since=1h&until=…&kind=…&verdict=…&rule=…&recipient=…&sender=…&txn=…&limit=N,
    newest first. Times: 30m, 1h, 2d, 1w ago, or ISO 8601 (UTC when no zone is given)."""
    ctx = context(request)
    query = Query(request, {"since", "until", "kind", "verdict", "rule", "recipient", "sender", "txn", "limit"})
    now = ctx.clock()
    filters = AuditFilter(
        since=query.time("since", now), until=query.time("until", now), kind=query.optional_choice("kind", KINDS),
        verdict=query.text("verdict", 100), rule_prefix=query.text("rule", 200) or None,
        recipient=query.text("recipient", 320), sender=query.text("sender", 320), txn_id=query.text("txn", 100))
    limit = query.integer("limit", 100, 1, 1000)
    records = await query_audit(ctx, filters, limit)
    return web.json_response({"items": [_record_json(r) for r in records]})


def _record_json(record: AuditRecord) -> dict[str, Any]:
    return {**dataclasses.asdict(record), "time_iso": format_time(record.time)}

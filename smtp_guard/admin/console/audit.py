"""The console's audit page: records filtered by time range, kind, verdict, rule, recipient,
sender and transaction, newest first — ``smtp-guard audit list`` through the same
``services.audit.query_audit``."""

from __future__ import annotations

from typing import get_args

from aiohttp import web

from ...audit_model import AuditFilter, AuditKind
from ...services.audit import BadTime, parse_time, query_audit
from ..requests import context
from .forms import query
from .pages import render

KINDS: tuple[AuditKind, ...] = get_args(AuditKind)
LIMITS = (50, 100, 500, 1000)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/audit", audit_page)


async def audit_page(request: web.Request) -> web.Response:
    ctx = context(request)
    form = query(request)
    now = ctx.clock()
    moments: dict[str, float | None] = {}
    for name in ("since", "until"):
        text = form.text(name, 40)
        try:
            moments[name] = parse_time(text, now) if text else None
        except BadTime as error:
            form.error(name, str(error))
    kind_text = form.text("kind")
    if kind_text and kind_text not in KINDS:
        form.error("kind", f"choose one of {', '.join(KINDS)}")
    limit = form.integer("limit", LIMITS[1], 1, LIMITS[-1])
    filters = AuditFilter(
        since=moments.get("since"), until=moments.get("until"),
        kind=next((kind for kind in KINDS if kind == kind_text), None),
        verdict=form.text("verdict") or None, rule_prefix=form.text("rule") or None,
        recipient=form.text("recipient", 320) or None, sender=form.text("sender", 320) or None,
        txn_id=form.text("txn") or None)
    records = [] if form.errors else await query_audit(ctx, filters, limit)
    return render(request, "audit.html", status=422 if form.errors else 200, form=form, records=records,
                  kind_choices=[("", "any kind"), *((kind, kind) for kind in KINDS)],
                  limit_choices=[(str(n), str(n)) for n in LIMITS], limit=limit)

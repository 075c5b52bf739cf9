"""``/api/v1/breakers``: streams a volume breaker, approval gate or fan-out detector stopped —
list them, look at one (audience, baseline, samples), approve it with a ceiling, or cancel it.

A stream id is free text (a campaign header, or sender and subject joined by ``|``), so in a
path it is percent-encoded, ``/`` included (``%2F``); the route matches the encoded path and
hands the handler the decoded id.
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web

from ..breaker import service as breaker_service
from ..breaker.model import BreakerRecord, BreakerStatus
from .problems import Problem, bad_input, not_found
from .query import Query
from .requests import context, in_force, json_object, optional_json_object, require_admin

STATUSES: tuple[BreakerStatus | Literal["all"], ...] = ("tripped", "approved", "cancelled", "all")
MAX_CEILING = 1_000_000_000


def routes(prefix: str) -> list[web.RouteDef]:
    return [
        web.get(f"{prefix}/breakers", list_breakers, allow_head=False),
        web.get(f"{prefix}/breakers/{{stream}}", show_breaker, allow_head=False),
        web.post(f"{prefix}/breakers/{{stream}}/approve", approve_breaker),
        web.post(f"{prefix}/breakers/{{stream}}/cancel", cancel_breaker),
    ]


def record_json(record: BreakerRecord) -> dict[str, Any]:
    return {"stream": record.stream, "rule": record.rule, "sender": record.sender, "class": record.message_class,
            "status": record.status, "threshold": record.threshold, "ceiling": record.ceiling,
            "recipients": record.recipients, "tripped_at": record.tripped_at, "updated_at": record.updated_at,
            "decided_by": record.decided_by, "decided_at": record.decided_at}


async def list_breakers(request: web.Request) -> web.Response:
    """GET /breakers?status=tripped|approved|cancelled|all&limit=N, newest trip first."""
    query = Query(request, {"status", "limit"})
    status = query.choice("status", STATUSES, "tripped")
    limit = query.integer("limit", 50, 1, 1000)
    summaries = await breaker_service.list_breakers(context(request), None if status == "all" else status, limit)
    return web.json_response({"items": [{**record_json(s.record), "held": s.held} for s in summaries]})


async def show_breaker(request: web.Request) -> web.Response:
    """GET /breakers/{stream}?samples=N: what an admin needs to approve or cancel it."""
    samples = Query(request, {"samples"}).integer("samples", 3, 0, 20)
    stream = request.match_info["stream"]
    try:
        details = await breaker_service.show_breaker(context(request), stream, samples)
    except breaker_service.BreakerNotFound:
        raise _not_found(stream) from None
    baseline = details.baseline
    return web.json_response({
        **record_json(details.record), "held": details.held,
        "baseline": None if baseline is None else {"baseline": baseline.baseline, "streams": baseline.streams,
                                                   "updated_at": baseline.updated_at},
        "recipients_by_state": dict(details.recipients_by_state),
        "samples": [{"hold_id": s.hold_id, "subject": s.subject, "from": s.from_header,
                     "recipients": list(s.recipients), "held": s.held} for s in details.samples],
    })


async def approve_breaker(request: web.Request) -> web.Response:
    """POST /breakers/{stream}/approve {"ceiling": N}: release its held mail (each recipient
    delivered once) and let it grow to N recipients."""
    require_admin(request)
    Query(request, ())
    body = await json_object(request, {"ceiling"}, required={"ceiling"})
    ceiling = body["ceiling"]
    if isinstance(ceiling, bool) or not isinstance(ceiling, int):
        raise bad_input("ceiling", "must be a whole number of recipients")
    if not 0 <= ceiling <= MAX_CEILING:
        raise bad_input("ceiling", f"must be between 0 and {MAX_CEILING}")
    stream = request.match_info["stream"]
    ctx = context(request)
    try:
        action = await breaker_service.approve_breaker(ctx, stream, ceiling)
    except breaker_service.BreakerNotFound:
        raise _not_found(stream) from None
    except breaker_service.CeilingTooLow as error:
        audience = error.record.recipients
        raise bad_input("ceiling", f"the stream already has {audience} recipients; a lower ceiling would trip it "
                        f"again at once: send a ceiling of {audience} or more") from None
    return web.json_response({"breaker": record_json(action.record), "changed": action.changed,
                              "in_force": (await in_force(ctx)).as_json()})


async def cancel_breaker(request: web.Request) -> web.Response:
    """POST /breakers/{stream}/cancel: its held mail is discarded and the rest of it refused."""
    require_admin(request)
    Query(request, ())
    await optional_json_object(request, set())
    stream = request.match_info["stream"]
    ctx = context(request)
    try:
        action = await breaker_service.cancel_breaker(ctx, stream)
    except breaker_service.BreakerNotFound:
        raise _not_found(stream) from None
    return web.json_response({"breaker": record_json(action.record), "changed": action.changed,
                              "in_force": (await in_force(ctx)).as_json()})


def _not_found(stream: str) -> Problem:
    return not_found(f"no tripped stream {stream!r}; GET /api/v1/breakers?status=all lists them (percent-encode "
                     "the stream in the path, / as %2F)")

"""``/api/v1/holds``: mail a policy held — list it, look at one message, release or discard it.

A message is shown by its headers and a plain-text preview of its body (hold/preview.py),
never as HTML or raw MIME: an admin's browser must not render what a sender wrote.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Awaitable, Callable, Literal, Sequence

from aiohttp import web

from ..hold.model import HeldMessage, HeldRecipient, RecipientState
from ..services import holds as hold_service
from ..services.context import AdminContext
from .problems import Problem, bad_input, not_found
from .query import Query
from .requests import context, in_force, optional_json_object, require_admin, strings

STATES: tuple[RecipientState, ...] = ("held", "released", "delivered", "failed", "discarded")
STATE_CHOICES: tuple[RecipientState | Literal["all"], ...] = (*STATES, "all")
Action = Callable[[AdminContext, str, Sequence[str] | None], Awaitable[hold_service.HoldAction]]


def routes(prefix: str) -> list[web.RouteDef]:
    return [
        web.get(f"{prefix}/holds", list_holds, allow_head=False),
        web.get(f"{prefix}/holds/{{id}}", show_hold, allow_head=False),
        web.post(f"{prefix}/holds/{{id}}/release", release_hold),
        web.post(f"{prefix}/holds/{{id}}/discard", discard_hold),
    ]


def summary_json(message: HeldMessage) -> dict[str, Any]:
    counts = Counter(r.state for r in message.recipients)
    return {"id": message.id, "txn_id": message.txn_id, "created_at": message.created_at, "client": message.client,
            "sender": message.sender, "size": message.size, "stream": message.stream, "class": message.message_class,
            "recipients_by_state": {state: counts[state] for state in STATES if counts[state]},
            "rules": sorted({r.rule for r in message.recipients})}


def _recipient_json(recipient: HeldRecipient) -> dict[str, Any]:
    return {"address": recipient.address, "state": recipient.state, "rule": recipient.rule,
            "reason": recipient.reason, "attempts": recipient.attempts,
            "next_attempt_at": recipient.next_attempt_at, "last_reply": recipient.last_reply}


async def list_holds(request: web.Request) -> web.Response:
    """GET /holds?state=held|released|delivered|failed|discarded|all&limit=N, newest first."""
    query = Query(request, {"state", "limit"})
    state = query.choice("state", STATE_CHOICES, "held")
    limit = query.integer("limit", 50, 1, 1000)
    messages = await hold_service.list_holds(context(request), None if state == "all" else state, limit)
    return web.json_response({"items": [summary_json(m) for m in messages]})


async def show_hold(request: web.Request) -> web.Response:
    """GET /holds/{id}: the message's envelope, headers, recipients and a text preview."""
    Query(request, ())
    hold_id = request.match_info["id"]
    try:
        details = await hold_service.show_hold(context(request), hold_id)
    except hold_service.HoldNotFound:
        raise _not_found(hold_id) from None
    preview = details.preview
    return web.json_response({
        **summary_json(details.message),
        "content_deleted": details.message.content is None,
        "headers": [{"name": name, "value": value} for name, value in details.headers],
        "preview": None if preview is None else {"text": preview.text, "source": preview.source,
                                                 "truncated": preview.truncated},
        "recipients": [_recipient_json(r) for r in details.message.recipients],
    })


async def release_hold(request: web.Request) -> web.Response:
    """POST /holds/{id}/release, optionally {"recipients": [...]}: the running guard's release
    worker delivers them within a second or two."""
    return await _act(request, hold_service.release_hold)


async def discard_hold(request: web.Request) -> web.Response:
    """POST /holds/{id}/discard, optionally {"recipients": [...]}: they never get the message."""
    return await _act(request, hold_service.discard_hold)


async def _act(request: web.Request, action: Action) -> web.Response:
    require_admin(request)
    Query(request, ())
    body = await optional_json_object(request, {"recipients"})
    recipients = strings(body, "recipients") if "recipients" in body else None
    hold_id = request.match_info["id"]
    ctx = context(request)
    try:
        result = await action(ctx, hold_id, recipients)
    except hold_service.HoldNotFound:
        raise _not_found(hold_id) from None
    except hold_service.NotARecipient as error:
        raise bad_input("recipients", f"{', '.join(error.addresses)} not a recipient of hold {hold_id}; its "
                        f"recipients are {', '.join(error.recipients)}") from None
    return web.json_response({"id": hold_id, "changed": result.changed,
                              "in_force": (await in_force(ctx)).as_json() if result.changed else None})


def _not_found(hold_id: str) -> Problem:
    return not_found(f"no held message {hold_id!r}; GET /api/v1/holds?state=all lists them")

"""Console pages for held mail: the queue, one message (headers, recipients, why it was held
and a text preview), and release or discard — the CLI's ``hold`` commands through the same
``services.holds`` functions.

The preview is the message's text only (``admin/preview.py``): a held message is whatever the
sender wrote, and its HTML is never rendered, nor anything it links to fetched.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import get_args

from aiohttp import web

from ...hold.model import HeldMessage, RecipientState
from ...services import holds as service
from ..preview import text_preview
from ..requests import context, principal, require_admin
from .forms import posted, query
from .pages import changed, redirect, render, session

PREVIEW_CHARACTERS = 20_000
LIMIT = 100
STATES: tuple[RecipientState, ...] = get_args(RecipientState)
WAITING = ("held", "released")  # recipients a discard still reaches
STREAM_RULES = ("breaker.", "gate.")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/holds", list_page)
    app.router.add_get("/holds/{id}", hold_page)
    app.router.add_post("/holds/{id}/release", release)
    app.router.add_post("/holds/{id}/discard", discard)


async def list_page(request: web.Request) -> web.Response:
    form = query(request)
    state_text = form.choice_or_all("state", STATES, "held")
    state = next((s for s in STATES if s == state_text), None)  # None: all
    messages = await service.list_holds(context(request), state, LIMIT)
    return render(request, "holds.html", status=422 if form.errors else 200, form=form, state=state_text,
                  state_choices=[(s, "held (waiting for an admin)" if s == "held" else s) for s in STATES]
                  + [("all", "any state")], messages=messages, limit=LIMIT, counts=_counts)


def _counts(message: HeldMessage) -> str:
    counts = Counter[str](r.state for r in message.recipients)
    return ", ".join(f"{counts[state]} {state}" for state in STATES if counts[state])


async def hold_page(request: web.Request, errors: dict[str, str] | None = None, status: int = 200) -> web.Response:
    hold_id = request.match_info["id"]
    try:
        details = await service.show_hold(context(request), hold_id)
    except service.HoldNotFound:
        raise web.HTTPNotFound(text=f"No held message {hold_id}. The list of held mail shows the ids.") from None
    message = details.message
    reasons = Counter((r.rule, r.reason) for r in message.recipients)
    preview = None
    if message.content is not None:  # parsing a large message must not hold up the guard's loop
        preview = await asyncio.to_thread(text_preview, message.content, PREVIEW_CHARACTERS)
    subject = next((value for name, value in details.headers if name.lower() == "subject"), "")
    # Held by a breaker or an approval gate: the stream has a page with its decision.
    stopped = any(r.rule.startswith(STREAM_RULES) for r in message.recipients)
    return render(request, "hold.html", status=status, message=message, message_headers=details.headers,
                  subject=subject, stopped=stopped,
                  reasons=reasons, preview=preview, errors=errors or {}, counts=_counts(message),
                  waiting=[r for r in message.recipients if r.state in WAITING],
                  may_change=principal(request).may_change)


async def release(request: web.Request) -> web.Response:
    return await _act(request, "release")


async def discard(request: web.Request) -> web.Response:
    return await _act(request, "discard")


async def _act(request: web.Request, verb: str) -> web.Response:
    require_admin(request)
    ctx = context(request)
    hold_id = request.match_info["id"]
    form = await posted(request)
    chosen = form.every("recipient")
    if verb == "discard" and not form.checked("confirm"):
        form.error("confirm", "tick this to confirm: discarded recipients never get the message")
        return await hold_page(request, form.errors, 422)
    act = service.release_hold if verb == "release" else service.discard_hold
    try:
        action = await act(ctx, hold_id, chosen or None)
    except service.HoldNotFound:
        raise web.HTTPNotFound(text=f"No held message {hold_id}; nothing was changed.") from None
    except service.NotARecipient as error:
        form.error("recipient", f"{', '.join(error.addresses)} is not a recipient of this message")
        return await hold_page(request, form.errors, 422)
    done = "Released" if verb == "release" else "Discarded"
    if action.changed:
        await changed(request, ctx, f"{done} {action.changed} recipient(s) of hold {hold_id}." +
                      (" The release worker delivers them within a second or two." if verb == "release" else ""))
    else:
        session(request).flash(f"Nothing to {verb}: no {'chosen ' if chosen else ''}recipient of hold {hold_id} "
                               f"is {'held' if verb == 'release' else 'waiting'}.", "warn")
    return redirect(f"/holds/{hold_id}")

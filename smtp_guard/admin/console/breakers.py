"""Console pages for stopped streams (volume breaker, approval gate, fan-out detector): the list,
one stream with its audience size, its sender's baseline and sample held messages, and the
decision — approve up to a ceiling, or cancel — through the same ``breaker.service`` functions
as ``smtp-guard breaker``.

Stream ids contain spaces, ``|`` and ``/``, so a stream's page takes the rest of the path and the
decisions carry the stream in a form field.
"""

from __future__ import annotations

from typing import get_args
from urllib.parse import quote

from aiohttp import web

from ...breaker import service
from ...breaker.model import BreakerStatus
from ..requests import context, principal, require_admin
from .forms import Form, posted, query
from .pages import changed, redirect, render

STATUSES: tuple[BreakerStatus, ...] = get_args(BreakerStatus)
LIMIT = 100
SAMPLES = 3
MAX_CEILING = 1 << 40


def add_routes(app: web.Application) -> None:
    app.router.add_get("/breakers", list_page)
    app.router.add_post("/breakers/approve", approve)
    app.router.add_post("/breakers/cancel", cancel)
    app.router.add_get("/breakers/{stream:.+}", stream_page)


async def list_page(request: web.Request) -> web.Response:
    form = query(request)
    status_text = form.choice_or_all("status", STATUSES, "tripped")
    status = next((s for s in STATUSES if s == status_text), None)  # None: all
    summaries = await service.list_breakers(context(request), status, LIMIT)
    return render(request, "breakers.html", status=422 if form.errors else 200, form=form, status_filter=status_text,
                  statuses=STATUSES, summaries=summaries, limit=LIMIT)


async def stream_page(request: web.Request) -> web.Response:
    return await _stream(request, request.match_info["stream"], Form(), 200)


async def _stream(request: web.Request, stream: str, form: Form, status: int) -> web.Response:
    try:
        details = await service.show_breaker(context(request), stream, SAMPLES)
    except service.BreakerNotFound:
        raise web.HTTPNotFound(text=f"No stopped stream {stream!r}. The list of stopped streams (status: all) "
                                    "shows every stream id.") from None
    if "ceiling" not in form.data:  # suggest the audience it has: the smallest ceiling that lets it go on
        form.data["ceiling"] = str(details.record.recipients)
    return render(request, "breaker.html", status=status, details=details, record=details.record, form=form,
                  may_change=principal(request).may_change)


async def approve(request: web.Request) -> web.Response:
    require_admin(request)
    ctx = context(request)
    form = await posted(request)
    stream = form.value("stream")
    ceiling = form.integer("ceiling", -1, 0, MAX_CEILING)
    if not form.text("ceiling"):
        form.error("ceiling", "enter the number of recipients the stream may reach")
    if not form.errors:
        try:
            action = await service.approve_breaker(ctx, stream, ceiling)
        except service.BreakerNotFound:
            raise web.HTTPNotFound(text=f"No stopped stream {stream!r}; nothing was changed.") from None
        except service.CeilingTooLow as error:
            form.error("ceiling", f"the stream already has {error.record.recipients} recipients; a lower ceiling "
                                  f"would stop it again at once (enter at least {error.record.recipients})")
        else:
            await changed(request, ctx, f"Approved stream {stream!r} up to {ceiling} recipients; released "
                                        f"{action.changed} held recipient(s) for delivery.")
            return redirect(f"/breakers/{_quoted(stream)}")
    return await _stream(request, stream, form, 422)


async def cancel(request: web.Request) -> web.Response:
    require_admin(request)
    ctx = context(request)
    form = await posted(request)
    stream = form.value("stream")
    if not form.checked("confirm"):
        form.error("confirm", "tick this to confirm: the held mail is discarded and the rest of the stream refused")
        return await _stream(request, stream, form, 422)
    try:
        action = await service.cancel_breaker(ctx, stream)
    except service.BreakerNotFound:
        raise web.HTTPNotFound(text=f"No stopped stream {stream!r}; nothing was changed.") from None
    await changed(request, ctx, f"Cancelled stream {stream!r}; discarded {action.changed} held recipient(s). "
                                "Further mail of it is refused with 550 5.7.1.")
    return redirect(f"/breakers/{_quoted(stream)}")


def _quoted(stream: str) -> str:
    return quote(stream, safe="")

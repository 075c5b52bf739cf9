"""Console pages for erasure: erase addresses (or erasure tokens) under a reference, read the
receipts, verify one address, and see later attempts to mail erased addresses — the CLI's
``erase`` commands through the same ``services.erasure`` functions.

No page keeps an erased address: receipts name none, and the flash message after an erasure
names only the reference and the receipts.
"""

from __future__ import annotations

from aiohttp import web

from ...services import erasure as service
from ...services.audit import BadTime, parse_time
from ..requests import context, principal, require_admin
from .forms import Form, posted, query
from .pages import changed, redirect, render

LIMIT = 100
MAX_TARGETS = 1000


def add_routes(app: web.Application) -> None:
    app.router.add_get("/erasures", erasures_page)
    app.router.add_post("/erasures", erase)
    app.router.add_get("/erasures/receipts/{id}", receipt_page)
    app.router.add_get("/erasures/verify", verify_page)
    app.router.add_get("/erasures/attempts", attempts_page)


async def erasures_page(request: web.Request) -> web.Response:
    return await _page(request, Form(), 200)


async def _page(request: web.Request, form: Form, status: int) -> web.Response:
    receipts = await service.receipts(context(request), LIMIT)
    return render(request, "erasures.html", status=status, form=form, receipts=receipts, limit=LIMIT,
                  may_change=principal(request).may_change)


async def erase(request: web.Request) -> web.Response:
    require_admin(request)
    ctx = context(request)
    form = await posted(request)
    values = form.lines("targets", MAX_TARGETS)
    reference = form.text("reference", 200)
    if not values:
        form.error("targets", "enter at least one address or erasure token")
    if not reference:
        form.error("reference", "enter the reference of the erasure request, e.g. its ticket number")
    if not form.checked("confirm"):
        form.error("confirm", "tick this to confirm: an erasure cannot be undone")
    targets, bad = [], []
    for value in values:  # all or nothing: one bad line and nothing is erased
        try:
            targets.append(service.target_from_text(ctx, value))
        except service.ErasureInputError as error:
            bad.append(str(error))
    if bad:
        form.error("targets", "; ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""))
    if form.errors:
        return await _page(request, form, 422)
    receipts = await service.erase(ctx, targets, reference)
    await changed(request, ctx, f"Erased {len(receipts)} address(es) under reference {reference}: receipt "
                                f"{', '.join(r.id for r in receipts)}.")
    return redirect(f"/erasures/receipts/{receipts[0].id}" if len(receipts) == 1 else "/erasures")


async def receipt_page(request: web.Request) -> web.Response:
    receipt_id = request.match_info["id"]
    found = await service.receipt(context(request), receipt_id)
    if found is None:
        raise web.HTTPNotFound(text=f"No erasure receipt {receipt_id}. The erasure page lists the receipts.")
    return render(request, "receipt.html", receipt=found)


async def verify_page(request: web.Request) -> web.Response:
    """Is the address enforced, and does no file in the data directory hold it any more?"""
    form = query(request)
    address = form.text("address", 320)
    result = None
    if address and not form.errors:
        try:
            result = await service.verify(context(request), address)
        except service.ErasureInputError as error:
            form.error("address", str(error))
    return render(request, "verify.html", status=422 if form.errors else 200, form=form, result=result,
                  data_dir=context(request).config.store.data_dir)


async def attempts_page(request: web.Request) -> web.Response:
    form = query(request)
    ctx = context(request)
    since = None
    if since_text := form.text("since", 40):
        try:
            since = parse_time(since_text, ctx.clock())
        except BadTime as error:
            form.error("since", str(error))
    attempts = [] if form.errors else await service.attempts(
        ctx, since, form.text("reference", 200) or None, LIMIT)
    return render(request, "attempts.html", status=422 if form.errors else 200, form=form, attempts=attempts,
                  limit=LIMIT)

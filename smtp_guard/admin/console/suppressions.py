"""Console pages for suppression lists: search and page through entries, add and remove them,
and ``check`` what would happen to one address now — the CLI's ``suppress`` commands through
the same ``services.suppressions`` functions."""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from ...config import ConfigError, parse_duration
from ...services import suppressions as service
from ...suppression_model import EntryKind, SuppressionFilter
from ..requests import context, principal, require_admin
from .forms import Form, posted, query
from .pages import changed, local_path, redirect, render

PAGE_SIZE = 50
MAX_PAGE = 2000  # paging reads every earlier entry again; past this, a search narrows better


def add_routes(app: web.Application) -> None:
    app.router.add_get("/suppressions", list_page)
    app.router.add_post("/suppressions", add)
    app.router.add_post("/suppressions/remove", remove)
    app.router.add_get("/check", check_page)


async def list_page(request: web.Request) -> web.Response:
    return await _list(request, Form(), status=200)


async def _list(request: web.Request, add_form: Form, status: int) -> web.Response:
    """The entries matching the query's filters, a page at a time, oldest first."""
    ctx = context(request)
    filters_form = query(request)
    list_name = filters_form.text("list", 63) or None
    if list_name is not None and list_name not in ctx.config.lists:
        filters_form.error("list", f"no list named {list_name!r}")
    kind_text = filters_form.text("kind")
    kind: EntryKind | None = None
    if kind_text in ("address", "domain"):
        kind = "address" if kind_text == "address" else "domain"
    elif kind_text:
        filters_form.error("kind", "choose address or domain")
    page_text = filters_form.value("page")  # from a pager link: anything else shows the first page
    page = int(page_text) if page_text.isdigit() and 1 <= int(page_text) <= MAX_PAGE else 1
    filters = SuppressionFilter(list_name=list_name, kind=kind, source=filters_form.text("source") or None,
                                contains=filters_form.text("q") or None,
                                include_expired=filters_form.checked("expired"))
    entries, has_next = [], False
    if not filters_form.errors:
        offset = (page - 1) * PAGE_SIZE
        found = await service.list_entries(ctx, filters, limit=offset + PAGE_SIZE + 1)
        entries, has_next = found[offset:offset + PAGE_SIZE], len(found) > offset + PAGE_SIZE
    wanted = {name: value for name, value in filters_form.data.items() if name != "page" and value}
    return render(request, "suppressions.html", status=422 if filters_form.errors else status,
                  filters=filters_form, add_form=add_form, entries=entries, page=page, lists=ctx.config.lists,
                  first=(page - 1) * PAGE_SIZE + 1, back=request.path_qs,
                  previous_url=_page_url(wanted, page - 1) if page > 1 else None,
                  next_url=_page_url(wanted, page + 1) if has_next and page < MAX_PAGE else None,
                  may_change=principal(request).may_change)


def _page_url(filters: dict[str, str], page: int) -> str:
    return "/suppressions?" + urlencode({**filters, "page": str(page)})


async def add(request: web.Request) -> web.Response:
    require_admin(request)
    ctx = context(request)
    form = await posted(request)
    values = form.lines("values")
    if not values:
        form.error("values", "enter at least one address or @domain")
    list_name = form.text("list", 63)
    if list_name not in ctx.config.lists:
        form.error("list", f"choose one of the configured lists ({', '.join(ctx.config.lists)})")
    reason = form.text("reason")
    lifetime = _lifetime(form)
    include_subdomains = form.checked("include_subdomains")
    for value in values:  # all or nothing: every value is checked before the first is stored
        try:
            target = service.parse_target(ctx, value)
        except service.InvalidTarget as error:
            form.error("values", str(error))
            break
        if include_subdomains and target.kind == "address":
            form.error("include_subdomains", f"{value!r} is an address; this applies to @domain entries only")
    if not form.errors:
        try:
            result = await service.add(ctx, values, list_name, reason, ctx.actor, lifetime, include_subdomains)
        except service.InvalidTarget as error:  # an erased address: refused before anything is stored
            form.error("values", str(error))
        else:
            count = len(result.entries)
            await changed(request, ctx, f"Added {count} entr{'y' if count == 1 else 'ies'} to {list_name} "
                                        f"({result.new} new).")
            return redirect("/suppressions?" + urlencode({"list": list_name}))
    return await _list(request, form, status=422)


def _lifetime(form: Form) -> float | None:
    """Blank: the list's own lifetime; "90d", "12h"; "never"."""
    text = form.text("lifetime", 20)
    if not text:
        return None
    try:
        seconds = parse_duration(text, "lifetime")
    except ConfigError as error:
        form.error("lifetime", str(error).removeprefix("lifetime: "))
        return None
    return service.FOREVER if seconds is None else seconds


async def remove(request: web.Request) -> web.Response:
    require_admin(request)
    ctx = context(request)
    form = await posted(request)
    back = local_path(form.value("back"), "/suppressions", prefix="/suppressions")
    target, list_name = form.text("value"), form.text("list", 63) or None
    try:
        result = await service.remove(ctx, [target], list_name)
    except (service.InvalidTarget, service.UnknownList) as error:
        raise web.HTTPUnprocessableEntity(text=f"Nothing was removed: {error}.") from None
    where = f"from {list_name}" if list_name else "from every list"
    await changed(request, ctx, f"Removed {target} {where} ({result.total} entr{'y' if result.total == 1 else 'ies'}).")
    return redirect(back)


async def check_page(request: web.Request) -> web.Response:
    """What would happen to mail to an address now, and the entries that decide it."""
    form = query(request)
    address = form.text("address", 320)
    result = None
    if address and not form.errors:
        try:
            result = await service.check(context(request), address)
        except service.InvalidTarget as error:
            form.error("address", str(error))
    return render(request, "check.html", status=422 if form.errors else 200, form=form, result=result)

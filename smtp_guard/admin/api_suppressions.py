"""``/api/v1/check`` and ``/api/v1/suppressions``: explain, list (by pages), add, remove, export.

The export is streamed (chunked): it reads the store page by page while it sends, so a list
of millions costs the guard no more memory than a page.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Collection

from aiohttp import web

from ..config import ConfigError, parse_duration
from ..services import suppressions as suppression_service
from ..services.context import AdminContext
from ..suppression_model import EntryKind, SuppressionEntry, SuppressionFilter
from .problems import bad_input
from .query import Query
from .requests import context, in_force, json_object, require_admin, string, strings

log = logging.getLogger(__name__)

FILTERS = ("list", "kind", "source", "contains", "include_expired", "since")
KINDS: tuple[EntryKind, ...] = ("address", "domain")
EXPORT_FORMATS: tuple[suppression_service.ExportFormat, ...] = ("csv", "jsonl")
EXPORT_TYPES = {"csv": "text/csv", "jsonl": "application/x-ndjson"}
EXPORT_CHUNK = 64 * 1024  # characters gathered before a write: one chunk per line would cost a syscall each
MAX_PAGE = 1000
# Longer is "never" in all but name, and an expiry past the year 9999 is a time no export can write.
MAX_LIFETIME = 100 * 365 * 86400


def routes(prefix: str) -> list[web.RouteDef]:
    return [
        web.get(f"{prefix}/check", check, allow_head=False),
        web.get(f"{prefix}/suppressions", list_suppressions, allow_head=False),
        web.post(f"{prefix}/suppressions", add_suppressions),
        web.delete(f"{prefix}/suppressions", remove_suppressions),
        web.get(f"{prefix}/suppressions/export", export_suppressions, allow_head=False),
    ]


def entry_json(entry: SuppressionEntry) -> dict[str, Any]:
    return {"kind": entry.kind, "value": entry.value, "list": entry.list_name, "reason": entry.reason,
            "source": entry.source, "created_at": entry.created_at, "expires_at": entry.expires_at,
            "include_subdomains": entry.include_subdomains}


def known_list(ctx: AdminContext, value: str, field: str = "list") -> str:
    if value not in ctx.config.lists:
        raise bad_input(field, f"no list named {value!r}; configured lists are {', '.join(ctx.config.lists)}")
    return value


async def check(request: web.Request) -> web.Response:
    """GET /check?address=A: what would happen to mail to A now, and the entries that decide it."""
    address = Query(request, {"address"}).required("address", "jane@example.com")
    ctx = context(request)
    try:
        result = await suppression_service.check(ctx, address)
    except suppression_service.InvalidTarget as error:
        raise bad_input("address", str(error)) from None
    decision = result.decision
    return web.json_response({
        "address": result.address, "key": result.key, "verdict": decision.verdict.value, "rule": decision.rule,
        "reason": decision.reason, "reply": None if decision.reply is None else str(decision.reply),
        "entries": [entry_json(entry) for entry in result.entries],
    })


def _filters(query: Query, ctx: AdminContext) -> SuppressionFilter:
    list_name = query.text("list", max_length=63)
    kind = query.optional_choice("kind", KINDS)
    return SuppressionFilter(None if list_name is None else known_list(ctx, list_name), kind,
                             query.text("source"), query.text("contains") or None, query.flag("include_expired"),
                             query.time("since", ctx.clock()))


async def list_suppressions(request: web.Request) -> web.Response:
    """GET /suppressions: entries in storage order, a page at a time (``next_cursor``)."""
    query = Query(request, {*FILTERS, "limit", "cursor"})
    ctx = context(request)
    filters = _filters(query, ctx)
    limit = query.integer("limit", 100, 1, MAX_PAGE)
    try:
        page = await suppression_service.list_page(ctx, filters, limit, query.text("cursor", max_length=40))
    except suppression_service.InvalidCursor as error:
        raise bad_input("cursor", str(error)) from None
    return web.json_response({"items": [entry_json(e) for e in page.entries], "next_cursor": page.next_cursor})


async def add_suppressions(request: web.Request) -> web.Response:
    """POST /suppressions {"values": [...], "list": "manual", "reason": "...", "lifetime": "90d"}."""
    require_admin(request)
    Query(request, ())
    body = await json_object(request, {"values", "list", "reason", "source", "lifetime", "include_subdomains"},
                             required={"values", "list"})
    ctx = context(request)
    values = strings(body, "values")
    list_name = known_list(ctx, string(body, "list", max_length=63))
    reason = string(body, "reason", "")
    source = string(body, "source", "") or ctx.actor
    include_subdomains = body.get("include_subdomains", False)
    if not isinstance(include_subdomains, bool):
        raise bad_input("include_subdomains", "must be true or false")
    lifetime = _lifetime(body.get("lifetime"))
    _check_targets(ctx, values)
    try:
        result = await suppression_service.add(ctx, values, list_name, reason, source, lifetime, include_subdomains)
    except suppression_service.InvalidTarget as error:  # an erased address, or subdomains of an address
        raise bad_input("values", str(error)) from None
    return web.json_response({"new": result.new, "entries": [entry_json(e) for e in result.entries],
                              "in_force": (await in_force(ctx)).as_json()}, status=201 if result.new else 200)


async def remove_suppressions(request: web.Request) -> web.Response:
    """DELETE /suppressions {"values": [...], "list": "manual"} (no list: from every list)."""
    require_admin(request)
    Query(request, ())
    body = await json_object(request, {"values", "list"}, required={"values"})
    ctx = context(request)
    values = strings(body, "values")
    list_name = known_list(ctx, string(body, "list", max_length=63)) if "list" in body else None
    _check_targets(ctx, values)
    result = await suppression_service.remove(ctx, values, list_name)
    return web.json_response({
        "removed": result.total,
        "targets": [{"kind": target.kind, "value": target.value, "removed": count} for target, count in result.removed],
        "in_force": (await in_force(ctx)).as_json(),
    })


def _check_targets(ctx: AdminContext, values: Collection[str]) -> None:
    """All or nothing: every value is checked before the first is stored."""
    for value in values:
        try:
            suppression_service.parse_target(ctx, value)
        except suppression_service.InvalidTarget as error:
            raise bad_input("values", str(error)) from None


def _lifetime(value: Any) -> float | None:
    """"90d", "12h", seconds, "never", or absent (the list's own lifetime)."""
    if value is None:
        return None
    try:
        seconds = parse_duration(value, "lifetime")
    except ConfigError as error:
        raise bad_input("lifetime", str(error).removeprefix("lifetime: ")) from None
    except OverflowError:  # a JSON integer past any float
        seconds = math.inf
    if seconds is None:
        return suppression_service.FOREVER
    if seconds > MAX_LIFETIME:
        raise bad_input("lifetime", 'longer than 100 years; write "never" for an entry that never expires')
    return seconds


async def export_suppressions(request: web.Request) -> web.StreamResponse:
    """GET /suppressions/export?format=csv|jsonl plus the list filters: every matching entry,
    oldest first, as ``smtp-guard suppress export`` writes it (the CSV reads back with an import)."""
    query = Query(request, {*FILTERS, "format"})
    fmt = query.choice("format", EXPORT_FORMATS, "csv")
    ctx = context(request)
    filters = _filters(query, ctx)
    response = web.StreamResponse(headers={
        "Content-Type": f"{EXPORT_TYPES[fmt]}; charset=utf-8",
        "Content-Disposition": f'attachment; filename="suppressions.{fmt}"'})
    response.enable_chunked_encoding()
    await response.prepare(request)
    pending: list[str] = []
    size = 0
    try:
        async for line in suppression_service.export_lines(ctx, filters, fmt):
            pending.append(line)
            size += len(line)
            if size >= EXPORT_CHUNK:
                await response.write("".join(pending).encode("utf-8"))
                pending, size = [], 0
        await response.write("".join(pending).encode("utf-8"))
    except ConnectionResetError:  # the client went away
        return response
    except Exception:
        # The 200 is on its way: the only way left to tell the client the export is cut short
        # is to end the connection without the final chunk.
        log.exception("export of suppressions to %s stopped", ctx.actor)
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response

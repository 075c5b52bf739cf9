"""The admin API under ``/api/v1/``: JSON in and out, one handler per operation, each calling the
same ``services`` function as the CLI command of the same name.

Every changing route needs role ``admin``, returns only after the change is in force on every
running guard (``in_force`` in the response, as the CLI reports it), and refuses bad input
whole with a problem naming the field, before anything is written.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..config import ConfigError, parse_duration
from ..services import suppressions as suppression_service
from ..suppression_model import SuppressionEntry
from .problems import bad_input
from .requests import context, in_force, json_object, require_admin, string, strings

PREFIX = "/api/v1"


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get(f"{PREFIX}/check", check)
    r.add_post(f"{PREFIX}/suppressions", add_suppressions)
    r.add_delete(f"{PREFIX}/suppressions", remove_suppressions)


def entry_json(entry: SuppressionEntry) -> dict[str, Any]:
    return {"kind": entry.kind, "value": entry.value, "list": entry.list_name, "reason": entry.reason,
            "source": entry.source, "created_at": entry.created_at, "expires_at": entry.expires_at,
            "include_subdomains": entry.include_subdomains}


def _list_name(ctx_lists: Any, body: dict[str, Any], name: str = "list", required: bool = True) -> str | None:
    if name not in body and not required:
        return None
    value = string(body, name, max_length=63)
    if value not in ctx_lists:
        raise bad_input(name, f"no list named {value!r}; configured lists are {', '.join(ctx_lists)}")
    return value


async def check(request: web.Request) -> web.Response:
    """GET /check?address=A: what would happen to mail to A now, and the entries that decide it."""
    address = request.query.get("address", "")
    if not address.strip():
        raise bad_input("address", "required, e.g. ?address=jane@example.com")
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


async def add_suppressions(request: web.Request) -> web.Response:
    """POST /suppressions {"values": [...], "list": "manual", "reason": "...", "lifetime": "90d"}."""
    require_admin(request)
    body = await json_object(request, {"values", "list", "reason", "source", "lifetime", "include_subdomains"},
                             required={"values", "list"})
    ctx = context(request)
    values = strings(body, "values")
    list_name = _list_name(ctx.config.lists, body)
    assert list_name is not None
    reason = string(body, "reason", "")
    source = string(body, "source", "") or ctx.actor
    include_subdomains = body.get("include_subdomains", False)
    if not isinstance(include_subdomains, bool):
        raise bad_input("include_subdomains", "must be true or false")
    lifetime = _lifetime(body.get("lifetime"))
    for value in values:  # all or nothing: every value is checked before the first is stored
        try:
            suppression_service.parse_target(ctx, value)
        except suppression_service.InvalidTarget as error:
            raise bad_input("values", str(error)) from None
    result = await suppression_service.add(ctx, values, list_name, reason, source, lifetime, include_subdomains)
    return web.json_response({"new": result.new, "entries": [entry_json(e) for e in result.entries],
                              "in_force": (await in_force(ctx)).as_json()}, status=201 if result.new else 200)


async def remove_suppressions(request: web.Request) -> web.Response:
    """DELETE /suppressions {"values": [...], "list": "manual"} (no list: from every list)."""
    require_admin(request)
    body = await json_object(request, {"values", "list"}, required={"values"})
    ctx = context(request)
    values = strings(body, "values")
    list_name = _list_name(ctx.config.lists, body, required=False)
    for value in values:
        try:
            suppression_service.parse_target(ctx, value)
        except suppression_service.InvalidTarget as error:
            raise bad_input("values", str(error)) from None
    result = await suppression_service.remove(ctx, values, list_name)
    return web.json_response({
        "removed": result.total,
        "targets": [{"kind": target.kind, "value": target.value, "removed": count} for target, count in result.removed],
        "in_force": (await in_force(ctx)).as_json(),
    })


def _lifetime(value: Any) -> float | None:
    """"90d", "12h", seconds, "never", or absent (the list's own lifetime)."""
    if value is None:
        return None
    try:
        seconds = parse_duration(value, "lifetime")
    except ConfigError as error:
        raise bad_input("lifetime", str(error).removeprefix("lifetime: ")) from None
    return suppression_service.FOREVER if seconds is None else seconds

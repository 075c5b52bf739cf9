"""``/api/v1/erasures``: erase addresses (GDPR Art. 17), read receipts, prove an erasure, and
see who still tries to mail an erased address.

Nothing here answers with an erased address: receipts name none, a verification reports
where copies are (file and offset), never their text, and attempts carry the reference only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from ..erasure.model import ErasureAttempt
from ..services import erasure as erasure_service
from .problems import bad_input, not_found
from .query import Query
from .requests import context, in_force, json_object, require_admin, string, strings

MAX_ADDRESSES = 1000  # each erasure rewrites the WAL; more belongs in the CLI's --file
MAX_COPIES_SHOWN = 50


def routes(prefix: str) -> list[web.RouteDef]:
    # verify and attempts before {id}: the first route that matches answers.
    return [
        web.post(f"{prefix}/erasures", erase),
        web.get(f"{prefix}/erasures", list_receipts, allow_head=False),
        web.get(f"{prefix}/erasures/verify", verify, allow_head=False),
        web.get(f"{prefix}/erasures/attempts", list_attempts, allow_head=False),
        web.get(f"{prefix}/erasures/{{id}}", show_receipt, allow_head=False),
    ]


async def erase(request: web.Request) -> web.Response:
    """POST /erasures {"addresses": [address or 64-hex token, ...], "reference": "DSR-2026-0042"}:
    one receipt per address, all in force when this returns. A bad entry refuses the whole
    request before anything is erased."""
    require_admin(request)
    Query(request, ())
    body = await json_object(request, {"addresses", "reference"}, required={"addresses", "reference"})
    ctx = context(request)
    values = strings(body, "addresses", max_items=MAX_ADDRESSES)
    reference = string(body, "reference", max_length=200).strip()
    if not reference:
        raise bad_input("reference", "required: the reference of the erasure request, e.g. its ticket number")
    targets = []
    for value in values:
        try:
            targets.append(erasure_service.target_from_text(ctx, value))
        except erasure_service.ErasureInputError as error:
            raise bad_input("addresses", f"{error}; nothing was erased") from None
    receipts = await erasure_service.erase(ctx, targets, reference)
    return web.json_response({"receipts": [r.as_dict() for r in receipts], "in_force": (await in_force(ctx)).as_json()},
                             status=201)


async def list_receipts(request: web.Request) -> web.Response:
    """GET /erasures?limit=N: receipts, newest first."""
    limit = Query(request, {"limit"}).integer("limit", 50, 1, 1000)
    receipts = await erasure_service.receipts(context(request), limit)
    return web.json_response({"items": [r.as_dict() for r in receipts]})


async def show_receipt(request: web.Request) -> web.Response:
    Query(request, ())
    receipt_id = request.match_info["id"]
    found = await erasure_service.receipt(context(request), receipt_id)
    if found is None:
        raise not_found(f"no erasure receipt {receipt_id!r}; GET /api/v1/erasures lists them")
    return web.json_response(found.as_dict())


async def verify(request: web.Request) -> web.Response:
    """GET /erasures/verify?address=A: is A enforced by a tombstone, and is no plaintext copy of
    it left in the data directory? ``ok`` only when both hold."""
    address = Query(request, {"address"}).required("address", "jane@example.com")
    ctx = context(request)
    try:
        result = await erasure_service.verify(ctx, address)
    except erasure_service.ErasureInputError as error:
        raise bad_input("address", str(error)) from None
    tombstone = result.tombstone
    data_dir = Path(ctx.config.store.data_dir)
    return web.json_response({
        "ok": result.ok, "enforced": result.is_enforced, "clean": result.is_clean,
        "tombstone": None if tombstone is None else {
            "id": tombstone.id, "reference": tombstone.reference, "created_at": tombstone.created_at,
            "key_id": tombstone.key_id},
        "reply": None if result.decision is None or result.decision.reply is None else str(result.decision.reply),
        "copies_found": len(result.findings),
        "copies": [{"file": str(_relative(f.path, data_dir)), "offset": f.offset}
                   for f in result.findings[:MAX_COPIES_SHOWN]],
    })


def _relative(path: Path, data_dir: Path) -> Path:
    """Where a copy is, from the data directory (the client needs no more of the server's layout)."""
    return path.relative_to(data_dir) if path.is_relative_to(data_dir) else path


async def list_attempts(request: web.Request) -> web.Response:
    """GET /erasures/attempts?since=30d&reference=DSR-…&limit=N: later attempts to mail erased
    addresses, newest first — evidence that someone upstream still holds them."""
    ctx = context(request)
    query = Query(request, {"since", "reference", "limit"})
    since = query.time("since", ctx.clock())
    reference = query.text("reference", max_length=200)
    limit = query.integer("limit", 100, 1, 1000)
    attempts = await erasure_service.attempts(ctx, since, reference, limit)
    return web.json_response({"items": [_attempt_json(a) for a in attempts]})


def _attempt_json(attempt: ErasureAttempt) -> dict[str, Any]:
    return {"time": attempt.time, "tombstone_id": attempt.tombstone_id, "reference": attempt.reference,
            "client": attempt.client, "sender": attempt.sender, "stream": attempt.stream, "txn_id": attempt.txn_id}

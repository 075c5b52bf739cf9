"""Erasure through the admin API, over real HTTP: in force when it returns, provable, and no
response of it names the erased address."""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from smtp_guard import replies

from admin_setup import SENDER
from conftest import wait_until
from sink import Sink
from smtp_client import message, send

Start = Callable[..., Awaitable[Any]]
SPELLINGS = ("jane@example.com", "jane.doe+news@example.com", "jane")


def names_jane(body: Any) -> bool:
    text = json.dumps(body).lower()
    return any(spelling in text for spelling in SPELLINGS)


async def test_an_erasure_is_in_force_when_it_returns_and_verifies(start_admin: Start, sink: Sink) -> None:
    admin = await start_admin()
    status, _, _ = await admin.call("POST", "/api/v1/suppressions",
                                    json={"values": ["jane@example.com"], "list": "unsubscribed"})
    assert status == 201
    status, body, _ = await admin.call("POST", "/api/v1/erasures",
                                       json={"addresses": ["Jane@Example.com"], "reference": "DSR-2026-0042"})
    assert status == 201, body
    [receipt] = body["receipts"]
    assert receipt["reference"] == "DSR-2026-0042" and body["in_force"]["all_confirmed"]
    assert {"store": "suppressions", "what": "entries", "count": 1} in receipt["purged"]
    assert not names_jane(body)

    # In force at once: no wait for a reload.
    outcome = await send(admin.guard.smtp_address, SENDER, ["jane@example.com", "ok@example.com"],
                         message(sender=SENDER, extra_headers="X-Campaign-ID: spring-sale\r\n"))
    assert outcome.rcpt["jane@example.com"] == str(replies.ERASED)
    assert sink.delivered_to() == ["ok@example.com"]

    status, body, _ = await admin.call("GET", "/api/v1/erasures/verify?address=jane@example.com",
                                       token=admin.viewer_token)
    assert status == 200 and body["ok"] and body["enforced"] and body["clean"], body
    assert body["tombstone"]["reference"] == "DSR-2026-0042" and body["reply"] == str(replies.ERASED)
    assert body["copies"] == [] and not names_jane(body)

    status, body, _ = await admin.call("GET", "/api/v1/erasures", token=admin.viewer_token)
    assert [r["receipt"] for r in body["items"]] == [receipt["receipt"]]
    status, body, _ = await admin.call("GET", f"/api/v1/erasures/{receipt['receipt']}", token=admin.viewer_token)
    assert status == 200 and body == receipt

    async def attempts() -> list[dict[str, Any]]:
        _, found, _ = await admin.call("GET", "/api/v1/erasures/attempts?since=1h&reference=DSR-2026-0042")
        return list(found["items"])

    [attempt] = await wait_until(attempts, what="the attempt to mail jane to be recorded")
    assert (attempt["stream"], attempt["sender"], attempt["tombstone_id"]) == (
        "spring-sale", SENDER, receipt["tombstone_id"])
    assert not names_jane(attempt)
    status, body, _ = await admin.call("GET", "/api/v1/erasures/attempts?reference=DSR-other")
    assert body["items"] == []
    # An erased address can not come back through the API.
    status, body, _ = await admin.call("POST", "/api/v1/suppressions",
                                       json={"values": ["jane@example.com"], "list": "unsubscribed"})
    assert status == 422 and body["field"] == "values" and "erased" in body["detail"]


async def test_verify_says_when_an_address_is_not_erased(start_admin: Start) -> None:
    admin = await start_admin()
    status, body, _ = await admin.call("GET", "/api/v1/erasures/verify?address=bob@example.com")
    assert status == 200
    assert (body["ok"], body["enforced"], body["tombstone"], body["reply"]) == (False, False, None, None)


async def test_one_bad_entry_refuses_the_whole_erasure(start_admin: Start, sink: Sink) -> None:
    admin = await start_admin()
    for payload, field in [
        ({"addresses": ["jane@example.com", "not an address"], "reference": "DSR-1"}, "addresses"),
        ({"addresses": ["jane@example.com"], "reference": "  "}, "reference"),
        ({"addresses": ["jane@example.com"], "reference": "DSR-\udc00"}, "reference"),
        ({"addresses": ["jane@example.com"]}, "reference"),
        ({"addresses": [], "reference": "DSR-1"}, "addresses"),
        ({"addresses": ["jane@example.com"], "reference": "DSR-1", "why": "asked"}, "why"),
        ({"addresses": ["jane@example.com"] * 1001, "reference": "DSR-1"}, "addresses"),
    ]:
        status, body, _ = await admin.call("POST", "/api/v1/erasures", json=payload)
        assert (status, body["field"]) == (422, field), (payload, body)
    status, body, _ = await admin.call("GET", "/api/v1/erasures")
    assert body["items"] == []
    await send(admin.guard.smtp_address, SENDER, ["jane@example.com"], message(sender=SENDER))
    assert sink.delivered_to() == ["jane@example.com"]
    for path, status, field in [
        ("/api/v1/erasures/verify", 422, "address"),
        ("/api/v1/erasures/verify?address=jane", 422, "address"),
        ("/api/v1/erasures/attempts?since=yesterday", 422, "since"),
        ("/api/v1/erasures?limit=-1", 422, "limit"),
        ("/api/v1/erasures/0000000000000000", 404, None),
    ]:
        got, body, _ = await admin.call("GET", path)
        assert (got, body.get("field")) == (status, field), (path, body)

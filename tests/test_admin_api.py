"""The admin API over real HTTP against a running guard on a real SQLite store."""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

import aiohttp
import aiosmtplib
import pytest

from smtp_guard.store.base import StoreError

from admin_setup import finished_job
from conftest import wait_until
from sink import Sink

Start = Callable[..., Awaitable[Any]]


async def send(guard: Any, recipient: str) -> None:
    host, port = guard.smtp_address
    await aiosmtplib.send(b"Subject: hi\r\n\r\nhello\r\n", sender="news@platform.test", recipients=[recipient],
                          hostname=host, port=port)


# --- authentication and roles ------------------------------------------------------------------

async def test_health_answers_without_a_token_and_the_api_does_not(start_admin: Start) -> None:
    admin = await start_admin()
    status, body, _ = await admin.call("GET", "/healthz", token=None)
    assert (status, body) == (200, "ok\n")
    status, body, _ = await admin.call("GET", "/readyz", token=None)
    assert status == 200 and body.startswith("ready")
    status, body, response = await admin.call("GET", "/api/v1/check?address=a@example.com", token=None)
    assert status == 401 and body["status"] == 401 and "Bearer" in body["detail"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.content_type == "application/problem+json"


async def test_a_wrong_token_is_refused_and_repeated_failures_are_throttled(start_admin: Start) -> None:
    admin = await start_admin(admin={"auth_max_failures": 3})
    for _ in range(3):
        status, body, _ = await admin.call("GET", "/api/v1/check?address=a@example.com", token="sgt_wrong")
        assert status == 401 and "not valid" in body["detail"]
    # Throttled now: even the right token waits until the window passes.
    status, body, response = await admin.call("GET", "/api/v1/check?address=a@example.com")
    assert status == 429 and int(response.headers["Retry-After"]) > 0
    metrics = admin.guard.metrics.registry
    assert metrics.get_sample_value("smtp_guard_admin_auth_failures_total", {"reason": "invalid"}) == 3
    assert metrics.get_sample_value("smtp_guard_admin_auth_failures_total", {"reason": "throttled"}) == 1


async def test_a_viewer_may_read_but_not_change(start_admin: Start) -> None:
    admin = await start_admin()
    status, _, _ = await admin.call("GET", "/api/v1/check?address=a@example.com", token=admin.viewer_token)
    assert status == 200
    status, body, _ = await admin.call("POST", "/api/v1/suppressions", token=admin.viewer_token,
                                       json={"values": ["a@example.com"], "list": "manual"})
    assert status == 403 and "role 'admin'" in body["detail"]


# --- suppressions ------------------------------------------------------------------------------

async def test_a_suppression_added_through_the_api_is_in_force_when_it_returns(start_admin: Start,
                                                                                sink: Sink) -> None:
    admin = await start_admin()
    status, body, _ = await admin.call("POST", "/api/v1/suppressions",
                                       json={"values": ["Jane.Doe+news@Example.com"], "list": "unsubscribed",
                                             "reason": "asked by phone"})
    assert status == 201, body
    assert body["new"] == 1 and body["in_force"]["all_confirmed"] and body["in_force"]["confirmed"] >= 1
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await send(admin.guard, "jane.doe@example.com")
    assert refused.value.recipients[0].code == 550
    status, body, _ = await admin.call("GET", "/api/v1/check?address=jane.doe%2Bother@example.com")
    assert status == 200 and body["verdict"] == "reject" and body["rule"] == "suppression.unsubscribed"
    assert body["entries"][0]["reason"] == "asked by phone"

    status, body, _ = await admin.call("DELETE", "/api/v1/suppressions",
                                       json={"values": ["jane.doe@example.com"]})
    assert status == 200 and body["removed"] == 1 and body["in_force"]["all_confirmed"]
    await send(admin.guard, "jane.doe@example.com")
    assert sink.messages[-1].rcpt_tos == ["jane.doe@example.com"]


@pytest.mark.parametrize("payload, field", [
    ({"values": ["not-an-address"], "list": "manual"}, "values"),
    ({"values": ["a@example.com"], "list": "no-such-list"}, "list"),
    ({"values": ["a@example.com"], "list": "manual", "colour": "red"}, "colour"),
    ({"values": [], "list": "manual"}, "values"),
    ({"list": "manual"}, "values"),
    ({"values": ["a@example.com"], "list": "manual", "lifetime": "soon"}, "lifetime"),
    ({"values": ["a@example.com"], "list": "manual", "lifetime": "36501d"}, "lifetime"),
    ({"values": ["a@example.com"], "list": "manual", "lifetime": 10 ** 400}, "lifetime"),
    ({"values": ["a@example.com"], "list": "manual", "reason": "\ud800"}, "reason"),  # JSON escapes it; no store takes it
])
async def test_bad_input_names_the_field_and_stores_nothing(start_admin: Start, payload: dict[str, Any],
                                                             field: str) -> None:
    admin = await start_admin()
    status, body, _ = await admin.call("POST", "/api/v1/suppressions",
                                       json={**payload, "values": ["ok@example.com", *payload["values"]]}
                                       if "values" in payload and payload["values"] else payload)
    assert status == 422 and body["field"] == field, body
    status, body, _ = await admin.call("GET", "/api/v1/check?address=ok@example.com")
    assert body["entries"] == []


async def test_a_body_that_is_not_json_is_a_400(start_admin: Start) -> None:
    admin = await start_admin()
    status, body, _ = await admin.call("POST", "/api/v1/suppressions", data=b"{nope",
                                       headers={"Content-Type": "application/json"})
    assert status == 400 and "not JSON" in body["detail"]
    status, body, _ = await admin.call("POST", "/api/v1/suppressions", data=b"[]",
                                       headers={"Content-Type": "application/json"})
    assert status == 400 and "object" in body["detail"]


async def add(admin: Any, values: list[str], list_name: str = "unsubscribed", **fields: Any) -> None:
    status, body, _ = await admin.call("POST", "/api/v1/suppressions", json={"values": values, "list": list_name,
                                                                             **fields})
    assert status in (200, 201), body


async def test_entries_are_listed_a_page_at_a_time_with_filters(start_admin: Start) -> None:
    admin = await start_admin()
    await add(admin, ["gone@example.org"], "bounced", lifetime=1)
    await add(admin, [f"user{i}@example.com" for i in range(5)])
    await add(admin, ["@example.net"], "bounced", source="crm")

    async def values(query: str) -> list[str]:
        status, body, _ = await admin.call("GET", "/api/v1/suppressions?" + query)
        assert status == 200, body
        return [item["value"] for item in body["items"]]

    async def has_expired() -> bool:
        return await values("list=bounced") == ["example.net"]

    await wait_until(has_expired, what="gone@example.org to expire")
    seen, cursor, pages = [], None, 0
    while True:
        query = "/api/v1/suppressions?limit=2" + (f"&cursor={cursor}" if cursor else "")
        status, body, _ = await admin.call("GET", query, token=admin.viewer_token)
        assert status == 200 and len(body["items"]) <= 2
        seen += [item["value"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == [f"user{i}@example.com" for i in range(5)] + ["example.net"]
    assert await values("list=bounced") == ["example.net"]
    assert await values("kind=domain") == ["example.net"]
    assert await values("source=crm") == ["example.net"]
    assert await values("contains=USER3") == ["user3@example.com"]
    assert await values("list=bounced&include_expired=true") == ["gone@example.org", "example.net"]
    for query, field in [("limit=0", "limit"), ("limit=1001", "limit"), ("limit=2.5", "limit"),
                         ("kind=person", "kind"), ("list=nope", "list"), ("include_expired=yes", "include_expired"),
                         ("cursor=abc", "cursor"), ("cursor=r9223372036854775808", "cursor"),
                         ("lists=bounced", "lists"), ("limit=1&limit=2", "limit")]:
        status, body, _ = await admin.call("GET", "/api/v1/suppressions?" + query)
        assert (status, body["field"]) == (422, field), (query, body)


async def test_the_export_is_streamed_and_reads_back_with_an_import(start_admin: Start) -> None:
    admin = await start_admin()
    everyone = [f"user{i:05}@example.com" for i in range(3000)]
    status, _, response = await admin.call("POST", "/api/v1/suppressions/import?list=bounced",
                                           data="\r\n".join(everyone).encode())
    assert status == 202
    assert (await finished_job(admin, response.headers["Location"]))["result"]["new"] == 3000

    async def exported(query: str) -> tuple[str, Any]:
        async with admin.http.get(admin.url("/api/v1/suppressions/export" + query),
                                  headers={"Authorization": f"Bearer {admin.viewer_token}"}) as response:
            assert response.status == 200
            return await response.text(), response

    full, response = await exported("")
    assert response.headers["Transfer-Encoding"] == "chunked" and response.content_type == "text/csv"
    assert 'filename="suppressions.csv"' in response.headers["Content-Disposition"]
    lines = full.splitlines()
    assert lines[0] == "kind,value,list,reason,source,created_at,expires_at,include_subdomains"
    assert [line.split(",")[1] for line in lines[1:]] == everyone

    text, response = await exported("?format=jsonl&contains=user0299")
    assert response.content_type == "application/x-ndjson"
    assert [json.loads(line)["value"] for line in text.splitlines()] == [f"user0299{i}@example.com" for i in range(10)]

    status, _, _ = await admin.call("DELETE", "/api/v1/suppressions", json={"values": everyone[:1]})
    assert status == 200
    status, _, _ = await admin.call("POST", "/api/v1/suppressions", json={"values": everyone[:1], "list": "manual"})
    assert status == 201
    # The export reads back: the entry taken off the list comes back, the rest are there already.
    status, _, response = await admin.call("POST", "/api/v1/suppressions/import", data=full.encode())
    assert status == 202
    job = await finished_job(admin, response.headers["Location"])
    assert (job["result"]["new"], job["result"]["present"], job["result"]["lists"]) == (1, 2999, ["bounced"])
    for query, field in [("?format=xml", "format"), ("?list=nope", "list"), ("?since=last week", "since")]:
        status, body, _ = await admin.call("GET", "/api/v1/suppressions/export" + query)
        assert (status, body["field"]) == (422, field)


async def test_the_audit_trail_shows_admin_actions_with_pseudonyms(start_admin: Start) -> None:
    admin = await start_admin()
    await add(admin, ["jane@example.com"], reason="asked by phone")
    status, body, _ = await admin.call("GET", "/api/v1/audit?kind=admin&since=1h", token=admin.viewer_token)
    assert status == 200
    [record] = body["items"]
    assert (record["verdict"], record["rule"], record["actor"]) == ("suppress.add", "suppression.unsubscribed",
                                                                   "api:ops")
    assert record["recipient"].startswith("h:") and "jane" not in json.dumps(body)
    assert record["time_iso"].endswith("Z")
    status, body, _ = await admin.call("GET", "/api/v1/audit?recipient=Jane@Example.com&rule=suppression")
    assert [r["verdict"] for r in body["items"]] == ["suppress.add"]
    status, body, _ = await admin.call("GET", "/api/v1/audit?until=2000-01-01")
    assert body["items"] == []
    for query, field in [("since=yesterday", "since"), ("until=soon", "until"), ("kind=mail", "kind"),
                         ("limit=none", "limit"), ("actor=me", "actor")]:
        status, body, _ = await admin.call("GET", "/api/v1/audit?" + query)
        assert (status, body["field"]) == (422, field), (query, body)


async def test_an_unknown_route_or_method_is_a_problem_too(start_admin: Start) -> None:
    admin = await start_admin()
    status, body, response = await admin.call("GET", "/api/v1/nothing")
    assert status == 404 and response.content_type == "application/problem+json"
    status, body, response = await admin.call("PUT", "/api/v1/suppressions", json={})
    assert status == 405 and body["status"] == 405


async def test_an_export_the_store_fails_midway_is_cut_off_not_ended(start_admin: Start,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The 200 is sent before the entries are read: a store error midway must not look like the
    end of a complete export, so the connection ends without the final chunk."""
    admin = await start_admin()
    await add(admin, ["jane@example.com"])
    store = admin.guard.backends.suppressions
    read = store.query

    async def failing(*args: Any, **kwargs: Any) -> Any:
        async for entry in read(*args, **kwargs):
            yield entry
        raise StoreError("disk I/O error")

    monkeypatch.setattr(store, "query", failing)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with admin.http.get(admin.url("/api/v1/suppressions/export"),
                                  headers={"Authorization": f"Bearer {admin.admin_token}"}) as response:
            assert response.status == 200
            await response.read()

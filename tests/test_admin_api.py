"""The admin API over real HTTP against a running guard on a real SQLite store."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import aiosmtplib
import pytest

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

"""Held mail through the admin API, over real HTTP: list, look (text preview only), release
to the real sink, discard."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from admin_setup import HOLD_LISTS, SENDER, hold_mail
from conftest import wait_until
from sink import Sink
from smtp_client import message

Start = Callable[..., Awaitable[Any]]

HTML = (f"From: Shop <{SENDER}>\r\nTo: you@example.com\r\nSubject: Your order\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/html; charset=utf-8\r\n\r\n"
        "<html><head><style>p{}</style></head><body><p>Hello <b>Jane</b></p>"
        "<script>alert('x')</script><img src=\"https://tracker.test/p.gif\"></body></html>\r\n").encode()


async def test_a_held_message_is_listed_and_shown_with_a_text_preview_only(start_admin: Start) -> None:
    admin = await start_admin(lists=HOLD_LISTS)
    hold_id = await hold_mail(admin, ["jane@example.com"], HTML)

    status, body, _ = await admin.call("GET", "/api/v1/holds", token=admin.viewer_token)
    assert status == 200
    [listed] = body["items"]
    assert listed["id"] == hold_id and listed["sender"] == SENDER
    assert listed["recipients_by_state"] == {"held": 1} and listed["rules"] == ["suppression.manual"]

    status, body, _ = await admin.call("GET", f"/api/v1/holds/{hold_id}", token=admin.viewer_token)
    assert status == 200
    assert body["preview"] == {"text": "Hello Jane", "source": "text/html", "truncated": False}
    assert {"name": "Subject", "value": "Your order"} in body["headers"]
    assert [(r["address"], r["state"]) for r in body["recipients"]] == [("jane@example.com", "held")]
    assert "<" not in str(body["preview"]) and "tracker.test" not in str(body)


async def test_release_delivers_the_held_recipients_to_the_upstream_once(start_admin: Start, sink: Sink) -> None:
    admin = await start_admin(lists=HOLD_LISTS)
    hold_id = await hold_mail(admin, ["jane@example.com", "joe@example.com"])
    assert sink.delivered_to() == []

    status, body, _ = await admin.call("POST", f"/api/v1/holds/{hold_id}/release",
                                       json={"recipients": ["JANE@example.com"]})
    assert status == 200 and body["changed"] == 1 and body["in_force"]["all_confirmed"], body
    await wait_until(lambda: sink.delivered_to() == ["jane@example.com"], what="jane's release to be delivered")

    status, body, _ = await admin.call("POST", f"/api/v1/holds/{hold_id}/release")  # no body: every one left
    assert status == 200 and body["changed"] == 1
    await wait_until(lambda: sorted(sink.delivered_to()) == ["jane@example.com", "joe@example.com"])
    status, body, _ = await admin.call("POST", f"/api/v1/holds/{hold_id}/release")
    assert status == 200 and body == {"id": hold_id, "changed": 0, "in_force": None}
    status, body, _ = await admin.call("GET", "/api/v1/holds?state=delivered")
    assert [item["id"] for item in body["items"]] == [hold_id]


async def test_discard_means_never_delivered_and_the_content_is_gone(start_admin: Start, sink: Sink) -> None:
    admin = await start_admin(lists=HOLD_LISTS)
    hold_id = await hold_mail(admin, ["jane@example.com"], message(sender=SENDER, subject="Discard me"))
    status, body, _ = await admin.call("POST", f"/api/v1/holds/{hold_id}/discard", json={})
    assert status == 200 and body["changed"] == 1 and body["in_force"]["all_confirmed"]
    status, body, _ = await admin.call("GET", f"/api/v1/holds/{hold_id}")
    assert body["content_deleted"] and body["preview"] is None and body["headers"] == []
    assert body["recipients"][0]["state"] == "discarded"
    status, body, _ = await admin.call("GET", "/api/v1/holds")
    assert body["items"] == []
    await admin.guard.background.release_worker.stop()
    assert await admin.guard.background.release_worker.run_once() == 0
    assert sink.delivered_to() == []


async def test_bad_hold_requests_name_what_to_fix_and_change_nothing(start_admin: Start) -> None:
    admin = await start_admin(lists=HOLD_LISTS)
    hold_id = await hold_mail(admin, ["jane@example.com"])
    for method, path, kwargs, status, field in [
        ("GET", "/api/v1/holds/0000000000000000", {}, 404, None),
        ("POST", "/api/v1/holds/0000000000000000/release", {}, 404, None),
        ("POST", f"/api/v1/holds/{hold_id}/release", {"json": {"recipients": ["bob@example.com"]}}, 422, "recipients"),
        ("POST", f"/api/v1/holds/{hold_id}/discard", {"json": {"recipients": []}}, 422, "recipients"),
        ("POST", f"/api/v1/holds/{hold_id}/discard", {"json": {"recipient": ["jane@example.com"]}}, 422, "recipient"),
        ("POST", f"/api/v1/holds/{hold_id}/discard", {"data": b"jane", "headers": {"Content-Type": "text/plain"}},
         415, None),
        ("GET", "/api/v1/holds?state=stuck", {}, 422, "state"),
        ("GET", "/api/v1/holds?limit=ten", {}, 422, "limit"),
        ("GET", "/api/v1/holds?limit=0", {}, 422, "limit"),
        ("GET", "/api/v1/holds?sate=held", {}, 422, "sate"),
    ]:
        got, body, response = await admin.call(method, path, **kwargs)
        assert (got, body.get("field")) == (status, field), (method, path, body)
        assert response.content_type == "application/problem+json"
    status, body, _ = await admin.call("GET", f"/api/v1/holds/{hold_id}")
    assert [r["state"] for r in body["recipients"]] == ["held"]

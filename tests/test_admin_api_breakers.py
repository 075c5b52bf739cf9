"""Stopped streams through the admin API, over real HTTP: a gated notice is held after a few
recipients; approving it delivers each held recipient exactly once, cancelling delivers none."""

from __future__ import annotations

from typing import Any, Awaitable, Callable
from urllib.parse import quote

from smtp_guard import replies

from admin_setup import APPROVAL_AFTER, GATED, SENDER, audience, gated_notice, trip_gate
from conftest import wait_until
from sink import Sink
from smtp_client import send

Start = Callable[..., Awaitable[Any]]
# A stream id as a platform may write it: a path separator, spaces, a pipe, non-ASCII.
STREAM = "sanction/2026 05|Zürich"
PATH = "/api/v1/breakers/" + quote(STREAM, safe="")


async def test_a_stopped_stream_is_listed_and_shown_with_its_audience_and_samples(start_admin: Start) -> None:
    admin = await start_admin(**GATED)
    await trip_gate(admin, STREAM, audience(10))

    status, body, _ = await admin.call("GET", "/api/v1/breakers", token=admin.viewer_token)
    assert status == 200
    [listed] = body["items"]
    assert (listed["stream"], listed["status"], listed["rule"], listed["class"]) == (
        STREAM, "tripped", "gate.sanction", "sanction")
    assert (listed["recipients"], listed["threshold"], listed["held"]) == (10, APPROVAL_AFTER, 10 - APPROVAL_AFTER)

    status, body, _ = await admin.call("GET", PATH + "?samples=1", token=admin.viewer_token)
    assert status == 200, body
    assert body["stream"] == STREAM and body["recipients_by_state"] == {"held": 10 - APPROVAL_AFTER}
    [sample] = body["samples"]
    assert sample["subject"] == "Policy violation: earnings forfeited" and sample["held"] == 10 - APPROVAL_AFTER
    assert sample["recipients"] == audience(5, start=APPROVAL_AFTER)
    status, body, _ = await admin.call("GET", "/api/v1/breakers?status=approved")
    assert body["items"] == []


async def test_approve_delivers_every_held_recipient_exactly_once(start_admin: Start, sink: Sink) -> None:
    admin = await start_admin(**GATED)
    everyone = audience(10)
    await trip_gate(admin, STREAM, everyone)
    assert sink.delivered_to() == everyone[:APPROVAL_AFTER]

    status, body, _ = await admin.call("POST", PATH + "/approve", json={"ceiling": 5})
    assert status == 422 and body["field"] == "ceiling" and "ceiling of 10" in body["detail"]
    status, body, _ = await admin.call("POST", PATH + "/approve", json={"ceiling": 50})
    assert status == 200, body
    assert body["changed"] == 10 - APPROVAL_AFTER and body["in_force"]["all_confirmed"]
    assert (body["breaker"]["status"], body["breaker"]["ceiling"], body["breaker"]["decided_by"]) == (
        "approved", 50, "api:ops")
    await wait_until(lambda: len(sink.delivered_to()) >= 10, what="the held recipients to be delivered")
    # In force: the rest of the stream, under the new ceiling, goes straight through.
    outcome = await send(admin.guard.smtp_address, SENDER, audience(5, start=10), gated_notice(STREAM))
    assert outcome.data is not None and outcome.data != str(replies.QUEUED_HELD)
    await admin.guard.background.release_worker.stop()
    assert await admin.guard.background.release_worker.run_once() == 0
    delivered = sink.delivered_to()
    assert len(delivered) == len(set(delivered)) == 15 and set(delivered) == set(audience(15))


async def test_cancel_discards_the_held_mail_and_refuses_the_rest(start_admin: Start, sink: Sink) -> None:
    admin = await start_admin(**GATED)
    await trip_gate(admin, STREAM, audience(10))
    status, body, _ = await admin.call("POST", PATH + "/cancel")
    assert status == 200 and body["changed"] == 10 - APPROVAL_AFTER and body["breaker"]["status"] == "cancelled"
    assert body["in_force"]["all_confirmed"]
    outcome = await send(admin.guard.smtp_address, SENDER, audience(2, start=20), gated_notice(STREAM))
    assert outcome.data == str(replies.STREAM_CANCELLED)
    await admin.guard.background.release_worker.stop()
    assert await admin.guard.background.release_worker.run_once() == 0
    assert sink.delivered_to() == audience(APPROVAL_AFTER)


async def test_bad_breaker_requests_name_what_to_fix_and_change_nothing(start_admin: Start) -> None:
    admin = await start_admin(**GATED)
    await trip_gate(admin, STREAM, audience(10))
    for method, path, kwargs, status, field in [
        ("GET", "/api/v1/breakers/no-such-stream", {}, 404, None),
        ("POST", "/api/v1/breakers/no-such-stream/approve", {"json": {"ceiling": 10}}, 404, None),
        ("POST", "/api/v1/breakers/no-such-stream/cancel", {}, 404, None),
        ("POST", PATH + "/approve", {"json": {}}, 422, "ceiling"),
        ("POST", PATH + "/approve", {"json": {"ceiling": "100"}}, 422, "ceiling"),
        ("POST", PATH + "/approve", {"json": {"ceiling": -1}}, 422, "ceiling"),
        ("POST", PATH + "/approve", {"json": {"ceiling": 100, "note": "ok"}}, 422, "note"),
        ("POST", PATH + "/cancel", {"json": {"really": True}}, 422, "really"),
        ("GET", "/api/v1/breakers?status=open", {}, 422, "status"),
        ("GET", PATH + "?samples=100", {}, 422, "samples"),
    ]:
        got, body, _ = await admin.call(method, path, **kwargs)
        assert (got, body.get("field")) == (status, field), (method, path, body)
    status, body, _ = await admin.call("GET", PATH)
    assert body["status"] == "tripped" and body["held"] == 10 - APPROVAL_AFTER

"""Hold-and-pace must not be a way around the end-of-DATA protections, and a recipient named
twice must be delivered once (regressions found in review)."""

from __future__ import annotations

import time
from dataclasses import replace

from smtp_guard import replies
from smtp_guard.suppression_model import SuppressionEntry

from smtp_client import message, send

SANCTION = {
    "classify": {"rules": [{"class": "sanction", "subject": "policy violation"}]},
    "classes": {"sanction": {"approval_after": 1}},
}
PACED = {"name": "paced", "key": "sender", "rate": "5/s", "burst": 1, "action": "hold"}


async def held_addresses(guard, state: str = "held") -> dict[str, str]:
    return {r.address: r.rule for m in await guard.backends.holds.list(None) for r in m.recipients if r.state == state}


async def test_recipient_named_twice_is_relayed_or_held_once(start_guard, sink):
    guard = await start_guard(**SANCTION)
    out = await send(guard.smtp_address, "n@p.test", ["b@example.com", "a@example.com", "a@example.com"],
                     message(subject="policy violation notice"))
    assert out.data is not None and out.data.startswith("250")
    assert sink.delivered_to() == ["b@example.com"]
    assert await held_addresses(guard) == {"a@example.com": "gate.sanction"}


async def test_paced_recipients_still_meet_the_approval_gate(start_guard, sink):
    guard = await start_guard(rate_limits=[PACED], **SANCTION)
    recipients = [f"r{i}@example.com" for i in range(5)]
    out = await send(guard.smtp_address, "n@p.test", recipients, message(subject="policy violation notice"))
    assert out.data is not None and out.data.startswith("250")
    assert sink.delivered_to() == ["r0@example.com"]
    # Held for an admin (state "held", no release time), not queued for paced release.
    assert await held_addresses(guard) == {r: "gate.sanction" for r in recipients[1:]}
    assert await held_addresses(guard, "released") == {}


async def test_paced_recipient_on_a_marketing_list_is_left_out(start_guard, sink):
    guard = await start_guard(rate_limits=[PACED], lists={"unsubscribed": {"scope": "marketing"}})
    await guard.backends.suppressions.add([SuppressionEntry("address", "jane@example.com", "unsubscribed",
                                                   created_at=time.time())])
    await guard.enforcement.reloader.refresh()
    out = await send(guard.smtp_address, "news@shop.test", ["joe@example.com", "jane@example.com"],
                     message(subject="Spring sale"))
    assert out.data is not None and out.data.startswith("250")
    assert sink.delivered_to() == ["joe@example.com"]
    assert await held_addresses(guard, "released") == {}
    assert await held_addresses(guard) == {}


async def test_cancelled_stream_refuses_paced_recipients_too(start_guard, sink):
    rule = {**PACED, "match": {"sender": "^n@p"}}
    guard = await start_guard(rate_limits=[rule], **SANCTION)
    campaign = "X-Campaign-ID: c1\r\n"
    await send(guard.smtp_address, "other@p.test", ["s1@example.com", "s2@example.com"],
               message(subject="policy violation notice", extra_headers=campaign))
    [stream] = list(guard.background.breaker_state.trips)
    guard.background.breaker_state.trips[stream] = replace(guard.background.breaker_state.trips[stream], status="cancelled")
    delivered_before = list(sink.delivered_to())
    out = await send(guard.smtp_address, "n@p.test", ["x1@example.com", "x2@example.com"],
                     message(subject="policy violation notice", extra_headers=campaign))
    assert out.rcpt["x2@example.com"] == str(replies.PACED)
    assert out.data == str(replies.STREAM_CANCELLED)
    assert sink.delivered_to() == delivered_before
    assert "x2@example.com" not in await held_addresses(guard, "released")

"""Message classes end to end: marketing-only lists, control headers, list shadow mode."""

from __future__ import annotations

import time

from smtp_guard import replies
from smtp_guard.audit_model import AuditFilter
from smtp_guard.erasure.keys import erasure_token
from smtp_guard.suppression_model import SuppressionEntry

from smtp_client import message, send, without_trace

SENDER = "news@shop.test"
TRANSACTIONAL_RULE = {"rules": [{"class": "transactional", "header": "X-Message-Type", "pattern": "^receipt$"}]}


async def unsubscribe(guard, address: str, list_name: str = "unsubscribed") -> None:
    await guard.backends.suppressions.add([SuppressionEntry("address", guard.backends.normalizer.key(address), list_name,
                                                   created_at=time.time())])
    await guard.enforcement.reloader.refresh()


async def test_marketing_scoped_unsubscribe_blocks_newsletter_not_receipt(start_guard, sink):
    guard = await start_guard(lists={"unsubscribed": {"scope": "marketing"}}, classify=TRANSACTIONAL_RULE)
    await unsubscribe(guard, "jane@example.com")

    newsletter = await send(guard.smtp_address, SENDER, ["jane@example.com", "joe@example.com"],
                            message(subject="Spring sale"))
    # The class is only known after DATA: jane got 250 at RCPT, and is left out afterwards.
    assert newsletter.rcpt["jane@example.com"].startswith("250")
    assert newsletter.data is not None and newsletter.data.startswith("250")
    assert sink.delivered_to() == ["joe@example.com"]

    receipt = await send(guard.smtp_address, SENDER, ["jane@example.com"],
                         message(subject="Your receipt", extra_headers="X-Message-Type: receipt\r\n"))
    assert receipt.data is not None and receipt.data.startswith("250")
    assert sink.delivered_to() == ["joe@example.com", "jane@example.com"]

    await guard.enforcement.audit.flush()
    records = await guard.backends.audit.query(AuditFilter(recipient="jane@example.com", verdict="drop"))
    assert [r.rule for r in records] == ["suppression.unsubscribed"]
    assert "marketing" in records[0].reason


async def test_newsletter_only_to_marketing_suppressed_recipients_is_refused(start_guard, sink):
    guard = await start_guard(lists={"unsubscribed": {"scope": "marketing"}})
    await unsubscribe(guard, "jane@example.com")
    outcome = await send(guard.smtp_address, SENDER, ["jane@example.com"], message(subject="Spring sale"))
    assert outcome.data == str(replies.SUPPRESSED)
    assert sink.messages == []


async def test_list_for_all_mail_wins_over_marketing_list_at_rcpt(start_guard, sink):
    guard = await start_guard(lists={"unsubscribed": {"scope": "marketing"}}, classify=TRANSACTIONAL_RULE)
    await unsubscribe(guard, "gone@example.com", "unsubscribed")
    await unsubscribe(guard, "gone@example.com", "invalid")
    outcome = await send(guard.smtp_address, SENDER, ["gone@example.com", "ok@example.com"],
                         message(subject="Your receipt", extra_headers="X-Message-Type: receipt\r\n"))
    assert outcome.rcpt["gone@example.com"] == str(replies.SUPPRESSED)
    assert sink.delivered_to() == ["ok@example.com"]


async def test_control_headers_are_stripped_before_relay(start_guard, sink):
    guard = await start_guard(streams={"strip_headers": ["X-Guard-Class"]})
    content = message(extra_headers="X-Guard-Class: marketing\r\n\tfolded continuation\r\n")
    await send(guard.smtp_address, SENDER, ["a@example.com"], content)
    assert without_trace(sink.messages[0].content) == message()


async def test_shadow_list_delivers_and_counts_what_it_would_have_rejected(start_guard, sink):
    guard = await start_guard(lists={"manual": {"shadow": True}})
    await unsubscribe(guard, "watch@example.com", "manual")
    outcome = await send(guard.smtp_address, SENDER, ["watch@example.com"], message())
    assert outcome.rcpt["watch@example.com"].startswith("250")
    assert sink.delivered_to() == ["watch@example.com"]
    assert guard.metrics.shadow_decisions.labels("reject", "suppression.manual")._value.get() == 1
    await guard.enforcement.audit.flush()
    records = await guard.backends.audit.query(AuditFilter(verdict="shadow-reject"))
    assert [r.rule for r in records] == ["suppression.manual"]


async def test_global_shadow_mode_covers_lists_but_never_erasures(start_guard, sink):
    guard = await start_guard(policy={"shadow": True})
    await unsubscribe(guard, "listed@example.com", "complained")
    ring = guard.backends.tombstones.ring
    token = erasure_token(guard.backends.normalizer.key("erased@example.com"))
    await guard.backends.erasure.remember_key(ring.primary.id, ring.primary.check_value, time.time())
    await guard.backends.erasure.add_tombstone(ring.primary.tombstone(token), ring.primary.id, "DSR-1", time.time())
    await guard.enforcement.tombstone_reloader.refresh()
    outcome = await send(guard.smtp_address, SENDER, ["listed@example.com", "erased@example.com"], message())
    assert outcome.rcpt["listed@example.com"].startswith("250")
    assert outcome.rcpt["erased@example.com"] == str(replies.ERASED)
    assert sink.delivered_to() == ["listed@example.com"]

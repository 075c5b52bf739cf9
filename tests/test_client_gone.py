"""A client that disconnects while the guard waits for the upstream's reply.

aiosmtpd cancels a session's task when its client disconnects. A cancelled wait for the
upstream's reply leaves that command in flight on a pooled upstream session; given back with
RSET, the session would read every later reply one command late (the next client's RCPT
answered with the upstream's MAIL reply, its DATA "accepted" without the message ever being
sent). These tests make the upstream slow to answer, cut the client at that moment, then run
more transactions through the same single upstream slot and check every reply and every
message the upstream got.
"""

from __future__ import annotations

import asyncio
import logging
import time

from smtp_guard import replies
from smtp_guard.app import Guard
from smtp_guard.audit_model import AuditFilter
from smtp_guard.relay.pool import SMTPTransaction
from smtp_guard.replies import Reply
from smtp_guard.suppression_model import SuppressionEntry

from conftest import wait_until
from sink import PERMFAIL_RCPT, Sink
from smtp_client import Outcome, message, raw, read_reply, send, without_trace

SENDER = "news@shop.test"
ONE_SESSION = {"max_connections": 1}  # one upstream session at a time: each transaction waits for it
SINK_RCPT_OK = "250 2.1.5 OK"
SINK_QUEUED = "250 2.0.0 OK queued"


async def command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> str:
    writer.write(line + b"\r\n")
    return await read_reply(reader)


async def hold_address(guard: Guard, address: str) -> None:
    await guard.backends.suppressions.add([SuppressionEntry("address", guard.backends.normalizer.key(address), "manual",
                                                            reason="test", source="test", created_at=time.time())])
    await guard.enforcement.reloader.refresh()


async def send_and_leave(guard: Guard, sink: Sink, rcpt_replies: dict[str, str]) -> None:
    """A client sends one message (subject "gone") and disconnects while the sink holds back
    its reply to DATA. ``rcpt_replies``: each recipient and the reply it must get."""
    async with raw(guard.smtp_address) as (reader, writer):
        await read_reply(reader)
        assert (await command(reader, writer, b"EHLO client.test")).startswith("250")
        assert await command(reader, writer, f"MAIL FROM:<{SENDER}>".encode()) == str(replies.SENDER_OK)
        for recipient, reply in rcpt_replies.items():
            assert await command(reader, writer, f"RCPT TO:<{recipient}>".encode()) == reply
        assert (await command(reader, writer, b"DATA")).startswith("354")
        writer.write(message(subject="gone") + b".\r\n")
        await wait_until(lambda: sink.hangs == 1, what="the sink to hold back its DATA reply")


async def next_transactions(guard: Guard, sink: Sink) -> list[Outcome]:
    """Three transactions started together the moment the client is gone: they queue for the
    one upstream session, and the first takes it as soon as it is given back. One recipient is
    refused by the upstream: a reply read one command late would answer it with a 250."""
    sink.permfail_rcpt.add("nouser@example.com")
    return list(await asyncio.gather(
        send(guard.smtp_address, SENDER, ["r0@example.com"], message(subject="zero")),
        send(guard.smtp_address, SENDER, ["nouser@example.com", "r1@example.com"], message(subject="one")),
        send(guard.smtp_address, SENDER, ["r2@example.com"], message(subject="two")),
    ))


def assert_next_transactions_right(outcomes: list[Outcome], sink: Sink, delivered_before: int) -> None:
    for outcome in outcomes:
        assert outcome.mail == str(replies.SENDER_OK)
        assert outcome.data == SINK_QUEUED
    assert [o.rcpt for o in outcomes] == [
        {"r0@example.com": SINK_RCPT_OK},
        {"nouser@example.com": PERMFAIL_RCPT, "r1@example.com": SINK_RCPT_OK},
        {"r2@example.com": SINK_RCPT_OK},
    ]
    later = sink.messages[delivered_before:]
    assert sorted((m.rcpt_tos, without_trace(m.content)) for m in later) == [
        (["r0@example.com"], message(subject="zero")),
        (["r1@example.com"], message(subject="one")),
        (["r2@example.com"], message(subject="two")),
    ]


def messages_total(guard: Guard, outcome: str) -> float:
    return guard.metrics.registry.get_sample_value("smtp_guard_messages_total", {"outcome": outcome}) or 0.0


async def test_client_gone_while_upstream_answers_data(start_guard, sink, caplog):
    """The delivery goes on without the client: the upstream's 250 is read, the held part is
    stored, the outcome logged and counted as relayed, and the upstream session is reused
    as it is (no RSET: the accepted message ended its transaction)."""
    caplog.set_level(logging.INFO, logger="smtp_guard.smtp")
    guard = await start_guard(upstream=ONE_SESSION, lists={"manual": {"action": "hold"}})
    await hold_address(guard, "held@example.com")
    sink.hang_on, sink.hang_seconds = "data", 0.5
    await send_and_leave(guard, sink, {"gone@example.com": SINK_RCPT_OK, "held@example.com": str(replies.RECIPIENT_OK)})
    sink.hang_on = None

    outcomes = await next_transactions(guard, sink)

    await wait_until(lambda: not guard.front.smtp.registry.cleanups, what="the abandoned delivery to end")
    assert (sink.messages[0].rcpt_tos, without_trace(sink.messages[0].content)) == (
        ["gone@example.com"], message(subject="gone"))
    assert_next_transactions_right(outcomes, sink, delivered_before=1)
    assert (sink.smtp_sessions, sink.transactions_started, sink.rsets) == (1, 4, 0)
    [held] = await guard.backends.holds.list()
    assert [r.address for r in held.recipients] == ["held@example.com"]
    await guard.enforcement.audit.flush()
    [gone] = await guard.backends.audit.query(AuditFilter(recipient="gone@example.com"))
    assert (gone.kind, gone.verdict) == ("decision", "pass")
    assert held.txn_id == gone.txn_id
    assert (messages_total(guard, "relayed"), messages_total(guard, "deferred")) == (4, 0)
    outcome_lines = [r.getMessage() for r in caplog.records if f"txn={gone.txn_id}" in r.getMessage()]
    assert any("disconnected before the reply to its DATA" in line for line in outcome_lines)
    assert any("relayed=1 held=1" in line and f"outcome=relayed reply='{SINK_QUEUED}'" in line
               for line in outcome_lines)


async def test_client_gone_while_upstream_answers_rcpt(start_guard, sink):
    """Nothing to finish without the client: the upstream session with the RCPT in flight is
    closed, never reset and reused; the next transactions get a new one and their own replies."""
    guard = await start_guard(upstream=ONE_SESSION)
    sink.hang_on, sink.hang_seconds = "rcpt", 0.5
    async with raw(guard.smtp_address) as (reader, writer):
        await read_reply(reader)
        assert (await command(reader, writer, b"EHLO client.test")).startswith("250")
        assert await command(reader, writer, f"MAIL FROM:<{SENDER}>".encode()) == str(replies.SENDER_OK)
        writer.write(b"RCPT TO:<gone@example.com>\r\n")
        await wait_until(lambda: sink.hangs == 1, what="the sink to hold back its RCPT reply")
    sink.hang_on = None

    outcomes = await next_transactions(guard, sink)

    assert_next_transactions_right(outcomes, sink, delivered_before=0)
    assert (sink.smtp_sessions, sink.transactions_started, sink.rsets) == (2, 4, 0)
    assert len(sink.messages) == 3
    await guard.enforcement.audit.flush()
    # The guard never answered that RCPT: no decision is on record for it.
    assert await guard.backends.audit.query(AuditFilter(recipient="gone@example.com")) == []
    assert (messages_total(guard, "relayed"), messages_total(guard, "deferred")) == (3, 0)


async def test_delivery_failure_after_client_left_is_logged(start_guard, sink, caplog, monkeypatch):
    """Nobody is left to answer 451 to: the internal error is logged with the transaction id."""
    original = SMTPTransaction.data

    async def data_then_fail(self: SMTPTransaction, content: bytes) -> Reply:
        await original(self, content)
        raise RuntimeError("bug after the upstream's reply")

    monkeypatch.setattr(SMTPTransaction, "data", data_then_fail)
    guard = await start_guard(upstream=ONE_SESSION)
    sink.hang_on, sink.hang_seconds = "data", 0.3
    await send_and_leave(guard, sink, {"gone@example.com": SINK_RCPT_OK})
    [failure] = await wait_until(
        lambda: [r for r in caplog.records if "internal error in the delivery" in r.getMessage()],
        what="the failed delivery to be logged")
    assert failure.levelno == logging.ERROR and failure.exc_info is not None
    assert str(failure.exc_info[1]) == "bug after the upstream's reply"


async def test_stop_waits_for_the_delivery_of_a_gone_client(start_guard, sink):
    """A guard stopped right after the client left still finishes the delivery (within
    CLEANUP_GRACE): the upstream's reply is read and nothing follows on the session."""
    guard = await start_guard(upstream=ONE_SESSION)
    sink.hang_on, sink.hang_seconds = "data", 0.3
    await send_and_leave(guard, sink, {"gone@example.com": SINK_RCPT_OK})
    await guard.stop()
    assert sink.delivered_to() == ["gone@example.com"]
    assert sink.rsets == 0
    assert messages_total(guard, "relayed") == 1

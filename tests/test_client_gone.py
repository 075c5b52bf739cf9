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

from smtp_guard import replies
from smtp_guard.app import Guard
from smtp_guard.audit_model import AuditFilter

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

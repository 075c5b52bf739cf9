"""The guard relaying to an independent upstream: Postfix's own ``smtp-sink``.

A second SMTP implementation on the far side catches what a sink built on the same library
as the guard would not: dot-stuffing, pooled-session RSET, and the envelope as Postfix reads it.
"""

from __future__ import annotations

import time

from smtp_guard import replies
from smtp_guard.suppression_model import SuppressionEntry

from conftest import wait_until
from smtp_client import message, send, without_trace

SENDER = "news@shop.test"


async def test_suppressed_recipient_never_reaches_postfix(start_guard, postfix_sink):
    guard = await start_guard(upstream={"port": postfix_sink.port})
    await guard.backends.suppressions.add([SuppressionEntry("address", guard.backends.normalizer.key("gone@example.com"),
                                                   "unsubscribed", created_at=time.time())])
    await guard.enforcement.reloader.refresh()
    content = message(subject="Postfix", body="First line\r\n.leading dot\r\n..two dots\r\n.\r\nlast\r\n")
    recipients = ["a@example.com", "gone@example.com", "b@example.org", "c@example.net"]
    outcome = await send(guard.smtp_address, SENDER, recipients, content)
    assert outcome.rcpt["gone@example.com"] == str(replies.SUPPRESSED)
    assert outcome.data is not None and outcome.data.startswith("250")

    [delivered] = await wait_until(postfix_sink.messages, what="smtp-sink dump written")
    assert delivered.mail_from == SENDER
    assert delivered.rcpt_tos == ["a@example.com", "b@example.org", "c@example.net"]
    assert without_trace(delivered.content) == content


async def test_pooled_session_to_postfix_carries_several_messages(start_guard, postfix_sink):
    guard = await start_guard(upstream={"port": postfix_sink.port})
    for n in range(3):
        outcome = await send(guard.smtp_address, SENDER, [f"r{n}@example.com"], message(subject=f"n{n}"))
        assert outcome.data is not None and outcome.data.startswith("250")
    messages = await wait_until(lambda: len(postfix_sink.messages()) == 3 and postfix_sink.messages(),
                                what="three transactions in the smtp-sink dump")
    assert [m.rcpt_tos for m in messages] == [["r0@example.com"], ["r1@example.com"], ["r2@example.com"]]
    assert [without_trace(m.content) for m in messages] == [message(subject=f"n{n}") for n in range(3)]
    assert guard.upstream.connects == 1

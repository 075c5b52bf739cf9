"""End to end over loopback: client -> guard -> real upstream sink, replies asserted exactly."""

from __future__ import annotations

import asyncio
import time

import aiosmtplib
import pytest

from smtp_guard import replies
from smtp_guard.suppression_model import SuppressionEntry

from smtp_client import dialogue, message, send, transact, without_trace

SENDER = "news@shop.test"


async def suppress(guard, value: str, list_name: str = "unsubscribed", kind: str = "address") -> None:
    """Add an entry through the store, as the CLI would, and wait for the running index."""
    key = guard.backends.normalizer.key(value) if kind == "address" else guard.backends.normalizer.domain(value)
    await guard.backends.suppressions.add([SuppressionEntry(kind, key, list_name, reason="test", source="test",
                                                   created_at=time.time())])
    await guard.enforcement.reloader.refresh()


async def test_multi_recipient_message_relayed_byte_exact(start_guard, sink):
    guard = await start_guard()
    content = message(body="Line one\r\n.leading dot\r\n..two dots\r\n") + b"\xe9t\xe9 8bit \t trailing \r\n"
    outcome = await send(guard.smtp_address, SENDER, ["a@example.com", "b@example.org", "c@example.net"], content)
    assert outcome.data is not None and outcome.data.startswith("250")
    assert len(sink.messages) == 1
    delivered = sink.messages[0]
    assert delivered.mail_from == SENDER
    assert delivered.rcpt_tos == ["a@example.com", "b@example.org", "c@example.net"]
    assert without_trace(delivered.content) == content


async def test_suppressed_recipient_rejected_cohort_delivered(start_guard, sink):
    guard = await start_guard()
    await suppress(guard, "gone@example.com")
    outcome = await send(guard.smtp_address, SENDER, ["gone@example.com", "ok@example.com"], message())
    assert outcome.rcpt["gone@example.com"] == f"{replies.SUPPRESSED.code} {replies.SUPPRESSED.enhanced} {replies.SUPPRESSED.text}"
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == ["ok@example.com"]


@pytest.mark.parametrize("listed, sent", [
    ("jane@example.com", "JANE@Example.COM"),  # case
    ("jane@example.com", "jane+newsletter@example.com"),  # sub-addressing
    ("jane.doe@gmail.com", "JaneDoe+x@googlemail.com"),  # provider dots + alias
    ("user@bücher.example", "user@xn--bcher-kva.example"),  # IDNA U-label vs A-label
    ("user@xn--bcher-kva.example", "USER@BÜCHER.example"),
])
async def test_normalization_rules_match_at_rcpt(start_guard, sink, listed, sent):
    guard = await start_guard()
    await suppress(guard, listed)
    outcome = await send(guard.smtp_address, SENDER, [sent, "other@example.com"], message())
    assert outcome.rcpt[sent].startswith("550 5.7.1")
    assert sink.delivered_to() == ["other@example.com"]


async def test_domain_and_subdomain_suppression(start_guard, sink):
    guard = await start_guard()
    await guard.backends.suppressions.add([
        SuppressionEntry("domain", "blocked.example", "manual", created_at=time.time()),
        SuppressionEntry("domain", "corp.example", "manual", created_at=time.time(), include_subdomains=True),
    ])
    await guard.enforcement.reloader.refresh()
    rcpts = ["a@blocked.example", "b@sub.blocked.example", "c@corp.example", "d@mail.corp.example"]
    outcome = await send(guard.smtp_address, SENDER, rcpts, message())
    assert outcome.rcpt["a@blocked.example"].startswith("550 5.7.1")
    assert outcome.rcpt["b@sub.blocked.example"].startswith("250")
    assert outcome.rcpt["c@corp.example"].startswith("550 5.7.1")
    assert outcome.rcpt["d@mail.corp.example"].startswith("550 5.7.1")
    assert sink.delivered_to() == ["b@sub.blocked.example"]


async def test_drop_action_accepts_but_never_relays(start_guard, sink):
    guard = await start_guard(lists={"bounced": {"action": "drop"}})
    await suppress(guard, "bounce@example.com", "bounced")
    outcome = await send(guard.smtp_address, SENDER, ["bounce@example.com", "ok@example.com"], message())
    assert outcome.rcpt["bounce@example.com"].startswith("250")
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == ["ok@example.com"]
    # Only dropped recipients: accepted, nothing reaches the upstream.
    outcome = await send(guard.smtp_address, SENDER, ["bounce@example.com"], message())
    assert outcome.data == str(replies.ACCEPTED_NOT_RELAYED)
    assert len(sink.messages) == 1


async def test_invalid_recipient_syntax_is_553_not_a_crash(start_guard, sink):
    guard = await start_guard()
    answers = await dialogue(guard.smtp_address, [
        b"EHLO client.test", b"MAIL FROM:<news@shop.test>",
        b'RCPT TO:<"bad\x01"@example.com>', b"RCPT TO:<x@-bad-.example>", b"RCPT TO:<a@b@example.com>",
        b"RCPT TO:<ok@example.com>", b"QUIT",
    ])
    assert answers[2] == str(replies.BAD_RECIPIENT)
    assert answers[3] == str(replies.BAD_RECIPIENT)
    assert answers[4][:3] == "553"
    assert answers[5].startswith("250")


@pytest.mark.parametrize("recipient", ["jane%example.com@relay.test", "example.com!jane@relay.test",
                                       '"jane@example.com"@relay.test', '"jane%example.com"@relay.test'])
async def test_a_local_part_an_upstream_may_route_elsewhere_is_refused(start_guard, sink, recipient):
    """Postfix's defaults for a trusted client (the guard is one) turn each of these into
    jane@example.com: a suppression of jane@example.com must not be walked around that way."""
    guard = await start_guard()
    await suppress(guard, "jane@example.com")
    outcome = await send(guard.smtp_address, SENDER, [recipient, "ok@example.com"], message())
    assert outcome.rcpt[recipient] == str(replies.ROUTED_RECIPIENT)
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == ["ok@example.com"]


async def test_a_non_ascii_address_needs_smtputf8(start_guard, sink):
    """RFC 6531: without SMTPUTF8 on MAIL, UTF-8 addresses are refused, not relayed raw."""
    guard = await start_guard()
    answers = await dialogue(guard.smtp_address, [
        b"EHLO client.test", "MAIL FROM:<jörg@bücher.example>".encode(), f"MAIL FROM:<{SENDER}>".encode(),
        "RCPT TO:<jörg@bücher.example>".encode(), b"RSET",
        "MAIL FROM:<jörg@bücher.example> SMTPUTF8".encode(), "RCPT TO:<jörg@bücher.example>".encode(), b"QUIT",
    ])
    assert answers[1] == str(replies.NON_ASCII_SENDER)
    assert answers[3] == str(replies.NON_ASCII_RECIPIENT)
    assert answers[5].startswith("250") and answers[6].startswith("250")


async def test_upstream_down_is_451(start_guard, sink):
    guard = await start_guard()
    await sink.stop()
    outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message())
    assert outcome.rcpt["a@example.com"] == str(replies.UPSTREAM_UNAVAILABLE)


async def test_upstream_rcpt_4xx_and_5xx_keep_their_class(start_guard, sink):
    guard = await start_guard()
    sink.tempfail_rcpt.add("later@example.com")
    sink.permfail_rcpt.add("nouser@example.com")
    outcome = await send(guard.smtp_address, SENDER, ["later@example.com", "nouser@example.com", "ok@example.com"],
                         message())
    assert outcome.rcpt["later@example.com"].startswith("450 4.")
    assert outcome.rcpt["nouser@example.com"].startswith("550 5.")
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == ["ok@example.com"]


@pytest.mark.parametrize("data_reply", ["451 4.3.0 try again", "554 5.7.1 content rejected"])
async def test_upstream_data_reply_class_reaches_client(start_guard, sink, data_reply):
    guard = await start_guard()
    sink.data_reply = data_reply
    outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message())
    assert outcome.data == data_reply
    assert sink.messages == []


async def test_connection_lost_mid_data_is_4xx_never_250(start_guard, sink):
    guard = await start_guard()
    sink.disconnect_on = "data"
    outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message())
    assert outcome.data == str(replies.UPSTREAM_LOST)


async def test_upstream_hang_times_out_with_4xx(start_guard, sink):
    guard = await start_guard(upstream={"command_timeout": 0.5})
    sink.hang_on = "data"
    outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message())
    assert outcome.data == str(replies.UPSTREAM_TIMEOUT)


async def test_upstream_sessions_are_reused(start_guard, sink):
    guard = await start_guard()
    for n in range(3):
        outcome = await send(guard.smtp_address, SENDER, [f"r{n}@example.com"], message())
        assert outcome.data is not None and outcome.data.startswith("250")
    assert len(sink.messages) == 3
    assert sink.smtp_sessions == 1


async def test_oversize_message_552(start_guard, sink):
    guard = await start_guard(smtp={"max_message_size": 2000})
    outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message(body="x" * 80 + "\r\n") * 40)
    assert outcome.data == str(replies.MESSAGE_TOO_BIG)
    assert sink.messages == []


async def test_too_many_recipients_452(start_guard, sink):
    guard = await start_guard(smtp={"max_recipients": 2})
    outcome = await send(guard.smtp_address, SENDER, ["a@example.com", "b@example.com", "c@example.com"], message())
    assert outcome.rcpt["c@example.com"] == str(replies.TOO_MANY_RECIPIENTS)
    assert sink.delivered_to() == ["a@example.com", "b@example.com"]


async def test_disallowed_network_is_refused(start_guard, sink):
    guard = await start_guard(access={"allow_networks": ["192.0.2.0/24"]})
    outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message())
    assert outcome.mail == str(replies.RELAY_DENIED)
    assert sink.messages == []


async def test_pipelining_advertised_and_honoured(start_guard, sink):
    guard = await start_guard()
    await suppress(guard, "gone@example.com")
    host, port = guard.smtp_address
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await reader.readline()
        writer.write(b"EHLO client.test\r\n")
        ehlo = b""
        while not ehlo.endswith(b"250 HELP\r\n"):
            ehlo += await reader.readline()
        assert b"250-PIPELINING" in ehlo
        # Everything up to DATA in one write (RFC 2920), then the content.
        writer.write(b"MAIL FROM:<news@shop.test>\r\nRCPT TO:<gone@example.com>\r\n"
                     b"RCPT TO:<ok@example.com>\r\nDATA\r\n")
        lines = [await reader.readline() for _ in range(4)]
        assert lines[0].startswith(b"250") and lines[1].startswith(b"550 5.7.1")
        assert lines[2].startswith(b"250") and lines[3].startswith(b"354")
        writer.write(message() + b".\r\nQUIT\r\n")
        assert (await reader.readline()).startswith(b"250")
    finally:
        writer.close()
        await writer.wait_closed()
    assert sink.delivered_to() == ["ok@example.com"]


@pytest.mark.parametrize("payload", [
    b"Subject: a\r\n\r\nhello\n.\r\nMAIL FROM:<evil@x.test>\r\n",
    b"Subject: a\r\n\r\nhello\r.\r\nMAIL FROM:<evil@x.test>\r\n",
    b"Subject: a\r\n\r\nhello\r\n.\n",
])
async def test_smuggling_payload_never_splits_a_message(start_guard, sink, payload):
    guard = await start_guard()
    host, port = guard.smtp_address
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await reader.readline()
        writer.write(b"HELO client.test\r\nMAIL FROM:<news@shop.test>\r\nRCPT TO:<ok@example.com>\r\nDATA\r\n")
        for _ in range(4):
            await reader.readline()
        writer.write(payload + b"\r\n.\r\n")
        final = await reader.readline()
        assert final.decode().rstrip() == str(replies.BARE_LINE_ENDING)
    finally:
        writer.close()
        await writer.wait_closed()
    assert sink.messages == []


async def test_bare_line_endings_normalized_when_configured(start_guard, sink):
    guard = await start_guard(smtp={"bare_line_endings": "normalize"})
    host, port = guard.smtp_address
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await reader.readline()
        writer.write(b"HELO client.test\r\nMAIL FROM:<news@shop.test>\r\nRCPT TO:<ok@example.com>\r\nDATA\r\n")
        for _ in range(4):
            await reader.readline()
        writer.write(b"Subject: a\r\n\r\nhello\n.\r\nMAIL FROM:<evil@x.test>\r\n\r\n.\r\n")
        assert (await reader.readline()).startswith(b"250")
    finally:
        writer.close()
        await writer.wait_closed()
    assert len(sink.messages) == 1
    assert without_trace(sink.messages[0].content) == b"Subject: a\r\n\r\nhello\r\n.\r\nMAIL FROM:<evil@x.test>\r\n\r\n"


async def test_null_sender_is_relayed(start_guard, sink):
    guard = await start_guard()
    outcome = await send(guard.smtp_address, "", ["a@example.com"], message())
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.messages[0].mail_from in ("", "<>")


async def test_sandbox_upstream_captures_to_maildir(start_guard, tmp_path):
    guard = await start_guard(upstream={"mode": "sandbox"})
    outcome = await send(guard.smtp_address, SENDER, ["a@example.com", "b@example.com"], message())
    assert outcome.data == str(replies.SANDBOX_CAPTURED)
    captured = list((guard.config.store.data_dir / "sandbox" / "new").iterdir())
    assert len(captured) == 1
    data = captured[0].read_bytes()
    assert data.startswith(b"Return-Path: <news@shop.test>\r\nX-Sandbox-Recipients: a@example.com, b@example.com\r\n")
    assert data.endswith(message())


async def test_graceful_shutdown_finishes_message_in_flight(start_guard, sink):
    guard = await start_guard(smtp={"shutdown_grace": 5.0})
    sink.hang_on = "data"
    sink.hang_seconds = 0.5
    client = aiosmtplib.SMTP(hostname=guard.smtp_address[0], port=guard.smtp_address[1], start_tls=False, timeout=10)
    await client.connect()
    sending = asyncio.create_task(transact(client, SENDER, ["a@example.com"], message()))
    while not sink.transactions_started:
        await asyncio.sleep(0.01)
    await guard.stop()
    outcome = await sending
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == ["a@example.com"]
    client.close()


async def test_mail_parameters_reach_the_upstream_on_its_first_transaction(start_guard, sink):
    """BODY and SMTPUTF8 are passed on only when the upstream's EHLO offers them: that EHLO must
    come before the first MAIL of every new upstream connection, not after it."""
    guard = await start_guard()
    eight_bit = message(body="caf\xe9\r\n")  # UTF-8 in the body: 8-bit content

    async def first_message(sender: str, recipient: str, options: list[str]) -> None:
        client = aiosmtplib.SMTP(hostname=guard.smtp_address[0], port=guard.smtp_address[1], start_tls=False,
                                 timeout=10)
        await client.connect()
        try:
            await client.mail(sender, options=options, encoding="utf-8")
            await client.rcpt(recipient, encoding="utf-8")
            await client.data(eight_bit)
        finally:
            await client.quit()

    await first_message(SENDER, "a@example.com", ["BODY=8BITMIME"])
    assert sink.messages[-1].mail_options == ("BODY=8BITMIME",)
    await guard.upstream.close()  # the next transaction opens a new upstream connection
    await first_message("nouvelles@bo\u00eete.test", "j\u00f6rg@example.com", ["SMTPUTF8", "BODY=8BITMIME"])
    assert set(sink.messages[-1].mail_options) == {"SMTPUTF8", "BODY=8BITMIME"}
    assert sink.messages[-1].rcpt_tos == ["j\u00f6rg@example.com"]

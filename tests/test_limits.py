"""Limits, each with its standard reply: sessions, idle time, line length, SIZE, NUL, upstream pool."""

from __future__ import annotations

import asyncio

from smtp_guard import replies

from conftest import wait_until
from smtp_client import dialogue, message, raw, read_reply, send

SENDER = "news@shop.test"


async def command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> str:
    writer.write(line + b"\r\n")
    return await read_reply(reader)


async def open_data(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, recipient: str) -> None:
    """Greeting, EHLO, MAIL, RCPT, DATA: ready for content."""
    await read_reply(reader)
    assert (await command(reader, writer, b"EHLO client.test")).startswith("250")
    assert (await command(reader, writer, f"MAIL FROM:<{SENDER}>".encode())).startswith("250")
    assert (await command(reader, writer, f"RCPT TO:<{recipient}>".encode())).startswith("250")
    assert (await command(reader, writer, b"DATA")).startswith("354")


async def test_third_concurrent_session_is_refused(start_guard, sink):
    guard = await start_guard(smtp={"max_sessions": 2})
    async with raw(guard.smtp_address) as (r1, _), raw(guard.smtp_address) as (r2, _):
        assert (await read_reply(r1)).startswith("220")
        assert (await read_reply(r2)).startswith("220")
        async with raw(guard.smtp_address) as (r3, _):
            assert await read_reply(r3) == str(replies.TOO_MANY_SESSIONS)
            assert await r3.read() == b""  # and closed
    # Once the others are gone, a new session is welcome again.
    await wait_until(lambda: not guard.front.smtp.registry.sessions, what="sessions to end")
    outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message())
    assert outcome.data is not None and outcome.data.startswith("250")
    assert guard.metrics.registry.get_sample_value(
        "smtp_guard_sessions_refused_total", {"reason": "max_sessions"}) == 1


async def test_idle_session_gets_421_then_closed(start_guard, sink):
    guard = await start_guard(smtp={"idle_timeout": 0.5})
    async with raw(guard.smtp_address) as (reader, writer):
        await read_reply(reader)
        assert (await command(reader, writer, b"EHLO client.test")).startswith("250")
        # No command: the guard speaks first after idle_timeout.
        assert await asyncio.wait_for(read_reply(reader), timeout=5) == str(replies.IDLE_TIMEOUT)
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    await wait_until(lambda: not guard.front.smtp.registry.sessions, what="the idle session to be gone")


async def test_line_too_long_in_data_then_next_transaction_works(start_guard, sink):
    # One upstream connection: a refused DATA must give the upstream session back to the pool.
    guard = await start_guard(upstream={"max_connections": 1})
    async with raw(guard.smtp_address) as (reader, writer):
        await open_data(reader, writer, "a@example.com")
        writer.write(b"Subject: long\r\n\r\n" + b"x" * 1200 + b"\r\nshort line\r\n.\r\n")
        assert await read_reply(reader) == str(replies.LINE_TOO_LONG)
        # The session goes on; the next message is relayed over the same upstream slot.
        assert (await command(reader, writer, f"MAIL FROM:<{SENDER}>".encode())).startswith("250")
        assert (await command(reader, writer, b"RCPT TO:<b@example.com>")).startswith("250")
        assert (await command(reader, writer, b"DATA")).startswith("354")
        writer.write(b"Subject: ok\r\n\r\nfine\r\n.\r\n")
        assert (await read_reply(reader)).startswith("250")
        await command(reader, writer, b"QUIT")
    assert sink.delivered_to() == ["b@example.com"]
    assert sink.smtp_sessions == 1


async def test_size_parameter_above_limit_is_552(start_guard, sink):
    guard = await start_guard(smtp={"max_message_size": 1000})
    answers = await dialogue(guard.smtp_address, [
        b"EHLO client.test", f"MAIL FROM:<{SENDER}> SIZE=1001".encode(),
        f"MAIL FROM:<{SENDER}> SIZE=1000".encode(), b"QUIT",
    ])
    assert answers[1] == str(replies.MESSAGE_TOO_BIG)
    assert answers[2] == str(replies.SENDER_OK)
    assert sink.smtp_sessions == 0


async def test_a_size_in_digits_other_than_ascii_is_501_not_an_internal_error(start_guard, sink, caplog):
    """aiosmtpd took "²" and "١٢" for digits, then failed in int(): 451 and a traceback per command."""
    guard = await start_guard()
    answers = await dialogue(guard.smtp_address, [
        b"EHLO client.test", f"MAIL FROM:<{SENDER}> SIZE=\u00b2".encode(),
        f"MAIL FROM:<{SENDER}> SIZE=\u0661\u0662".encode(), f"MAIL FROM:<{SENDER}> SIZE=abc".encode(), b"QUIT",
    ])
    assert answers[1] == answers[2] == answers[3]
    assert answers[1].startswith("501 5.5.4 ")
    assert "Traceback" not in caplog.text and "ERROR" not in caplog.text


async def test_nul_byte_in_data_is_refused(start_guard, sink):
    guard = await start_guard()
    async with raw(guard.smtp_address) as (reader, writer):
        await open_data(reader, writer, "a@example.com")
        writer.write(b"Subject: nul\r\n\r\nhel\x00lo\r\n.\r\n")
        assert await read_reply(reader) == str(replies.NUL_IN_MESSAGE)
        await command(reader, writer, b"QUIT")
    assert sink.messages == []
    assert guard.metrics.registry.get_sample_value("smtp_guard_messages_total", {"outcome": "refused"}) == 1


async def test_upstream_pool_bound_queues_concurrent_transactions(start_guard, sink):
    guard = await start_guard(upstream={"max_connections": 1})
    # Each transaction holds the only upstream session for at least 0.2 s (from its first
    # RCPT to the end of DATA), so the two overlap and the second waits for the first.
    sink.hang_on = "rcpt"
    sink.hang_seconds = 0.2
    first, second = await asyncio.gather(
        send(guard.smtp_address, SENDER, ["a@example.com"], message(subject="one")),
        send(guard.smtp_address, SENDER, ["b@example.com"], message(subject="two")),
    )
    assert first.data is not None and first.data.startswith("250")
    assert second.data is not None and second.data.startswith("250")
    assert sorted(sink.delivered_to()) == ["a@example.com", "b@example.com"]
    assert sink.smtp_sessions == 1

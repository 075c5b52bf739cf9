"""The SMTP front against hostile and slow clients, over real loopback SMTP.

Command-line injection (bare LF, bare CR, NUL), the three timeouts (idle between commands,
data between reads, session lifetime), AUTH password guessing, a banner that names no
software, the Received: trace header, and opportunistic STARTTLS to the upstream.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import re
import ssl
import time
from typing import Any

import pytest

from smtp_guard import replies
from smtp_guard.smtp.auth import AuthThrottle, hash_password
from smtp_guard.smtp.server import CommandLineReader
from smtp_guard.suppression_model import SuppressionEntry

from conftest import ManualClock, wait_until
from sink import Sink
from smtp_client import Stream, message, raw, read_reply, send, without_trace

SENDER = "news@shop.test"
USER, PASSWORD = "platform", "s3cret"
PASSWORD_HASH = hash_password(PASSWORD)

async def command(stream: Stream, line: bytes) -> str:
    reader, writer = stream
    writer.write(line + b"\r\n")
    return await asyncio.wait_for(read_reply(reader), timeout=5)


async def replies_to(stream: Stream, data: bytes, count: int) -> list[str]:
    """Write raw bytes (no CRLF added) and read ``count`` replies."""
    reader, writer = stream
    writer.write(data)
    return [await asyncio.wait_for(read_reply(reader), timeout=5) for _ in range(count)]


async def greet(stream: Stream) -> str:
    greeting = await asyncio.wait_for(read_reply(stream[0]), timeout=5)
    assert (await command(stream, b"EHLO client.test")).startswith("250")
    return greeting


# --- command-line injection ----------------------------------------------------------------------

@pytest.mark.parametrize("injected, refusals", [
    # aiosmtpd alone would run MAIL, then the smuggled RCPT.
    (b"MAIL FROM:<a@x.test>\nRCPT TO:<b@evil.test>\r\n", 2),
    (b"MAIL FROM:<a@x.test>\rRCPT TO:<b@evil.test>\r\n", 1),
    (b"MAIL FROM:<a@x.test>\x00RCPT TO:<b@evil.test>\r\n", 1),
    (b"MAIL FROM:<a@x.test>\n\nRCPT TO:<b@evil.test>\n\r\n", 4),
    # One refusal per LF-terminated piece, the CRLF-terminated last one included.
    (b"NOOP\nNOOP\nNOOP\r\n", 3),
])
async def test_broken_command_line_is_refused_and_never_executed(start_guard, sink, injected, refusals):
    guard = await start_guard()
    async with raw(guard.smtp_address) as stream:
        await greet(stream)
        assert await replies_to(stream, injected, refusals) == [str(replies.BAD_COMMAND_LINE)] * refusals
        # Neither part ran: no transaction is open, and the session goes on normally.
        assert await command(stream, b"RCPT TO:<b@evil.test>") == str(replies.NEED_MAIL)
        assert await command(stream, f"MAIL FROM:<{SENDER}>".encode()) == str(replies.SENDER_OK)
        assert (await command(stream, b"RCPT TO:<ok@example.com>")).startswith("250")
        assert (await command(stream, b"DATA")).startswith("354")
        assert (await replies_to(stream, b"Subject: ok\r\n\r\nfine\r\n.\r\n", 1))[0].startswith("250")
        await command(stream, b"QUIT")
    assert sink.delivered_to() == ["ok@example.com"]
    assert sink.transactions_started == 1


async def test_injected_rcpt_after_accepted_mail_is_not_relayed(start_guard, sink):
    guard = await start_guard()
    async with raw(guard.smtp_address) as stream:
        await greet(stream)
        assert await command(stream, f"MAIL FROM:<{SENDER}>".encode()) == str(replies.SENDER_OK)
        assert await replies_to(stream, b"RCPT TO:<ok@example.com>\nRCPT TO:<b@evil.test>\r\n", 2) == \
            [str(replies.BAD_COMMAND_LINE)] * 2
        assert await command(stream, b"DATA") == "503 5.5.1 Need RCPT command"
        await command(stream, b"QUIT")
    assert sink.smtp_sessions == 0


async def test_too_long_line_ending_in_bare_lf_does_not_smuggle_the_next_piece(start_guard, sink):
    guard = await start_guard()
    async with raw(guard.smtp_address) as stream:
        await greet(stream)
        long_mail = b"MAIL FROM:<" + b"a" * 3000 + b"@x.test>\n"
        assert await replies_to(stream, long_mail + b"RCPT TO:<b@evil.test>\r\n", 2) == [
            "500 5.5.2 Command line too long", str(replies.BAD_COMMAND_LINE)]
        assert await command(stream, b"QUIT") == str(replies.BYE)
    assert sink.smtp_sessions == 0


@pytest.mark.parametrize("length", [600, 1000, 1200, 70_000])
@pytest.mark.parametrize("pipelined", [False, True])
async def test_command_after_a_too_long_command_line_runs(start_guard, sink, length, pipelined):
    """Over 512 octets aiosmtpd refuses the parsed line; past the 1001-octet stream limit the
    line is discarded unparsed. Either way it gets one refusal and the next command runs."""
    guard = await start_guard()
    too_long = b"NOOP " + b"a" * (length - 5) + b"\r\n"
    mail, rcpt = f"MAIL FROM:<{SENDER}>".encode(), b"RCPT TO:<ok@example.com>"
    async with raw(guard.smtp_address) as stream:
        await greet(stream)
        if pipelined:
            answers = await replies_to(stream, too_long + mail + b"\r\n" + rcpt + b"\r\n", 3)
        else:
            answers = [*await replies_to(stream, too_long, 1), await command(stream, mail),
                       await command(stream, rcpt)]
        assert answers[:2] == [str(replies.COMMAND_LINE_TOO_LONG), str(replies.SENDER_OK)]
        assert answers[2].startswith("250 2.1.5 ")  # the upstream's own answer, passed through
        assert (await command(stream, b"DATA")).startswith("354")
        assert (await replies_to(stream, b"Subject: ok\r\n\r\nfine\r\n.\r\n", 1))[0].startswith("250")
        assert await command(stream, b"QUIT") == str(replies.BYE)
    assert sink.delivered_to() == ["ok@example.com"]


@pytest.mark.parametrize("ending, tail, refused, returned", [
    # The CRLF split across two reads: the long line ended properly, the next one runs.
    (b"\r", b"\nMAIL FROM:<a@x.test>\r\n", [replies.COMMAND_LINE_TOO_LONG], b"MAIL FROM:<a@x.test>\r\n"),
    # It ended in a bare LF: the rest up to the CRLF is a piece of the same broken line.
    (b"", b"\nRCPT TO:<b@evil.test>\r\nNOOP\r\n", [replies.COMMAND_LINE_TOO_LONG, replies.BAD_COMMAND_LINE],
     b"NOOP\r\n"),
])
async def test_end_of_a_too_long_line_is_judged_across_reads(ending, tail, refused, returned):
    """The line's first part is read and discarded before its LF arrives (the stream limit
    is exceeded without a separator): how it ended is still known."""
    stream = asyncio.StreamReader(limit=1001)
    answered: list[replies.Reply] = []

    async def refuse(reply: replies.Reply) -> None:
        answered.append(reply)

    async def before_command() -> None:
        pass

    reader = CommandLineReader(stream, refuse, before_command, 1001)
    stream.feed_data(b"NOOP " + b"a" * 1200 + ending)
    line = asyncio.ensure_future(reader.readuntil())
    await wait_until(lambda: not reader._buffer, what="the first part to be discarded")
    stream.feed_data(tail)
    assert await asyncio.wait_for(line, timeout=5) == returned
    assert answered == refused


async def test_client_using_bare_lf_throughout_gets_an_answer_to_every_line(start_guard, sink):
    guard = await start_guard()
    async with raw(guard.smtp_address) as stream:
        await asyncio.wait_for(read_reply(stream[0]), timeout=5)
        assert await replies_to(stream, b"EHLO client.test\n", 1) == [str(replies.BAD_COMMAND_LINE)]
        assert await replies_to(stream, b"QUIT\n", 1) == [str(replies.BAD_COMMAND_LINE)]
        # The first CRLF ends the broken line: that last piece of it is refused too.
        assert await command(stream, b"QUIT") == str(replies.BAD_COMMAND_LINE)
        assert await command(stream, b"QUIT") == str(replies.BYE)
    assert sink.smtp_sessions == 0


async def test_bare_lf_in_an_auth_answer_is_refused(start_guard, sink, tls):
    guard = await start_guard(**auth_listener(tls))
    async with raw(guard.smtp_address) as stream:
        await greet(stream)
        assert (await command(stream, b"AUTH LOGIN")).startswith("334")
        user = base64.b64encode(USER.encode())
        assert await replies_to(stream, user + b"\nRCPT TO:<b@evil.test>\r\n", 2) == [
            "501 5.5.2 Can't decode base64", str(replies.BAD_COMMAND_LINE)]
        await command(stream, b"QUIT")


@pytest.mark.parametrize("ending, then, second_reply", [
    (b"\r\n", b"NOOP\r\n", str(replies.OK)),
    (b"\n", b"RCPT TO:<b@evil.test>\r\n", str(replies.BAD_COMMAND_LINE)),
])
async def test_too_long_auth_answer_fails_the_exchange_and_nothing_of_it_runs(start_guard, sink, tls, ending, then,
                                                                             second_reply):
    guard = await start_guard(**auth_listener(tls))
    async with raw(guard.smtp_address) as stream:
        await greet(stream)
        assert (await command(stream, b"AUTH LOGIN")).startswith("334")
        assert await replies_to(stream, b"A" * 1200 + ending + then, 2) == [
            "501 5.5.2 Can't decode base64", second_reply]
        assert await command(stream, b"QUIT") == str(replies.BYE)


# --- banner --------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, greeting", [
    ({}, "220 guard.test ESMTP"),
    ({"smtp": {"banner": "mail relay ready"}}, "220 guard.test mail relay ready"),
])
async def test_banner_names_no_software(start_guard, sink, overrides, greeting):
    guard = await start_guard(**overrides)
    async with raw(guard.smtp_address) as stream:
        assert await greet(stream) == greeting
        stream[1].write(b"EHLO client.test\r\nHELP\r\nHELP DATA\r\nQUIT\r\n")
        everything = (await asyncio.wait_for(stream[0].read(), timeout=5)).decode()
    assert everything.endswith(f"{replies.BYE}\r\n") and "Supported commands" in everything
    for revealing in ("python", "aiosmtpd", "1.4", "smtp-guard", "smtp_guard"):
        assert revealing not in (greeting + everything).lower()


# --- timeouts ------------------------------------------------------------------------------------

async def open_data(stream: Stream) -> None:
    await greet(stream)
    assert await command(stream, f"MAIL FROM:<{SENDER}>".encode()) == str(replies.SENDER_OK)
    assert (await command(stream, b"RCPT TO:<a@example.com>")).startswith("250")
    assert (await command(stream, b"DATA")).startswith("354")


async def test_slow_steady_client_sends_2mb_over_longer_than_both_timeouts(start_guard, sink):
    guard = await start_guard(smtp={"idle_timeout": 0.5, "data_timeout": 0.5})
    line = b"x" * 76 + b"\r\n"
    body = line * (2 * 1024 * 1024 // len(line))
    chunks = 8  # one every 0.2 s: 1.6 s in DATA, more than three times either timeout
    size = len(body) // chunks + 1
    async with raw(guard.smtp_address) as stream:
        await open_data(stream)
        started = time.monotonic()
        stream[1].write(b"Subject: slow\r\n\r\n")
        for start in range(0, len(body), size):
            # Pacing the client (the behaviour under test), not waiting for the guard.
            await asyncio.sleep(0.2)
            stream[1].write(body[start:start + size])
        stream[1].write(b".\r\n")
        reply = await asyncio.wait_for(read_reply(stream[0]), timeout=10)
        assert time.monotonic() - started > 1.0
        assert reply.startswith("250"), reply
        assert await command(stream, b"QUIT") == str(replies.BYE)
    [delivered] = sink.messages
    assert without_trace(delivered.content) == b"Subject: slow\r\n\r\n" + body


async def test_stalled_client_in_data_gets_421_and_nothing_is_relayed(start_guard, sink):
    guard = await start_guard(smtp={"idle_timeout": 30, "data_timeout": 0.5})
    async with raw(guard.smtp_address) as stream:
        await open_data(stream)
        stream[1].write(b"Subject: stalled\r\n\r\nfirst line\r\n")
        assert await asyncio.wait_for(read_reply(stream[0]), timeout=5) == str(replies.DATA_TIMEOUT)
        assert await asyncio.wait_for(stream[0].read(), timeout=5) == b""
    await wait_until(lambda: not guard.front.smtp.registry.sessions, what="the stalled session to be gone")
    assert sink.messages == []


async def test_idle_timeout_still_applies_between_commands(start_guard, sink):
    guard = await start_guard(smtp={"idle_timeout": 0.5, "data_timeout": 30})
    async with raw(guard.smtp_address) as stream:
        await greet(stream)
        assert await asyncio.wait_for(read_reply(stream[0]), timeout=5) == str(replies.IDLE_TIMEOUT)
        assert await asyncio.wait_for(stream[0].read(), timeout=5) == b""


async def test_busy_session_ends_at_session_timeout(start_guard, sink):
    guard = await start_guard(smtp={"session_timeout": 0.5})
    async with raw(guard.smtp_address) as stream:
        await greet(stream)
        answers: list[str] = []

        async def noop_refused() -> bool:
            answers.append(await command(stream, b"NOOP"))
            return not answers[-1].startswith("250")

        await wait_until(noop_refused, timeout=5, interval=0.05, what="a NOOP past session_timeout")
        assert answers[-1] == str(replies.SESSION_TIMEOUT)
        assert len(answers) > 1  # busy all along: idle_timeout never came into it
        assert await asyncio.wait_for(stream[0].read(), timeout=5) == b""


async def test_session_timeout_cuts_a_data_that_trickles_in(start_guard, sink):
    """A byte every 0.2 s keeps data_timeout (0.5 s) from ever firing; session_timeout still
    ends the session, in the middle of DATA: 421, closed, nothing relayed."""
    guard = await start_guard(smtp={"idle_timeout": 0.5, "data_timeout": 0.5, "session_timeout": 1.5})
    async with raw(guard.smtp_address) as stream:
        started = time.monotonic()
        await open_data(stream)

        async def trickle() -> None:
            for byte in b"Subject: slow\r\n\r\n" + b"x" * 100:
                stream[1].write(bytes([byte]))
                await asyncio.sleep(0.2)  # pacing the client, the behaviour under test

        trickling = asyncio.create_task(trickle())
        try:
            assert await asyncio.wait_for(read_reply(stream[0]), timeout=10) == str(replies.SESSION_TIMEOUT)
            assert await asyncio.wait_for(stream[0].read(), timeout=5) == b""
        finally:
            trickling.cancel()
        assert 1.4 < time.monotonic() - started < 5
    await wait_until(lambda: not guard.front.smtp.registry.sessions, what="the session to be gone")
    assert sink.messages == []


async def test_session_timeout_ends_an_idle_session_at_its_deadline(start_guard, sink):
    guard = await start_guard(smtp={"idle_timeout": 30, "session_timeout": 0.5})
    async with raw(guard.smtp_address) as stream:
        await greet(stream)
        assert await asyncio.wait_for(read_reply(stream[0]), timeout=5) == str(replies.SESSION_TIMEOUT)
        assert await asyncio.wait_for(stream[0].read(), timeout=5) == b""


# --- AUTH password guessing ----------------------------------------------------------------------

def auth_listener(tls: Any, **auth: Any) -> dict[str, Any]:
    """AUTH on the listener (plaintext allowed on loopback), loopback not allowed by network."""
    return {
        "smtp": {"tls": {"cert": str(tls.cert_file), "key": str(tls.key_file)},
                 "auth": {"users": {USER: PASSWORD_HASH}, "allow_plaintext_on_loopback": True, **auth}},
        "access": {"allow_networks": ["192.0.2.0/24"]},
    }


def plain(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode())


async def guess(address: tuple[str, int], attempts: int, password: str = "wrong") -> list[str]:
    """Try ``attempts`` passwords, reconnecting whenever the guard closes the session."""
    answers: list[str] = []
    while len(answers) < attempts:
        async with raw(address) as stream:
            await greet(stream)
            while len(answers) < attempts:
                answers.append(await command(stream, plain(USER, password)))
                if answers[-1].startswith("421"):
                    assert await asyncio.wait_for(stream[0].read(), timeout=5) == b""
                    break
    return answers


async def test_thirty_wrong_passwords_are_throttled(start_guard, sink, tls):
    clock = ManualClock(time.time())
    guard = await start_guard(clock=clock, **auth_listener(tls))  # 3 per session, 10 per address in 10 min
    answers = await guess(guard.smtp_address, 30)
    invalid, too_many, throttled = (str(replies.AUTH_FAILED), str(replies.AUTH_TOO_MANY_FAILURES),
                                    str(replies.AUTH_THROTTLED))
    # Three sessions of (535, 535, 421), one more check; from then on no password is checked.
    assert answers[:10] == [invalid, invalid, too_many] * 3 + [invalid]
    # The fourth session ends at its third failure; every later one at its third refusal.
    assert answers[10:] == [throttled, too_many] + [throttled, throttled, too_many] * 6
    samples = guard.metrics.registry.get_sample_value
    assert samples("smtp_guard_auth_failures_total", {"outcome": "invalid"}) == 10
    assert samples("smtp_guard_auth_failures_total", {"outcome": "throttled"}) == 20
    # Even the right password is refused, unchecked, until the window has passed.
    assert await guess(guard.smtp_address, 1, PASSWORD) == [throttled]
    clock.advance(guard.config.smtp.auth.failure_window)
    assert await guess(guard.smtp_address, 1, PASSWORD) == ["235 2.7.0 Authentication successful"]


async def test_session_closed_after_max_failures_even_with_auth_login(start_guard, sink, tls):
    guard = await start_guard(**auth_listener(tls, max_failures_per_session=2))
    async with raw(guard.smtp_address) as stream:
        await greet(stream)
        for expected in (replies.AUTH_FAILED, replies.AUTH_TOO_MANY_FAILURES):
            assert (await command(stream, b"AUTH LOGIN")).startswith("334")
            assert (await command(stream, base64.b64encode(USER.encode()))).startswith("334")
            assert await command(stream, base64.b64encode(b"wrong")) == str(expected)
        assert await asyncio.wait_for(stream[0].read(), timeout=5) == b""


async def test_successful_auth_logs_no_deprecation_warning(start_guard, sink, tls, caplog):
    guard = await start_guard(**auth_listener(tls))
    with caplog.at_level(logging.WARNING, logger="mail.log"):
        async with raw(guard.smtp_address) as stream:
            await greet(stream)
            assert await command(stream, plain(USER, PASSWORD)) == "235 2.7.0 Authentication successful"
            assert await command(stream, f"MAIL FROM:<{SENDER}>".encode()) == str(replies.SENDER_OK)
            assert await command(stream, b"QUIT") == str(replies.BYE)
    assert [r.getMessage() for r in caplog.records if r.name == "mail.log"] == []


def test_throttle_counts_per_address_in_a_sliding_window() -> None:
    clock = ManualClock(1000.0)
    throttle = AuthThrottle(max_failures=3, window=60, clock=clock)
    for _ in range(3):
        assert not throttle.is_throttled("192.0.2.1")
        throttle.record_failure("192.0.2.1")
        clock.advance(10)
    assert throttle.is_throttled("192.0.2.1")
    assert not throttle.is_throttled("192.0.2.2")
    clock.advance(30)  # the first failure (at 1000) leaves the window at 1060
    assert not throttle.is_throttled("192.0.2.1")
    # IPv6 clients are counted per /64; IPv4-mapped addresses as IPv4.
    for suffix in ("1", "2", "3"):
        throttle.record_failure(f"2001:db8:0:1::{suffix}")
    assert throttle.is_throttled("2001:db8:0:1::ffff") and not throttle.is_throttled("2001:db8:0:2::1")
    for _ in range(3):
        throttle.record_failure("::ffff:198.51.100.7")
    assert throttle.is_throttled("198.51.100.7")


# --- Received: ------------------------------------------------------------------------------------

RECEIVED = re.compile(
    rb"Received: from client\.test \(unknown \[127\.0\.0\.1\]\)\r\n"
    rb"\tby guard\.test with ESMTP id ([0-9a-f]{12});\r\n"
    rb"\t([^\r\n]+)\r\n")


async def test_received_header_on_relayed_and_held_mail(start_guard, sink):
    guard = await start_guard(lists={"manual": {"action": "hold"}})
    await guard.backends.suppressions.add([SuppressionEntry("address", guard.backends.normalizer.key("held@example.com"), "manual",
                                                   reason="test", source="test", created_at=time.time())])
    await guard.enforcement.reloader.refresh()
    content = message(subject="Traced")
    async with raw(guard.smtp_address) as stream:
        await greet(stream)
        assert await command(stream, f"MAIL FROM:<{SENDER}>".encode()) == str(replies.SENDER_OK)
        assert (await command(stream, b"RCPT TO:<ok@example.com>")).startswith("250")
        assert await command(stream, b"RCPT TO:<held@example.com>") == str(replies.RECIPIENT_OK)
        assert (await command(stream, b"DATA")).startswith("354")
        assert (await replies_to(stream, content + b".\r\n", 1))[0].startswith("250")
        await command(stream, b"QUIT")
    [relayed] = sink.messages
    [held] = await guard.backends.holds.list()
    stored = await guard.backends.holds.get(held.id)
    assert stored is not None
    for copy in (relayed.content, stored.content):
        match = RECEIVED.match(copy)
        assert match, copy[:200]
        assert copy[match.end():] == content
        assert match.group(1).decode() == held.txn_id
        assert abs(email.utils.parsedate_to_datetime(match.group(2).decode()).timestamp() - time.time()) < 60
        header = copy[:match.end()]
        assert b"example.com" not in header  # never a recipient (Postfix's "for <...>" is left out)
        assert all(len(line) <= 998 for line in header.split(b"\r\n"))


async def test_received_header_protocol_and_hostile_helo(start_guard, sink, tls):
    guard = await start_guard(**auth_listener(tls))
    async with raw(guard.smtp_address) as stream:
        await asyncio.wait_for(read_reply(stream[0]), timeout=5)
        helo = b"evil.test)\tfor <x@y> (" + b"a" * 2000
        assert (await command(stream, b"EHLO " + helo[:400])).startswith("250")
        assert (await command(stream, plain(USER, PASSWORD))).startswith("235")
        assert await command(stream, f"MAIL FROM:<{SENDER}>".encode()) == str(replies.SENDER_OK)
        assert (await command(stream, b"RCPT TO:<a@example.com>")).startswith("250")
        assert (await command(stream, b"DATA")).startswith("354")
        assert (await replies_to(stream, message() + b".\r\n", 1))[0].startswith("250")
        await command(stream, b"QUIT")
    header = sink.messages[0].content.split(b"\r\n\t")[0]
    assert header.startswith(b"Received: from evil.test??for??x?y???aaa")
    assert len(header) < 300 and b"(unknown [127.0.0.1])" in header
    assert b" with ESMTPA id " in sink.messages[0].content


async def test_received_header_can_be_switched_off(start_guard, sink):
    guard = await start_guard(smtp={"received_header": False})
    content = message()
    outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], content)
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.messages[0].content == content


# --- opportunistic upstream TLS --------------------------------------------------------------------

@pytest.mark.parametrize("offers_starttls", [True, False])
async def test_opportunistic_tls_uses_starttls_when_offered(start_guard, tls, offers_starttls):
    # No ca_file: opportunistic TLS encrypts without verifying, as Postfix's "may" does.
    async with Sink(tls_context=tls.server_context() if offers_starttls else None) as upstream:
        guard = await start_guard(upstream={"port": upstream.port, "tls": "opportunistic"})
        outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message())
        await guard.stop()
    assert outcome.data is not None and outcome.data.startswith("250")
    [delivered] = upstream.messages
    assert delivered.tls is offers_starttls


async def test_opportunistic_tls_falls_back_to_plaintext_when_the_handshake_fails(start_guard, tls):
    # The upstream advertises STARTTLS but demands a client certificate the guard does not
    # have (TLS 1.2, so the handshake itself fails). The guard reconnects and sends in plaintext.
    broken = tls.server_context()
    broken.maximum_version = ssl.TLSVersion.TLSv1_2
    broken.verify_mode = ssl.CERT_REQUIRED
    broken.load_verify_locations(str(tls.ca_file))
    async with Sink(tls_context=broken) as upstream:
        guard = await start_guard(upstream={"port": upstream.port, "tls": "opportunistic"})
        outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message())
        await guard.stop()
    assert outcome.data is not None and outcome.data.startswith("250")
    [delivered] = upstream.messages
    assert not delivered.tls
    assert upstream.smtp_sessions == 2  # the failed TLS session, then plaintext

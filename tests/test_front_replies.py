"""Every reply the SMTP front sends carries an enhanced status code (RFC 2034), over real loopback.

The guard advertises ENHANCEDSTATUSCODES, so every reply after EHLO has one, each line of a
multi-line reply included, except the reply to HELO/EHLO itself and the intermediate 354 and
334 (RFC 3463 has no class 3). Most replies below are formatted by aiosmtpd, not by the guard:
this drives every command aiosmtpd answers, in every way it can answer it.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from smtp_guard import replies
from smtp_guard.smtp.auth import hash_password

from smtp_client import Stream, raw

ENHANCED_LINE = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3} ")
SENDER = "news@shop.test"
USER = "platform"


async def reply_lines(stream: Stream, line: bytes) -> list[str]:
    """Send one command line; every line of its reply, without CRLF."""
    reader, writer = stream
    writer.write(line + b"\r\n")
    lines: list[str] = []
    while not lines or lines[-1][3:4] == "-":
        raw_line = await asyncio.wait_for(reader.readline(), timeout=5)
        assert raw_line.endswith(b"\r\n"), f"{line!r}: connection closed after {lines}"
        lines.append(raw_line.decode().rstrip("\r\n"))
    return lines


def assert_all_enhanced(answers: dict[bytes, list[str]]) -> None:
    missing = {cmd: lines for cmd, lines in answers.items() if not all(ENHANCED_LINE.match(x) for x in lines)}
    assert missing == {}


async def drive(stream: Stream, commands: list[bytes]) -> dict[bytes, list[str]]:
    return {command: await reply_lines(stream, command) for command in commands}


# Answered alike with and without TLS and AUTH; in this order (a MAIL is open for the nested one).
COMMON = [
    b"HELP", b"HELP DATA", b"HELP NOSUCH",
    b"NOOP", b"NOOP anything",
    b"VRFY <someone@example.com>", b"VRFY", b"VRFY <<<",
    b"EXPN list",
    b"XYZZY", b"",
    b"HELO", b"EHLO",
    b"STARTTLS now",
    b"MAIL", b"MAIL TO:<a@x>", f"MAIL FROM:<{SENDER}> BODY=9BIT".encode(),
    f"MAIL FROM:<{SENDER}> SMTPUTF8=yes".encode(), f"MAIL FROM:<{SENDER}> SIZE=abc".encode(),
    f"MAIL FROM:<{SENDER}> SIZE=999999999999".encode(), f"MAIL FROM:<{SENDER}> FOO=bar".encode(),
    b"MAIL FROM:<a@@b>",
    b"RCPT TO:<a@example.com>",
    b"DATA", b"DATA now",
    b"RSET now", b"RSET",
]


async def test_every_reply_after_ehlo_has_an_enhanced_code(start_guard, sink):
    """No TLS, no AUTH: STARTTLS is 454, AUTH is 538, MAIL and RCPT reach their checks."""
    guard = await start_guard()
    async with raw(guard.smtp_address) as stream:
        await asyncio.wait_for(stream[0].readline(), timeout=5)
        before_ehlo = await drive(stream, [b"MAIL FROM:<a@x.test>", b"DATA"])
        ehlo = await reply_lines(stream, b"EHLO client.test")
        answers = {**before_ehlo, **await drive(stream, COMMON + [
            b"STARTTLS", b"AUTH PLAIN",
            f"MAIL FROM:<{SENDER}>".encode(), f"MAIL FROM:<{SENDER}>".encode(),
            b"RCPT", b"RCPT FROM:<a@example.com>", b"RCPT TO:<a@example.com> FOO=bar",
            b"RCPT TO:<not an address>", b"RCPT TO:<a@example.com>",
        ])}
        data = await reply_lines(stream, b"DATA")
        answers[b". (end of DATA)"] = await reply_lines(stream, b"Subject: x\r\n\r\nbody\r\n.")
        answers[b"QUIT now"] = await reply_lines(stream, b"QUIT now")
        answers[b"QUIT"] = await reply_lines(stream, b"QUIT")
    assert_all_enhanced(answers)
    # RFC 2034's exceptions: the reply to EHLO is the hostname and keywords; 354 has no class.
    assert ehlo[0] == "250-guard.test" and "250-ENHANCEDSTATUSCODES" in ehlo
    assert data == ["354 End data with <CR><LF>.<CR><LF>"]
    # A sample of the mapping, exactly.
    assert answers[b"NOOP"] == [str(replies.OK)]
    assert answers[b"XYZZY"] == [str(replies.COMMAND_NOT_RECOGNIZED)]
    assert answers[b"HELO"] == ["501 5.5.4 Syntax: HELO hostname"]
    assert answers[b"VRFY <someone@example.com>"][0].startswith("252 2.0.0 ")
    assert answers[b"EXPN list"] == ["502 5.5.1 EXPN not implemented"]
    assert answers[b"STARTTLS"] == ["454 4.7.0 TLS not available"]
    assert answers[f"MAIL FROM:<{SENDER}> BODY=9BIT".encode()] == [
        "501 5.5.4 BODY can only be one of 7BIT, 8BITMIME"]
    assert answers[b"HELP"] == ["250 2.0.0 Supported commands: AUTH DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET VRFY"]
    assert answers[b"HELP DATA"] == ["250 2.0.0 Syntax: DATA"]
    assert answers[b"MAIL FROM:<a@@b>"] == ["553 5.1.3 Malformed address"]
    assert answers[b"QUIT"] == [str(replies.BYE)]


def auth_config(tls: Any) -> dict[str, Any]:
    return {"smtp": {"tls": {"cert": str(tls.cert_file), "key": str(tls.key_file)},
                     "auth": {"users": {USER: hash_password("s3cret")}, "allow_plaintext_on_loopback": True}},
            "access": {"allow_networks": ["192.0.2.0/24"]}}


async def test_every_auth_reply_has_an_enhanced_code(start_guard, sink, tls):
    """AUTH offered (plaintext on loopback): its syntax errors, an aborted exchange, AUTH after
    HELO, and MAIL from a client that must authenticate."""
    guard = await start_guard(**auth_config(tls))
    async with raw(guard.smtp_address) as stream:
        await asyncio.wait_for(stream[0].readline(), timeout=5)
        await reply_lines(stream, b"EHLO client.test")
        answers = await drive(stream, COMMON + [
            b"AUTH", b"AUTH PLAIN a b", b"AUTH NOSUCH", b"AUTH PLAIN !!!", b"AUTH PLAIN AGEA",
            f"MAIL FROM:<{SENDER}>".encode(),
        ])
        assert (await reply_lines(stream, b"AUTH LOGIN")) == ["334 VXNlciBOYW1lAA=="]  # base64, no code
        answers[b"* (AUTH LOGIN aborted)"] = await reply_lines(stream, b"*")
        assert await reply_lines(stream, b"HELO client.test") == ["250 guard.test"]  # RFC 2034: no code
        answers[b"AUTH PLAIN after HELO"] = await reply_lines(stream, b"AUTH PLAIN")
        answers[b"QUIT"] = await reply_lines(stream, b"QUIT")
    assert_all_enhanced(answers)
    assert answers[f"MAIL FROM:<{SENDER}>".encode()] == [str(replies.AUTH_REQUIRED)]
    assert answers[b"HELP"] == ["250 2.0.0 Supported commands: AUTH DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET "
                                "STARTTLS VRFY"]

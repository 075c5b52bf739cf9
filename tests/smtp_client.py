"""A test SMTP client that records the exact reply to every command (aiosmtplib underneath)."""

from __future__ import annotations

import asyncio
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import aiosmtplib


@dataclass
class Outcome:
    mail: str = ""
    rcpt: dict[str, str] = field(default_factory=dict)  # recipient -> "code text"
    data: str | None = None  # None when no recipient was accepted

    @property
    def accepted(self) -> list[str]:
        return [r for r, reply in self.rcpt.items() if reply.startswith("2")]


def _fmt(code: int, message: str) -> str:
    return f"{code} {message}"


async def transact(client: aiosmtplib.SMTP, sender: str, recipients: Sequence[str], content: bytes) -> Outcome:
    """One transaction on an open client: MAIL, each RCPT, then DATA if any was accepted."""
    outcome = Outcome()
    # Internationalized addresses need SMTPUTF8 (RFC 6531) and UTF-8 on the wire.
    utf8 = not all(a.isascii() for a in (sender, *recipients))
    encoding = "utf-8" if utf8 else "ascii"
    try:
        response = await client.mail(sender, options=["SMTPUTF8"] if utf8 else [], encoding=encoding)
        outcome.mail = _fmt(response.code, response.message)
    except aiosmtplib.SMTPResponseException as error:
        outcome.mail = _fmt(error.code, error.message)
        await client.rset()
        return outcome
    for recipient in recipients:
        try:
            response = await client.rcpt(recipient, encoding=encoding)
            outcome.rcpt[recipient] = _fmt(response.code, response.message)
        except aiosmtplib.SMTPResponseException as error:
            outcome.rcpt[recipient] = _fmt(error.code, error.message)
    if outcome.accepted:
        try:
            response = await client.data(content)
            outcome.data = _fmt(response.code, response.message)
        except aiosmtplib.SMTPResponseException as error:
            outcome.data = _fmt(error.code, error.message)
    else:
        await client.rset()
    return outcome


async def send(address: tuple[str, int], sender: str, recipients: Sequence[str], content: bytes,
               **client_options: object) -> Outcome:
    """Connect, EHLO, one transaction, QUIT."""
    host, port = address
    client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10, **client_options)  # type: ignore[arg-type]
    await client.connect()
    try:
        return await transact(client, sender, recipients, content)
    finally:
        try:
            await client.quit()
        except aiosmtplib.SMTPException:
            client.close()


def message(subject: str = "Hello", body: str = "Hi there.\r\n", sender: str = "news@shop.test",
            extra_headers: str = "") -> bytes:
    return (f"From: Shop <{sender}>\r\nTo: you@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@shop.test>\r\n{extra_headers}\r\n{body}").encode()


_TRACE = re.compile(rb"Received: from [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


def without_trace(content: bytes) -> bytes:
    """The message as the client sent it: ``content`` minus the Received: header the guard
    puts first on what it relays and holds (asserted to be there)."""
    match = _TRACE.match(content)
    assert match, f"no Received: header first in {content[:80]!r}"
    return content[match.end():]


async def read_reply(reader) -> str:  # type: ignore[no-untyped-def]
    """One (possibly multi-line) reply; returns its last line without CRLF."""
    while True:
        line = (await reader.readline()).decode("utf-8", "replace")
        if not line or line[3:4] != "-":
            return line.rstrip("\r\n")


async def dialogue(address: tuple[str, int], commands: Sequence[bytes]) -> list[str]:
    """Send raw command lines one at a time (bytes a library would refuse to send) and
    return the reply to each, after the greeting."""
    import asyncio

    reader, writer = await asyncio.open_connection(*address)
    try:
        await read_reply(reader)
        answers = []
        for command in commands:
            writer.write(command + b"\r\n")
            answers.append(await read_reply(reader))
        return answers
    finally:
        writer.close()
        await writer.wait_closed()


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def raw(address: tuple[str, int]) -> AsyncIterator[Stream]:
    """A plain TCP connection to the guard, for bytes no SMTP client library would send."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        yield reader, writer
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass  # the guard closed it first

"""An upstream that answers out of protocol — a 250 to DATA instead of 354, a 354 to the final
dot, a 221 or a 251 where the command has its own success reply — must never make the guard
answer the client with a success: the client would believe its mail taken when the upstream
never received it (or received it in an unknown state). Every such reply becomes 451 4.5.0 and
the upstream session is dropped, not reused.

An upstream that offers no SMTPUTF8 is never sent a non-ASCII address (RFC 6531): that
recipient gets 553 5.6.7, the others of the message still go.

The upstream here is a scripted one on loopback (asyncio streams): aiosmtpd, as every real
server, always answers DATA with 354, so it cannot play these faults.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smtp_guard import replies
from smtp_guard.app import Guard

from conftest import make_config
from smtp_client import message, send

SENDER = "news@shop.test"


class ScriptedUpstream:
    """Answers each command with ``replies[verb]`` (``"."``: the final dot), the rest with 250.
    Reads a message's content only after it answered DATA with 354; records each session's
    commands and the messages it got."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = {"DATA": "354 go ahead", ".": "250 2.0.0 queued", **answers}
        self.commands: list[str] = []
        self.messages: list[bytes] = []
        self.sessions = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> "ScriptedUpstream":
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        writer.write(b"220 upstream.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line.split(b" ", 1)[0].strip().decode("ascii", "replace").upper()
                self.commands.append(verb)
                if verb in ("EHLO", "HELO"):
                    writer.write(b"250-upstream.test\r\n250 8BITMIME\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    break
                else:
                    answer = self.answers.get(verb, "250 2.0.0 ok")
                    writer.write(answer.encode() + b"\r\n")
                    if verb == "DATA" and answer.startswith("354"):
                        self.messages.append(await reader.readuntil(b"\r\n.\r\n"))
                        writer.write(self.answers["."].encode() + b"\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def guard_before(tmp_path: Path) -> AsyncIterator:
    """``guard = await guard_before(upstream)``: a started Guard relaying to ``upstream``."""
    started: list[Guard] = []

    async def start(upstream: ScriptedUpstream) -> Guard:
        guard = Guard(make_config(tmp_path, upstream.port))
        started.append(guard)
        await guard.start()
        return guard

    yield start
    for guard in started:
        await guard.stop()


OUT_OF_PROTOCOL = str(replies.UPSTREAM_OUT_OF_PROTOCOL)


@pytest.mark.parametrize("answers", [
    {"DATA": "250 2.0.0 fine"},  # no 354: the content was never sent
    {"DATA": "221 2.0.0 bye"},
    {".": "354 again"},  # the content was sent; what the upstream did with it is unknown
    {".": "251 2.1.5 will forward"},
], ids=["250-to-DATA", "221-to-DATA", "354-to-the-dot", "251-to-the-dot"])
async def test_a_success_that_is_not_the_commands_own_reply_is_451_at_the_end_of_data(
        guard_before, caplog: pytest.LogCaptureFixture, answers: dict[str, str]) -> None:
    async with ScriptedUpstream(answers) as upstream:
        guard = await guard_before(upstream)
        outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message())
        assert outcome.rcpt["a@example.com"].startswith("250")
        assert outcome.data == OUT_OF_PROTOCOL
        assert "which that command cannot get; closing the session" in caplog.text
        # The session is dropped: the next message opens a new one.
        sessions = upstream.sessions
        await send(guard.smtp_address, SENDER, ["b@example.com"], message())
        assert upstream.sessions == sessions + 1


async def test_a_354_to_rcpt_is_451_and_the_recipient_is_not_relayed(guard_before) -> None:
    async with ScriptedUpstream({"RCPT": "354 what"}) as upstream:
        guard = await guard_before(upstream)
        outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message())
        assert outcome.rcpt["a@example.com"] == OUT_OF_PROTOCOL
        assert outcome.data is None or not outcome.data.startswith("250")
        assert upstream.messages == []


async def test_a_251_to_rcpt_is_an_acceptance(guard_before) -> None:
    async with ScriptedUpstream({"RCPT": "251 2.1.5 user not local; will forward"}) as upstream:
        guard = await guard_before(upstream)
        outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message())
        assert outcome.rcpt["a@example.com"].startswith("251")
        assert outcome.data == "250 2.0.0 queued"
        assert len(upstream.messages) == 1


async def test_an_upstream_without_smtputf8_gets_no_non_ascii_address(guard_before) -> None:
    """Its EHLO offers no SMTPUTF8 (the scripted upstream's does not): a UTF-8 recipient is
    refused here, never sent as raw bytes; an ASCII one in the same message still goes."""
    async with ScriptedUpstream({}) as upstream:
        guard = await guard_before(upstream)
        outcome = await send(guard.smtp_address, SENDER, ["jörg@bücher.example", "a@example.com"], message())
        assert outcome.rcpt["jörg@bücher.example"] == str(replies.UPSTREAM_NO_SMTPUTF8)
        assert outcome.rcpt["a@example.com"].startswith("250")
        assert outcome.data == "250 2.0.0 queued"
        assert upstream.commands.count("RCPT") == 1


async def test_a_mail_reply_other_than_250_is_451_for_the_recipient_not_a_success(guard_before) -> None:
    async with ScriptedUpstream({"MAIL": "251 2.1.0 odd"}) as upstream:
        guard = await guard_before(upstream)
        outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message())
        assert outcome.rcpt["a@example.com"] == OUT_OF_PROTOCOL
        assert upstream.messages == []

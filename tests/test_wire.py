"""wire.dot_stuffed puts on the wire exactly what aiosmtplib's data() would for content with
CRLF line endings only (the relay uses it instead of aiosmtplib's regex passes); dots at line
starts survive the relay end to end. (Bare line endings normalized by the front:
test_relay.py.)"""

from __future__ import annotations

import os

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import example, given, settings, strategies as st

from smtp_guard.wire import dot_stuffed, has_bare_line_ending

from smtp_client import message, send, without_trace

# Lines made of the characters that matter (dots, spaces, letters), joined by CRLF.
crlf_content = st.lists(st.text(".a \t", max_size=6), max_size=8).map(lambda lines: "\r\n".join(lines).encode()) \
    | st.lists(st.text(".a", max_size=4), max_size=6).map(lambda lines: ("\r\n".join(lines) + "\r\n").encode())


@settings(max_examples=500, deadline=None, derandomize=bool(os.environ.get("CI")), database=None)
@given(crlf_content)
@example(b"")
@example(b".")
@example(b"..\r\n.\r\n")
@example(b"a\r\n.")
def test_dot_stuffing_matches_aiosmtplib(content: bytes) -> None:
    assert not has_bare_line_ending(content)
    assert dot_stuffed(content) == PERIOD_REGEX.sub(b"..", normalize_message_line_endings(content)) + b".\r\n"


async def test_dots_at_line_starts_survive_the_relay(start_guard, sink) -> None:
    guard = await start_guard()
    content = message(body=".\r\n..\r\n.a\r\nlast line without a dot\r\n.")  # no CRLF at the very end
    outcome = await send(guard.smtp_address, "news@shop.test", ["a@example.com"], content)
    assert outcome.data is not None and outcome.data.startswith("250")
    assert without_trace(sink.messages[0].content) == content + b"\r\n"


"""DATA lines come to aiosmtpd in runs of whole lines (smtp/server.py ``CommandLineReader``):
what aiosmtpd makes of them must be byte for byte what it makes of single lines — the message,
its transparency dots (RFC 5321 4.5.2), the bytes it counts against the size limit, where DATA
ends, and what stays for the next command."""

from __future__ import annotations

import asyncio
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from smtp_guard.smtp.server import CommandLineReader

LIMIT = 1001  # aiosmtpd's line_length_limit


async def aiosmtpd_data(readuntil) -> tuple[bytes, int]:  # type: ignore[no-untyped-def]
    """aiosmtpd's DATA loop, the parts that shape the content: read until the lone dot, count
    what it read (the size limit), then remove one leading dot of every piece it read."""
    pieces: list[bytearray] = []
    counted = 0
    while True:
        piece = await readuntil(b"\r\n")
        assert len(piece) <= LIMIT  # else aiosmtpd answers "500 Line too long"
        if piece == b".\r\n":
            break
        counted += len(piece)
        pieces.append(bytearray(piece))
    for piece in pieces:
        if piece.startswith(b"."):
            del piece[0]
    return b"".join(pieces), counted


async def _nothing(*args: object) -> None:
    return None


async def read_both(stream: bytes, splits: list[int]) -> tuple[tuple[bytes, int, bytes], tuple[bytes, int, bytes]]:
    """(content, bytes counted, what is left) by single lines and by runs, the stream fed in pieces."""
    results = []
    for runs in (False, True):
        reader = asyncio.StreamReader(limit=LIMIT)
        reading = (CommandLineReader(reader, _nothing, _nothing, LIMIT).readuntil if runs else reader.readuntil)
        task = asyncio.ensure_future(aiosmtpd_data(reading))
        start = 0
        for cut in [*sorted(splits), len(stream)]:
            reader.feed_data(stream[start:cut])
            start = cut
            await asyncio.sleep(0)
        reader.feed_eof()
        content, counted = await task
        results.append((content, counted, await reader.read()))
    return results[0], results[1]


_LINES = st.lists(st.one_of(
    st.sampled_from([b"", b".", b"..", b"...x", b".x", b"x.", b"a\nb", b"a\rb", b"From x", b" ."]),
    st.binary(max_size=20).map(lambda raw: bytes(b"ab.\n \r"[byte % 6] for byte in raw)),
    st.integers(min_value=900, max_value=999).map(lambda n: b"y" * n),
), max_size=40)


@settings(max_examples=300, deadline=None, derandomize=bool(os.environ.get("CI")), database=None)
@given(_LINES, st.lists(st.integers(min_value=0, max_value=4000), max_size=4), st.booleans())
def test_runs_of_lines_give_aiosmtpd_the_same_message(lines: list[bytes], splits: list[int], pipelined: bool) -> None:
    stream = b"".join(line + b"\r\n" for line in lines) + b".\r\n" + (b"QUIT\r\n" if pipelined else b"")
    by_line, by_run = asyncio.run(read_both(stream, [s for s in splits if s <= len(stream)]))
    assert by_run == by_line


def test_a_run_never_reaches_past_the_end_of_data() -> None:
    stream = b"one\r\n..two\r\n.\r\nRSET\r\n.\r\n"
    by_line, by_run = asyncio.run(read_both(stream, []))
    assert by_run == by_line == (b"one\r\n.two\r\n", 12, b"RSET\r\n.\r\n")

"""classify.parse_headers decodes header values as the stdlib does, with a shortcut for plain ones."""

from __future__ import annotations

import email.header
import email.parser
import email.policy
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from smtp_guard.classify import _decode, parse_headers


def _stdlib(value: str) -> str:
    return " ".join(str(email.header.make_header(email.header.decode_header(value))).split())


@settings(max_examples=300, deadline=None, derandomize=bool(os.environ.get("CI")), database=None)
@given(st.text("ab =?\t\r\n()\"\\;:,.Q_-", max_size=30))
def test_plain_values_decode_as_the_stdlib_decodes_them(value: str) -> None:
    try:
        expected = _stdlib(value)
    except Exception:
        return  # the slow path's own error handling applies; not the shortcut's business
    assert _decode(value) == expected


def test_encoded_words_are_still_decoded() -> None:
    headers = parse_headers(b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n  aus  Wien\r\nX-A: 1\r\n\r\nbody")
    assert headers == {"subject": "Grüße aus Wien", "x-a": "1"}


# --- the plain-head fast path agrees with the stdlib parser ---------------------------------------

def _stdlib_headers(content: bytes) -> dict[str, str]:
    """parse_headers as it was before its fast path: always the stdlib parser."""
    head = content.split(b"\r\n\r\n", 1)[0]
    headers: dict[str, str] = {}
    for name, value in email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head).items():
        headers.setdefault(name.lower(), _decode(value))
    return headers


_NAMES = st.sampled_from(["Subject", "subject", "From", "X-Campaign-ID", "To", "X Bad", "", "X:Y", "Ab\x7f",
                          "List-Unsubscribe", "From "])
_VALUES = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
    st.sampled_from(["=?utf-8?q?J=C3=B6rg?=", "=?utf-8?b?w7Zs?= tail", "  spaced  ", "", "=?bad", "a\tb"]),
)
_LINES = st.one_of(
    st.builds(lambda name, value: f"{name}:{value}", _NAMES, _VALUES),
    st.builds(lambda ws, value: f"{ws}{value}", st.sampled_from([" ", "\t", "  "]), _VALUES),
    st.sampled_from(["From someone@example.com Mon", "no colon here", "\r", "\n", "x\rY: z", "caf\u00e9: x"]),
)


@settings(max_examples=400, deadline=None, derandomize=bool(os.environ.get("CI")), database=None)
@given(st.lists(_LINES, min_size=1, max_size=8), st.booleans())
def test_plain_head_fast_path_agrees_with_the_stdlib_parser(lines: list[str], with_body: bool) -> None:
    content = "\r\n".join(lines).encode("utf-8", "surrogateescape") + (b"\r\n\r\nbody\r\n" if with_body else b"")
    assert parse_headers(content) == _stdlib_headers(content)

"""replies.py: every reply the guard sends is a well-formed RFC 5321 / RFC 3463 reply."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from smtp_guard import replies
from smtp_guard.replies import Reply, rewrite_aiosmtpd_reply, upstream_reply

CONSTANTS = {name: value for name, value in vars(replies).items() if isinstance(value, Reply)}
REWRITES = {prefix: reply for prefix, reply in replies.AIOSMTPD_REWRITES}
ALL = {**CONSTANTS, **{f"rewrite of {prefix!r}": reply for prefix, reply in REWRITES.items()}}

# RFC 3463 section 3: class.subject.detail, subject 0-7, detail 0-999.
ENHANCED = re.compile(r"([245])\.([0-7])\.(\d{1,3})")


def test_the_table_is_not_empty() -> None:
    assert {"RECIPIENT_OK", "SUPPRESSED", "UPSTREAM_UNAVAILABLE", "INTERNAL_ERROR"} <= set(CONSTANTS)


@pytest.mark.parametrize("name", sorted(ALL))
def test_reply_is_well_formed(name: str) -> None:
    reply = ALL[name]
    assert 200 <= reply.code <= 599 and reply.code // 10 % 10 <= 5, "RFC 5321 4.2.1 reply code"
    match = ENHANCED.fullmatch(reply.enhanced)
    assert match, f"{reply.enhanced!r} is not an RFC 3463 enhanced code"
    assert match.group(1) == str(reply.code)[0], "enhanced class digit must equal the code's class digit"
    assert reply.text and reply.text == reply.text.strip()
    assert all(" " <= ch <= "~" for ch in reply.text), "one line of printable ASCII"
    assert str(reply) == f"{reply.code} {reply.enhanced} {reply.text}"
    # Exactly one of the three classes.
    assert [reply.is_success, reply.is_temporary, reply.is_permanent].count(True) == 1


def test_temporary_failures_are_4xx_so_the_platform_retries() -> None:
    for name in ("UPSTREAM_UNAVAILABLE", "UPSTREAM_TIMEOUT", "UPSTREAM_LOST", "UPSTREAM_BUSY",
                 "STORE_UNAVAILABLE", "STORE_FULL", "INTERNAL_ERROR", "TOO_MANY_RECIPIENTS", "SHUTTING_DOWN"):
        assert CONSTANTS[name].is_temporary, name
    assert replies.SUPPRESSED.is_permanent and (replies.SUPPRESSED.code, replies.SUPPRESSED.enhanced) == (550, "5.7.1")
    assert (replies.STORE_UNAVAILABLE.code, replies.STORE_UNAVAILABLE.enhanced) == (451, "4.3.0")
    assert (replies.STORE_FULL.code, replies.STORE_FULL.enhanced) == (452, "4.3.1")  # RFC 3463: mail system full


def test_with_text_keeps_code_and_enhanced_code() -> None:
    changed = replies.SUPPRESSED.with_text("Recipient unsubscribed")
    assert changed == Reply(550, "5.7.1", "Recipient unsubscribed")


def test_reply_without_enhanced_code_formats_without_it() -> None:
    assert str(Reply(220, "", "ready")) == "220 ready"


@pytest.mark.parametrize("code, message, expected", [
    (450, "4.2.0 Mailbox busy", Reply(450, "4.2.0", "Mailbox busy")),
    (550, "5.1.1 <x@example.com>: Recipient address rejected", Reply(550, "5.1.1", "<x@example.com>: Recipient address rejected")),
    (554, "5.7.1 rejected", Reply(554, "5.7.1", "rejected")),
    (250, "2.0.0 Ok: queued as 4Bc1", Reply(250, "2.0.0", "Ok: queued as 4Bc1")),
    (421, "4.3.2 shutting down", Reply(421, "4.3.2", "shutting down")),
    # No enhanced code from the upstream: a generic one of the same class.
    (451, "try later", Reply(451, "4.0.0", "try later")),
    (550, "No such user", Reply(550, "5.0.0", "No such user")),
    (250, "Ok", Reply(250, "2.0.0", "Ok")),
    # An enhanced code of another class is text, not an enhanced code: the class stays the code's.
    (450, "5.1.1 odd upstream", Reply(450, "4.0.0", "5.1.1 odd upstream")),
    # Multi-line replies fold into one line; empty text gets a placeholder.
    (452, "4.5.3 too many\n  recipients  \n", Reply(452, "4.5.3", "too many recipients")),
    # ... and the enhanced code each line repeats (RFC 2034) is said once.
    (250, "2.0.0 first\n2.0.0 queued as X", Reply(250, "2.0.0", "first queued as X")),
    (250, "2.0.0\n2.0.0 queued", Reply(250, "2.0.0", "queued")),
    (550, "", Reply(550, "5.0.0", "upstream reply")),
])
def test_upstream_reply_keeps_class_and_enhanced_code(code: int, message: str, expected: Reply) -> None:
    reply = upstream_reply(code, message)
    assert reply == expected
    assert str(reply.code)[0] == reply.enhanced[0]


@pytest.mark.parametrize("status, expected", [
    ("552 Error: Too much mail data", replies.MESSAGE_TOO_BIG),
    ("500 Line too long (see RFC5321 4.5.3.1.6)", replies.LINE_TOO_LONG),
    ("503 Error: need RCPT command", REWRITES["503 Error: need RCPT command"]),
    ("555 MAIL FROM parameters not recognized or not implemented", REWRITES["555 "]),
    ("250 OK", replies.OK),
    ("221 Bye", replies.BYE),
    ('500 Error: command "XYZZY" not recognized', replies.COMMAND_NOT_RECOGNIZED),
    ("501 Syntax: HELO hostname", REWRITES["501 Syntax: HELO"]),
    ("252 Cannot VRFY user, but will accept message and attempt delivery", REWRITES["252 Cannot VRFY"]),
    ("454 TLS not available", REWRITES["454 TLS not available"]),
])
def test_aiosmtpd_replies_are_rewritten_with_enhanced_codes(status: str, expected: Reply) -> None:
    assert rewrite_aiosmtpd_reply(status) == str(expected)


def test_replies_with_an_enhanced_code_pass_through_rewrite_unchanged() -> None:
    assert rewrite_aiosmtpd_reply(str(replies.SUPPRESSED)) == str(replies.SUPPRESSED)
    assert rewrite_aiosmtpd_reply("504 5.5.4 Unrecognized authentication type") == \
        "504 5.5.4 Unrecognized authentication type"


@pytest.mark.parametrize("status, expected", [
    # HELP's text is the client's answer: only the code is added.
    ("250 Supported commands: DATA EHLO", "250 2.0.0 Supported commands: DATA EHLO"),
    ("501 Supported commands: DATA EHLO", "501 5.5.4 Supported commands: DATA EHLO"),
    ("250 Syntax: MAIL FROM: <address>", "250 2.0.0 Syntax: MAIL FROM: <address>"),
    # A reply the table does not know still gets the generic code of its class.
    ("250 Something new", "250 2.0.0 Something new"),
    ("452 Something new", "452 4.0.0 Something new"),
    ("550-first line", "550-5.0.0 first line"),
    # No enhanced class 3 (RFC 3463): intermediate replies are left alone.
    ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
])
def test_aiosmtpd_replies_keep_their_text_or_get_a_generic_code(status: str, expected: str) -> None:
    assert rewrite_aiosmtpd_reply(status) == expected


def test_aiosmtpd_exception_text_never_reaches_the_client() -> None:
    assert rewrite_aiosmtpd_reply("500 Error: (KeyError) 'x'") == str(replies.INTERNAL_ERROR)


def test_kept_text_codes_match_their_reply_class() -> None:
    for prefix, enhanced in replies.AIOSMTPD_ENHANCED_CODES:
        assert ENHANCED.fullmatch(enhanced) and enhanced[0] == prefix[0], prefix


def test_every_reply_constant_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    undocumented = sorted(name for name, reply in CONSTANTS.items() if f"`{reply}`" not in readme)
    assert undocumented == []

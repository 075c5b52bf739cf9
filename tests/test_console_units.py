"""The console's small parts alone: the text preview of a held message, the session store and
the origin check."""

from __future__ import annotations

from email.message import EmailMessage
from email.policy import SMTP

import pytest
from aiohttp.test_utils import make_mocked_request

from smtp_guard.admin.preview import text_preview
from smtp_guard.admin.sessions import SessionStore, has_csrf_token, is_cross_origin
from smtp_guard.admin.tokens import Principal

from conftest import ManualClock


def mail(plain: str | None = None, html: str | None = None, charset: str = "utf-8") -> bytes:
    message = EmailMessage()
    message["Subject"] = "preview"
    if plain is not None:
        message.set_content(plain, charset=charset)
    if html is not None:
        if plain is None:
            message.set_content(html, subtype="html", charset=charset)
        else:
            message.add_alternative(html, subtype="html", charset=charset)
    return message.as_bytes(policy=SMTP)


def test_the_plain_part_is_preferred_and_kept_as_written() -> None:
    content = mail(plain="Hello <b>there</b>,\n\nyour order ships today.\n", html="<p>HTML version</p>")
    assert text_preview(content, 1000) == "Hello <b>there</b>,\n\nyour order ships today."


def test_an_html_only_message_shows_its_text_without_any_markup() -> None:
    content = mail(html="<html><head><title>T</title><style>p {color: red}</style></head><body>"
                        "<h1>Sale</h1><p>Hello &amp; welcome<br>to the <a href='http://x.test'>shop</a></p>"
                        "<script>alert(1)</script><img src='http://tracker.test/p.gif'><!-- hidden -->"
                        "<p>Bye</p></body></html>")
    assert text_preview(content, 1000) == "Sale\n\nHello & welcome\nto the shop\n\nBye"


def test_encoded_parts_are_decoded_and_unknown_charsets_read_as_utf8() -> None:
    assert text_preview(mail(plain="Grüße aus Köln\n", charset="iso-8859-1"), 100) == "Grüße aus Köln"
    raw = (b"Content-Type: text/plain; charset=x-unknown\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + b"R3LDvMOfZQ==\r\n")
    assert text_preview(raw, 100) == "Grüße"


def test_control_and_bidi_override_characters_are_removed() -> None:
    content = mail(plain="invoice\u202eexe.pdf\x07 and \x1b[31mred\n")
    assert text_preview(content, 100) == "invoiceexe.pdf and [31mred"


def test_a_long_text_is_cut_at_the_limit_with_an_ellipsis() -> None:
    assert text_preview(mail(plain="word " * 100), 20) == "word word word word…"


def test_a_message_without_a_text_part_has_no_preview() -> None:
    message = EmailMessage()
    message.set_content(b"\x89PNG", maintype="image", subtype="png")
    assert text_preview(message.as_bytes(policy=SMTP), 100) == ""


def test_sessions_expire_after_their_lifetime_and_end_at_logout() -> None:
    clock = ManualClock(1000.0)
    store = SessionStore(lifetime=60.0, secure=False, clock=clock)
    session = store.create(Principal("ops", "admin"))
    assert session.principal.actor == "console:ops" and len(session.id) >= 40 and session.csrf_token != session.id
    assert store.get(session.id) is session and store.get("") is None and store.get("guess") is None
    clock.advance(59.9)
    assert store.get(session.id) is session
    clock.advance(0.1)
    assert store.get(session.id) is None and len(store) == 0
    other = store.create(Principal("ops", "admin"))
    assert other.id != session.id
    store.end(other.id)
    assert store.get(other.id) is None


def test_the_csrf_token_must_match_exactly() -> None:
    session = SessionStore(60.0, False).create(Principal("ops", "admin"))
    assert has_csrf_token(session, session.csrf_token)
    for presented in (None, "", session.csrf_token[:-1], session.csrf_token + "x", b"bytes"):
        assert not has_csrf_token(session, presented)


@pytest.mark.parametrize("origin, host, cross", [
    (None, "127.0.0.1:8080", False),
    ("null", "127.0.0.1:8080", False),  # what a browser sends under Referrer-Policy: no-referrer
    ("http://127.0.0.1:8080", "127.0.0.1:8080", False),
    ("HTTP://127.0.0.1:8080", "127.0.0.1:8080", False),
    ("http://127.0.0.1:8081", "127.0.0.1:8080", True),
    ("http://localhost:8080", "127.0.0.1:8080", True),
    ("https://127.0.0.1:8080", "127.0.0.1:8080", True),
    ("http://console.test", "console.test:80", False),
    ("http://[::1]:8080", "[::1]:8080", False),
    ("", "127.0.0.1:8080", True),
])
def test_the_origin_check(origin: str | None, host: str, cross: bool) -> None:
    headers = {"Host": host} | ({"Origin": origin} if origin is not None else {})
    assert is_cross_origin(make_mocked_request("POST", "/suppressions", headers=headers)) is cross


@pytest.mark.parametrize("site, cross", [("same-origin", False), ("none", False), ("same-site", True),
                                         ("cross-site", True), ("Cross-Site", True)])
def test_fetch_metadata_names_a_cross_site_form_even_without_an_origin(site: str, cross: bool) -> None:
    for origin in ({}, {"Origin": "null"}):
        headers = {"Host": "127.0.0.1:8080", "Sec-Fetch-Site": site, **origin}
        assert is_cross_origin(make_mocked_request("POST", "/suppressions", headers=headers)) is cross

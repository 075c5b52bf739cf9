"""The text preview of a held message: text only, whatever the sender put in the body."""

from __future__ import annotations

from smtp_guard.hold.preview import text_preview


def test_the_plain_part_is_preferred_and_decoded() -> None:
    content = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n"
               b"--b\r\nContent-Type: text/html\r\n\r\n<p>Hello</p>\r\n"
               b"--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n"
               b"\r\nGr=FC=DFe\r\n--b--\r\n")
    preview = text_preview(content)
    assert preview is not None and (preview.text, preview.source, preview.truncated) == ("Grüße", "text/plain", False)


def test_html_becomes_text_without_markup_scripts_or_styles() -> None:
    content = (b"Content-Type: text/html; charset=utf-8\r\n\r\n<html><head><title>T</title><style>p{color:red}</style>"
               b"</head><body><p>Dear   <b>Jane</b>,</p>\n  <script>alert(1)</script>"
               b"<p>Click &lt;here&gt; &amp; <a href=\"https://x.test\">now</a><br/>bye</p></body></html>\r\n")
    preview = text_preview(content)
    assert preview is not None and preview.source == "text/html"
    assert preview.text == "Dear Jane,\n\nClick <here> & now\nbye"


def test_control_characters_go_and_long_text_is_cut() -> None:
    body = "bell\x07 \x1b[31mred\u202e\r\n".encode() + b"a" * 50
    preview = text_preview(b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body, limit=20)
    assert preview is not None and preview.truncated and len(preview.text) == 20
    assert preview.text.startswith("bell [31mred")


def test_no_text_part_or_an_unknown_charset_gives_no_preview() -> None:
    assert text_preview(b"Content-Type: image/png\r\n\r\niVBORw0KGgo=\r\n") is None
    assert text_preview(b"Content-Type: text/plain; charset=x-unknown\r\n\r\nhi\r\n") is None

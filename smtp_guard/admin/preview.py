"""A held message's text, safe to show an admin: never its HTML.

A held message is whatever a sending platform (or an attacker behind it) wrote. The console
and the API show its *text* only: the ``text/plain`` part, or else the ``text/html`` part with
every tag dropped (scripts, styles and comments with their contents), entities decoded, and
control and bidirectional-override characters removed. The result is plain text for the
caller to escape like any other value; nothing in it is ever markup, and nothing it names (an
``<img src>``, a tracking pixel) is fetched.
"""

from __future__ import annotations

import re
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from html.parser import HTMLParser

# Tags whose content is not text a reader sees.
_HIDDEN = frozenset({"script", "style", "head", "title", "template", "noscript", "svg", "math", "object"})
# Tags after which a reader sees a new line.
_BREAKS = frozenset({"br", "p", "div", "li", "tr", "table", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote",
                     "pre", "hr", "section", "article", "header", "footer", "ul", "ol", "dd", "dt"})
# C0/C1 controls except tab and newline, and the bidirectional overrides and isolates that can
# make text read differently from what it is (CVE-2021-42574, "Trojan Source").
_UNSHOWABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_BLANK_RUNS = re.compile(r"\n{3,}")
_SPACE_RUNS = re.compile(r"[ \t\r\f\v]+")


def text_preview(content: bytes, limit: int) -> str:
    """At most ``limit`` characters of the message's text (an ellipsis marks a cut), or ""
    when it has no text part."""
    message = BytesParser(policy=policy.default).parsebytes(content)
    text = ""
    if isinstance(message, EmailMessage):
        body = message.get_body(preferencelist=("plain", "html"))
        if body is not None:
            text = _decoded(body)
            if body.get_content_subtype() == "html":
                text = html_text(text)
    text = _tidy(text)
    return text if len(text) <= limit else text[:limit].rstrip() + "…"


def html_text(html: str) -> str:
    """The text a reader of ``html`` would see, without any markup."""
    parser = _TextOnly()
    parser.feed(html)
    parser.close()
    return "".join(parser.chunks)


def _decoded(part: Message) -> str:
    payload = part.get_payload(decode=True)  # undoes base64 / quoted-printable
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # a charset Python does not know: show what can be read
        return payload.decode("utf-8", errors="replace")


def _tidy(text: str) -> str:
    text = _UNSHOWABLE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [_SPACE_RUNS.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


class _TextOnly(HTMLParser):
    """Collects character data outside hidden elements; tags and comments are dropped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HIDDEN:
            self._hidden += 1
        elif tag in _BREAKS:
            self.chunks.append("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BREAKS:
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in _BREAKS:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.chunks.append(data)

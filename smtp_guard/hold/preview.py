"""A held message's body as plain text, for an admin judging it (API and console).

Never HTML and never raw MIME: the text/plain part when there is one, else the text/html part
with its markup dropped (script and style content included) and its entities decoded, so
nothing the sender wrote can run or load in the admin's browser. Control characters are
removed and the text is cut at ``limit`` characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from html.parser import HTMLParser
from typing import Literal

PreviewSource = Literal["text/plain", "text/html"]
DEFAULT_LIMIT = 2000
# C0 and C1 controls except tab and newline; DEL; bidirectional overrides, which can make
# text read differently from what it says.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Preview:
    text: str
    source: PreviewSource  # the part it was taken from
    truncated: bool


def text_preview(content: bytes, limit: int = DEFAULT_LIMIT) -> Preview | None:
    """The body's text, or None when the message has no text part (or none that decodes)."""
    try:
        message = BytesParser(policy=policy.default).parsebytes(content)
        assert isinstance(message, EmailMessage)  # policy.default builds EmailMessage
        part = message.get_body(preferencelist=("plain", "html"))
        if part is None:
            return None
        body = part.get_content()
        source: PreviewSource = "text/html" if part.get_content_type() == "text/html" else "text/plain"
        text = _html_text(body) if source == "text/html" else body
    except Exception:
        # The content is whatever the platform sent: an unknown charset (LookupError) or a
        # malformed structure must cost the preview, never the rest of the hold's details.
        return None
    if not isinstance(text, str):
        return None
    text = _UNSAFE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _BLANK_LINES.sub("\n\n", text).strip()
    return Preview(text[:limit], source, len(text) > limit)


def _html_text(html: str) -> str:
    extractor = _TextOnly()
    extractor.feed(html)
    extractor.close()
    # Whitespace in HTML source is layout, not text: keep the line breaks the tags made.
    lines = (" ".join(line.split()) for line in "".join(extractor.parts).split("\n"))
    return "\n".join(lines)


class _TextOnly(HTMLParser):
    """Collects an HTML document's text; block elements become line breaks."""

    _HIDDEN = frozenset({"script", "style", "head", "title", "template"})
    _BREAKS = frozenset({"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag in self._BREAKS:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)  # <br/> is one break, not two

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self._BREAKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)

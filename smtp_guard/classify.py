"""What a message is, read once at the end of DATA: headers, class, stream, body hash.

* **class** (``marketing`` by default, ``transactional``, or a sensitive class such as
  ``sanction``) comes from the first matching ``[[classify.rules]]`` rule (header, sender,
  subject patterns);
* **stream** — one logical send, a campaign or notification type — is the first configured
  id header present (``X-Campaign-ID`` …), else the envelope sender plus the normalized
  subject (numbers masked, so "Your order 1234" and "Your order 5678" are one stream);
* **body hash** — SHA-256 of the body with line endings and runs of white space normalized:
  the fan-out detector's notion of "the same mail".
"""

from __future__ import annotations

import email.errors
import email.header
import email.parser
import email.policy
import hashlib
import re
from dataclasses import dataclass
from typing import Sequence

from .config import ClassifyConfig, StreamsConfig
from .policy.base import MessageContext, RecipientContext

_PREFIXES = re.compile(r"^(?:\s*(?:re|fwd?|aw|wg|tr)\s*:\s*)+", re.IGNORECASE)
_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class _CompiledRule:
    message_class: str
    header: str
    pattern: re.Pattern[str] | None
    sender: re.Pattern[str] | None
    subject: re.Pattern[str] | None

    def matches(self, headers: dict[str, str], sender: str, subject: str) -> bool:
        if self.header:
            value = headers.get(self.header)
            if value is None or (self.pattern is not None and not self.pattern.search(value)):
                return False
        if self.sender is not None and not self.sender.search(sender):
            return False
        return self.subject is None or bool(self.subject.search(subject))


def _compile(pattern: str) -> re.Pattern[str] | None:
    return re.compile(pattern, re.IGNORECASE) if pattern else None


def parse_headers(content: bytes) -> dict[str, str]:
    """Lower-case header name -> first value, decoded (RFC 2047) and unfolded."""
    head = content.split(b"\r\n\r\n", 1)[0]
    fields = _plain_fields(head)
    if fields is None:
        fields = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head).items()
    headers: dict[str, str] = {}
    for name, value in fields:
        key = name.lower()
        if key not in headers:
            headers[key] = _decode(value)
    return headers


def _plain_fields(head: bytes) -> list[tuple[str, str]] | None:
    """The header fields of a plain head — ASCII, CRLF lines, each a ``name:`` field or a
    folded continuation of one — as the stdlib parser (compat32) returns them; None for
    anything else, which goes to that parser. It cost 3 % of the CPU per message, for heads
    that are nearly always plain. A property test checks both agree."""
    if not head.isascii():
        return None
    fields: list[tuple[str, list[str]]] = []
    for line in head.decode("ascii").split("\r\n"):
        if "\r" in line or "\n" in line:
            return None
        if line[:1] in (" ", "\t"):
            if not fields:
                return None
            fields[-1][1].append(line)
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or not name.isprintable() or " " in name:
            return None
        fields.append((name, [value.lstrip(" \t")]))
    return [(name, "\r\n".join(lines)) for name, lines in fields]


def _decode(value: object) -> str:
    text = str(value)
    if text.isascii() and "=?" not in text:
        # No encoded word (RFC 2047 2): decode_header/make_header would return it unchanged,
        # at a cost paid for every header of every message.
        return " ".join(text.split())
    try:
        text = str(email.header.make_header(email.header.decode_header(str(value))))
    except (UnicodeError, LookupError, email.errors.HeaderParseError):
        text = str(value)
    return " ".join(text.split())


def normalize_subject(subject: str) -> str:
    return " ".join(_DIGITS.sub("#", _PREFIXES.sub("", subject)).lower().split())


def body_hash(content: bytes) -> str:
    parts = content.split(b"\r\n\r\n", 1)
    body = parts[1] if len(parts) == 2 else b""
    # Runs of ASCII whitespace as one space, none at the ends (bytes.split() in C: several
    # times faster than a regex). Only compared within one run (the fan-out detector).
    return hashlib.sha256(b" ".join(body.split())).hexdigest()


class MessageClassifier:
    def __init__(self, classify: ClassifyConfig, streams: StreamsConfig) -> None:
        self._default = classify.default
        self._rules = tuple(
            _CompiledRule(r.message_class, r.header.lower(), _compile(r.pattern), _compile(r.sender), _compile(r.subject))
            for r in classify.rules)
        self._id_headers = tuple(h.lower() for h in streams.id_headers)

    def message_class(self, headers: dict[str, str], sender: str) -> str:
        subject = headers.get("subject", "")
        for rule in self._rules:
            if rule.matches(headers, sender, subject):
                return rule.message_class
        return self._default

    def stream(self, headers: dict[str, str], sender: str) -> str:
        for name in self._id_headers:
            value = headers.get(name)
            if value:
                return value[:200]
        return f"{sender or '<>'}|{normalize_subject(headers.get('subject', ''))}"[:200]

    def context(self, content: bytes, sender: str, client_ip: str, auth_user: str | None,
                recipients: Sequence[RecipientContext], now: float) -> MessageContext:
        headers = parse_headers(content)
        return MessageContext(
            sender=sender, client_ip=client_ip, auth_user=auth_user, headers=headers,
            subject=headers.get("subject", ""), stream=self.stream(headers, sender),
            message_class=self.message_class(headers, sender), body_hash=body_hash(content),
            recipients=tuple(recipients), now=now,
        )


def strip_headers(content: bytes, names: Sequence[str]) -> bytes:
    """Remove the named header fields (with their folded continuation lines); bytes otherwise
    unchanged (docs/design.md: the guard only adds or removes configured headers)."""
    if not names:
        return content
    wanted = {n.lower().encode() for n in names}
    head, separator, body = content.partition(b"\r\n\r\n")
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() in wanted
        if not dropping:
            kept.append(line)
    return b"\r\n".join(kept) + separator + body

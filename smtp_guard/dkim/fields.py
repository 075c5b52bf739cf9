"""Reading what DKIM cares about in a message head and in tag lists, without dkimpy: the SMTP
front uses it on every signed message it relays (dkim/existing.py), workers included."""

from __future__ import annotations

import email.utils
from typing import Sequence


def header_fields(content: bytes) -> list[tuple[str, bytes]]:
    """The head's fields in order: (lower-case name, value with folding kept)."""
    head = content.split(b"\r\n\r\n", 1)[0]
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
        elif b":" in line:
            raw_name, value = line.split(b":", 1)
            fields.append((raw_name.strip().decode("ascii", "replace").lower(), value))
    return fields


def from_domain(fields: Sequence[tuple[str, bytes]]) -> str | None:
    """The domain of the (first) From address, lower-case A-label; None without one."""
    values = [value for name, value in fields if name == "from"]
    if not values:
        return None
    text = values[0].decode("utf-8", "replace").replace("\r\n", "")
    addresses = [address for _, address in email.utils.getaddresses([text]) if "@" in address]
    if not addresses:
        return None
    domain = addresses[0].rsplit("@", 1)[1].strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def txt_tags(text: str) -> dict[str, str]:
    """A DKIM key record's tags (``v=DKIM1; k=rsa; p=…``), whitespace removed as RFC 6376 allows."""
    tags = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags[name.strip()] = "".join(value.split())
    return tags

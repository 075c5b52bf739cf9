"""Signatures the platform made before the guard: does a change the guard made break them?

The guard only removes configured header fields, adds its own (Received, List-Unsubscribe) and,
when told to, rewrites bare line endings. A DKIM signature covers the body and the header
instances its h= tag selects (bottom-up, RFC 6376 section 5.4.2), so comparing those between
what arrived and what leaves says exactly which signatures a change invalidated, without DNS.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from .fields import header_fields, txt_tags

Fields = Sequence[tuple[str, bytes]]


def is_signed(content: bytes) -> bool:
    head = content.split(b"\r\n\r\n", 1)[0].lower()
    return head.startswith(b"dkim-signature:") or b"\r\ndkim-signature:" in head


def broken_signatures(before: bytes, after: bytes) -> list[str]:
    """The d= domains of ``before``'s signatures that still travel in ``after`` but no longer
    cover the same body or the same header instances."""
    fields_before, fields_after = header_fields(before), header_fields(after)
    body_changed = before.split(b"\r\n\r\n", 1)[1:] != after.split(b"\r\n\r\n", 1)[1:]
    still_there = {value for name, value in fields_after if name == "dkim-signature"}
    broken = []
    for name, value in fields_before:
        if name != "dkim-signature" or value not in still_there:
            continue
        tags = txt_tags(value.decode("ascii", "replace"))
        signed = [h.strip().lower() for h in tags.get("h", "").split(":") if h.strip()]
        if body_changed or _selected(fields_before, signed) != _selected(fields_after, signed):
            broken.append(tags.get("d", "?"))
    return broken


def _selected(fields: Fields, signed: Sequence[str]) -> list[bytes | None]:
    """The field values h= covers: the n-th mention of a name is its n-th instance from the bottom."""
    mentioned: Counter[str] = Counter()
    selected = []
    for name in signed:
        instances = [value for field, value in fields if field == name]
        mentioned[name] += 1
        selected.append(instances[-mentioned[name]] if mentioned[name] <= len(instances) else None)
    return selected

"""Byte-level scan of the data directory for plaintext copies of one address.

``erase verify`` reads the actual files — the SQLite database, its WAL and shared-memory
files, the sandbox Maildir, anything else there — not the tables, so deleted-but-not-
overwritten bytes are found too. Every spelling that would match the address is searched
for: any case, any sub-address tag, dots anywhere for dot-insensitive providers, every
alias domain, A-label and U-label domains.

SQLite stores a row's column values back to back (``addressjane@example.commanual``), so in
SQLite files (database and WAL, recognised by their magic) the address is searched for
without looking at the bytes around it: ``maryjane@example.com`` there is reported as a
possible copy of ``jane@example.com`` too. A proof must fail closed; the finding names the
file and offset so an operator can see what it is. Elsewhere (sandbox Maildir, other text
files) neighbours such as ``notjane@`` or ``jane@example.community`` are not reported.

Not found by design: copies inside encoded MIME bodies (base64, quoted-printable) of a held
message; the hold queue keeps message bytes exactly as received.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import idna

from ..addresses import AddressNormalizer, Mailbox, normalize_domain
from ..config import AddressConfig

_CHUNK = 1 << 20
_OVERLAP = 1024
# Database file header; WAL header magic (big- and little-endian checksums).
_SQLITE_MAGIC = (b"SQLite format 3\x00", b"\x37\x7f\x06\x82", b"\x37\x7f\x06\x83")
_LOCAL_CHAR_BEFORE = rb"(?<![A-Za-z0-9.!#$%&'*+/=?^_`{|}~-])"


@dataclass(frozen=True)
class Finding:
    """A copy of the address: in a file at a byte offset, or (``row`` set) in a database
    value — ``path`` then names the table and column, ``offset`` the byte in the value."""

    path: Path
    offset: int
    text: str
    row: str = ""

    @property
    def location(self) -> str:
        if self.row:
            return f"{self.path} row {self.row} at byte {self.offset}"
        return f"{self.path} at byte {self.offset}"


def address_pattern(mailbox: Mailbox, normalizer: AddressNormalizer, config: AddressConfig, *,
                    packed: bool = False) -> re.Pattern[bytes]:
    """Every spelling of the address; ``packed`` drops the checks on the bytes around it
    (for SQLite records, whose column values touch)."""
    key = normalizer.key(mailbox)
    local, _, domain = key.rpartition("@")
    domains = {domain}
    for alias in config.domain_aliases:
        if normalizer.domain(alias) == domain:
            domains |= {normalize_domain(alias), alias.lower()}
    for ascii_domain in list(domains):
        try:
            domains.add(idna.decode(ascii_domain))
        except idna.IDNAError:
            pass
    dotless = domain in {normalizer.domain(d) for d in config.dotless_domains}
    characters = _caseless(local.replace(".", "") if dotless else local)
    local_pattern = rb"\.?".join(characters) if dotless else b"".join(characters)
    separators = re.escape(config.subaddress_separators.encode()) if config.subaddress_separators else b""
    tag = rb"(?:[" + separators + rb"][^@\s\"<>]*)?" if separators else b""
    domain_pattern = b"|".join(b"".join(_caseless(d)) for d in sorted(domains, key=len, reverse=True))
    address = local_pattern + tag + rb"@(?:" + domain_pattern + rb")"
    if packed:
        return re.compile(address, re.IGNORECASE)
    # Not followed by more of a host name: jane@example.community and jane@example.com.au are
    # other people (a sentence's final dot is fine).
    return re.compile(_LOCAL_CHAR_BEFORE + address + rb"(?!\.?[A-Za-z0-9-])", re.IGNORECASE)


def _caseless(text: str) -> list[bytes]:
    """One pattern per character of ``text`` matching it in either case. ``re.IGNORECASE``
    on bytes folds ASCII only, but ``JÖHN@BÜCHER.example`` is the same mailbox as
    ``jöhn@bücher.example`` (the normalizer lower-cases local parts and IDNA maps domains)."""
    parts = []
    for char in text:
        spellings = sorted({v.encode("utf-8") for v in (char, char.lower(), char.upper())
                            if v.lower() == char.lower()})
        parts.append(re.escape(char.encode("utf-8")) if len(spellings) == 1 or char.isascii()
                     else b"(?:" + b"|".join(re.escape(v) for v in spellings) + b")")
    return parts


def scan_directory(root: Path, pattern: re.Pattern[bytes],
                   packed_pattern: re.Pattern[bytes] | None = None) -> list[Finding]:
    """Findings in every file under ``root``; SQLite files are searched with ``packed_pattern``
    when one is given (see the module docstring)."""
    findings: list[Finding] = []
    for path in _files(root):
        use = packed_pattern if packed_pattern is not None and is_sqlite_file(path) else pattern
        findings.extend(scan_file(path, use))
    return findings


def is_sqlite_file(path: Path) -> bool:
    """A SQLite database or write-ahead log, by its first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(len(_SQLITE_MAGIC[0]))
    return head.startswith(_SQLITE_MAGIC)


def scan_file(path: Path, pattern: re.Pattern[bytes]) -> Iterator[Finding]:
    """Every match in the file, read in chunks. Each chunk is searched with ``_OVERLAP`` bytes
    of context on both sides, and only matches that start inside it are reported: a match
    across a boundary is found once, and the look-behind/look-ahead always see the bytes
    next to a match (a neighbour split by a boundary is not mistaken for the address)."""
    with open(path, "rb") as handle:
        offset = 0  # of ``chunk`` in the file
        previous = b""
        chunk = handle.read(_CHUNK)
        while chunk:
            following = handle.read(_CHUNK)
            window = previous + chunk + following[:_OVERLAP]
            start, end = len(previous), len(previous) + len(chunk)
            for match in pattern.finditer(window):
                if start <= match.start() < end:
                    yield Finding(path, offset - start + match.start(), match.group(0).decode("utf-8", "replace"))
            previous = (previous + chunk)[-_OVERLAP:]
            offset += len(chunk)
            chunk = following


def _files(root: Path) -> Iterator[Path]:
    for directory, _, names in os.walk(root):
        for name in sorted(names):
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                yield path

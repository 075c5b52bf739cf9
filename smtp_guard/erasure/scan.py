"""Byte-level scan of the data directory for plaintext copies of one address.

``erase verify`` reads the actual files — the SQLite database, its WAL and shared-memory
files, the sandbox Maildir, anything else there — not the tables, so deleted-but-not-
overwritten bytes are found too. Every spelling that would match the address is searched
for: any case, any sub-address tag, dots anywhere for dot-insensitive providers, every
alias domain, A-label and U-label domains.

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

from ..addresses import AddressNormalizer, Mailbox
from ..config import AddressConfig

_CHUNK = 1 << 20
_OVERLAP = 1024
_LOCAL_CHAR_BEFORE = rb"(?<![A-Za-z0-9.!#$%&'*+/=?^_`{|}~-])"


@dataclass(frozen=True)
class Finding:
    path: Path
    offset: int
    text: str


def address_pattern(mailbox: Mailbox, normalizer: AddressNormalizer, config: AddressConfig) -> re.Pattern[bytes]:
    key = normalizer.key(mailbox)
    local, _, domain = key.rpartition("@")
    domains = {domain} | {normalizer.domain(alias) for alias in config.domain_aliases
                          if normalizer.domain(alias) == domain} | {
        alias.lower() for alias in config.domain_aliases if normalizer.domain(alias) == domain}
    for ascii_domain in list(domains):
        try:
            domains.add(idna.decode(ascii_domain))
        except idna.IDNAError:
            pass
    dotless = domain in {normalizer.domain(d) for d in config.dotless_domains}
    characters = [re.escape(c.encode("utf-8")) for c in local.replace(".", "")] if dotless else \
        [re.escape(c.encode("utf-8")) for c in local]
    local_pattern = rb"\.?".join(characters) if dotless else b"".join(characters)
    separators = re.escape(config.subaddress_separators.encode()) if config.subaddress_separators else b""
    tag = rb"(?:[" + separators + rb"][^@\s\"<>]*)?" if separators else b""
    domain_pattern = b"|".join(re.escape(d.encode("utf-8")) for d in sorted(domains, key=len, reverse=True))
    return re.compile(_LOCAL_CHAR_BEFORE + local_pattern + tag + rb"@(?:" + domain_pattern + rb")(?![A-Za-z0-9-])",
                      re.IGNORECASE)


def scan_directory(root: Path, pattern: re.Pattern[bytes]) -> list[Finding]:
    findings: list[Finding] = []
    for path in _files(root):
        findings.extend(scan_file(path, pattern))
    return findings


def scan_file(path: Path, pattern: re.Pattern[bytes]) -> Iterator[Finding]:
    seen: set[int] = set()
    with open(path, "rb") as handle:
        offset = 0
        previous = b""
        while True:
            chunk = handle.read(_CHUNK)
            if not chunk:
                break
            window = previous + chunk
            base = offset - len(previous)
            for match in pattern.finditer(window):
                position = base + match.start()
                if position not in seen:
                    seen.add(position)
                    yield Finding(path, position, match.group(0).decode("utf-8", "replace"))
            previous = window[-_OVERLAP:]
            offset += len(chunk)


def _files(root: Path) -> Iterator[Path]:
    for directory, _, names in os.walk(root):
        for name in sorted(names):
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                yield path

"""DKIM signing of what the guard relays (dkimpy), after every header the guard adds or strips.

A message is signed with every key of the most specific configured domain that is its From
domain or a parent of it (``news.example.com`` mail is signed by ``example.com``: DMARC's
relaxed alignment), RSA and Ed25519 together when both are configured. Each signature is
made over the message as the upstream will get it, independently of the other. Mail from a
domain without a key passes unsigned: the operator did not ask for it. A failure to sign mail
that should be signed raises SigningFailed; the caller defers it (never an unsigned relay).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Sequence

import dkim

from ..config import DKIMConfig
from . import openssl_rsa
from .fields import from_domain, header_fields
from .keys import SigningKey, load

log = logging.getLogger(__name__)

Outcome = Literal["signed", "not_configured", "failed"]


class SigningFailed(Exception):
    """Mail that should be signed could not be; the message says why (for the log)."""


@dataclass(frozen=True)
class Signed:
    content: bytes
    outcome: Outcome
    domain: str = ""  # the d= domain when signed


class DKIMSigner:
    def __init__(self, config: DKIMConfig, keys: Sequence[SigningKey]) -> None:
        self._headers = [h.lower() for h in config.headers]
        self._oversign = {h.lower() for h in config.oversign}
        self._keys: dict[str, list[SigningKey]] = {}
        for key in keys:
            self._keys.setdefault(key.domain, []).append(key)
            if key.algorithm == "rsa":
                openssl_rsa.register(key.private)

    @classmethod
    def from_config(cls, config: DKIMConfig) -> "DKIMSigner":
        """Every configured key, read now (DKIMKeyError names the file that cannot be used)."""
        return cls(config, [load(entry.key_file, entry.domain, entry.selector) for entry in config.keys])

    @property
    def domains(self) -> list[str]:
        return sorted(self._keys)

    def keys_for(self, domain: str) -> list[SigningKey]:
        """The keys of ``domain`` or of its nearest configured parent."""
        labels = domain.split(".")
        for start in range(len(labels) - 1):
            found = self._keys.get(".".join(labels[start:]))
            if found:
                return found
        return []

    def sign(self, content: bytes) -> Signed:
        fields = header_fields(content)
        domain = from_domain(fields)
        keys = self.keys_for(domain) if domain else []
        if not keys:
            return Signed(content, "not_configured")
        include = self._include(fields)
        signatures = []
        for key in keys:
            try:
                signatures.append(dkim.sign(content, key.selector.encode(), key.domain.encode(), key.private,
                                            signature_algorithm=key.signature_algorithm, include_headers=include))
            except (dkim.DKIMException, ValueError) as error:
                raise SigningFailed(f"{key.dns_name} ({key.algorithm}): {error}") from error
        return Signed(b"".join(signatures) + content, "signed", keys[0].domain)

    def _include(self, fields: Sequence[tuple[str, bytes]]) -> list[bytes]:
        """h=: each configured field once per instance (bottom-up, as DKIM selects them), and the
        over-signed ones once more, present or not, so none can be added after signing."""
        present = Counter(name for name, _ in fields)
        include = []
        for name in self._headers:
            include += [name.encode()] * (present[name] + (name in self._oversign))
        return include

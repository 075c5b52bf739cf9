"""Audit data minimization: the audit trail never stores a recipient address.

Every recipient (and every address inside a reason text, e.g. an upstream's "550 5.1.1
<jane@example.com>: unknown user") is replaced by a keyed pseudonym, ``h:<16 hex>``, derived
from the address's erasure token. An operator can still ask for one person's records
(``audit list --recipient ADDRESS`` computes the pseudonyms), nobody can read addresses out
of the trail, and an erasure — even one given only as a token — can find and erase them.
"""

from __future__ import annotations

import asyncio
import functools
import re
from dataclasses import replace
from typing import Callable, Sequence

from ..addresses import AddressNormalizer
from ..audit_model import AuditFilter, AuditRecord, AuditStore
from .keys import ErasureKey, KeyRing, address_token, erasure_token
from .model import Tombstone

TOKEN_CACHE = 4096  # addresses whose token is remembered (senders and recent recipients)
PSEUDONYMIZE_SLICE = 100  # audit records pseudonymized between two turns of the event loop

# Anything shaped like an address inside free text (a reply, an exception, a log line). Wider
# than what the SMTP front accepts, on purpose: a quoted local part ("jane doe"@…), a UTF-8 or
# A-label domain (…@пример.рф, …@example.xn--p1ai), an address literal (…@[192.0.2.1]) and a
# dotless domain (…@localhost) all name a person, and so does a UTF-8 domain shown escaped in
# a bytes repr (aiosmtpd logs b'RCPT TO:<j\xc3\xb6rg@b\xc3\xbccher.example>'). A false
# positive only hides a token.
_LABEL = r"(?:[A-Za-z0-9_-]|[^\x00-\x7f\s]|\\x[0-9A-Fa-f]{2}|\\u[0-9A-Fa-f]{4})+"
ADDRESS_IN_TEXT = re.compile(
    r"(?:\"(?:[^\"\\\r\n]|\\.)*\"|[^\s<>\"'(),;:@\[\]]+)"
    rf"@(?:\[[^\]\s]*\]|{_LABEL}(?:\.{_LABEL})*)"
)


def replace_addresses(text: str, replacement: Callable[[str], str]) -> str:
    """``text`` with every address in it (per ADDRESS_IN_TEXT) replaced by ``replacement(address)``."""
    return ADDRESS_IN_TEXT.sub(lambda match: replacement(match.group(0)), text) if "@" in text else text


class Pseudonymizer:
    def __init__(self, normalizer: AddressNormalizer, ring: Callable[[], KeyRing],
                 erased: Callable[[str], Tombstone | None] = lambda token: None) -> None:
        self._normalizer = normalizer
        self._ring = ring
        # An address already erased is recorded as ``erased:<tombstone id>``: records written
        # after the erasure (the refused attempts among them) must not bring the person back.
        self._erased = erased
        # Parsing and normalizing an address for its token was 3 % of the CPU per message (the
        # same senders, again and again, in every log line and audit record). Tokens do not
        # depend on keys or tombstones; ``forget`` empties the cache when an erasure arrives,
        # so the erased address is not kept here either.
        self._tokens = functools.lru_cache(maxsize=TOKEN_CACHE)(functools.partial(address_token, normalizer))
        # A token's pseudonym under the primary key (two HMACs), for the same addresses. Only
        # the key's part is remembered: whether the token is erased is asked on every call.
        self._pseudonyms: dict[str, tuple[ErasureKey, str]] = {}

    def token(self, address: str) -> str | None:
        return self._tokens(address)

    def forget(self) -> None:
        """Drop every remembered address (an erasure arrived)."""
        self._tokens.cache_clear()
        self._pseudonyms.clear()

    def pseudonym(self, text: str) -> str:
        """The pseudonym of an address; other values (domains, labels) unchanged."""
        if "@" not in text or text.startswith("@"):
            return text
        token = self.token(text)
        if token is None:
            # Not a mailbox we accept, but it may still name a person: never store it.
            token = erasure_token(text.lower())
        tombstone = self._erased(token)
        if tombstone is not None:
            return f"erased:{tombstone.id}"
        primary = self._ring().primary
        remembered = self._pseudonyms.get(token)
        if remembered is not None and remembered[0] is primary:
            return remembered[1]
        pseudonym = primary.pseudonym(token)
        if len(self._pseudonyms) >= TOKEN_CACHE:
            self._pseudonyms.clear()
        self._pseudonyms[token] = (primary, pseudonym)
        return pseudonym

    def all_pseudonyms(self, address: str) -> list[str]:
        token = self.token(address) or erasure_token(address.lower())
        return self._ring().pseudonyms(token)

    def redact(self, text: str) -> str:
        return replace_addresses(text, self.pseudonym)

    def record(self, record: AuditRecord) -> AuditRecord:
        return replace(record, recipient=self.pseudonym(record.recipient), reason=self.redact(record.reason))


class PseudonymizingAuditStore:
    """Wraps an AuditStore so nothing written to it names a recipient."""

    def __init__(self, store: AuditStore, pseudonymizer: Pseudonymizer) -> None:
        self._store = store
        self._pseudonymizer = pseudonymizer

    @property
    def pseudonymizer(self) -> Pseudonymizer:
        """The one that writes this trail: logs use it too, so a log line and an audit record
        name a person by the same pseudonym."""
        return self._pseudonymizer

    async def append(self, records: Sequence[AuditRecord]) -> None:
        # A batch (500 by default) takes 2-4 ms to pseudonymize: in slices, with the event loop
        # running the sessions in between, so a flush never stalls a reply by that much.
        pseudonymized: list[AuditRecord] = []
        for start in range(0, len(records), PSEUDONYMIZE_SLICE):
            if start:
                await asyncio.sleep(0)
            pseudonymized += [self._pseudonymizer.record(r) for r in records[start:start + PSEUDONYMIZE_SLICE]]
        await self._store.append(pseudonymized)

    async def query(self, filters: AuditFilter, limit: int = 100) -> list[AuditRecord]:
        if filters.recipient is None or "@" not in filters.recipient or filters.recipient.startswith("@"):
            return await self._store.query(filters, limit)
        found: list[AuditRecord] = []
        for pseudonym in self._pseudonymizer.all_pseudonyms(filters.recipient):
            found += await self._store.query(replace(filters, recipient=pseudonym), limit)
        found.sort(key=lambda r: r.time, reverse=True)
        return found[:limit]

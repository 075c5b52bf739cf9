"""Audit data minimization: the audit trail never stores a recipient address.

Every recipient (and every address inside a reason text, e.g. an upstream's "550 5.1.1
<jane@example.com>: unknown user") is replaced by a keyed pseudonym, ``h:<16 hex>``, derived
from the address's erasure token. An operator can still ask for one person's records
(``audit list --recipient ADDRESS`` computes the pseudonyms), nobody can read addresses out
of the trail, and an erasure — even one given only as a token — can find and erase them.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Callable, Sequence

from ..addresses import AddressNormalizer
from ..store.base import AuditFilter, AuditRecord, AuditStore, Tombstone
from .keys import KeyRing, address_token, erasure_token

_ADDRESS = re.compile(r"[^\s<>\"'(),;:@\[\]]+@[A-Za-z0-9\u0080-\uffff.-]+\.[A-Za-z\u0080-\uffff]{2,}")


class Pseudonymizer:
    def __init__(self, normalizer: AddressNormalizer, ring: Callable[[], KeyRing],
                 erased: Callable[[str], Tombstone | None] = lambda token: None) -> None:
        self._normalizer = normalizer
        self._ring = ring
        # An address already erased is recorded as ``erased:<tombstone id>``: records written
        # after the erasure (the refused attempts among them) must not bring the person back.
        self._erased = erased

    def token(self, address: str) -> str | None:
        return address_token(self._normalizer, address)

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
        return self._ring().primary.pseudonym(token)

    def all_pseudonyms(self, address: str) -> list[str]:
        token = self.token(address) or erasure_token(address.lower())
        return self._ring().pseudonyms(token)

    def redact(self, text: str) -> str:
        return _ADDRESS.sub(lambda match: self.pseudonym(match.group(0)), text) if "@" in text else text

    def record(self, record: AuditRecord) -> AuditRecord:
        return replace(record, recipient=self.pseudonym(record.recipient), reason=self.redact(record.reason))


class PseudonymizingAuditStore:
    """Wraps an AuditStore so nothing written to it names a recipient."""

    def __init__(self, store: AuditStore, pseudonymizer: Pseudonymizer) -> None:
        self._store = store
        self._pseudonymizer = pseudonymizer

    async def append(self, records: Sequence[AuditRecord]) -> None:
        await self._store.append([self._pseudonymizer.record(r) for r in records])

    async def query(self, filters: AuditFilter, limit: int = 100) -> list[AuditRecord]:
        if filters.recipient is None or "@" not in filters.recipient or filters.recipient.startswith("@"):
            return await self._store.query(filters, limit)
        found: list[AuditRecord] = []
        for pseudonym in self._pseudonymizer.all_pseudonyms(filters.recipient):
            found += await self._store.query(replace(filters, recipient=pseudonym), limit)
        found.sort(key=lambda r: r.time, reverse=True)
        return found[:limit]

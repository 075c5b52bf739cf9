"""Tombstones, erasure receipts, later attempts to mail an erased address; the store interface.

Plain data (frozen dataclasses) and a Protocol; ``store/sqlite/erasure.py`` implements it.
"""

from __future__ import annotations

import builtins
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

from .scan import Finding


@dataclass(frozen=True)
class Tombstone:
    """An erased address, as a keyed hash only (HMAC-SHA256 of its erasure token)."""

    id: int
    digest: bytes
    key_id: str
    reference: str
    created_at: float


@dataclass(frozen=True)
class PurgeCount:
    store: str  # "suppressions", "hold_queue", "audit", "sandbox", ...
    what: str  # "entries", "recipients", "messages", "rows", "files"
    count: int


@dataclass(frozen=True)
class ErasureReceipt:
    id: str
    reference: str
    created_at: float
    tombstone_id: int
    key_id: str
    purged: tuple[PurgeCount, ...]
    storage: Mapping[str, str]  # how the bytes were made unrecoverable (checkpoint, secure_delete)

    def as_dict(self) -> dict[str, object]:
        """The receipt as exported (JSON) and stored; it names no address."""
        return {
            "receipt": self.id, "reference": self.reference, "created_at": self.created_at,
            "tombstone_id": self.tombstone_id, "key_id": self.key_id,
            "purged": [{"store": p.store, "what": p.what, "count": p.count} for p in self.purged],
            "storage": dict(self.storage),
        }


def receipt_from_dict(body: Mapping[str, Any]) -> ErasureReceipt:
    """A receipt as stored (``ErasureReceipt.as_dict``)."""
    purged = tuple(PurgeCount(str(p["store"]), str(p["what"]), int(p["count"])) for p in body["purged"])
    return ErasureReceipt(
        id=str(body["receipt"]), reference=str(body["reference"]), created_at=float(body["created_at"]),
        tombstone_id=int(body["tombstone_id"]), key_id=str(body["key_id"]), purged=purged,
        storage={str(k): str(v) for k, v in body["storage"].items()},
    )


@dataclass(frozen=True)
class ErasureAttempt:
    """A later attempt to mail an erased address: evidence that someone upstream kept it."""

    time: float
    tombstone_id: int
    reference: str
    client: str
    sender: str
    stream: str
    txn_id: str


class ErasureStore(Protocol):
    async def key_checks(self) -> dict[str, str]:
        """key id -> check value of every key the store remembers (each key a guard or an
        admin command opened it with, and every key that made a tombstone)."""

    async def remember_key(self, key_id: str, check_value: str, now: float) -> None: ...

    async def tombstone_counts(self) -> dict[str, int]:
        """key id -> how many tombstones were made with it (keys that made none are absent)."""

    async def pseudonymized_audit_records(self) -> int:
        """How many audit records name a recipient by a keyed pseudonym (``h:…``), in the
        recipient or inside the reason. A pseudonym does not say which key made it."""

    async def forget_keys(self, key_ids: Sequence[str]) -> bool:
        """Drop the check values of these keys — only if, in the same transaction, no
        tombstone was made with any of them and no audit record holds a pseudonym. Returns
        whether they were dropped."""

    async def add_tombstone(self, digest: bytes, key_id: str, reference: str, now: float) -> tuple[Tombstone, bool]:
        """Store a tombstone (idempotent); returns it and whether it is new."""

    async def tombstones_since(self, last_id: int) -> builtins.list[Tombstone]: ...

    async def find_tombstone(self, digests: Sequence[tuple[bytes, str]]) -> Tombstone | None:
        """The tombstone with any of these (digest, key id) pairs."""

    async def purge_address(self, key_hashes: Sequence[int] | None, matches: Callable[[str], bool],
                            audit_pseudonyms: Sequence[str], tombstone_id: int) -> builtins.list[PurgeCount]:
        """Remove every plaintext copy of one address from the database: suppression entries
        and their change-log rows (by key hash; None: test every entry with ``matches``), held
        recipients whose address ``matches`` (messages left without recipients are deleted),
        and the audit pseudonyms given."""

    async def erase_pseudonyms(self, pseudonyms: Sequence[str], tombstone_id: int) -> int:
        """Replace these audit pseudonyms by ``erased:<tombstone id>``; returns rows changed."""

    async def make_unrecoverable(self) -> dict[str, str]:
        """Make the deleted bytes leave the database's files as far as the engine allows, and
        say what was done and what may still hold them (the receipt's ``storage``)."""

    async def copies(self, pattern: re.Pattern[bytes]) -> builtins.list[Finding]:
        """Values in the store's tables that match ``pattern``, for a store whose files are
        not in the data directory (``erase verify`` scans that directory's files itself, which
        covers a SQLite store byte for byte)."""

    async def add_receipt(self, receipt: ErasureReceipt) -> None: ...

    async def receipts(self, limit: int = 100) -> builtins.list[ErasureReceipt]: ...

    async def receipt(self, receipt_id: str) -> ErasureReceipt | None: ...

    async def record_attempts(self, attempts: Sequence[ErasureAttempt]) -> None: ...

    async def attempts(self, since: float | None = None, reference: str | None = None,
                       limit: int = 100) -> builtins.list[ErasureAttempt]: ...

"""Store interfaces and the values that cross them.

The SQLite implementation (``store/sqlite``) is the only code with SQL in it; a PostgreSQL
implementation for several guard instances can join it later behind the same protocols
(docs/design.md, "Scale"). Everything here is plain data: frozen dataclasses and Protocols.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterable, Literal, Mapping, Protocol, Sequence

EntryKind = Literal["address", "domain"]
RecipientState = Literal["held", "released", "delivered", "failed", "discarded"]
AuditKind = Literal["decision", "admin", "delivery"]


class StoreError(Exception):
    """The store could not do what was asked (locked, full, corrupt, unreachable)."""


class StoreBusy(StoreError):
    """Another writer held the store for longer than ``[store] busy_timeout``. Temporary: the
    same call succeeds once the other writer lets go."""


class StoreFull(StoreError):
    """The disk (or file system) holding the store is full. Temporary: the same call succeeds
    once space is freed; nothing was written."""


# --- suppressions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SuppressionEntry:
    """One list entry. ``value`` is a normalized matching key (address) or an A-label domain."""

    kind: EntryKind
    value: str
    list_name: str
    reason: str = ""
    source: str = ""
    created_at: float = 0.0
    expires_at: float | None = None
    include_subdomains: bool = False

    def has_expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


def list_order(priority: Sequence[str], names: Iterable[str]) -> tuple[str, ...]:
    """All list names, most important first: the priority order, then the others by name.
    When an address is on several lists, the first one decides (the store's snapshot and
    ``suppress check`` both rank by this)."""
    known = tuple(dict.fromkeys(priority))
    return known + tuple(sorted(set(names) - set(known)))


@dataclass(frozen=True)
class DomainRule:
    list_name: str
    include_subdomains: bool


@dataclass
class SuppressionSnapshot:
    """Everything the hot path needs, compact: sorted 64-bit key hashes with a parallel
    array of list numbers (index into ``list_names``), plus the small domain table.

    Ten million addresses cost 90 MB here instead of a gigabyte of Python strings. The two
    sequences are ``array``s when the store built them in this process, or memoryviews over
    a snapshot file shared by several processes (``index_file.map_snapshot``).
    """

    hashes: Sequence[int]  # int64 ('q'), sorted ascending, unique
    lists: Sequence[int]  # uint8 ('B'), list number per hash
    list_names: tuple[str, ...]
    domains: dict[str, DomainRule]
    seq: int  # change-log position this snapshot includes
    next_expiry: float | None  # earliest expiry among loaded entries (reload then)


@dataclass(frozen=True)
class SuppressionDelta:
    """Changes since a change-log position, each resolved to its current effective list
    (None: no longer suppressed). ``full_reload`` means: too much changed, load a snapshot."""

    seq: int
    full_reload: bool = False
    addresses: Mapping[int, str | None] = field(default_factory=dict)
    domains: Mapping[str, DomainRule | None] = field(default_factory=dict)
    next_expiry: float | None = None  # earliest expiry among the changed entries


@dataclass(frozen=True)
class SuppressionFilter:
    list_name: str | None = None
    kind: EntryKind | None = None
    source: str | None = None
    contains: str | None = None
    include_expired: bool = False


class SuppressionStore(Protocol):
    async def add(self, entries: Sequence[SuppressionEntry], *, bulk: bool = False) -> int:
        """Insert or update entries (same kind, value and list = same entry). Returns how many
        were new. ``bulk`` records one full-reload marker instead of one change per entry."""

    async def remove(self, kind: EntryKind, value: str, list_name: str | None = None) -> int:
        """Delete an entry from one list, or from every list when list_name is None."""

    async def find(self, address_key: str | None, domains: Sequence[str], now: float) -> list[SuppressionEntry]:
        """Entries that match an address key or any of the domains (for explaining a decision)."""

    def query(self, filters: SuppressionFilter, now: float, limit: int | None = None) -> AsyncIterator[SuppressionEntry]:
        """Entries matching the filters, oldest first."""

    async def count_by_list(self, now: float) -> dict[str, int]:
        """Live (unexpired) entries per list."""

    async def load_snapshot(self, list_priority: Sequence[str], now: float) -> SuppressionSnapshot:
        """Build the compact index from all unexpired entries. When an address is on several
        lists, the first list in ``list_priority`` wins."""

    async def changes_since(self, seq: int, list_priority: Sequence[str], now: float) -> SuppressionDelta:
        """What changed after change-log position ``seq``."""

    async def current_seq(self) -> int:
        """The change-log position a snapshot loaded now would include (one cheap read)."""

    async def purge_expired(self, now: float) -> int:
        """Delete expired entries; returns how many."""


# --- hold queue -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldRecipient:
    address: str  # exactly as validated and as it will be relayed
    state: RecipientState
    rule: str
    reason: str
    attempts: int = 0
    next_attempt_at: float | None = None
    last_reply: str = ""


@dataclass(frozen=True)
class NewHold:
    """A message to hold durably before the client gets its 250."""

    txn_id: str
    client: str
    sender: str
    mail_options: tuple[str, ...]
    content: bytes
    recipients: Sequence[HeldRecipient]
    stream: str = ""
    message_class: str = ""


@dataclass(frozen=True)
class HeldMessage:
    id: str
    txn_id: str
    created_at: float
    client: str
    sender: str
    mail_options: tuple[str, ...]
    size: int
    recipients: tuple[HeldRecipient, ...]
    content: bytes | None = None  # filled by get(), not by listing
    stream: str = ""
    message_class: str = ""


@dataclass(frozen=True)
class HoldStats:
    held_messages: int
    held_recipients: int
    oldest_held_at: float | None


class HoldStore(Protocol):
    async def hold(self, message: NewHold) -> str:
        """Store durably (committed and fsync'd when this returns). Returns the hold id."""

    async def list(self, state: RecipientState | None = "held", limit: int = 100) -> builtins.list[HeldMessage]: ...

    async def get(self, hold_id: str) -> HeldMessage | None: ...

    async def release(self, hold_id: str, now: float, recipients: Sequence[str] | None = None) -> int:
        """Move held recipients to 'released' (due now). Returns how many moved."""

    async def discard(self, hold_id: str, recipients: Sequence[str] | None = None) -> int:
        """Move held recipients to 'discarded'; content is deleted when nobody needs it."""

    async def due(self, now: float, limit: int = 50) -> builtins.list[HeldMessage]:
        """Messages (with content) that have released recipients due for an attempt; only
        those recipients are included."""

    async def claim(self, hold_id: str, addresses: Sequence[str], now: float, lease: float) -> builtins.list[str]:
        """Take the recipients that are still released and due for one attempt, hiding them
        from other workers for ``lease`` seconds (a crashed attempt is retried after it).
        Returns the addresses claimed."""

    async def record_attempt(self, hold_id: str, address: str, state: RecipientState, reply: str,
                             next_attempt_at: float | None) -> None:
        """Outcome of one relay attempt for one recipient."""

    async def stats(self) -> HoldStats: ...

    async def release_stream(self, stream: str, rules: Sequence[str], now: float) -> int:
        """Release every held recipient of the stream's messages that one of ``rules`` held
        (an admin approved the stream). Returns how many moved."""

    async def discard_stream(self, stream: str, rules: Sequence[str]) -> int:
        """Discard every held or released recipient of the stream's messages that one of
        ``rules`` held (an admin cancelled the stream). Returns how many moved."""

    async def stream_messages(self, stream: str, limit: int = 3) -> builtins.list[HeldMessage]:
        """Messages of the stream with a held recipient, oldest first, without content."""

    async def stream_counts(self, stream: str) -> dict[RecipientState, int]:
        """Recipients of the stream's held messages, by state."""


# --- volume breaker and approval gates ------------------------------------------------------

BreakerStatus = Literal["tripped", "approved", "cancelled"]


@dataclass(frozen=True)
class BreakerRecord:
    """A stream whose volume breaker, fan-out detector or approval gate tripped. The server
    writes the counts; an admin writes the decision (``approved`` with a ceiling, or
    ``cancelled``), versioned by ``decided_at``."""

    stream: str
    rule: str  # "breaker.volume", "breaker.fanout", "gate.<class>"
    sender: str
    message_class: str
    status: BreakerStatus
    threshold: int  # the count the stream exceeded
    ceiling: int | None  # set by an approval: the stream may grow to this many recipients
    recipients: int  # distinct recipients seen (the audience size)
    tripped_at: float
    updated_at: float
    decided_by: str = ""
    decided_at: float | None = None


@dataclass(frozen=True)
class Baseline:
    """A sender's usual stream size: an exponentially decayed average of finished streams."""

    sender: str
    baseline: float
    streams: int
    updated_at: float


class BreakerStore(Protocol):
    async def save(self, records: Sequence[BreakerRecord]) -> None:
        """Server side: insert new trips and update counts. Status, rule and threshold are
        only overwritten where the stored ``decided_at`` is the one the record carries, so a
        server never undoes an admin decision it has not seen yet."""

    async def get(self, stream: str) -> BreakerRecord | None: ...

    async def list(self, status: BreakerStatus | None = None, limit: int | None = 100) -> builtins.list[BreakerRecord]:
        """Newest trip first (every one when ``limit`` is None)."""

    async def decided_since(self, since: float | None) -> builtins.list[BreakerRecord]:
        """Records whose admin decision is at or after ``since`` (every decided one if None)."""

    async def decide(self, stream: str, status: BreakerStatus, ceiling: int | None, actor: str,
                     now: float) -> BreakerRecord | None:
        """Admin side: record a decision. None when the stream has no breaker record."""

    async def baselines(self) -> builtins.list[Baseline]: ...

    async def baseline(self, sender: str) -> Baseline | None: ...

    async def save_baselines(self, baselines: Sequence[Baseline]) -> None: ...


# --- audit ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRecord:
    time: float
    kind: AuditKind
    verdict: str  # pass/reject/defer/hold/drop for decisions; the verb for admin actions
    rule: str
    reason: str
    txn_id: str = ""
    client: str = ""
    sender: str = ""
    recipient: str = ""
    actor: str = ""  # who did an admin action (cli:user, api:token-name)


@dataclass(frozen=True)
class AuditFilter:
    since: float | None = None
    until: float | None = None
    kind: AuditKind | None = None
    verdict: str | None = None
    rule_prefix: str | None = None
    recipient: str | None = None
    sender: str | None = None
    txn_id: str | None = None


class AuditStore(Protocol):
    async def append(self, records: Sequence[AuditRecord]) -> None: ...

    async def query(self, filters: AuditFilter, limit: int = 100) -> list[AuditRecord]:
        """Newest first."""


# --- erasure ----------------------------------------------------------------------------------


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
        """Checkpoint and truncate the WAL so deleted bytes leave the disk files."""

    async def add_receipt(self, receipt: ErasureReceipt) -> None: ...

    async def receipts(self, limit: int = 100) -> builtins.list[ErasureReceipt]: ...

    async def receipt(self, receipt_id: str) -> ErasureReceipt | None: ...

    async def record_attempts(self, attempts: Sequence[ErasureAttempt]) -> None: ...

    async def attempts(self, since: float | None = None, reference: str | None = None,
                       limit: int = 100) -> builtins.list[ErasureAttempt]: ...


# --- read-your-writes: change generation and running guards -------------------------------------


@dataclass(frozen=True)
class GuardInstance:
    """One running guard process as it reports itself to the store."""

    id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float  # the instance's own clock
    applied_generation: int | None  # None until its first refresh

    @property
    def name(self) -> str:
        """How an operator finds the process: ``host:pid``."""
        return f"{self.host}:{self.pid}"


class ChangeStore(Protocol):
    """A store-wide change generation and the guards that follow it.

    An admin change, once committed, moves the generation; a guard that read generation G and
    then refreshed its in-memory state from the store has seen every change committed before
    G was reached, and reports G as applied. Being a table in the store, it works the same
    for every worker process and every instance that shares the store (no signals, no sockets).
    """

    async def bump_generation(self) -> int:
        """Call after an admin change committed: moves the generation on, returns the new one."""

    async def generation(self) -> int:
        """The current generation (one single-row read: guards poll it often)."""

    async def report(self, instance: GuardInstance) -> None:
        """Insert or update the instance's row (registration, heartbeat, applied generation)."""

    async def remove(self, instance_id: str) -> None:
        """The instance stopped cleanly."""

    async def instances(self) -> builtins.list[GuardInstance]: ...

    async def forget(self, heartbeat_before: float) -> builtins.list[GuardInstance]:
        """Delete the rows whose last heartbeat is older than ``heartbeat_before`` (guards that
        were killed, or hung for that long); returns them."""

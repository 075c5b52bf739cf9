"""Suppression lists: entries, the compact snapshot the hot path reads, the store interface.

Plain data (frozen dataclasses) and a Protocol; ``store/sqlite/suppressions.py`` implements it
and ``index.py`` keeps the snapshot in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Iterable, Literal, Mapping, Protocol, Sequence

from .address_table import AddressTable

EntryKind = Literal["address", "domain"]


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


def better_list(current: str | None, candidate: str, order: tuple[str, ...]) -> str:
    """The more important of two lists (``order`` holds the configured priority; lists not in
    it come after, by name)."""
    if current is None:
        return candidate
    return min(current, candidate, key=lambda name: _rank(name, order))


def _rank(name: str, order: tuple[str, ...]) -> tuple[int, int, str]:
    return (0, order.index(name), "") if name in order else (1, 0, name)


# Past this many logged changes a running server reloads the snapshot instead of applying them.
MAX_DELTA = 50_000


@dataclass(frozen=True)
class DomainRule:
    list_name: str
    include_subdomains: bool


@dataclass
class SuppressionSnapshot:
    """Everything the hot path needs, compact: the addresses' 64-bit key hashes with their list
    numbers (index into ``list_names``) in an ``AddressTable``, plus the small domain table.

    Ten million addresses cost 57 MiB here instead of a gigabyte of Python strings. The table is
    in this process's memory when the store built it, or over a snapshot file shared by several
    processes (``index_file.map_snapshot``).
    """

    addresses: AddressTable
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
    # Only entries added at or after this time (what a platform has not fetched yet).
    since: float | None = None


@dataclass(frozen=True)
class SuppressionPage:
    """One page of a listing in storage order. ``next`` is the position (a row id) the next
    page starts after, None on the last page: positions never change, so paging never repeats
    or skips an entry, whatever is added or removed meanwhile."""

    entries: tuple[SuppressionEntry, ...]
    next: int | None


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

    async def page(self, filters: SuppressionFilter, now: float, limit: int, after: int | None = None) -> SuppressionPage:
        """At most ``limit`` entries matching the filters in storage order, past position ``after``
        (the previous page's ``next``)."""

    async def count_by_list(self, now: float) -> dict[str, int]:
        """Live (unexpired) entries per list."""

    async def next_expiry(self, now: float) -> float | None:
        """When the first entry still live at ``now`` expires (None: none ever does)."""

    async def load_snapshot(self, list_priority: Sequence[str], now: float) -> SuppressionSnapshot:
        """Build the compact index from all unexpired entries. When an address is on several
        lists, the first list in ``list_priority`` wins."""

    async def changes_since(self, seq: int, list_priority: Sequence[str], now: float) -> SuppressionDelta:
        """What changed after change-log position ``seq``."""

    async def current_seq(self) -> int:
        """The change-log position a snapshot loaded now would include (one cheap read)."""

    async def purge_expired(self, now: float) -> int:
        """Delete expired entries; returns how many."""

"""In-memory suppression index: a compact snapshot plus a small overlay of recent changes.

The snapshot's addresses are an ``AddressTable`` (64-bit key hashes and list numbers): 6
bytes per address, so ten million addresses cost about 57 MiB. One process loads it from the
store into its own memory; worker processes of one guard instead map one shared snapshot file
(``IndexReloader(snapshots=SharedSnapshots(...))``, ``index_share.py``), so the 57 MiB are
there once however many workers run. A lookup is one ``find`` over ~150 records — no disk or
network I/O on the hot path (a mapped file's pages are in the page cache once it is checked).

Changes made by the CLI or API reach a running server through the store's change log:
``IndexReloader.refresh`` — run by its own periodic loop, and at once when an admin change
moves the store's change generation (``change_sync.py``) — applies them to a copy-on-write
overlay dict and swaps the reference, so a lookup never sees a half-applied update. Past ``MAX_OVERLAY`` changes, or
when the store asks for it (bulk import) or an entry expires, a fresh snapshot is loaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Protocol, Sequence

from .address_table import AddressTable
from .malloc_tuning import give_back_free_memory
from .periodic import Periodic
from .suppression_model import DomainRule, SuppressionDelta, SuppressionSnapshot, SuppressionStore

log = logging.getLogger(__name__)

MAX_OVERLAY = 100_000
_REMOVED = ""  # overlay value meaning "no longer suppressed" (list names are never empty)


def empty_snapshot() -> SuppressionSnapshot:
    return SuppressionSnapshot(AddressTable.empty(), (), {}, seq=0, next_expiry=None)


class SuppressionIndex:
    def __init__(self, snapshot: SuppressionSnapshot | None = None) -> None:
        self._snapshot = snapshot or empty_snapshot()
        self._overlay: dict[int, str] = {}
        self._domains: dict[str, DomainRule] = dict(self._snapshot.domains)

    # --- hot path ----------------------------------------------------------------------------

    def lookup_address(self, key_hash: int) -> str | None:
        """The list an address key hash is on, or None."""
        overlaid = self._overlay.get(key_hash)
        if overlaid is not None:
            return overlaid or None
        snapshot = self._snapshot
        number = snapshot.addresses.list_number(key_hash)
        return None if number is None else snapshot.list_names[number]

    def lookup_domain(self, domain_chain: Sequence[str]) -> str | None:
        """The list the domain (exact) or a parent domain (when it includes subdomains) is on."""
        domains = self._domains
        if not domains:
            return None
        for depth, domain in enumerate(domain_chain):
            rule = domains.get(domain)
            if rule is not None and (depth == 0 or rule.include_subdomains):
                return rule.list_name
        return None

    # --- updates (reload loop only) ------------------------------------------------------------

    @property
    def seq(self) -> int:
        return self._snapshot.seq

    @property
    def overlay_size(self) -> int:
        return len(self._overlay)

    @property
    def next_expiry(self) -> float | None:
        return self._snapshot.next_expiry

    def __len__(self) -> int:
        return len(self._snapshot.addresses) + sum(1 for v in self._overlay.values() if v)

    def replace(self, snapshot: SuppressionSnapshot) -> None:
        # Assign the overlay first as empty would expose a window without recent changes; the
        # snapshot already contains them, so swapping snapshot then overlay is safe.
        self._snapshot = snapshot
        self._overlay = {}
        self._domains = dict(snapshot.domains)

    def apply(self, delta: SuppressionDelta) -> None:
        if delta.addresses:
            overlay = dict(self._overlay)
            for key_hash, list_name in delta.addresses.items():
                overlay[key_hash] = list_name or _REMOVED
            self._overlay = overlay
        if delta.domains:
            domains = dict(self._domains)
            for domain, rule in delta.domains.items():
                if rule is None:
                    domains.pop(domain, None)
                else:
                    domains[domain] = rule
            self._domains = domains
        if delta.next_expiry is not None:
            current = self._snapshot.next_expiry
            self._snapshot.next_expiry = delta.next_expiry if current is None else min(current, delta.next_expiry)
        self._snapshot.seq = delta.seq


class SnapshotSource(Protocol):
    """Where full reloads come from when several processes share one snapshot
    (``index_share.SharedSnapshots``)."""

    async def get(self, list_priority: Sequence[str], now: float, at_least: int = 0) -> SuppressionSnapshot:
        """A snapshot for ``now`` at change-log position ``at_least`` or later; it may be a
        few changes behind the store (the reloader applies them)."""


class IndexReloader:
    """Keeps a SuppressionIndex in step with the store, polling its change log.

    Full reloads load a snapshot from the store into this process, or, given ``snapshots``,
    take the shared one and apply the changes logged since it was built.
    """

    def __init__(self, index: SuppressionIndex, store: SuppressionStore, list_priority: Sequence[str],
                 interval: float, clock: Callable[[], float] = time.time,
                 snapshots: SnapshotSource | None = None, on_reload: Callable[[], None] = lambda: None) -> None:
        """``on_reload``: told each time the index took changes (a metric counts them)."""
        self.index = index
        self._store = store
        self._snapshots = snapshots
        self._priority = tuple(list_priority)
        self._clock = clock
        # Keep enforcing the last good index when a refresh fails; the next poll tries again.
        self._loop = Periodic("suppression-index-reloader", interval, self.refresh,
                              "refresh failed; keeping the current index")
        self.on_reload = on_reload
        # Two refreshes at once could apply an older delta over a newer one.
        self._lock = asyncio.Lock()

    async def load(self, at_least: int = 0) -> None:
        """Replace the index by a full snapshot (one at change-log position ``at_least`` or
        later, when it comes from the shared source)."""
        started = time.monotonic()
        if self._snapshots is None:
            snapshot = await self._store.load_snapshot(self._priority, self._clock())
            self.index.replace(snapshot)
        else:
            snapshot = await self._load_shared(self._snapshots, at_least)
        # What loading freed (the rows, the previous arrays or mapping) goes back to the system.
        give_back_free_memory()
        # A shared snapshot may be a few changes older than the store: they are in the overlay.
        since = self.index.overlay_size
        log.info("suppression index loaded: %d addresses, %d domains%s in %.2fs", len(snapshot.addresses),
                 len(snapshot.domains), f" (and {since} address changes since its snapshot)" if since else "",
                 time.monotonic() - started)
        self.on_reload()

    async def _load_shared(self, snapshots: SnapshotSource, at_least: int) -> SuppressionSnapshot:
        now = self._clock()
        snapshot = await snapshots.get(self._priority, now, at_least)
        delta = await self._store.changes_since(snapshot.seq, self._priority, now)
        if delta.full_reload:
            # A bulk change was logged after the source chose its file: ask for one that has it.
            snapshot = await snapshots.get(self._priority, now, delta.seq)
            delta = await self._store.changes_since(snapshot.seq, self._priority, now)
        # Swap and catch up with no await in between: no lookup sees the shared snapshot
        # without the changes the old index already had (read-your-writes, change_sync.py).
        # A full reload still asked for here is the next refresh's.
        self.index.replace(snapshot)
        if not delta.full_reload and delta.seq != snapshot.seq:
            self.index.apply(delta)
        return snapshot

    async def refresh(self) -> None:
        """Apply what changed since the last look (one poll)."""
        async with self._lock:  # the periodic loop and change-sync both call this
            await self._refresh()

    async def _refresh(self) -> None:
        now = self._clock()
        expiry = self.index.next_expiry
        if expiry is not None and expiry <= now:
            await self.load(at_least=self.index.seq)
            return
        delta = await self._store.changes_since(self.index.seq, self._priority, now)
        if delta.full_reload or self.index.overlay_size + len(delta.addresses) > MAX_OVERLAY:
            await self.load(at_least=delta.seq)
        elif delta.seq != self.index.seq:
            self.index.apply(delta)
            self.on_reload()

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

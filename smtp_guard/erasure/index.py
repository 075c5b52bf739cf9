"""Tombstone index: erased addresses as keyed digests, looked up with no I/O.

Erasures are rare (thousands, not millions), so a dict of digests is compact enough for one
process. The processes of a multi-worker guard share the tombstones that existed at start as
a mapped file (``tombstone_file.py``) and keep only later ones in their dict. A lookup
computes the erasure token once and one HMAC per key in the ring (usually one).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Sequence

from .keys import ErasureKeyError, KeyRing, check_key_file, erasure_token
from .model import ErasureStore, Tombstone
from .tombstone_file import MappedTombstones

log = logging.getLogger(__name__)


class TombstoneIndex:
    def __init__(self, ring: KeyRing, tombstones: Sequence[Tombstone] = (),
                 shared: MappedTombstones | None = None) -> None:
        """``shared``: the tombstones up to its ``last_id``, mapped; ``tombstones``: later ones."""
        self.ring = ring
        self._shared = shared if shared else None  # an empty file: nothing to look up in
        self._by_digest: dict[bytes, Tombstone] = {}
        self.last_id = 0 if shared is None else shared.last_id
        # Set when a tombstone arrives that no key in the ring can match: enforcement would
        # silently stop, so the erasure policy fails closed until the key file is fixed.
        self.broken: str | None = None
        if shared is not None:
            lacking = [key_id for key_id in shared.key_ids if ring.by_id(key_id) is None]
            if lacking:
                self.broken = f"tombstones were made with key {lacking[0]!r}, which {ring.path} does not hold"
        self.add(tombstones)

    def __len__(self) -> int:
        return len(self._by_digest) + (0 if self._shared is None else len(self._shared))

    def lookup(self, normalized_key: str) -> Tombstone | None:
        if not self._by_digest and self._shared is None:
            return None
        token = erasure_token(normalized_key)
        return self.lookup_token(token)

    def lookup_token(self, token: str) -> Tombstone | None:
        if not self._by_digest and self._shared is None:
            return None  # no erasure yet: no HMAC (every audit record and log line asks)
        for key in self.ring.keys:
            digest = key.tombstone(token)
            tombstone = self._by_digest.get(digest)
            if tombstone is None and self._shared is not None:
                tombstone = self._shared.get(digest)
            if tombstone is not None and tombstone.key_id == key.id:
                return tombstone
        return None

    def add(self, tombstones: Sequence[Tombstone]) -> None:
        by_digest = dict(self._by_digest)
        for tombstone in tombstones:
            if self.ring.by_id(tombstone.key_id) is None:
                self.broken = (f"tombstone {tombstone.id} was made with key {tombstone.key_id!r}, which "
                               f"{self.ring.path} does not hold")
            by_digest[tombstone.digest] = tombstone
            self.last_id = max(self.last_id, tombstone.id)
        self._by_digest = by_digest


class TombstoneReloader:
    """Takes new tombstones from the store; re-reads the key file when one needs a new key.

    ``refresh()`` returns only once ``on_new`` (the guard's audit sweep) has finished for every
    tombstone it took, and raises while that sweep fails. Change-sync runs it as a step and
    confirms a change generation only after its steps return, so a guard confirms an erasure
    only once the records it wrote under the person's pseudonym say ``erased:<id>``.
    """

    def __init__(self, index: TombstoneIndex, store: ErasureStore, load_ring: Callable[[], KeyRing],
                 on_new: Callable[[Sequence[Tombstone]], Awaitable[None]] | None = None) -> None:
        self.index = index
        self._store = store
        self._load_ring = load_ring
        self._on_new = on_new
        # One refresh at a time: two could both take the same new tombstones and sweep twice.
        self._lock = asyncio.Lock()
        self._unswept: list[Tombstone] = []

    async def refresh(self) -> None:
        async with self._lock:  # the periodic loop and change-sync both call this
            await self._refresh()

    async def _refresh(self) -> None:
        new = await self._store.tombstones_since(self.index.last_id)
        if not new and self.index.broken is None:
            await self._sweep()
            return
        if any(self.index.ring.by_id(t.key_id) is None for t in new) or self.index.broken:
            try:
                ring = self._load_ring()
                # A running guard never forgets a key: keys nothing was made with are
                # only forgotten at start-up (open_key_ring), with a warning.
                await check_key_file(ring.path, ring, self._store)
                self.index.ring = ring
                self.index.broken = None
            except ErasureKeyError as error:
                self.index.broken = str(error)
        self.index.add(new)
        if self.index.broken:
            log.error("erasure enforcement is broken, deferring all mail: %s", self.index.broken)
        self._unswept += new
        await self._sweep()

    async def _sweep(self) -> None:
        """Hand new tombstones to ``on_new``; kept and handed again next time if it fails
        (e.g. the store is locked), so no erasure misses its sweep."""
        if self._unswept and self._on_new is not None:
            await self._on_new(list(self._unswept))
        self._unswept.clear()

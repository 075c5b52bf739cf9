"""What a guard process enforces from: the suppression index and the erasure tombstones, kept
in step with the store, and the audit buffer its decisions go to."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from typing import Callable, Sequence

from ..audit import AuditLog
from ..backends import Backends
from ..change_sync import Step
from ..config import Config
from ..erasure.keys import ErasureKeyError, load_key_ring
from ..erasure.index import TombstoneReloader
from ..index import IndexReloader, SnapshotSource, SuppressionIndex
from ..metrics import Metrics
from ..periodic import Periodic
from ..readiness import Readiness
from ..startup import naming_setting
from ..erasure.model import Tombstone
from ..store.base import StoreError


class Enforcement:
    def __init__(self, config: Config, backends: Backends, metrics: Metrics, readiness: Readiness,
                 clock: Callable[[], float] = time.time, snapshots: SnapshotSource | None = None) -> None:
        """``snapshots``: where full reloads take the index from when several processes share
        one (``index_share.SharedSnapshots``); by default each loads its own from the store."""
        self._config = config
        self._backends = backends
        self._readiness = readiness
        self.index = SuppressionIndex()
        self.reloader = IndexReloader(self.index, backends.suppressions, config.list_priority,
                                      config.store.reload_interval, clock=clock, snapshots=snapshots,
                                      on_reload=metrics.index_reloads.inc)
        key_file = config.erasure_key_file
        self.tombstone_reloader = TombstoneReloader(backends.tombstones, backends.erasure,
                                                    lambda: load_key_ring(key_file), on_new=self._sweep_after_erasure)
        self.audit = AuditLog(backends.audit, config.audit, on_dropped=metrics.audit_dropped.inc)

    @property
    def change_steps(self) -> Sequence[Step]:
        """What change-sync runs when an admin change was committed."""
        return (self.reloader.refresh, self.tombstone_reloader.refresh)

    async def start(self, running: AsyncExitStack) -> None:
        """Load the index and start the loops that keep it and the tombstones fresh; each is
        registered on ``running`` so stopping unwinds it (the audit trail flushed last)."""
        with naming_setting(self._config.store.setting, True, StoreError):
            await self.reloader.load()
        self._readiness.set("index", None)
        self.audit.start()
        running.push_async_callback(self.audit.stop)
        self.reloader.start()
        running.push_async_callback(self.reloader.stop)
        tombstones = Periodic("tombstones", self._config.store.reload_interval, self.tombstone_reloader.refresh,
                              "tombstone refresh failed; keeping the current tombstones")
        tombstones.start()
        running.push_async_callback(tombstones.stop)

    async def _sweep_after_erasure(self, tombstones: Sequence[Tombstone]) -> None:
        """Between an erasure's purge and this process learning of it, audit records about the
        person may have been written under their pseudonym: write what is buffered (now as
        ``erased:<id>``), then replace the pseudonym in what was already written."""
        await self.audit.flush()
        self._backends.audit.pseudonymizer.forget()
        ring = self._backends.tombstones.ring
        for tombstone in tombstones:
            key = ring.by_id(tombstone.key_id)
            if key is None:
                # Fails the refresh, so the sweep is retried once the key file is restored and
                # this guard does not confirm the erasure meanwhile (it defers all mail anyway).
                raise ErasureKeyError(f"the key file lacks key {tombstone.key_id} of erasure {tombstone.reference}: "
                                      "its audit records cannot be swept until the key file is restored")
            await self._backends.erasure.erase_pseudonyms([key.pseudonym_of_digest(tombstone.digest)], tombstone.id)

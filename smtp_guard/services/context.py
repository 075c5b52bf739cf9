"""What an admin operation needs, handed in by the composition root (app.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..addresses import AddressNormalizer
from ..config import Config
from ..erasure.index import TombstoneIndex
from ..erasure.keys import KeyRing
from ..store.base import AuditStore, BreakerStore, ChangeStore, ErasureStore, HoldStore, SuppressionStore


@dataclass(frozen=True)
class AdminContext:
    config: Config
    suppressions: SuppressionStore
    holds: HoldStore
    audit: AuditStore  # pseudonymizing: never stores a recipient address
    erasure: ErasureStore
    breakers: BreakerStore
    key_ring: KeyRing
    # Erased addresses: never to be stored again (a re-import must not undo an erasure).
    tombstones: TombstoneIndex
    normalizer: AddressNormalizer
    actor: str  # recorded with every admin action, e.g. "cli:alice"
    # Change generation and running guards: services.propagation.in_force after a change.
    changes: ChangeStore
    clock: Callable[[], float] = field(default=time.time)

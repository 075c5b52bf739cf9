"""What an admin operation needs, handed in by the composition root (app.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..addresses import AddressNormalizer
from ..audit_model import AuditStore
from ..breaker.model import BreakerStore
from ..change_model import ChangeStore
from ..config import EMBEDDED_DEFAULTS, Config
from ..erasure.index import TombstoneIndex
from ..erasure.keys import KeyRing
from ..erasure.model import ErasureStore
from ..hold.model import HoldStore
from ..suppression_model import SuppressionStore


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


class StoreNotFound(Exception):
    """An admin command was pointed at a store that does not exist. It never creates one: a
    second, empty store would take changes that no running guard enforces."""

    def __init__(self, config: Config, well_known_configs: Sequence[Path] = ()) -> None:
        if config.store.is_postgresql:
            super().__init__(
                f"the PostgreSQL database at {config.store.location} ([store] url from {config.source}) has no "
                "smtp-guard schema (or an older one). Admin commands never create it: run `smtp-guard store "
                "migrate --config FILE`, or start the guard with that config (smtp-guard serve --config FILE).")
            return
        hints = [f"--config {known}" for known in well_known_configs
                 if known.is_file() and config.source == EMBEDDED_DEFAULTS]
        hint = f" (did you mean {' or '.join(hints)}?)" if hints else ""
        super().__init__(
            f"no store at {config.store.path} ([store] path from {config.source}){hint}. Admin commands never create "
            "one: point this command at the guard's own config (--config FILE or SMTP_GUARD_CONFIG), "
            "or start the guard once with that config (smtp-guard serve --config FILE) to create it.")

"""The pipeline, in one place: the decision order of DESIGN.md ("Decisions, per recipient").

Both the server (app.py) and ``suppress check`` build their pipeline here, so what the CLI
explains is what the server enforces; reordering is a one-line diff.
"""

from __future__ import annotations

from ..breaker_state import BreakerState
from ..config import Config
from ..erasure.index import TombstoneIndex
from ..index import SuppressionIndex
from .breaker import BreakerPolicy
from .erasure import ErasurePolicy
from .pipeline import Pipeline
from .suppression import MarketingSuppressionPolicy, SuppressionPolicy


def default_pipeline(config: Config, tombstones: TombstoneIndex, suppressions: SuppressionIndex, *,
                     breakers: BreakerState | None = None) -> Pipeline:
    """``breakers``: the running server's stream state (``suppress check`` passes none: a fresh one)."""
    shadow_all = config.policy.shadow
    suppression = SuppressionPolicy(suppressions, config.lists, shadow_all=shadow_all)
    return Pipeline(
        [
            ErasurePolicy(tombstones, config.erasure.action),  # 1. erased
            suppression,  # 2. suppressed (lists for all mail)
        ],
        [
            # End of DATA, once class and stream are known:
            MarketingSuppressionPolicy(suppression, config.lists, config.classify.default),  # 2b. marketing-only lists
            # 3. approval gates, volume breaker, fan-out detector (held or deferred per stream)
            BreakerPolicy(breakers or BreakerState(config.breaker), config.breaker, config.classes, shadow_all),
        ],
    )

"""The pipeline, in one place: the decision order of DESIGN.md ("Decisions, per recipient").

Both the server (app.py) and ``suppress check`` build their pipeline here, so what the CLI
explains is what the server enforces; reordering is a one-line diff.
"""

from __future__ import annotations

from ..config import Config
from ..erasure.index import TombstoneIndex
from ..index import SuppressionIndex
from .erasure import ErasurePolicy
from .pipeline import Pipeline
from .suppression import MarketingSuppressionPolicy, SuppressionPolicy


def default_pipeline(config: Config, tombstones: TombstoneIndex, suppressions: SuppressionIndex) -> Pipeline:
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
        ],
    )

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
from .suppression import SuppressionPolicy


def default_pipeline(config: Config, tombstones: TombstoneIndex, suppressions: SuppressionIndex) -> Pipeline:
    return Pipeline([
        ErasurePolicy(tombstones, config.erasure.action),  # 1. erased
        SuppressionPolicy(suppressions, config.lists),  # 2. suppressed
    ])

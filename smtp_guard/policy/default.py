"""The pipeline, in one place: the decision order of docs/design.md ("Decisions, per recipient").

Both the server (app.py) and ``suppress check`` build their pipeline here, so what the CLI
explains is what the server enforces; reordering is a one-line diff.
"""

from __future__ import annotations

import time
from typing import Callable

from ..breaker.policy import BreakerPolicy
from ..breaker.state import BreakerState
from ..config import Config
from ..counters import RateCounters
from ..erasure.index import TombstoneIndex
from ..index import SuppressionIndex
from .base import MessagePolicy, Policy
from .erasure import ErasurePolicy
from .pipeline import Pipeline
from .ratelimit import MessageRateLimitPolicy, RateLimitPolicy
from .suppression import MarketingSuppressionPolicy, SuppressionPolicy


def default_pipeline(config: Config, tombstones: TombstoneIndex, suppressions: SuppressionIndex, *,
                     breakers: BreakerState | None = None, counters: RateCounters | None = None,
                     clock: Callable[[], float] = time.time) -> Pipeline:
    """``breakers``: the running server's stream state, counting where its ``tallies`` are
    (``suppress check`` passes none: a fresh one). ``counters``: the running server's rate-limit
    buckets, read with ``clock``; None (``suppress check``) leaves the rate limits out, so
    explaining a recipient never spends a token."""
    shadow_all = config.policy.shadow
    # Rate limits need the running server's counters; without them (``suppress check``, which
    # must not spend tokens) they are left out.
    rate_limits: list[Policy] = []
    message_rate_limits: list[MessagePolicy] = []
    if counters is not None and config.rate_limits:
        rate_limits.append(RateLimitPolicy(config.rate_limits, clock, shadow_all))
        message_rate_limits.append(MessageRateLimitPolicy(config.rate_limits, shadow_all))
    suppression = SuppressionPolicy(suppressions, config.lists, shadow_all=shadow_all)
    breakers = breakers or BreakerState(config.breaker)
    return Pipeline(
        [
            ErasurePolicy(tombstones, config.erasure.action),  # 1. erased
            suppression,  # 2. suppressed (lists for all mail)
            *rate_limits,  # 3. rate limits known at RCPT (deferred / held)
        ],
        [
            # End of DATA, once class and stream are known:
            MarketingSuppressionPolicy(suppression, config.lists, config.classify.default),  # 2b. marketing-only lists
            *message_rate_limits,  # 3. rate limits by stream, class or header
            # 3. approval gates, volume breaker, fan-out detector (held or deferred per stream)
            BreakerPolicy(breakers, config.breaker, config.classes, shadow_all),
        ],
        counters=counters, tallies=breakers.tallies, on_counters_error=config.counters.on_error,
    )

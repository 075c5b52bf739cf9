"""When a stream trips: the volume breaker, approval gates and the fan-out detector.

Each rule names one of the stream's counts (``tally.Measure``) and the largest value of it
that it lets through: the volume breaker the distinct recipients within the window, an
approval gate the stream's audience, the fan-out detector the recipients of one exact body.
A stream trips at the first recipient whose count exceeds an enforced rule's limit. The
comparison itself is made where the counts are kept (``tally.py``, in memory or in Redis), so
that a trip is claimed once however many guards count the stream; the rules only say what to
compare, and the breaker policy (``policy.py``) owns what a trip means for the mail.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from ..config import BreakerConfig
from .state import BreakerState
from .tally import Measure

VOLUME_RULE = "breaker.volume"
FANOUT_RULE = "breaker.fanout"
GATE_PREFIX = "gate."


def gate_rule(message_class: str) -> str:
    return GATE_PREFIX + message_class


def holding_rules(rule: str, message_class: str) -> tuple[str, ...]:
    """The rules whose holds an admin decision on a stream releases or discards: the one that
    tripped it and the others that hold for a stream (not a rate limit's or a list's holds)."""
    return tuple(dict.fromkeys((rule, gate_rule(message_class), VOLUME_RULE, FANOUT_RULE)))


def cancelling_rules(rule: str, message_class: str, rate_limit_names: Sequence[str]) -> tuple[str, ...]:
    """The rules whose holds a cancellation discards: the stream's own holds and its recipients
    that were only waiting to be paced by a rate limit (a cancelled mailing must not trickle out)."""
    return holding_rules(rule, message_class) + tuple(f"ratelimit.{name}" for name in rate_limit_names)


class StreamRule(Protocol):
    rule: str
    shadow: bool
    measure: Measure

    def limit(self, sender: str) -> int:
        """The largest value of ``measure`` this rule lets through; one more trips the stream."""


class VolumeRule:
    """Distinct recipients of the stream in the window against max(floor, factor x the
    sender's learned baseline), and against the absolute ceiling."""

    rule = VOLUME_RULE
    measure: Measure = "window"

    def __init__(self, config: BreakerConfig, state: BreakerState, shadow: bool) -> None:
        self._config = config
        self._state = state
        self.shadow = shadow

    def limit(self, sender: str) -> int:
        baseline = self._state.baseline(sender)
        threshold = self._config.floor if baseline is None else max(self._config.floor,
                                                                    int(self._config.factor * baseline))
        return min(threshold, self._config.ceiling) if self._config.ceiling else threshold


class GateRule:
    """A sensitive class: each stream sends at most ``approval_after`` recipients before an
    admin has seen the audience and samples (docs/design.md, second incident)."""

    measure: Measure = "size"

    def __init__(self, message_class: str, approval_after: int, shadow: bool) -> None:
        self.rule = gate_rule(message_class)
        self._after = approval_after
        self.shadow = shadow

    def limit(self, sender: str) -> int:
        return self._after


class FanoutRule:
    """A personal/transactional class: the same body to more than ``limit`` distinct
    recipients is someone's mail going to everyone ("the same partner id in thousands")."""

    rule = FANOUT_RULE
    measure: Measure = "body"

    def __init__(self, limit: int, shadow: bool) -> None:
        self._limit = limit
        self.shadow = shadow

    def limit(self, sender: str) -> int:
        return self._limit

"""When a stream trips: the volume breaker, approval gates and the fan-out detector.

Each rule looks at a stream's tally (and, for the fan-out detector, the current body's
recipient count) and answers with the limit the stream exceeded, or None. They only compare
numbers; the breaker policy (``policy.py``) owns what a trip means for the mail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from ..config import BreakerConfig
from .state import BreakerState, StreamTally

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


@dataclass(frozen=True)
class Exceeded:
    rule: str
    threshold: int
    reason: str


class StreamRule(Protocol):
    rule: str
    shadow: bool

    def limit(self, sender: str) -> int:
        """The largest count this rule lets through (to bound what the tally remembers)."""

    def exceeded(self, tally: StreamTally, body_recipients: int, now: float) -> Exceeded | None: ...


class VolumeRule:
    """Distinct recipients of the stream in the window against max(floor, factor x the
    sender's learned baseline), and against the absolute ceiling."""

    rule = VOLUME_RULE

    def __init__(self, config: BreakerConfig, state: BreakerState, shadow: bool) -> None:
        self._config = config
        self._state = state
        self.shadow = shadow

    def threshold(self, sender: str) -> tuple[int, float | None]:
        baseline = self._state.baseline(sender)
        if baseline is None:
            return self._config.floor, None
        return max(self._config.floor, int(self._config.factor * baseline)), baseline

    def limit(self, sender: str) -> int:
        threshold, _ = self.threshold(sender)
        return min(threshold, self._config.ceiling) if self._config.ceiling else threshold

    def exceeded(self, tally: StreamTally, body_recipients: int, now: float) -> Exceeded | None:
        count = tally.in_window(now, self._config.window)
        threshold, baseline = self.threshold(tally.sender)
        ceiling = self._config.ceiling
        if ceiling and count > ceiling and ceiling < threshold:
            return Exceeded(self.rule, ceiling, f"stream reached {count} recipients, over the ceiling of {ceiling}")
        if count <= threshold:
            return None
        if baseline is None:
            why = f"the floor of {threshold} (no baseline for this sender yet)"
        elif threshold == self._config.floor:
            why = f"the floor of {threshold} (sender's baseline {baseline:.0f})"
        else:
            why = f"{self._config.factor:g}x the sender's baseline of {baseline:.0f}"
        return Exceeded(self.rule, threshold, f"stream reached {count} recipients within "
                                              f"{_duration(self._config.window)}, over {why}")


class GateRule:
    """A sensitive class: each stream sends at most ``approval_after`` recipients before an
    admin has seen the audience and samples (docs/design.md, second incident)."""

    def __init__(self, message_class: str, approval_after: int, shadow: bool) -> None:
        self.rule = gate_rule(message_class)
        self._class = message_class
        self._after = approval_after
        self.shadow = shadow

    def limit(self, sender: str) -> int:
        return self._after

    def exceeded(self, tally: StreamTally, body_recipients: int, now: float) -> Exceeded | None:
        if tally.size <= self._after:
            return None
        return Exceeded(self.rule, self._after, f"class {self._class} needs an admin's approval after "
                                                f"{self._after} recipient(s) per stream")


class FanoutRule:
    """A personal/transactional class: the same body to more than ``limit`` distinct
    recipients is someone's mail going to everyone ("the same partner id in thousands")."""

    rule = FANOUT_RULE

    def __init__(self, message_class: str, limit: int, shadow: bool) -> None:
        self._class = message_class
        self._limit = limit
        self.shadow = shadow

    def limit(self, sender: str) -> int:
        return self._limit

    def exceeded(self, tally: StreamTally, body_recipients: int, now: float) -> Exceeded | None:
        if body_recipients <= self._limit:
            return None
        return Exceeded(self.rule, self._limit, f"the same body of personal class {self._class} went to more "
                                                f"than {self._limit} recipients")


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"

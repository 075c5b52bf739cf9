"""Rate limits: ``[[rate_limits]]`` token buckets, one per rule and key value.

Each rule counts recipients (one token each) per key — client address, authenticated user,
sender, sender domain, recipient domain or stream — at ``rate`` with ``burst``. Over the limit:

* ``action = "defer"``: 451 4.7.1 naming the rule; the platform retries later and the same
  mail passes once the bucket has refilled. Never a 5xx: a rate is no reason to bounce.
* ``action = "hold"``: accept (250), store durably in the hold queue and release at the
  allowed pace (``Decision.release_at``), for platforms that never retry a per-recipient 4xx.
  The release time is reserved in the bucket, so a backlog drains at ``rate`` and no faster.

Two policies, because SMTP gives two moments to decide (policy/pipeline.py):

* ``RateLimitPolicy`` at RCPT, for rules whose key and match are known then (every key but
  ``stream``; ``match.sender``): exact per-recipient replies.
* ``MessageRateLimitPolicy`` at the end of DATA, for rules keyed by ``stream`` or matching a
  class or header. Every recipient already got 250, so a per-recipient 4xx is impossible:
  "defer" defers the whole message (451 4.7.1) unless the tokens of all its recipients are
  there — and then takes none, so the retry is not charged twice; "hold" holds the recipients
  over the limit.

Several rules may apply to one recipient. Enforced "defer" rules are taken all-or-nothing
(a recipient deferred by one rule is not charged by another); "hold" rules each reserve a
token and the latest release time wins. A rule in shadow mode (``shadow = true`` or
``[policy] shadow``) is counted like an enforced one but only reported: a PASS carrying what
it would have done. Tokens taken for a recipient that a later policy or the upstream refuses
are not given back: the limits err on the slow side.

Counters are the ``RateCounters`` interface (counters.py): synchronous, no I/O here.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

from .. import replies
from ..config import RateLimitRule
from ..counters import RateCounters, Take
from .base import Decision, MessageContext, MessageVerdict, RecipientContext, Verdict

_NO_OPINION_WITH_SHADOW = Decision(Verdict.PASS, "pass", "no policy objected", replies.RECIPIENT_OK)

_UNITS = ((1.0, "s"), (60.0, "m"), (3600.0, "h"), (86400.0, "d"))


def format_rate(per_second: float) -> str:
    """Tokens per second back in the unit it was probably written in: 0.5 -> "30/m"."""
    for seconds, unit in _UNITS:
        if per_second * seconds >= 1 or unit == "d":
            return f"{per_second * seconds:g}/{unit}"
    raise AssertionError("unreachable")


def _sender(sender: str) -> str:
    """The envelope sender as rules see it: "" for the null reverse-path ("<>" at RCPT)."""
    return "" if sender == "<>" else sender


@dataclass(frozen=True, eq=False)  # identity: a rule is one configured rule
class _Rule:
    """One ``[[rate_limits]]`` rule, compiled: patterns, decisions, shadow flag."""

    limit: RateLimitRule
    shadow: bool
    sender: re.Pattern[str] | None
    header: str  # lower-case header name, "" for none
    pattern: re.Pattern[str] | None
    defer: Decision
    hold: Decision  # release_at is filled in per recipient

    @classmethod
    def compile(cls, limit: RateLimitRule, shadow_all: bool) -> _Rule:
        rule_id = f"ratelimit.{limit.name}"
        what = f"rate limit {limit.name} ({format_rate(limit.rate)} per {limit.key}, burst {limit.burst:g})"
        return cls(
            limit=limit,
            shadow=limit.shadow or shadow_all,
            sender=re.compile(limit.match_sender, re.IGNORECASE) if limit.match_sender else None,
            header=limit.match_header.lower(),
            pattern=re.compile(limit.match_pattern, re.IGNORECASE) if limit.match_pattern else None,
            defer=Decision(Verdict.DEFER, rule_id, f"over the {what}", replies.rate_limited(limit.name)),
            hold=Decision(Verdict.HOLD, rule_id, f"over the {what}; released at the allowed pace", replies.PACED),
        )

    @property
    def is_deferring(self) -> bool:
        return self.limit.action == "defer"

    def matches_sender(self, sender: str) -> bool:
        return self.sender is None or bool(self.sender.search(_sender(sender)))

    def matches_message(self, message: MessageContext) -> bool:
        if self.limit.match_class and message.message_class != self.limit.match_class:
            return False
        if self.header:
            value = message.headers.get(self.header)
            if value is None or (self.pattern is not None and not self.pattern.search(value)):
                return False
        return self.matches_sender(message.sender)

    def bucket(self, recipient: RecipientContext, sender: str, client_ip: str, auth_user: str | None,
               stream: str = "") -> str | None:
        """The counter key of this rule for one recipient, or None when the rule does not
        apply (``auth_user`` for an unauthenticated client). Values are never logged."""
        key = self.limit.key
        if key == "client":
            value = client_ip
        elif key == "auth_user":
            if auth_user is None:
                return None
            value = auth_user
        elif key == "sender":
            value = _sender(sender).lower() or "<>"
        elif key == "sender_domain":
            value = _sender(sender).rpartition("@")[2].lower() or "<>"
        elif key == "recipient_domain":
            value = recipient.domain_chain[0] if recipient.domain_chain else recipient.mailbox.domain.lower()
        else:
            value = stream
        return f"ratelimit.{self.limit.name}:{value}"

    def take(self, bucket: str) -> Take:
        return Take(bucket, self.limit.rate, self.limit.burst)


# (rule, counter key) pairs that apply to one recipient, in configuration order.
_Applicable = Sequence[tuple[_Rule, str]]


class _Limiter:
    """What both phases share: the counters, and how one recipient's rules are applied."""

    def __init__(self, rules: Iterable[RateLimitRule], counters: RateCounters, shadow_all: bool) -> None:
        self._rules = tuple(_Rule.compile(rule, shadow_all) for rule in rules)
        self._counters = counters

    def _take_enforced(self, applicable: _Applicable, now: float) -> Decision | None:
        """Take the tokens of every enforced "defer" rule at once; the decision of the first
        rule short of tokens (nothing taken), or None."""
        by_key = {bucket: rule for rule, bucket in applicable if rule.is_deferring and not rule.shadow}
        if not by_key:
            return None
        short = self._counters.take_all([rule.take(bucket) for rule, bucket in applicable
                                         if rule.is_deferring and not rule.shadow], now)
        return None if short is None else by_key[short.key].defer

    def _schedule(self, applicable: _Applicable, now: float) -> tuple[Decision | None, list[Decision]]:
        """Reserve a token in every "hold" rule, and try every shadowed "defer" rule alone.
        Returns the enforced hold (latest release time wins), and the shadowed decisions."""
        held: Decision | None = None
        shadowed: list[Decision] = []
        for rule, bucket in applicable:
            if rule.is_deferring:
                if rule.shadow and not self._counters.take(bucket, rule.limit.rate, rule.limit.burst, now):
                    shadowed.append(rule.defer)
                continue
            release_at = self._counters.schedule(bucket, rule.limit.rate, rule.limit.burst, now)
            if release_at <= now:
                continue
            decision = replace(rule.hold, release_at=release_at)
            if rule.shadow:
                shadowed.append(decision)
            elif held is None or release_at > (held.release_at or now):
                held = decision
        return held, shadowed


def _with_shadowed(decision: Decision | None, shadowed: list[Decision]) -> Decision | None:
    if not shadowed:
        return decision
    return replace(decision or _NO_OPINION_WITH_SHADOW, shadowed=tuple(shadowed))


class RateLimitPolicy(_Limiter):
    """The rules decidable at RCPT (``RateLimitRule.needs_message`` is false)."""

    name = "ratelimit"
    # Shadow mode is per rule (``shadow = true`` or ``[policy] shadow``): decisions are marked.
    shadow = False

    def __init__(self, rules: Iterable[RateLimitRule], counters: RateCounters,
                 clock: Callable[[], float] = time.time, shadow_all: bool = False) -> None:
        super().__init__([rule for rule in rules if not rule.needs_message], counters, shadow_all)
        self._clock = clock

    def check(self, recipient: RecipientContext) -> Decision | None:
        if not self._rules:
            return None
        applicable = [(rule, bucket) for rule in self._rules if rule.matches_sender(recipient.sender)
                      and (bucket := rule.bucket(recipient, recipient.sender, recipient.client_ip,
                                                 recipient.auth_user)) is not None]
        if not applicable:
            return None
        now = self._clock()
        deferred = self._take_enforced(applicable, now)
        if deferred is not None:
            return deferred
        held, shadowed = self._schedule(applicable, now)
        return _with_shadowed(held, shadowed)


class MessageRateLimitPolicy(_Limiter):
    """The rules that need the message: keyed by stream, or matching a class or header."""

    name = "ratelimit.message"
    shadow = False

    def __init__(self, rules: Iterable[RateLimitRule], counters: RateCounters, shadow_all: bool = False) -> None:
        super().__init__([rule for rule in rules if rule.needs_message], counters, shadow_all)

    def check_message(self, message: MessageContext) -> MessageVerdict | None:
        if not self._rules or not message.recipients:
            return None
        rules = [rule for rule in self._rules if rule.matches_message(message)]
        if not rules:
            return None
        per_recipient: dict[str, _Applicable] = {}
        for recipient in message.recipients:
            per_recipient[recipient.mailbox.text] = [
                (rule, bucket) for rule in rules
                if (bucket := rule.bucket(recipient, message.sender, message.client_ip, message.auth_user,
                                          message.stream)) is not None]
        everything = [pair for applicable in per_recipient.values() for pair in applicable]
        deferred = self._take_enforced(everything, message.now)
        if deferred is not None:
            return MessageVerdict(message=deferred)
        shadowed_defers = self._shadowed_message_defers(everything, message.now)
        decided: dict[str, Decision] = {}
        for address, applicable in per_recipient.items():
            # Shadowed "defer" rules were tried for the whole message above.
            held, shadowed = self._schedule([(r, b) for r, b in applicable if not (r.shadow and r.is_deferring)],
                                            message.now)
            decision = _with_shadowed(held, shadowed_defers + shadowed)
            if decision is not None:
                decided[address] = decision
        return MessageVerdict(recipients=decided) if decided else None

    def _shadowed_message_defers(self, everything: _Applicable, now: float) -> list[Decision]:
        """Each shadowed "defer" rule alone, for the whole message: what it would have
        deferred (reported for every recipient, as an enforced deferral would be)."""
        shadowed = []
        for rule in dict.fromkeys(r for r, _ in everything if r.shadow and r.is_deferring):
            takes = [rule.take(bucket) for r, bucket in everything if r is rule]
            if self._counters.take_all(takes, now) is not None:
                shadowed.append(rule.defer)
        return shadowed

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

The counters may be a network away (Redis), so neither policy calls them: each returns an
``Ask`` — one ``counters.Request`` with every take and reservation of the recipient (or the
message), and how to read its settlement — and the pipeline settles it in one atomic call
(policy/pipeline.py; one round trip to Redis).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Sequence

from .. import replies
from ..config import RateLimitRule
from ..counters import Request, Settlement, Take
from .base import Ask, Decision, MessageContext, MessageVerdict, RecipientContext, Verdict

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


def _enforced(applicable: _Applicable) -> list[tuple[_Rule, str]]:
    """The enforced "defer" rules: taken all-or-nothing (a recipient deferred by one rule is
    not charged by another)."""
    return [(rule, bucket) for rule, bucket in applicable if rule.is_deferring and not rule.shadow]


def _short_decision(applicable: _Applicable, short: Take) -> Decision:
    """The deferral of the first enforced rule whose bucket was short."""
    return next(rule.defer for rule, bucket in _enforced(applicable) if bucket == short.key)


def _settled(applicable: _Applicable, due: Iterator[float], now: float,
             met: Iterator[bool] | None = None) -> tuple[Decision | None, list[Decision]]:
    """One recipient's settlement, read in configuration order: a reservation per "hold" rule
    from ``due`` and, with ``met``, a take per shadowed "defer" rule. Returns the enforced hold
    (the latest release time wins) and what the shadowed rules would have done."""
    held: Decision | None = None
    shadowed: list[Decision] = []
    for rule, _ in applicable:
        if rule.is_deferring:
            if rule.shadow and met is not None and not next(met):
                shadowed.append(rule.defer)
            continue
        release_at = next(due)
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


class RateLimitPolicy:
    """The rules decidable at RCPT (``RateLimitRule.needs_message`` is false)."""

    name = "ratelimit"
    # Shadow mode is per rule (``shadow = true`` or ``[policy] shadow``): decisions are marked.
    shadow = False

    def __init__(self, rules: Iterable[RateLimitRule], clock: Callable[[], float] = time.time,
                 shadow_all: bool = False) -> None:
        self._rules = tuple(_Rule.compile(rule, shadow_all) for rule in rules if not rule.needs_message)
        self._clock = clock

    def check(self, recipient: RecipientContext) -> Ask[Decision] | None:
        if not self._rules:
            return None
        applicable = [(rule, bucket) for rule in self._rules if rule.matches_sender(recipient.sender)
                      and (bucket := rule.bucket(recipient, recipient.sender, recipient.client_ip,
                                                 recipient.auth_user)) is not None]
        if not applicable:
            return None
        # Enforced "defer" rules all-or-nothing; each shadowed one alone; a reservation per "hold" rule.
        request = Request(
            take_all=tuple(rule.take(bucket) for rule, bucket in _enforced(applicable)),
            groups=tuple((rule.take(bucket),) for rule, bucket in applicable if rule.is_deferring and rule.shadow),
            reserve=tuple(rule.take(bucket) for rule, bucket in applicable if not rule.is_deferring))
        now = self._clock()
        return Ask(request, now, lambda settlement: self._answer(applicable, settlement, now))

    @staticmethod
    def _answer(applicable: _Applicable, settlement: Settlement, now: float) -> Decision | None:
        if settlement.short is not None:
            return _short_decision(applicable, settlement.short)
        held, shadowed = _settled(applicable, iter(settlement.due), now, iter(settlement.met))
        return _with_shadowed(held, shadowed)


class MessageRateLimitPolicy:
    """The rules that need the message: keyed by stream, or matching a class or header."""

    name = "ratelimit.message"
    shadow = False

    def __init__(self, rules: Iterable[RateLimitRule], shadow_all: bool = False) -> None:
        self._rules = tuple(_Rule.compile(rule, shadow_all) for rule in rules if rule.needs_message)

    def check_message(self, message: MessageContext) -> Ask[MessageVerdict] | None:
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
        if not everything:
            return None
        # Each shadowed "defer" rule alone, for the whole message: what it would have deferred
        # (reported for every recipient, as an enforced deferral would be).
        shadow_defers = list(dict.fromkeys(r for r, _ in everything if r.shadow and r.is_deferring))
        request = Request(
            take_all=tuple(rule.take(bucket) for rule, bucket in _enforced(everything)),
            groups=tuple(tuple(rule.take(bucket) for r, bucket in everything if r is rule) for rule in shadow_defers),
            reserve=tuple(rule.take(bucket) for rule, bucket in everything if not rule.is_deferring))
        return Ask(request, message.now,
                   lambda settlement: self._answer(per_recipient, everything, shadow_defers, settlement, message.now))

    @staticmethod
    def _answer(per_recipient: dict[str, _Applicable], everything: _Applicable, shadow_defers: list[_Rule],
                settlement: Settlement, now: float) -> MessageVerdict | None:
        if settlement.short is not None:
            return MessageVerdict(message=_short_decision(everything, settlement.short))
        shadowed_defers = [rule.defer for rule, met in zip(shadow_defers, settlement.met) if not met]
        due = iter(settlement.due)
        decided: dict[str, Decision] = {}
        for address, applicable in per_recipient.items():
            # Shadowed "defer" rules were settled for the whole message above.
            held, shadowed = _settled(applicable, due, now)
            decision = _with_shadowed(held, shadowed_defers + shadowed)
            if decision is not None:
                decided[address] = decision
        return MessageVerdict(recipients=decided) if decided else None

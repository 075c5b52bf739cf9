"""The breaker policy: volume breaker, approval gates and fan-out detector at the end of DATA.

One message policy over one stream state, because a stream has one breaker: whichever rule
trips it (``gate.<class>``, ``breaker.volume``, ``breaker.fanout``; checked in that order),
an admin approves or cancels the stream, and that decision governs all of them:

* no trip — each recipient is counted, in order; the recipient that makes a rule's count
  exceed its limit trips the stream, so one message can be split: the first recipients are
  relayed, the rest wait;
* tripped — further recipients are held for the admin (HOLD; the client already got 250 at
  RCPT and gets 250 for DATA once the hold is on disk) or, with ``[breaker] action = "defer"``,
  the whole message is deferred (451 4.7.1, the platform retries). Gates always hold: the
  admin must see samples;
* approved with ceiling C — recipients pass until the stream's audience exceeds C, then it
  trips again under the same rule;
* cancelled — the whole message is refused (550 5.7.1).

A rule in shadow mode trips "would have": each later recipient of the stream carries a shadow
decision (logged, audited, counted), and everything is delivered.
"""

from __future__ import annotations

from typing import Mapping

from .. import replies
from ..config import BreakerConfig, ClassConfig
from ..policy.base import Decision, MessageContext, MessageVerdict, Verdict
from .model import BreakerRecord
from .rules import GATE_PREFIX, Exceeded, FanoutRule, GateRule, StreamRule, VolumeRule
from .state import BreakerState, StreamTally

_PASS = Decision(Verdict.PASS, "pass", "no policy objected", replies.RECIPIENT_OK)


class BreakerPolicy:
    name = "breaker"
    # Shadow mode is per rule ([breaker] shadow, [classes.NAME] shadow, [policy] shadow).
    shadow = False

    def __init__(self, state: BreakerState, config: BreakerConfig, classes: Mapping[str, ClassConfig],
                 shadow_all: bool = False) -> None:
        self._state = state
        self._config = config
        volume = [VolumeRule(config, state, config.shadow or shadow_all)] if config.enabled else []
        # Rules per class, compiled once: gate, volume, fan-out (the order they are checked).
        self._rules: dict[str, tuple[StreamRule, ...]] = {}
        for name, klass in classes.items():
            rules: list[StreamRule] = []
            if klass.approval_after >= 0:
                rules.append(GateRule(name, klass.approval_after, klass.shadow or shadow_all))
            rules += volume
            if klass.fanout_limit > 0:
                rules.append(FanoutRule(name, klass.fanout_limit, config.shadow or klass.shadow or shadow_all))
            self._rules[name] = tuple(rules)
        self._unknown_class_rules: tuple[StreamRule, ...] = tuple(volume)

    def check_message(self, message: MessageContext) -> MessageVerdict | None:
        if not message.recipients:
            return None
        state, now = self._state, message.now
        rules = self._rules.get(message.message_class, self._unknown_class_rules)
        trip = state.trips.get(message.stream)
        if trip is None and not rules:
            return None
        if trip is not None and trip.status == "cancelled":
            state.decided("reject", trip.rule, message.message_class, len(message.recipients))
            return MessageVerdict(message=Decision(
                Verdict.REJECT, trip.rule, "the stream was cancelled by an administrator", replies.STREAM_CANCELLED))
        tally = state.tally(message.stream, message.sender, message.message_class, now)
        cap = self._cap(message.sender, rules, trip)
        counts_bodies = any(isinstance(rule, FanoutRule) for rule in rules)
        decisions: dict[str, Decision] = {}
        for recipient in message.recipients:
            tally.add(recipient.key_hash, now, self._config.window, cap)
            body_recipients = (state.add_body(message.stream, message.body_hash, recipient.key_hash, now, cap)
                               if counts_bodies else 0)
            trip = self._advance(tally, state.trips.get(message.stream), rules, body_recipients, now)
            if trip is not None and trip.status == "tripped":
                decisions[recipient.mailbox.text] = self._decision(trip)
            elif trip is None and message.stream in state.shadow_trips:
                would = self._shadow_decision(state.shadow_trips[message.stream], tally)
                decisions[recipient.mailbox.text] = Decision(
                    _PASS.verdict, _PASS.rule, _PASS.reason, _PASS.reply, shadowed=(would,))
        return self._verdict(message, decisions)

    def _advance(self, tally: StreamTally, trip: BreakerRecord | None, rules: tuple[StreamRule, ...],
                 body_recipients: int, now: float) -> BreakerRecord | None:
        """The stream's trip after counting one more recipient (tripping it if needed)."""
        if trip is not None:
            if trip.status == "approved" and tally.size > (trip.ceiling or 0):
                return self._state.trip(tally, trip.rule, trip.ceiling or 0, now)
            return trip
        shadowed: Exceeded | None = None
        for rule in rules:
            exceeded = rule.exceeded(tally, body_recipients, now)
            if exceeded is None:
                continue
            if not rule.shadow:
                self._state.shadow_trips.pop(tally.stream, None)
                return self._state.trip(tally, exceeded.rule, exceeded.threshold, now)
            shadowed = shadowed or exceeded
        if shadowed is not None and tally.stream not in self._state.shadow_trips:
            self._state.shadow_trips[tally.stream] = shadowed.rule
        return None

    def _verdict(self, message: MessageContext, decisions: dict[str, Decision]) -> MessageVerdict | None:
        if not decisions:
            return None
        enforced = [d for d in decisions.values() if d.verdict is not Verdict.PASS]
        if enforced and enforced[0].verdict is Verdict.DEFER:
            # The client already got 250 for every recipient at RCPT: the only 4xx left is
            # the message's, so the recipients before the trip wait with the others.
            self._state.decided("defer", enforced[0].rule, message.message_class, len(message.recipients))
            return MessageVerdict(message=enforced[0])
        if enforced:
            self._state.decided("hold", enforced[0].rule, message.message_class, len(enforced))
        return MessageVerdict(recipients=decisions)

    def _decision(self, trip: BreakerRecord) -> Decision:
        why = (f"stream paused by {trip.rule}: more than {trip.threshold} recipients; waiting for an admin "
               "(smtp-guard breaker show)")
        if self._holds(trip.rule):
            return Decision(Verdict.HOLD, trip.rule, why, replies.HELD_FOR_REVIEW)
        return Decision(Verdict.DEFER, trip.rule, why, replies.BREAKER_DEFERRED)

    def _shadow_decision(self, rule: str, tally: StreamTally) -> Decision:
        why = f"stream would be paused by {rule} ({tally.size} recipients so far)"
        if self._holds(rule):
            return Decision(Verdict.HOLD, rule, why, replies.HELD_FOR_REVIEW)
        return Decision(Verdict.DEFER, rule, why, replies.BREAKER_DEFERRED)

    def _holds(self, rule: str) -> bool:
        return rule.startswith(GATE_PREFIX) or self._config.action == "hold"

    @staticmethod
    def _cap(sender: str, rules: tuple[StreamRule, ...], trip: BreakerRecord | None) -> int:
        """How many recipients a tally remembers exactly: well past every limit in force."""
        limits = [rule.limit(sender) for rule in rules]
        if trip is not None and trip.ceiling:
            limits.append(trip.ceiling)
        return 2 * max(limits, default=0) + 1000

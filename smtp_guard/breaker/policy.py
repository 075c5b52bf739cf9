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

The counts may be a network away (Redis, shared by every guard instance), so the policy does
not count: it returns a ``StreamAsk`` — the message's recipients and the limits in force
(``tally.CountRequest``) — and reads the counts, and the trip they claimed or found, into
decisions once the pipeline has had them counted (docs/design.md, "Scale"). A stream this
guard knows to be tripped stays held when the counts cannot be had.
"""

from __future__ import annotations

from typing import Mapping

from .. import replies
from ..config import BreakerConfig, ClassConfig
from ..policy.base import Decision, MessageContext, MessageVerdict, StreamAsk, Verdict
from .model import BreakerRecord
from .rules import GATE_PREFIX, FanoutRule, GateRule, StreamRule, VolumeRule
from .state import BreakerState
from .tally import Bound, Counted, CountRequest, exceeded

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
                rules.append(FanoutRule(klass.fanout_limit, config.shadow or klass.shadow or shadow_all))
            self._rules[name] = tuple(rules)
        self._unknown_class_rules: tuple[StreamRule, ...] = tuple(volume)

    def check_message(self, message: MessageContext) -> MessageVerdict | StreamAsk[MessageVerdict] | None:
        if not message.recipients:
            return None
        rules = self._rules.get(message.message_class, self._unknown_class_rules)
        trip = self._state.trips.get(message.stream)
        if trip is None and not rules:
            return None
        if trip is not None and trip.status == "cancelled":
            return self._cancelled(message, trip)
        request = CountRequest(
            stream=message.stream, recipients=tuple(r.key_hash for r in message.recipients),
            body=message.body_hash if any(rule.measure == "body" for rule in rules) else None,
            now=message.now, window=self._config.window, stream_idle=self._config.stream_idle,
            cap=self._cap(message.sender, rules, trip), carry=self._state.carry(message.stream, message.now),
            basis=None if trip is None else trip.decided_at, bounds=self._bounds(message.sender, rules, trip))
        shadowed = _limits(message.sender, rules, shadow=True)
        held = trip if trip is not None and trip.status == "tripped" else None
        return StreamAsk(request, lambda counted: self._answer(message, shadowed, trip, counted),
                         None if held is None else lambda: self._hold_all(message, held))

    def _answer(self, message: MessageContext, shadowed: tuple[Bound, ...], known: BreakerRecord | None,
                counted: Counted) -> MessageVerdict | None:
        """The decisions the counts mean. ``shadowed``: the limits of the rules in shadow mode;
        ``known``: the stream's trip when the count was asked."""
        state, now = self._state, message.now
        active = state.counted(message.stream, message.sender, message.message_class, counted)
        trip: BreakerRecord | None
        if counted.trip is not None and counted.claimed is not None:
            trip = state.trip(message.stream, active, counted.trip, counted.size[counted.claimed], now)
            first = counted.claimed
        elif counted.trip is not None:
            trip, first = state.adopt(message.stream, active, counted.trip, counted.size[-1], now), 0
        else:
            trip = state.trips.get(message.stream)
            first = 0 if trip is not None and trip.status == "tripped" else len(message.recipients)
        if trip is not None and trip.status == "cancelled":  # an admin cancelled it while it was counted
            return self._cancelled(message, trip)
        decisions: dict[str, Decision] = {}
        for position, recipient in enumerate(message.recipients):
            if position >= first and trip is not None and trip.status == "tripped":
                decisions[recipient.mailbox.text] = self._decision(trip)
            elif known is None:
                would = self._shadow_trip(message, shadowed, counted, position)
                if would is not None:
                    decisions[recipient.mailbox.text] = Decision(
                        _PASS.verdict, _PASS.rule, _PASS.reason, _PASS.reply, shadowed=(would,))
        return self._verdict(message, decisions)

    def _shadow_trip(self, message: MessageContext, shadowed: tuple[Bound, ...], counted: Counted,
                     position: int) -> Decision | None:
        """What the stream's shadow trip would do with the recipient at ``position`` (tripping
        it in shadow if a rule in shadow mode is exceeded there first)."""
        shadow_trips = self._state.shadow_trips
        if message.stream not in shadow_trips:
            bound = exceeded(shadowed, counted.window[position], counted.size[position], counted.body[position])
            if bound is None:
                return None
            shadow_trips[message.stream] = bound.rule
        rule = shadow_trips[message.stream]
        why = f"stream would be paused by {rule} ({counted.size[position]} recipients so far)"
        if self._holds(rule):
            return Decision(Verdict.HOLD, rule, why, replies.HELD_FOR_REVIEW)
        return Decision(Verdict.DEFER, rule, why, replies.BREAKER_DEFERRED)

    def _hold_all(self, message: MessageContext, trip: BreakerRecord) -> MessageVerdict | None:
        """Without counts: a stream this guard knows to be tripped waits all the same."""
        return self._verdict(message, {r.mailbox.text: self._decision(trip) for r in message.recipients})

    def _cancelled(self, message: MessageContext, trip: BreakerRecord) -> MessageVerdict:
        self._state.decided("reject", trip.rule, message.message_class, len(message.recipients))
        return MessageVerdict(message=Decision(
            Verdict.REJECT, trip.rule, "the stream was cancelled by an administrator", replies.STREAM_CANCELLED))

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

    def _holds(self, rule: str) -> bool:
        return rule.startswith(GATE_PREFIX) or self._config.action == "hold"

    @staticmethod
    def _bounds(sender: str, rules: tuple[StreamRule, ...], trip: BreakerRecord | None) -> tuple[Bound, ...]:
        """What trips the stream with this message: the enforced rules' limits; for an approved
        stream its ceiling, under the rule that tripped it; nothing more for a tripped one."""
        if trip is None:
            return _limits(sender, rules, shadow=False)
        if trip.status == "approved":
            return (Bound(trip.rule, "size", trip.ceiling or 0),)
        return ()

    @staticmethod
    def _cap(sender: str, rules: tuple[StreamRule, ...], trip: BreakerRecord | None) -> int:
        """How many recipients a tally remembers exactly: well past every limit in force."""
        limits = [rule.limit(sender) for rule in rules]
        if trip is not None and trip.ceiling:
            limits.append(trip.ceiling)
        return 2 * max(limits, default=0) + 1000


def _limits(sender: str, rules: tuple[StreamRule, ...], shadow: bool) -> tuple[Bound, ...]:
    """The limits of the rules enforced (or, with ``shadow``, in shadow mode), in check order."""
    return tuple(Bound(rule.rule, rule.measure, rule.limit(sender)) for rule in rules if rule.shadow == shadow)

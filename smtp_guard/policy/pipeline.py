"""The ordered policy pipeline: first decision wins, no decision means pass.

Two phases, because SMTP gives two moments to decide: recipient policies at RCPT (per
recipient, exact replies), message policies at the end of DATA (they need headers, class or
stream; they can refuse the whole message, or hold/drop recipients that already got 250).

A policy in shadow mode is asked like any other; its decision is kept as "would have" on the
final decision (logged, audited, counted) and the pipeline goes on as if it had said nothing.

A policy that raises fails closed and temporary (451 4.3.5, like Postfix's
``smtpd_policy_service_default_action``): a broken policy must never let mail through, and
must never make the platform drop it either.

A counting policy answers with an ``Ask`` (rate limits) or a ``StreamAsk`` (the breaker); the
pipeline settles it with the rate counters, or has it counted by the breaker's stream tallies,
and hands the result back. That one ``await`` is the only place a decision may wait for I/O
(the counters in Redis), and it is why ``decide`` is a coroutine although every policy is
synchronous. When the counters cannot be reached, the recipient (or the message) is deferred
with 451 4.3.0 — or, with ``[counters] on_error = "allow"``, the counting policy is passed over
and the deferral it would have meant is recorded as "would have" (logged, audited, counted),
never silently. A ``StreamAsk`` may decide without the counts instead (a stream the guard knows
to be tripped stays held).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Sequence, TypeVar

from .. import replies
from ..breaker.tally import StreamTallies
from ..config import CountersOnError
from ..counters import CountersUnavailable, RateCounters
from .base import (Ask, Decision, MessageContext, MessagePolicy, MessageVerdict, Policy, RecipientContext, StreamAsk,
                   Verdict)

log = logging.getLogger(__name__)

PASS = Decision(Verdict.PASS, "pass", "no policy objected", replies.RECIPIENT_OK)


_Opinion = TypeVar("_Opinion", Decision, MessageVerdict)


def _failed(name: str) -> Decision:
    log.exception("policy %s failed; deferring", name)
    return Decision(Verdict.DEFER, f"{name}.error", "policy raised an error", replies.POLICY_FAILED)


def _unavailable(name: str, error: CountersUnavailable, on_error: CountersOnError) -> Decision:
    """The decision a counting policy could not reach: enforced (``defer``), or only reported."""
    if on_error == "allow":
        log.warning("policy %s: counters unavailable (%s); letting the mail through uncounted "
                    "([counters] on_error = \"allow\")", name, error)
        reason = f"counters unavailable ({error}); not counted, allowed by [counters] on_error"
    else:
        log.error("policy %s: counters unavailable (%s); deferring (451 4.3.0)", name, error)
        reason = f"counters unavailable ({error})"
    return Decision(Verdict.DEFER, "counters.unavailable", reason, replies.COUNTERS_UNAVAILABLE)


@dataclass
class MessageOutcome:
    """The message phase's result: a whole-message decision, or per-recipient ones."""

    message: Decision | None = None
    recipients: dict[str, Decision] = field(default_factory=dict)
    shadowed: list[tuple[str, Decision]] = field(default_factory=list)  # (recipient or "", decision)


class Pipeline:
    def __init__(self, policies: Sequence[Policy], message_policies: Sequence[MessagePolicy] = (), *,
                 counters: RateCounters | None = None, tallies: StreamTallies | None = None,
                 on_counters_error: CountersOnError = "defer") -> None:
        """``counters``: what the rate limits' asks are settled with; ``tallies``: where the
        breaker's streams are counted (a policy asking for either fails closed without it);
        ``on_counters_error``: ``[counters] on_error``."""
        self.policies = tuple(policies)
        self.message_policies = tuple(message_policies)
        self._counters = counters
        self._tallies = tallies
        self._on_counters_error: CountersOnError = on_counters_error

    async def _settle(self, name: str, ask: Ask[_Opinion] | StreamAsk[_Opinion]) -> _Opinion | None:
        if isinstance(ask, StreamAsk):
            return await self._count(name, ask)
        if self._counters is None:
            raise RuntimeError("a counting policy in a pipeline built without rate counters")
        return ask.answer(await self._counters.settle(ask.request, ask.now))

    async def _count(self, name: str, ask: StreamAsk[_Opinion]) -> _Opinion | None:
        if self._tallies is None:
            raise RuntimeError("a counting policy in a pipeline built without stream tallies")
        try:
            counted = await self._tallies.count(ask.request)
        except CountersUnavailable as error:
            if ask.without_counts is None:
                raise
            log.warning("policy %s: counters unavailable (%s); deciding with what this guard knows", name, error)
            return ask.without_counts()
        return ask.answer(counted)

    async def decide(self, recipient: RecipientContext) -> Decision:
        shadowed: list[Decision] = []
        final = PASS
        for policy in self.policies:
            try:
                decision = policy.check(recipient)
                if isinstance(decision, Ask):
                    decision = await self._settle(policy.name, decision)
            except CountersUnavailable as error:
                decision = _unavailable(policy.name, error, self._on_counters_error)
                if self._on_counters_error == "allow":
                    shadowed.append(decision)
                    continue
                final = decision
                break
            except Exception:
                final = _failed(policy.name)
                break
            if decision is None:
                continue
            # A policy may shadow one of its rules itself: PASS carrying what it would have done.
            shadowed += decision.shadowed
            if decision.verdict is Verdict.PASS:
                continue
            if policy.shadow:
                shadowed.append(replace(decision, shadowed=()))
                continue
            final = decision
            break
        return replace(final, shadowed=tuple(shadowed)) if shadowed else final

    async def decide_message(self, message: MessageContext) -> MessageOutcome:
        outcome = MessageOutcome()
        remaining = message
        for policy in self.message_policies:
            try:
                verdict = policy.check_message(remaining)
                if isinstance(verdict, (Ask, StreamAsk)):
                    verdict = await self._settle(policy.name, verdict)
            except CountersUnavailable as error:
                unavailable = _unavailable(policy.name, error, self._on_counters_error)
                if self._on_counters_error == "allow":
                    outcome.shadowed.append(("", unavailable))
                    continue
                outcome.message = unavailable
                return outcome
            except Exception:
                outcome.message = _failed(policy.name)
                return outcome
            if verdict is None:
                continue
            if verdict.message is not None:
                if policy.shadow:
                    outcome.shadowed.append(("", verdict.message))
                else:
                    outcome.message = verdict.message
                    return outcome
            for address, decision in verdict.recipients.items():
                outcome.shadowed += [(address, d) for d in decision.shadowed]
            decided = {k: replace(d, shadowed=()) for k, d in verdict.recipients.items()
                       if d.verdict is not Verdict.PASS}
            if policy.shadow:
                outcome.shadowed += list(decided.items())
                continue
            outcome.recipients.update(decided)
            if decided:
                # Later policies only see (and count) the recipients still to be relayed.
                remaining = replace(remaining, recipients=tuple(
                    r for r in remaining.recipients if r.mailbox.text not in decided))
        return outcome

    def __repr__(self) -> str:
        names = [p.name for p in self.policies] + [f"{p.name}@data" for p in self.message_policies]
        return f"<Pipeline {' -> '.join(names)}>"

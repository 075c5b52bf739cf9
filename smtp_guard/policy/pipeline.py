"""The ordered policy pipeline: first decision wins, no decision means pass.

A policy that raises fails closed and temporary (451 4.3.5, like Postfix's
``smtpd_policy_service_default_action``): a broken policy must never let mail through, and
must never make the platform drop it either.
"""

from __future__ import annotations

import logging
from typing import Sequence

from .. import replies
from .base import Decision, Policy, RecipientContext, Verdict

log = logging.getLogger(__name__)

PASS = Decision(Verdict.PASS, "pass", "no policy objected", replies.RECIPIENT_OK)
POLICY_ERROR_REPLY = replies.Reply(451, "4.3.5", "Policy check failed, try again later")


class Pipeline:
    def __init__(self, policies: Sequence[Policy]) -> None:
        self.policies = tuple(policies)

    def decide(self, recipient: RecipientContext) -> Decision:
        for policy in self.policies:
            try:
                decision = policy.check(recipient)
            except Exception:
                log.exception("policy %s failed; deferring the recipient", policy.name)
                return Decision(Verdict.DEFER, f"{policy.name}.error", "policy raised an error", POLICY_ERROR_REPLY)
            if decision is not None:
                return decision
        return PASS

    def __repr__(self) -> str:
        return f"<Pipeline {' -> '.join(p.name for p in self.policies)}>"

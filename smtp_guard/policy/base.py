"""Policy types: what a policy sees (RecipientContext) and what it says (Decision).

A policy is a small object with one synchronous ``check`` returning a Decision, or None for
"no opinion" (Postfix DUNNO). Synchronous makes "no I/O on the hot path" structural: a policy
compiles its configuration up front and only looks things up.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from ..addresses import Mailbox
from ..replies import Reply
from ..store.base import Tombstone


class Verdict(enum.Enum):
    PASS = "pass"  # relay it
    REJECT = "reject"  # refuse the recipient (5xx)
    DEFER = "defer"  # refuse for now (4xx), the platform retries
    HOLD = "hold"  # accept, keep in the hold queue for an admin
    DROP = "drop"  # accept, never relay (counted and audited)


@dataclass(frozen=True)
class Decision:
    """One recipient's fate and why. Audit, logs, metrics and ``check`` all read this record,
    so "explain" can never disagree with "enforce"."""

    verdict: Verdict
    rule: str  # stable id such as "suppression.unsubscribed"
    reason: str  # for humans
    reply: Reply | None = None  # what the client sees at RCPT (None: the default for the verdict)
    tombstone: Tombstone | None = None  # the erasure that matched (evidence for the attempt report)


@dataclass(frozen=True)
class RecipientContext:
    """Everything known about one recipient at RCPT time."""

    mailbox: Mailbox
    key: str  # normalized matching key
    key_hash: int
    domain_chain: tuple[str, ...]  # normalized domain, then its parents
    sender: str
    client_ip: str
    auth_user: str | None = None


class Policy(Protocol):
    name: str

    def check(self, recipient: RecipientContext) -> Decision | None:
        """A decision, or None for no opinion. Must not do I/O."""

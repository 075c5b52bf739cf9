"""Policy types: what a policy sees (RecipientContext) and what it says (Decision).

A policy is a small object with one synchronous ``check`` returning a Decision, or None for
"no opinion" (Postfix DUNNO). Synchronous makes "no I/O on the hot path" structural: a policy
compiles its configuration up front and only looks things up.

A policy that counts needs the shared counters, which may be a network away (Redis). It still
does no I/O: a rate limit's ``check`` returns an ``Ask`` — the counter ``Request`` and how to
read its settlement — and the breaker's a ``StreamAsk`` — the stream's ``CountRequest`` and how
to read the counts; the pipeline has either counted (docs/design.md, "Scale").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Generic, Mapping, Protocol, TypeVar

from ..addresses import Mailbox
from ..breaker.tally import Counted, CountRequest
from ..counters import Request, Settlement
from ..erasure.model import Tombstone
from ..replies import Reply


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
    # HOLD only: release automatically at this time (hold-and-pace); None waits for an admin.
    release_at: float | None = None
    # Decisions of policies in shadow mode that would have applied ("would have rejected").
    shadowed: tuple["Decision", ...] = ()


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


@dataclass(frozen=True)
class MessageContext:
    """Everything known about a message at the end of DATA, for the policies that need its
    headers: class, stream, body. ``recipients`` are the ones still to be relayed."""

    sender: str
    client_ip: str
    auth_user: str | None
    headers: Mapping[str, str]  # lower-case name -> first value, unfolded
    subject: str
    stream: str
    message_class: str
    body_hash: str
    recipients: tuple[RecipientContext, ...]
    now: float


@dataclass(frozen=True)
class MessageVerdict:
    """A message policy's opinion: about the whole message (``message``: DEFER or REJECT it
    all), or about some recipients (HOLD or DROP them; they already got 250 at RCPT)."""

    message: Decision | None = None
    recipients: Mapping[str, Decision] = field(default_factory=dict)  # by mailbox text


_Opinion = TypeVar("_Opinion", Decision, MessageVerdict)


@dataclass(frozen=True)
class Ask(Generic[_Opinion]):
    """A counting policy's question: settle ``request`` at ``now``, then ``answer`` says what
    the settlement means (an opinion, or None). The pipeline settles it in one call to the
    counters: one round trip to Redis for all of a recipient's (or a message's) buckets."""

    request: Request
    now: float
    answer: Callable[[Settlement], _Opinion | None]


@dataclass(frozen=True)
class StreamAsk(Generic[_Opinion]):
    """The breaker's question: count ``request`` into its stream (one round trip to Redis for
    all of a message's recipients), then ``answer`` says what the counts mean. When they cannot
    be had, ``without_counts`` (if any) decides with what the policy knows already — a stream it
    knows to be tripped stays held — else the counters' failure does."""

    request: CountRequest
    answer: Callable[[Counted], _Opinion | None]
    without_counts: Callable[[], _Opinion | None] | None = None


class Policy(Protocol):
    """A recipient policy, asked at RCPT time."""

    name: str
    shadow: bool

    def check(self, recipient: RecipientContext) -> Decision | Ask[Decision] | None:
        """A decision, None for no opinion, or what to count first. Must not do I/O."""


class MessagePolicy(Protocol):
    """A message policy, asked at the end of DATA (it needs headers, class or stream)."""

    name: str
    shadow: bool

    def check_message(self, message: MessageContext,
                      ) -> MessageVerdict | Ask[MessageVerdict] | StreamAsk[MessageVerdict] | None:
        """An opinion, None, or what to count first. Must not do I/O; may update in-memory state."""

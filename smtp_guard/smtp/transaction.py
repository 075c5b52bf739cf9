"""One mail transaction, MAIL to the end of DATA: the guard's state machine, without aiosmtpd.

Per recipient, at RCPT time, the pipeline decides; a recipient that passes is offered to the
upstream at once, so the client gets the upstream's own answer for that recipient (like
Postfix's before-queue proxy). At the end of DATA the message policies may refuse the whole
message, or hold or drop recipients that already got 250 (the upstream transaction is then
started again with the rest). The message goes to the upstream for the relayed recipients and
into the durable hold queue for the held ones; the client gets 250 only when every part of
that succeeded, otherwise a 4xx (or the upstream's own 5xx).

A ``Transaction`` is made per MAIL command and driven by ``smtp/handler.py``: ``mail``, then
``rcpt`` per recipient, then ``data`` with the message. Each step returns the reply for the
client. ``end`` closes it wherever it stops (``data`` calls it; RSET, a new EHLO or a lost
connection call it through the server). Nothing here knows aiosmtpd.

Once the final dot is in, the guard's work on the message (``delivery``: policies, upstream
DATA, hold queue, outcome) runs to its end even if the client goes away meanwhile: the upstream
may already have the message, and only a finished delivery knows, logs and counts what became
of it and gives the upstream session back in a known state.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Awaitable, Callable, Literal, Sequence

from .. import replies
from ..addresses import AddressNormalizer, InvalidAddress, Mailbox, key_hash, parse_mailbox, routes_elsewhere
from ..classify import MessageClassifier, strip_headers
from ..config import BareLineEndings
from ..decision_service import MessageDecider
from ..dkim.existing import broken_signatures, is_signed
from ..metrics import Metrics
from ..policy.base import Decision, MessageContext, RecipientContext, Verdict
from ..policy.pipeline import Pipeline
from ..relay.base import Upstream, UpstreamError, UpstreamTransaction
from ..replies import Reply
from ..audit_model import AuditRecord
from ..erasure.model import ErasureAttempt
from ..hold.model import HeldRecipient, HoldStore, NewHold
from ..store.base import StoreBusy, StoreError, StoreFull
from ..wire import crlf_only, has_bare_line_ending

if TYPE_CHECKING:  # built by the front only when switched on (cryptography, dnspython)
    from ..recipient_domains import RecipientDomains
    from ..unsubscribe.headers import ListUnsubscribe
    from ..unsubscribe.inbox import UnsubscribeInbox

# The outcome line has been logged as "smtp_guard.smtp" since before this module existed
# (README, "Logging"); operators filter on that name.
log = logging.getLogger("smtp_guard.smtp")


def _failure_outcome(reply: Reply) -> Outcome:
    return "deferred" if reply.is_temporary else "refused"


# What happened to a message that reached the end of DATA (metrics.MESSAGE_OUTCOMES).
Outcome = Literal["relayed", "held", "dropped", "refused", "deferred"]


@dataclass(frozen=True, slots=True)
class Collaborators:
    """What every transaction works with: built once per listener, shared by all of them."""

    pipeline: Pipeline  # decides at RCPT
    decider: MessageDecider  # decides at the end of DATA (this process, or the supervisor's)
    upstream: Upstream
    holds: HoldStore
    normalizer: AddressNormalizer
    classifier: MessageClassifier
    metrics: Metrics
    record_audit: Callable[[AuditRecord], None]  # AuditLog.record: buffered, never blocks or raises
    record_erasure_attempts: Callable[[Sequence[ErasureAttempt]], Awaitable[None]]
    max_recipients: int
    bare_line_endings: BareLineEndings = "reject"
    strip: tuple[str, ...] = ()  # header fields removed before relaying or holding
    clock: Callable[[], float] = time.time
    # [unsubscribe]: the headers added to selected mail, and the mailto: mailbox (never relayed).
    list_unsubscribe: ListUnsubscribe | None = None
    inbox: UnsubscribeInbox | None = None
    recipient_domains: RecipientDomains | None = None  # [recipient_domains] check = true


class Transaction:
    """The guard's state of one mail transaction. Steps: ``mail``, ``rcpt``..., ``data``; ``end``.

    The collections are the transaction's record of each recipient, for reading: ``recipients``
    every one that got 250 at RCPT, in order (the list aiosmtpd's envelope shows); ``relayed``
    those the upstream transaction has; ``held`` those for the hold queue, with the decision
    that holds them (``paced``: held only until a rate limit allows them, still to be judged by
    the end-of-DATA policies); ``dropped`` those accepted and never relayed.
    """

    # One object per MAIL command, read on every RCPT: slots keep both cheap.
    __slots__ = ("_parts", "txn_id", "client", "auth_user", "sender", "mail_from", "mail_options",
                 "recipients", "upstream", "relayed", "paced", "held", "dropped", "refused",
                 "erasure_attempts", "delivery", "inbox_only", "to_inbox")

    def __init__(self, parts: Collaborators, client: str = "", auth_user: str | None = None,
                 inbox_only: bool = False) -> None:
        """``inbox_only``: a client that may not relay, allowed to write to the unsubscribe mailbox."""
        self._parts = parts
        self.inbox_only = inbox_only
        self.to_inbox = False  # the unsubscribe mailbox is a recipient: DATA is read, not relayed
        self.txn_id = secrets.token_hex(6)
        self.client = client  # the client's IP address
        self.auth_user = auth_user  # the AUTH user name, None when not authenticated
        self.sender: Mailbox | None = None  # None: the null reverse-path (or no MAIL yet)
        self.mail_from = ""  # as audited and logged: "<>" for the null reverse-path
        self.mail_options: Sequence[str] = ()
        self.recipients: list[str] = []
        self.upstream: UpstreamTransaction | None = None
        self.relayed: dict[str, RecipientContext] = {}  # in RCPT order (RCPT refuses duplicates)
        self.paced: dict[str, RecipientContext] = {}
        self.held: dict[str, Decision] = {}
        self.dropped: list[str] = []
        self.refused = 0  # RCPTs answered with a 4xx or 5xx (they count towards max_recipients)
        # Attempts to mail erased addresses, written when the transaction ends (with the stream
        # id from the headers if DATA came).
        self.erasure_attempts: list[ErasureAttempt] = []
        # The end-of-DATA work, from the final dot; it ends the transaction itself.
        self.delivery: asyncio.Task[Reply] | None = None

    def __repr__(self) -> str:
        return (f"<Transaction {self.txn_id} relayed={len(self.relayed)} held={len(self.held)} "
                f"dropped={len(self.dropped)} refused={self.refused} upstream={'open' if self.upstream else 'none'}>")

    @property
    def reverse_path(self) -> str:
        """The sender as relayed and held: "" for the null reverse-path."""
        return "" if self.sender is None else self.sender.text

    @property
    def needs_cleanup(self) -> bool:
        """``end`` has something to do: an upstream session to give back or evidence to write.
        Never once DATA has started the delivery, which ends the transaction itself (an ``end``
        beside it would give the upstream session back in the middle of its DATA command)."""
        return self.delivery is None and (self.upstream is not None or bool(self.erasure_attempts))

    # --- MAIL ----------------------------------------------------------------------------------

    def mail(self, address: str, options: Sequence[str] = ()) -> Reply:
        """MAIL FROM: ``address`` without angle brackets, "<>" for the null reverse-path
        (bounces, DSNs). Nothing reaches the upstream before the first relayed recipient."""
        if address == "<>":
            sender = None
        else:
            try:
                sender = parse_mailbox(address)
            except InvalidAddress:
                return replies.BAD_SENDER
            if not sender.text.isascii() and not _asks_for_smtputf8(options):
                return replies.NON_ASCII_SENDER
        self.sender = sender
        self.mail_from = "<>" if sender is None else sender.text
        self.mail_options = options
        return replies.SENDER_OK

    # --- RCPT ----------------------------------------------------------------------------------

    async def rcpt(self, address: str) -> Reply:
        """RCPT TO: the pipeline's decision; a passing recipient gets the upstream's own reply."""
        parts = self._parts
        if len(self.recipients) + self.refused >= parts.max_recipients:
            self._count(Verdict.DEFER, "limits.max_recipients")
            return replies.TOO_MANY_RECIPIENTS
        if address in self.recipients:
            # Named twice: one delivery, as from any MTA (and never relayed once and held once).
            return replies.DUPLICATE_RECIPIENT
        if parts.inbox is not None and parts.inbox.is_inbox(address):
            self.to_inbox = True
            self.recipients.append(address)
            return replies.RECIPIENT_OK
        if self.inbox_only:
            self.refused += 1
            parts.metrics.relay_denied.inc()
            return replies.RELAY_DENIED
        try:
            mailbox = parse_mailbox(address)
            key = parts.normalizer.key(mailbox)
            chain = tuple(parts.normalizer.domain_chain(mailbox.domain))
        except InvalidAddress:
            self.refused += 1
            self._count(Verdict.REJECT, "address.invalid")
            return replies.BAD_RECIPIENT
        if not mailbox.text.isascii() and not _asks_for_smtputf8(self.mail_options):
            self.refused += 1
            self._count(Verdict.REJECT, "address.non_ascii")
            return replies.NON_ASCII_RECIPIENT
        if routes_elsewhere(mailbox):
            self.refused += 1
            self._record(mailbox.text, Decision(Verdict.REJECT, "address.routing",
                                                "local part routes elsewhere (%, ! or a quoted @)",
                                                replies.ROUTED_RECIPIENT))
            return replies.ROUTED_RECIPIENT
        context = RecipientContext(
            mailbox=mailbox, key=key, key_hash=key_hash(key), domain_chain=chain,
            sender=self.mail_from, client_ip=self.client, auth_user=self.auth_user,
        )
        decision = await parts.pipeline.decide(context)
        for shadowed in decision.shadowed:
            self._record_shadow(mailbox.text, shadowed)
        if decision.tombstone is not None:
            self._note_erasure_attempt(decision)
        if parts.recipient_domains is not None and (
                decision.verdict is Verdict.PASS or decision.verdict is Verdict.HOLD and decision.release_at is not None):
            # Only for recipients on their way to the upstream (relayed now, or paced): the
            # pipeline's own refusals and holds keep their reasons.
            decision = await self._check_domain(parts.recipient_domains, mailbox, decision)
        if decision.verdict is Verdict.PASS:
            return await self._relay(context, decision)
        reply = decision.reply or replies.RECIPIENT_OK
        if decision.verdict is Verdict.HOLD:
            self.held[mailbox.text] = decision
            if decision.release_at is not None:
                # Paced, not stopped: the end-of-DATA policies (gates, breaker, marketing
                # lists) must still judge this recipient.
                self.paced[mailbox.text] = context
            self.recipients.append(mailbox.text)
        elif decision.verdict is Verdict.DROP:
            self.dropped.append(mailbox.text)
            self.recipients.append(mailbox.text)
        else:
            self.refused += 1
        self._record(mailbox.text, decision)
        return reply

    async def _check_domain(self, domains: RecipientDomains, mailbox: Mailbox, decision: Decision) -> Decision:
        """The recipient domain check: its refusal or deferral replaces the pipeline's pass
        (in shadow mode it is only recorded as "would have")."""
        found = await domains.check(mailbox.domain)
        if found is None:
            return decision
        if domains.shadow:
            self._record_shadow(mailbox.text, found)
            return decision
        return found

    async def _relay(self, context: RecipientContext, decision: Decision) -> Reply:
        """Offer a passing recipient to the upstream; its answer is the client's answer."""
        parts = self._parts
        address = context.mailbox.text
        if self.upstream is None:
            started = time.monotonic()
            try:
                self.upstream = await parts.upstream.begin(self.reverse_path, _relayable_options(self.mail_options))
            except UpstreamError as error:
                self._count_upstream_error(error.reply)
                self.refused += 1
                self._record(address, _upstream_decision(error.reply, "upstream.mail"))
                return error.reply
            finally:
                parts.metrics.upstream_duration.labels("mail").observe(time.monotonic() - started)
        started = time.monotonic()
        reply = await self.upstream.rcpt(address)
        parts.metrics.upstream_duration.labels("rcpt").observe(time.monotonic() - started)
        if reply.is_success:
            self.relayed[address] = context
            self.recipients.append(address)
            self._record(address, decision)
            return reply
        self._count_upstream_error(reply)
        self.refused += 1
        self._record(address, _upstream_decision(reply, "upstream.rcpt"))
        return reply

    # --- end of DATA ---------------------------------------------------------------------------

    async def data(self, content: bytes, trace: bytes = b"") -> Reply:
        """The message is in (``content``, dot-unstuffed): decide, relay, hold; the final reply.
        ``trace`` (the guard's Received header, or nothing) goes on top of what is relayed and
        held. The transaction ends here, whatever happens.

        The work runs as ``delivery``, a task of its own that cancelling the caller does not
        cancel: aiosmtpd cancels its session task when the client disconnects, and the client
        may well disconnect while the upstream is answering DATA (one task per message,
        ~10 us of the ~1.5 ms of CPU a message costs)."""
        self.delivery = asyncio.get_running_loop().create_task(self._deliver_and_end(content, trace))
        return await asyncio.shield(self.delivery)

    async def _deliver_and_end(self, content: bytes, trace: bytes) -> Reply:
        parts = self._parts
        try:
            message = parts.classifier.context(
                content, self.reverse_path, self.client, self.auth_user,
                [*self.relayed.values(), *self.paced.values()], parts.clock())
            if self.erasure_attempts:
                self.erasure_attempts = [replace(a, stream=message.stream) for a in self.erasure_attempts]
            reply, outcome = await self._deliver(content, message, trace)
        finally:
            await self.end()
        parts.metrics.messages.labels(outcome).inc()
        log.info("txn=%s client=%s from=<%s> relayed=%d held=%d dropped=%d refused=%d size=%d outcome=%s reply=%r",
                 self.txn_id, self.client, self.mail_from, len(self.relayed), len(self.held),
                 len(self.dropped), self.refused, len(content), outcome, str(reply))
        return reply

    async def _deliver(self, content: bytes, message: MessageContext, trace: bytes) -> tuple[Reply, Outcome]:
        received = content
        if b"\x00" in content:
            return replies.NUL_IN_MESSAGE, "refused"
        if self.to_inbox:
            assert self._parts.inbox is not None
            inbox_reply = await self._parts.inbox.receive(content)
            if not (self.relayed or self.held or self.dropped or self.paced):
                return inbox_reply, "dropped" if inbox_reply.is_success else _failure_outcome(inbox_reply)
        if has_bare_line_ending(content):
            # One message in must be exactly one message out (SMTP smuggling): refuse, or turn
            # every bare CR/LF into CRLF so the upstream sees the same line structure we saw.
            if self._parts.bare_line_endings == "reject":
                return replies.BARE_LINE_ENDING, "refused"
            content = crlf_only(content)
        refusal = await self._apply_message_policies(message)
        if refusal is not None:
            return refusal
        # The guard's own headers go on here, after stripping; the upstream and the hold queue
        # get the same bytes, and a DKIM signature (relay/signing.py) is made over them last.
        content = strip_headers(content, self._parts.strip)
        if self._parts.list_unsubscribe is not None:
            content, done = self._parts.list_unsubscribe.decorate(content, message, self._delivery_keys())
            self._parts.metrics.list_unsubscribe.labels(done).inc()
        content = trace + content  # the trace field on top (RFC 5321 section 4.4)
        if is_signed(received):
            self._check_platform_signatures(received, content)
        upstream_reply: Reply | None = None
        if self.relayed:
            assert self.upstream is not None
            started = time.monotonic()
            upstream_reply = await self.upstream.data(content)
            self._parts.metrics.upstream_duration.labels("data").observe(time.monotonic() - started)
            if not upstream_reply.is_success:
                self._count_upstream_error(upstream_reply)
                return upstream_reply, "deferred" if upstream_reply.is_temporary else "refused"
        if self.held:
            failure = await self._hold(content, message)
            if failure is not None:
                return failure, "deferred"
            if upstream_reply is None:
                paced = all(d.release_at is not None for d in self.held.values())
                return (replies.QUEUED_PACED if paced else replies.QUEUED_HELD), "held"
        if upstream_reply is not None:
            return upstream_reply, "relayed"
        return replies.ACCEPTED_NOT_RELAYED, "dropped"

    def _delivery_keys(self) -> list[str]:
        """The matching keys of everyone this message goes to, now or when released."""
        keys = [context.key for context in self.relayed.values()]
        keys += [self._parts.normalizer.key(address) for address in self.held if address not in self.relayed]
        return keys

    def _check_platform_signatures(self, received: bytes, relayed: bytes) -> None:
        """Say when a change the guard made breaks the platform's own DKIM signature: the mail
        still goes (the guard's own signature, if configured, covers what leaves)."""
        for domain in broken_signatures(received, relayed):
            self._parts.metrics.dkim_broken_signatures.inc()
            log.warning("txn=%s the guard's changes (stripped headers or normalized line endings) break the "
                        "platform's DKIM signature d=%s; relaying it anyway: sign with [[dkim.keys]] or stop "
                        "stripping a signed header", self.txn_id, domain)

    async def _hold(self, content: bytes, message: MessageContext) -> Reply | None:
        """Store the held recipients durably; the reply for the client if that failed."""
        try:
            hold_id = await self._parts.holds.hold(NewHold(
                txn_id=self.txn_id, client=self.client, sender=self.reverse_path,
                mail_options=tuple(self.mail_options), content=content,
                recipients=[_held_recipient(address, d) for address, d in self.held.items()],
                stream=message.stream, message_class=message.message_class,
            ))
        except StoreError as error:
            # If the relayed part was accepted upstream, a retry duplicates it; a 250 here
            # would lose the held part. Duplicates are the lesser harm. Nothing was stored:
            # a full disk or a store locked past [store] busy_timeout is temporary.
            reply = replies.STORE_FULL if isinstance(error, StoreFull) else replies.STORE_UNAVAILABLE
            if isinstance(error, (StoreFull, StoreBusy)):
                log.error("txn=%s could not store held message (%s); answering %s", self.txn_id, error, reply.code)
            else:
                log.exception("txn=%s could not store held message; answering %s", self.txn_id, reply.code)
            return reply
        log.info("txn=%s held as %s for %d recipient(s)", self.txn_id, hold_id, len(self.held))
        return None

    async def _apply_message_policies(self, message: MessageContext) -> tuple[Reply, Outcome] | None:
        """Run the end-of-DATA policies. Returns the reply when the whole message is refused;
        otherwise takes the recipients they hold or drop out of the relayed set."""
        if not self._parts.pipeline.message_policies:
            return None
        outcome = await self._parts.decider.decide_message(message)
        for address, shadowed in outcome.shadowed:
            self._record_shadow(address, shadowed)
        decided = outcome.recipients
        decision = outcome.message
        if decision is not None:
            judged = [*self.relayed, *self.paced]
            # Paced recipients were only waiting for a token: a refusal of the message is theirs too.
            for address in self.paced:
                del self.held[address]
            self.paced.clear()
            if decision.verdict is Verdict.REJECT and (self.held or self.dropped):
                # Some recipients are held or dropped for reasons of their own (they got 250 at
                # RCPT): a 5xx for the message would lie about them, so the refused ones are
                # left out (dropped, audited) and the rest is kept.
                decided = {address: replace(decision, verdict=Verdict.DROP) for address in self.relayed}
                for address in judged:
                    if address not in self.relayed:
                        self.dropped.append(address)
                        self._record(address, replace(decision, verdict=Verdict.DROP))
            else:
                for address in judged:
                    self._record(address, decision)
                reply = decision.reply or (replies.DEFERRED if decision.verdict is Verdict.DEFER else replies.REFUSED)
                return reply, "deferred" if reply.is_temporary else "refused"
        changed = False
        for address, recipient_decision in decided.items():
            if address in self.paced:
                self._overrule_pacing(address, recipient_decision)
                self._record(address, recipient_decision)
                continue
            if address not in self.relayed:
                continue
            changed = True
            del self.relayed[address]
            if recipient_decision.verdict is Verdict.HOLD:
                self.held[address] = recipient_decision
            else:
                self.dropped.append(address)
            self._record(address, recipient_decision)
        if changed:
            failure = await self._restart_upstream()
            if failure is not None:
                return failure, "deferred"
        return None

    def _overrule_pacing(self, address: str, decision: Decision) -> None:
        """An end-of-DATA decision on a recipient held only for pacing: a stop (gate, breaker:
        HOLD without release time) or a drop replaces the pacing; a later release time wins."""
        paced = self.held.pop(address)
        del self.paced[address]
        if decision.verdict is Verdict.DROP:
            self.dropped.append(address)
        elif decision.release_at is not None and paced.release_at is not None and paced.release_at > decision.release_at:
            self.held[address] = paced
        else:
            self.held[address] = decision

    async def _restart_upstream(self) -> Reply | None:
        """The upstream already has RCPTs for recipients now held or dropped: start its
        transaction again with only the ones to relay (RSET, MAIL, RCPT...)."""
        old, self.upstream = self.upstream, None
        if old is not None:
            await old.finish()
        if not self.relayed:
            return None
        try:
            self.upstream = await self._parts.upstream.begin(self.reverse_path, _relayable_options(self.mail_options))
        except UpstreamError as error:
            self._count_upstream_error(error.reply)
            return error.reply if error.reply.is_temporary else replies.UPSTREAM_CHANGED
        for address in self.relayed:
            reply = await self.upstream.rcpt(address)
            if not reply.is_success:
                self._count_upstream_error(reply)
                return replies.UPSTREAM_CHANGED
        return None

    # --- transaction end -----------------------------------------------------------------------

    async def end(self) -> None:
        """End the transaction (after DATA, at RSET, a new EHLO or a lost connection): write the
        evidence of any attempt to mail an erased address, and give the upstream session back.
        Never raises for the evidence; a second call has nothing left to do."""
        # Evidence first: finishing the upstream session (an RSET) may take a while.
        if self.erasure_attempts:
            attempts, self.erasure_attempts = self.erasure_attempts, []
            try:
                await self._parts.record_erasure_attempts(attempts)
            except Exception:
                log.exception("txn=%s could not record %d erasure attempt(s)", self.txn_id, len(attempts))
        if self.upstream is not None:
            upstream, self.upstream = self.upstream, None
            await upstream.finish()

    def _note_erasure_attempt(self, decision: Decision) -> None:
        tombstone = decision.tombstone
        assert tombstone is not None
        self._parts.metrics.erasure_attempts.inc()
        # The address is never logged: the erasure reference identifies the case.
        log.warning("txn=%s client=%s from=<%s> tried to mail an erased address (erasure reference %s)",
                    self.txn_id, self.client, self.mail_from, tombstone.reference)
        self.erasure_attempts.append(ErasureAttempt(
            time=self._parts.clock(), tombstone_id=tombstone.id, reference=tombstone.reference,
            client=self.client, sender=self.mail_from, stream="", txn_id=self.txn_id))

    # --- bookkeeping ---------------------------------------------------------------------------

    def _record(self, recipient: str, decision: Decision) -> None:
        self._count(decision.verdict, decision.rule)
        self._parts.record_audit(AuditRecord(
            time=self._parts.clock(), kind="decision", verdict=decision.verdict.value, rule=decision.rule,
            reason=decision.reason, txn_id=self.txn_id, client=self.client, sender=self.mail_from,
            recipient=recipient, actor=self.auth_user or "",
        ))

    def _record_shadow(self, recipient: str, decision: Decision) -> None:
        """A shadow-mode decision: logged, audited and counted as "would have", not enforced."""
        self._parts.metrics.shadow_decisions.labels(decision.verdict.value, decision.rule).inc()
        log.info("txn=%s shadow: would have %s (%s: %s)", self.txn_id, decision.verdict.value, decision.rule,
                 decision.reason)
        self._parts.record_audit(AuditRecord(
            time=self._parts.clock(), kind="decision", verdict=f"shadow-{decision.verdict.value}",
            rule=decision.rule, reason=f"shadow mode, not enforced: {decision.reason}", txn_id=self.txn_id,
            client=self.client, sender=self.mail_from, recipient=recipient, actor=self.auth_user or "",
        ))

    def _count(self, verdict: Verdict, rule: str) -> None:
        self._parts.metrics.recipients.labels(verdict.value, rule).inc()

    def _count_upstream_error(self, reply: Reply) -> None:
        if reply in (replies.UPSTREAM_LOST, replies.UPSTREAM_UNAVAILABLE, replies.UPSTREAM_BUSY,
                     replies.UPSTREAM_OUT_OF_PROTOCOL):  # the session is dropped, as for a lost one
            error_class = "connection"
        elif reply is replies.UPSTREAM_TIMEOUT:
            error_class = "timeout"
        else:
            error_class = "4xx" if reply.is_temporary else "5xx"
        self._parts.metrics.upstream_errors.labels(error_class).inc()


def _held_recipient(address: str, decision: Decision) -> HeldRecipient:
    # Hold-and-pace: a recipient with a release time goes straight to the release worker.
    if decision.release_at is not None:
        return HeldRecipient(address, "released", decision.rule, decision.reason, next_attempt_at=decision.release_at)
    return HeldRecipient(address, "held", decision.rule, decision.reason)


def _upstream_decision(reply: Reply, rule: str) -> Decision:
    verdict = Verdict.DEFER if reply.is_temporary else Verdict.REJECT
    return Decision(verdict, rule, f"upstream answered {reply}", reply)


def _asks_for_smtputf8(mail_options: Sequence[str]) -> bool:
    return any(option.upper() == "SMTPUTF8" for option in mail_options)


def _relayable_options(mail_options: Sequence[str]) -> list[str]:
    # BODY and SMTPUTF8 describe the content and must reach the upstream; SIZE is ours.
    return [o for o in mail_options if o.split("=")[0] in ("BODY", "SMTPUTF8")]

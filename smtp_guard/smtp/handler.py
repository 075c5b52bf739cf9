"""The aiosmtpd handler: SMTP front -> policy pipeline -> relay (lock-step) or hold.

Per recipient, at RCPT time, the pipeline decides; a recipient that passes is offered to the
upstream at once, so the client gets the upstream's own answer for that recipient (like
Postfix's before-queue proxy). At the end of DATA the message goes to the upstream for the
relayed recipients and into the durable hold queue for the held ones; the client gets 250
only when every part of that succeeded, otherwise a 4xx (or the upstream's own 5xx).
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Sequence

from .. import replies
from ..addresses import AddressNormalizer, InvalidAddress, Mailbox, key_hash, parse_mailbox
from ..audit import AuditLog
from ..audit_model import AuditRecord
from ..classify import MessageClassifier, strip_headers
from ..config import SMTPConfig
from ..erasure.model import ErasureAttempt
from ..hold.model import HeldRecipient, HoldStore, NewHold
from ..metrics import Metrics
from ..policy.base import Decision, MessageContext, RecipientContext, Verdict
from ..policy.pipeline import MessageOutcome, Pipeline
from ..relay.base import Upstream, UpstreamError, UpstreamTransaction
from ..replies import Reply
from ..store.base import StoreBusy, StoreError, StoreFull
from .access import AccessControl
from .trace import protocol_name, received_header

log = logging.getLogger("smtp_guard.smtp")

_BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@dataclass
class Transaction:
    """Guard state of one mail transaction, kept on the aiosmtpd envelope."""

    txn_id: str
    sender: Mailbox | None
    upstream: UpstreamTransaction | None = None
    # Recipients the upstream accepted at RCPT, in order (a dict: RCPT refuses duplicates).
    relayed: dict[str, RecipientContext] = field(default_factory=dict)
    paced_contexts: dict[str, RecipientContext] = field(default_factory=dict)  # held only to pace them
    held: list[tuple[str, Decision]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    refused: int = 0
    # Attempts to mail erased addresses, written when the transaction ends (with the stream
    # id from the headers if DATA came).
    erasure_attempts: list[ErasureAttempt] = field(default_factory=list)

    @property
    def needs_cleanup(self) -> bool:
        return self.upstream is not None or bool(self.erasure_attempts)


def _client_ip(session: Any) -> str:
    peer = getattr(session, "peer", None)
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


def _txn(envelope: Any) -> Transaction | None:
    return getattr(envelope, "guard_txn", None)


class GuardHandler:
    """aiosmtpd hooks. Thin: validation, then the pipeline, then relay or hold."""

    def __init__(self, *, smtp_config: SMTPConfig, access: AccessControl, auth_enabled: bool,
                 normalizer: AddressNormalizer, pipeline: Pipeline, upstream: Upstream, holds: HoldStore,
                 audit: AuditLog, metrics: Metrics,
                 record_erasure_attempts: Callable[[Sequence[ErasureAttempt]], Awaitable[None]],
                 classifier: MessageClassifier, strip: Sequence[str] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self._config = smtp_config
        self._access = access
        self._auth_enabled = auth_enabled
        self._normalizer = normalizer
        self._pipeline = pipeline
        self._upstream = upstream
        self._holds = holds
        self._audit = audit
        self._metrics = metrics
        self._record_erasure_attempts = record_erasure_attempts
        self._classifier = classifier
        self._strip = tuple(strip)
        self._clock = clock

    # --- session -------------------------------------------------------------------------------

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        # aiosmtpd leaves host_name to a new-style EHLO hook; without it MAIL says "send HELO".
        session.host_name = hostname
        # aiosmtpd reads commands strictly in order, so pipelined commands are honoured as
        # long as it is advertised (RFC 2920); enhanced codes are in every reply we send.
        return responses[:-1] + ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_exception(self, error: Exception) -> str:
        # Fail closed and temporary; the client never sees exception text.
        log.exception("internal error in an SMTP session; answering 451")
        return str(replies.INTERNAL_ERROR)

    # --- MAIL ----------------------------------------------------------------------------------

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        client_ip = _client_ip(session)
        if not (self._access.is_allowed_network(client_ip) or session.authenticated):
            self._metrics.relay_denied.inc()
            log.info("relay denied for client %s (not in [access] allow_networks, not authenticated)", client_ip)
            return str(replies.AUTH_REQUIRED if self._auth_enabled else replies.RELAY_DENIED)
        if address == "<>":
            sender = None  # null reverse-path (bounces, DSNs)
        else:
            try:
                sender = parse_mailbox(address)
            except InvalidAddress:
                return str(replies.BAD_SENDER)
        # aiosmtpd treats an empty mail_from as "no MAIL yet", so the null path stays "<>"
        # on the envelope and becomes "" only when it is relayed or held.
        envelope.mail_from = "<>" if sender is None else sender.text
        envelope.mail_options.extend(mail_options)
        envelope.guard_txn = Transaction(txn_id=secrets.token_hex(6), sender=sender)
        return str(replies.SENDER_OK)

    # --- RCPT ----------------------------------------------------------------------------------

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        txn = _txn(envelope)
        if txn is None:  # MAIL was refused; aiosmtpd already requires MAIL first
            return str(replies.NEED_MAIL)
        if len(envelope.rcpt_tos) + txn.refused >= self._config.max_recipients:
            self._count(Verdict.DEFER, "limits.max_recipients")
            return str(replies.TOO_MANY_RECIPIENTS)
        if address in envelope.rcpt_tos:
            # Named twice: one delivery, as from any MTA (and never relayed once and held once).
            return str(replies.DUPLICATE_RECIPIENT)
        try:
            mailbox = parse_mailbox(address)
            key = self._normalizer.key(mailbox)
            chain = tuple(self._normalizer.domain_chain(mailbox.domain))
        except InvalidAddress:
            txn.refused += 1
            self._count(Verdict.REJECT, "address.invalid")
            return str(replies.BAD_RECIPIENT)
        context = RecipientContext(
            mailbox=mailbox, key=key, key_hash=key_hash(key), domain_chain=chain,
            sender=envelope.mail_from, client_ip=_client_ip(session), auth_user=_auth_user(session),
        )
        decision = self._pipeline.decide(context)
        for shadowed in decision.shadowed:
            self._record_shadow(txn, session, envelope, mailbox.text, shadowed)
        if decision.tombstone is not None:
            self._note_erasure_attempt(txn, session, envelope, decision)
        if decision.verdict is Verdict.PASS:
            reply, decision = await self._relay_recipient(txn, envelope, context, decision)
        else:
            reply = decision.reply or replies.RECIPIENT_OK
            if decision.verdict is Verdict.HOLD:
                txn.held.append((mailbox.text, decision))
                if decision.release_at is not None:
                    # Paced, not stopped: the end-of-DATA policies (gates, breaker, marketing
                    # lists) must still judge this recipient.
                    txn.paced_contexts[mailbox.text] = context
                envelope.rcpt_tos.append(mailbox.text)
            elif decision.verdict is Verdict.DROP:
                txn.dropped.append(mailbox.text)
                envelope.rcpt_tos.append(mailbox.text)
            else:
                txn.refused += 1
        self._record(txn, session, envelope, mailbox.text, decision)
        return str(reply)

    async def _relay_recipient(self, txn: Transaction, envelope: Any, context: RecipientContext,
                               decision: Decision) -> tuple[Reply, Decision]:
        """Offer a passing recipient to the upstream; its answer is the client's answer."""
        if txn.upstream is None:
            started = time.monotonic()
            try:
                txn.upstream = await self._upstream.begin(_reverse_path(txn), _relayable_options(envelope))
            except UpstreamError as error:
                self._count_upstream_error(error.reply)
                txn.refused += 1
                return error.reply, _upstream_decision(error.reply, "upstream.mail")
            finally:
                self._metrics.upstream_duration.labels("mail").observe(time.monotonic() - started)
        mailbox = context.mailbox
        started = time.monotonic()
        reply = await txn.upstream.rcpt(mailbox.text)
        self._metrics.upstream_duration.labels("rcpt").observe(time.monotonic() - started)
        if reply.is_success:
            txn.relayed[mailbox.text] = context
            envelope.rcpt_tos.append(mailbox.text)
            return reply, decision
        self._count_upstream_error(reply)
        txn.refused += 1
        return reply, _upstream_decision(reply, "upstream.rcpt")

    # --- DATA ----------------------------------------------------------------------------------

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        txn = _txn(envelope)
        if txn is None:
            return str(replies.INTERNAL_ERROR)
        content: bytes = envelope.original_content
        try:
            message = self._classifier.context(
                content, _reverse_path(txn), _client_ip(session), _auth_user(session),
                [*txn.relayed.values(), *txn.paced_contexts.values()], self._clock())
            if txn.erasure_attempts:
                txn.erasure_attempts = [replace(a, stream=message.stream) for a in txn.erasure_attempts]
            trace = self._trace(server, session, txn)
            reply, outcome = await self._deliver(txn, session, envelope, content, message, trace)
        finally:
            await self.abandon(envelope)
        self._metrics.messages.labels(outcome).inc()
        log.info("txn=%s client=%s from=<%s> relayed=%d held=%d dropped=%d refused=%d size=%d outcome=%s reply=%r",
                 txn.txn_id, _client_ip(session), envelope.mail_from, len(txn.relayed), len(txn.held),
                 len(txn.dropped), txn.refused, len(content), outcome, str(reply))
        return str(reply)

    def _trace(self, server: Any, session: Any, txn: Transaction) -> bytes:
        """The headers the guard adds to what it relays and holds (empty when switched off)."""
        if not self._config.received_header:
            return b""
        protocol = protocol_name(extended=bool(session.extended_smtp), tls=session.ssl is not None,
                                 authenticated=bool(session.authenticated))
        return received_header(helo=session.host_name or "", client_ip=_client_ip(session),
                               hostname=server.hostname, protocol=protocol, txn_id=txn.txn_id,
                               when=self._clock())

    async def _deliver(self, txn: Transaction, session: Any, envelope: Any, content: bytes,
                       message: MessageContext, trace: bytes = b"") -> tuple[Reply, str]:
        if b"\x00" in content:
            return replies.NUL_IN_MESSAGE, "refused"
        if _BARE_CR_OR_LF.search(content):
            # One message in must be exactly one message out (SMTP smuggling): refuse, or turn
            # every bare CR/LF into CRLF so the upstream sees the same line structure we saw.
            if self._config.bare_line_endings == "reject":
                return replies.BARE_LINE_ENDING, "refused"
            content = _BARE_CR_OR_LF.sub(b"\r\n", content)
        refusal = await self._apply_message_policies(txn, session, envelope, message)
        if refusal is not None:
            return refusal
        # The guard's own headers go on here, after stripping and before anything (such as a
        # DKIM signature) is computed over the content, so upstream and hold queue get the same bytes.
        content = trace + strip_headers(content, self._strip)
        upstream_reply: Reply | None = None
        if txn.relayed:
            assert txn.upstream is not None
            started = time.monotonic()
            upstream_reply = await txn.upstream.data(content)
            self._metrics.upstream_duration.labels("data").observe(time.monotonic() - started)
            if not upstream_reply.is_success:
                self._count_upstream_error(upstream_reply)
                return upstream_reply, "deferred" if upstream_reply.is_temporary else "refused"
        if txn.held:
            try:
                hold_id = await self._holds.hold(NewHold(
                    txn_id=txn.txn_id, client=_client_ip(session), sender=_reverse_path(txn),
                    mail_options=tuple(envelope.mail_options), content=content,
                    recipients=[_held_recipient(address, d) for address, d in txn.held],
                    stream=message.stream, message_class=message.message_class,
                ))
            except StoreError as error:
                # If the relayed part was accepted upstream, a retry duplicates it; a 250 here
                # would lose the held part. Duplicates are the lesser harm. Nothing was stored:
                # a full disk or a store locked past [store] busy_timeout is temporary.
                reply = replies.STORE_FULL if isinstance(error, StoreFull) else replies.STORE_UNAVAILABLE
                if isinstance(error, (StoreFull, StoreBusy)):
                    log.error("txn=%s could not store held message (%s); answering %s", txn.txn_id, error,
                              reply.code)
                else:
                    log.exception("txn=%s could not store held message; answering %s", txn.txn_id, reply.code)
                return reply, "deferred"
            log.info("txn=%s held as %s for %d recipient(s)", txn.txn_id, hold_id, len(txn.held))
            if upstream_reply is None:
                paced = all(d.release_at is not None for _, d in txn.held)
                return (replies.QUEUED_PACED if paced else replies.QUEUED_HELD), "held"
        if upstream_reply is not None:
            return upstream_reply, "relayed"
        return replies.ACCEPTED_NOT_RELAYED, "dropped"

    async def _apply_message_policies(self, txn: Transaction, session: Any, envelope: Any,
                                      message: MessageContext) -> tuple[Reply, str] | None:
        """Run the end-of-DATA policies. Returns the reply when the whole message is refused;
        otherwise takes the recipients they hold or drop out of the relayed set."""
        if not self._pipeline.message_policies:
            return None
        outcome: MessageOutcome = self._pipeline.decide_message(message)
        for address, shadowed in outcome.shadowed:
            self._record_shadow(txn, session, envelope, address, shadowed)
        decision = outcome.message
        if decision is not None:
            judged = [*txn.relayed, *txn.paced_contexts]
            # Paced recipients were only waiting for a token: a refusal of the message is theirs too.
            txn.held = [(a, d) for a, d in txn.held if a not in txn.paced_contexts]
            txn.paced_contexts.clear()
            if decision.verdict is Verdict.REJECT and (txn.held or txn.dropped):
                # Some recipients are held or dropped for reasons of their own (they got 250 at
                # RCPT): a 5xx for the message would lie about them, so the refused ones are
                # left out (dropped, audited) and the rest is kept.
                outcome.recipients = {a: replace(decision, verdict=Verdict.DROP) for a in txn.relayed}
                for address in judged:
                    if address not in txn.relayed:
                        txn.dropped.append(address)
                        self._record(txn, session, envelope, address, replace(decision, verdict=Verdict.DROP))
            else:
                for address in judged:
                    self._record(txn, session, envelope, address, decision)
                reply = decision.reply or (replies.DEFERRED if decision.verdict is Verdict.DEFER else replies.REFUSED)
                return reply, "deferred" if reply.is_temporary else "refused"
        changed = False
        for address, recipient_decision in outcome.recipients.items():
            if address in txn.paced_contexts:
                self._overrule_pacing(txn, address, recipient_decision)
                self._record(txn, session, envelope, address, recipient_decision)
                continue
            if address not in txn.relayed:
                continue
            changed = True
            del txn.relayed[address]
            if recipient_decision.verdict is Verdict.HOLD:
                txn.held.append((address, recipient_decision))
            else:
                txn.dropped.append(address)
            self._record(txn, session, envelope, address, recipient_decision)
        if changed:
            failure = await self._restart_upstream(txn, envelope)
            if failure is not None:
                return failure, "deferred"
        return None

    @staticmethod
    def _overrule_pacing(txn: Transaction, address: str, decision: Decision) -> None:
        """An end-of-DATA decision on a recipient held only for pacing: a stop (gate, breaker:
        HOLD without release time) or a drop replaces the pacing; a later release time wins."""
        paced = dict(txn.held)[address]
        txn.held = [(a, d) for a, d in txn.held if a != address]
        del txn.paced_contexts[address]
        if decision.verdict is Verdict.DROP:
            txn.dropped.append(address)
        elif decision.release_at is not None and paced.release_at is not None and paced.release_at > decision.release_at:
            txn.held.append((address, paced))
        else:
            txn.held.append((address, decision))

    async def _restart_upstream(self, txn: Transaction, envelope: Any) -> Reply | None:
        """The upstream already has RCPTs for recipients now held or dropped: start its
        transaction again with only the ones to relay (RSET, MAIL, RCPT...)."""
        old, txn.upstream = txn.upstream, None
        if old is not None:
            await old.finish()
        if not txn.relayed:
            return None
        try:
            txn.upstream = await self._upstream.begin(_reverse_path(txn), _relayable_options(envelope))
        except UpstreamError as error:
            self._count_upstream_error(error.reply)
            return error.reply if error.reply.is_temporary else replies.UPSTREAM_CHANGED
        for address in txn.relayed:
            reply = await txn.upstream.rcpt(address)
            if not reply.is_success:
                self._count_upstream_error(reply)
                return replies.UPSTREAM_CHANGED
        return None

    # --- transaction end -----------------------------------------------------------------------

    async def abandon(self, envelope: Any) -> None:
        """End a transaction (DATA, RSET, disconnect): release its upstream session and write
        the evidence of any attempt to mail an erased address."""
        txn = _txn(envelope)
        if txn is None:
            return
        # Evidence first: finishing the upstream session (an RSET) may take a while.
        if txn.erasure_attempts:
            attempts, txn.erasure_attempts = txn.erasure_attempts, []
            try:
                await self._record_erasure_attempts(attempts)
            except Exception:
                log.exception("txn=%s could not record %d erasure attempt(s)", txn.txn_id, len(attempts))
        if txn.upstream is not None:
            upstream, txn.upstream = txn.upstream, None
            await upstream.finish()

    def _note_erasure_attempt(self, txn: Transaction, session: Any, envelope: Any, decision: Decision) -> None:
        tombstone = decision.tombstone
        assert tombstone is not None
        self._metrics.erasure_attempts.inc()
        # The address is never logged: the erasure reference identifies the case.
        log.warning("txn=%s client=%s from=<%s> tried to mail an erased address (erasure reference %s)",
                    txn.txn_id, _client_ip(session), envelope.mail_from, tombstone.reference)
        txn.erasure_attempts.append(ErasureAttempt(
            time=self._clock(), tombstone_id=tombstone.id, reference=tombstone.reference,
            client=_client_ip(session), sender=envelope.mail_from, stream="", txn_id=txn.txn_id))



    # --- bookkeeping ---------------------------------------------------------------------------

    def _record(self, txn: Transaction, session: Any, envelope: Any, recipient: str, decision: Decision) -> None:
        self._count(decision.verdict, decision.rule)
        self._audit.record(AuditRecord(
            time=self._clock(), kind="decision", verdict=decision.verdict.value, rule=decision.rule,
            reason=decision.reason, txn_id=txn.txn_id, client=_client_ip(session), sender=envelope.mail_from,
            recipient=recipient, actor=_auth_user(session) or "",
        ))

    def _record_shadow(self, txn: Transaction, session: Any, envelope: Any, recipient: str,
                       decision: Decision) -> None:
        """A shadow-mode decision: logged, audited and counted as "would have", not enforced."""
        self._metrics.shadow_decisions.labels(decision.verdict.value, decision.rule).inc()
        log.info("txn=%s shadow: would have %s (%s: %s)", txn.txn_id, decision.verdict.value, decision.rule,
                 decision.reason)
        self._audit.record(AuditRecord(
            time=self._clock(), kind="decision", verdict=f"shadow-{decision.verdict.value}", rule=decision.rule,
            reason=f"shadow mode, not enforced: {decision.reason}", txn_id=txn.txn_id, client=_client_ip(session),
            sender=envelope.mail_from, recipient=recipient, actor=_auth_user(session) or "",
        ))

    def _count(self, verdict: Verdict, rule: str) -> None:
        self._metrics.recipients.labels(verdict.value, rule).inc()

    def _count_upstream_error(self, reply: Reply) -> None:
        if reply in (replies.UPSTREAM_LOST, replies.UPSTREAM_UNAVAILABLE, replies.UPSTREAM_BUSY):
            error_class = "connection"
        elif reply is replies.UPSTREAM_TIMEOUT:
            error_class = "timeout"
        else:
            error_class = "4xx" if reply.is_temporary else "5xx"
        self._metrics.upstream_errors.labels(error_class).inc()


def _held_recipient(address: str, decision: Decision) -> HeldRecipient:
    # Hold-and-pace: a recipient with a release time goes straight to the release worker.
    if decision.release_at is not None:
        return HeldRecipient(address, "released", decision.rule, decision.reason, next_attempt_at=decision.release_at)
    return HeldRecipient(address, "held", decision.rule, decision.reason)


def _upstream_decision(reply: Reply, rule: str) -> Decision:
    verdict = Verdict.DEFER if reply.is_temporary else Verdict.REJECT
    return Decision(verdict, rule, f"upstream answered {reply}", reply)


def _reverse_path(txn: Transaction) -> str:
    return "" if txn.sender is None else txn.sender.text


def _auth_user(session: Any) -> str | None:
    data = getattr(session, "auth_data", None)
    return data if isinstance(data, str) else None


def _relayable_options(envelope: Any) -> list[str]:
    # BODY and SMTPUTF8 describe the content and must reach the upstream; SIZE is ours.
    return [o for o in envelope.mail_options if o.split("=")[0] in ("BODY", "SMTPUTF8")]

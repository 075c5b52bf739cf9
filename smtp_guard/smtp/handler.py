"""The aiosmtpd handler: a thin adapter between aiosmtpd's hooks and ``Transaction``.

aiosmtpd calls a hook per command with its session and envelope; the guard's state of a mail
transaction lives in a ``Transaction`` (smtp/transaction.py), made at MAIL and kept on the
envelope. Here: the relay permission (client network or AUTH), the EHLO keywords, the
Received header (it names the session), and the translation of aiosmtpd's objects to and from
the transaction's steps.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

from .. import replies
from ..addresses import AddressNormalizer
from ..audit import AuditLog
from ..classify import MessageClassifier
from ..config import SMTPConfig
from ..decision_service import MessageDecider
from ..metrics import Metrics
from ..policy.pipeline import Pipeline
from ..relay.base import Upstream
from ..erasure.model import ErasureAttempt
from ..hold.model import HoldStore
from .access import AccessControl
from .proxy import client_ip
from .trace import protocol_name, received_header
from .transaction import Collaborators, Transaction

if TYPE_CHECKING:  # built by the front only when switched on (cryptography, dnspython)
    from ..recipient_domains import RecipientDomains
    from ..unsubscribe.headers import ListUnsubscribe
    from ..unsubscribe.inbox import UnsubscribeInbox

log = logging.getLogger("smtp_guard.smtp")


def _auth_user(session: Any) -> str | None:
    data = getattr(session, "auth_data", None)
    return data if isinstance(data, str) else None


def _txn(envelope: Any) -> Transaction | None:
    return getattr(envelope, "guard_txn", None)


class GuardHandler:
    """aiosmtpd hooks. Thin: who may relay, then one ``Transaction`` per MAIL."""

    def __init__(self, *, smtp_config: SMTPConfig, access: AccessControl, auth_enabled: bool,
                 normalizer: AddressNormalizer, pipeline: Pipeline, decider: MessageDecider, upstream: Upstream,
                 holds: HoldStore,
                 audit: AuditLog, metrics: Metrics,
                 record_erasure_attempts: Callable[[Sequence[ErasureAttempt]], Awaitable[None]],
                 classifier: MessageClassifier, strip: Sequence[str] = (),
                 list_unsubscribe: ListUnsubscribe | None = None, inbox: UnsubscribeInbox | None = None,
                 recipient_domains: RecipientDomains | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._config = smtp_config
        self._access = access
        self._auth_enabled = auth_enabled
        self._metrics = metrics
        self._clock = clock
        self._parts = Collaborators(
            pipeline=pipeline, decider=decider, upstream=upstream, holds=holds, normalizer=normalizer, classifier=classifier,
            metrics=metrics, record_audit=audit.record, record_erasure_attempts=record_erasure_attempts,
            max_recipients=smtp_config.max_recipients, bare_line_endings=smtp_config.bare_line_endings,
            strip=tuple(strip), clock=clock, list_unsubscribe=list_unsubscribe, inbox=inbox,
            recipient_domains=recipient_domains,
        )

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

    # --- the transaction -----------------------------------------------------------------------

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        client = client_ip(session)
        may_relay = self._access.is_allowed_network(client) or session.authenticated
        if not may_relay and self._parts.inbox is None:
            self._metrics.relay_denied.inc()
            log.info("relay denied for client %s (not in [access] allow_networks, not authenticated)", client)
            return str(replies.AUTH_REQUIRED if self._auth_enabled else replies.RELAY_DENIED)
        # With [unsubscribe] mailto anyone may write to that one mailbox: each RCPT decides.
        txn = Transaction(self._parts, client, _auth_user(session), inbox_only=not may_relay)
        reply = txn.mail(address, mail_options)
        if reply.is_success:
            # aiosmtpd treats an empty mail_from as "no MAIL yet", so the null path stays "<>"
            # on the envelope (the transaction relays and holds it as "").
            envelope.mail_from = txn.mail_from
            envelope.mail_options.extend(mail_options)
            # aiosmtpd reads rcpt_tos (DATA needs one; shutdown's idle check): the transaction's
            # own list of accepted recipients, shared rather than copied at each RCPT.
            envelope.rcpt_tos = txn.recipients
            envelope.guard_txn = txn
        return str(reply)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        txn = _txn(envelope)
        if txn is None:  # MAIL was refused; aiosmtpd already requires MAIL first
            return str(replies.NEED_MAIL)
        return str(await txn.rcpt(address))

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        txn = _txn(envelope)
        if txn is None:
            return str(replies.INTERNAL_ERROR)
        return str(await txn.data(envelope.original_content, self._trace(server, session, txn)))

    def _trace(self, server: Any, session: Any, txn: Transaction) -> bytes:
        """The headers the guard adds to what it relays and holds (empty when switched off)."""
        if not self._config.received_header:
            return b""
        protocol = protocol_name(extended=bool(session.extended_smtp), tls=session.ssl is not None,
                                 authenticated=bool(session.authenticated))
        return received_header(helo=session.host_name or "", client_ip=client_ip(session),
                               hostname=server.hostname, protocol=protocol, txn_id=txn.txn_id,
                               when=self._clock())

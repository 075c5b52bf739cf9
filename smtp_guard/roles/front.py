"""The SMTP front of one guard process: the listener, and what it decides with.

With ``[smtp] workers = N`` each worker process runs one front on the same port (the kernel
spreads connections over them: SO_REUSEPORT).
"""

from __future__ import annotations

import ssl
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Callable

from ..backends import Backends
from ..classify import MessageClassifier
from ..config import Config
from ..decision_service import MessageDecider
from ..metrics import Metrics
from ..policy.pipeline import Pipeline
from ..readiness import Readiness
from ..relay.base import Upstream
from ..smtp.access import AccessControl
from ..smtp.auth import Authenticator
from ..smtp.handler import GuardHandler
from ..smtp.server import SMTPServer
from ..startup import naming_setting
from .enforcement import Enforcement

if TYPE_CHECKING:
    from ..recipient_domains import RecipientDomains
    from ..unsubscribe.headers import ListUnsubscribe
    from ..unsubscribe.inbox import UnsubscribeInbox
    from ..unsubscribe.service import Unsubscriber


def build_listener_tls(config: Config) -> ssl.SSLContext | None:
    tls = config.smtp.tls
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    return context


def _unsubscribe(config: Config, backends: Backends, metrics: Metrics, clock: Callable[[], float]
                 ) -> tuple[ListUnsubscribe | None, UnsubscribeInbox | None]:
    """The List-Unsubscribe headers and the mailto: mailbox, when [unsubscribe] is on."""
    if not config.unsubscribe.enabled:
        return None, None
    from ..unsubscribe.headers import ListUnsubscribe
    from ..unsubscribe.inbox import UnsubscribeInbox

    unsubscriber = unsubscriber_for(config, backends, metrics, clock)
    inbox = UnsubscribeInbox(config.unsubscribe.mailto, unsubscriber) if config.unsubscribe.mailto else None
    return ListUnsubscribe(config.unsubscribe, unsubscriber), inbox


def unsubscriber_for(config: Config, backends: Backends, metrics: Metrics, clock: Callable[[], float]
                     ) -> Unsubscriber:
    """Imported here, not at the top: cryptography costs a process memory it needs only for this."""
    from ..unsubscribe.service import Unsubscriber
    from ..unsubscribe.tokens import UnsubscribeTokens

    tokens = UnsubscribeTokens(backends.tombstones.ring, config.unsubscribe.token_lifetime, clock)
    return Unsubscriber(tokens, lambda actor: backends.admin_context(config, actor), config.unsubscribe.list, metrics)


class Front:
    def __init__(self, config: Config, backends: Backends, enforcement: Enforcement, pipeline: Pipeline,
                 decider: MessageDecider, upstream: Upstream, metrics: Metrics, readiness: Readiness,
                 clock: Callable[[], float] = time.time) -> None:
        """``pipeline`` decides at RCPT here; ``decider`` takes the end-of-DATA decisions (in this
        process, or the supervisor's for a worker)."""
        self._config = config
        self._readiness = readiness
        list_unsubscribe, inbox = _unsubscribe(config, backends, metrics, clock)
        self.recipient_domains: RecipientDomains | None = None
        if config.recipient_domains.check:
            # Imported here: dnspython costs every process memory it needs only for this check.
            from ..dns_resolver import resolver
            from ..recipient_domains import RecipientDomains

            self.recipient_domains = RecipientDomains(resolver(config.dns), config.recipient_domains, metrics,
                                                      clock, shadow=config.policy.shadow)
        handler = GuardHandler(
            smtp_config=config.smtp, access=AccessControl(config.access.allow_networks),
            auth_enabled=bool(config.smtp.auth.users), normalizer=backends.normalizer, pipeline=pipeline,
            decider=decider, upstream=upstream, holds=backends.holds, audit=enforcement.audit, metrics=metrics,
            clock=clock,
            record_erasure_attempts=backends.erasure.record_attempts,
            classifier=MessageClassifier(config.classify, config.streams), strip=config.streams.strip_headers,
            list_unsubscribe=list_unsubscribe, inbox=inbox,
            recipient_domains=self.recipient_domains,
        )
        authenticator = Authenticator(config.smtp.auth.users) if config.smtp.auth.users else None
        with naming_setting("[smtp.tls] cert and key", True, OSError, ssl.SSLError):
            tls = build_listener_tls(config)
        self.smtp = SMTPServer(handler, config.smtp, metrics, tls, authenticator, clock)

    async def start(self, running: AsyncExitStack) -> None:
        if self.recipient_domains is not None:  # unwound after the listener stopped
            running.push_async_callback(self.recipient_domains.close)
        with naming_setting(f"[smtp] listen {self._config.smtp.listen}", True, OSError):
            await self.smtp.start()
        running.push_async_callback(self._stop)
        self._readiness.set("listener", None)

    async def _stop(self) -> None:
        self._readiness.set("listener", "shutting down")
        await self.smtp.stop(self._config.smtp.shutdown_grace)

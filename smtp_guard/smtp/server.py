"""The SMTP listener: aiosmtpd's protocol with the guard's limits, replies and shutdown.

``GuardSMTP`` subclasses aiosmtpd's ``SMTP`` only where aiosmtpd has no hook:
* session accounting and the concurrent-session limit (connection_made/lost);
* telling the handler when a transaction ends without DATA (RSET, new EHLO, disconnect),
  so its upstream session goes back to the pool;
* rewriting aiosmtpd's own fixed replies to ones with enhanced status codes;
* a 421 on idle timeout instead of a silent close.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, Callable

from aiosmtpd.smtp import SMTP

from .. import replies
from ..config import SMTPConfig
from ..metrics import Metrics
from .access import AccessControl
from .auth import Authenticator
from .handler import GuardHandler

log = logging.getLogger("smtp_guard.smtp")

CLEANUP_GRACE = 10.0  # seconds shutdown waits for ended transactions to return their upstream session


class SessionRegistry:
    """Open sessions, for the concurrency limit and graceful shutdown."""

    def __init__(self, metrics: Metrics) -> None:
        self.sessions: set["GuardSMTP"] = set()
        self._metrics = metrics
        self.accepting = True
        self._changed = asyncio.Event()
        # Transaction ends (upstream session back to the pool, erasure evidence written) run as
        # tasks; shutdown waits for them.
        self.cleanups: set[asyncio.Task[None]] = set()

    def add(self, session: "GuardSMTP") -> None:
        self.sessions.add(session)
        self._metrics.sessions_active.set(len(self.sessions))

    def remove(self, session: "GuardSMTP") -> None:
        self.sessions.discard(session)
        self._metrics.sessions_active.set(len(self.sessions))
        self._changed.set()

    async def wait_changed(self) -> None:
        self._changed.clear()
        await self._changed.wait()


class GuardSMTP(SMTP):
    def __init__(self, handler: GuardHandler, registry: SessionRegistry, config: SMTPConfig,
                 metrics: Metrics, allow_plaintext_auth_on_loopback: bool, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._guard_handler = handler
        self._registry = registry
        self._guard_config = config
        self._guard_metrics = metrics
        self._plaintext_auth_on_loopback = allow_plaintext_auth_on_loopback
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if not first:
            return  # the STARTTLS upgrade of an existing session
        peer = transport.get_extra_info("peername")
        if self._plaintext_auth_on_loopback and isinstance(peer, tuple) and AccessControl.is_loopback(str(peer[0])):
            self._auth_require_tls = False
        reason = None
        if not self._registry.accepting:
            reason, reply = "shutting_down", replies.SHUTTING_DOWN
        elif len(self._registry.sessions) >= self._guard_config.max_sessions:
            reason, reply = "max_sessions", replies.TOO_MANY_SESSIONS
        if reason is not None:
            self._guard_metrics.sessions_refused.labels(reason).inc()
            transport.write(f"{reply}\r\n".encode())  # type: ignore[attr-defined]
            transport.close()
            return
        self._registry.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._end_transaction(self.envelope)
        self._registry.remove(self)
        super().connection_lost(error)

    def _create_envelope(self) -> Any:
        # Called by aiosmtpd on every reset (EHLO, RSET, after DATA): the old transaction ends.
        self._end_transaction(getattr(self, "envelope", None))
        return super()._create_envelope()

    def _end_transaction(self, envelope: Any) -> None:
        txn = getattr(envelope, "guard_txn", None)
        if txn is None or not txn.needs_cleanup:
            return
        task = self.loop.create_task(self._guard_handler.abandon(envelope))
        self._registry.cleanups.add(task)
        task.add_done_callback(self._registry.cleanups.discard)

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            status = replies.rewrite_aiosmtpd_reply(status)
        await super().push(status)

    async def smtp_DATA(self, arg: str) -> None:
        self.in_data = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self.in_data = False

    def _timeout_cb(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(f"{replies.IDLE_TIMEOUT}\r\n".encode())  # type: ignore[attr-defined]
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def close_idle(self) -> None:
        """Shutdown: tell a session between transactions to go away (421) and close it."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(f"{replies.SHUTTING_DOWN}\r\n".encode())  # type: ignore[attr-defined]
            self.transport.close()

    @property
    def is_idle(self) -> bool:
        """Not inside DATA and no upstream transaction open: safe to close."""
        return not self.in_data and (self.envelope is None or getattr(self.envelope, "guard_txn", None) is None
                                     or not getattr(self.envelope, "rcpt_tos", None))


class SMTPServer:
    """Listening socket plus the sessions it spawned, with a time-limited graceful shutdown."""

    def __init__(self, handler: GuardHandler, config: SMTPConfig, metrics: Metrics,
                 tls_context: ssl.SSLContext | None, authenticator: Authenticator | None) -> None:
        self._handler = handler
        self._config = config
        self._metrics = metrics
        self._tls = tls_context
        self._authenticator = authenticator
        self.registry = SessionRegistry(metrics)
        self._server: asyncio.base_events.Server | None = None

    def _factory(self) -> Callable[[], GuardSMTP]:
        config = self._config

        def make() -> GuardSMTP:
            return GuardSMTP(
                self._handler, self.registry, config, self._metrics,
                allow_plaintext_auth_on_loopback=config.auth.allow_plaintext_on_loopback,
                hostname=config.hostname or None,
                data_size_limit=config.max_message_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                tls_context=self._tls,
                require_starttls=config.tls.require,
                timeout=config.idle_timeout,
                authenticator=self._authenticator,
                auth_required=False,  # allowed networks relay without AUTH; the handler decides
                auth_require_tls=True,
            )
        return make

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory(), self._config.listen.host, self._config.listen.port)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None and self._server.sockets
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def stop(self, grace: float) -> None:
        """Stop accepting; close idle sessions at once; give sessions in a transaction up to
        ``grace`` seconds to finish; then cut the rest (a cut client never got its 250)."""
        self.registry.accepting = False
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.registry.sessions:
            for session in list(self.registry.sessions):
                if session.is_idle:
                    session.close_idle()
            remaining = deadline - loop.time()
            if remaining <= 0 or not self.registry.sessions:
                break
            try:
                await asyncio.wait_for(self.registry.wait_changed(), timeout=min(remaining, 0.2))
            except asyncio.TimeoutError:
                pass
        for session in list(self.registry.sessions):
            if session.transport is not None:
                log.warning("closing session still busy after %.0fs shutdown grace", grace)
                session.transport.close()
        if self.registry.cleanups:
            await asyncio.wait(set(self.registry.cleanups), timeout=CLEANUP_GRACE)
        if self._server is not None:
            await self._server.wait_closed()

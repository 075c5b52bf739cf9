"""A fault-injecting upstream SMTP server for tests (after KumoMTA's test sink).

The sink is a real aiosmtpd server on a loopback port chosen by the kernel. It records what
it delivered byte-exact and misbehaves on purpose, chosen per test by plain attributes::

    sink.tempfail_rcpt.add("later@example.com")   # RCPT -> 450 4.2.0
    sink.permfail_rcpt.add("nouser@example.com")  # RCPT -> 550 5.1.1
    sink.data_reply = "451 4.3.0 try later"       # final DATA reply, message not recorded
    sink.hang_on = "data"                         # "connect" (greeting), "mail", "rcpt", "data"
    sink.hang_seconds = 0.5                       # None: hang until the sink stops
    sink.disconnect_on = "data"                   # "mail", "rcpt", "data": close without replying

TLS: ``Sink(tls_context=ctx)`` offers STARTTLS (``requires_tls=True`` refuses mail without it),
``implicit_tls=True`` speaks TLS from the first byte; ``auth=(user, password)`` requires AUTH.

Faults can change between transactions of one connection. ``stop()`` closes the listener and
every client connection and waits for their sessions to end, so a test leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

Stage = Literal["connect", "mail", "rcpt", "data"]

TEMPFAIL_RCPT = "450 4.2.0 Mailbox temporarily unavailable"
PERMFAIL_RCPT = "550 5.1.1 No such user"
AUTH_REQUIRED = "530 5.7.0 Authentication required"


@dataclass(frozen=True)
class Delivered:
    """One message the sink accepted with a 250 to DATA."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes  # exactly the bytes received, dot-unstuffed (aiosmtpd's original_content)
    tls: bool = False  # the transaction ran over TLS (STARTTLS or implicit)
    login: str | None = None  # the AUTH user, if the client authenticated
    mail_options: tuple[str, ...] = ()  # MAIL parameters (BODY=8BITMIME, SMTPUTF8, ...)


async def _forever() -> None:
    await asyncio.get_running_loop().create_future()


class _SinkSMTP(SMTP):
    """aiosmtpd's protocol plus the two things a sink needs: a greeting that can hang, and a
    signal when the connection is gone (so ``Sink.stop`` can wait for it)."""

    def __init__(self, sink: Sink, **options: Any) -> None:
        super().__init__(sink, **options)
        self.sink = sink
        self.raw_transport: asyncio.BaseTransport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._greeted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.raw_transport is None:  # called again with the TLS transport after STARTTLS
            self.raw_transport = transport
            self.sink.sessions.append(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if not self.closed.done():
            self.closed.set_result(None)

    async def push(self, status: Any) -> None:
        if not self._greeted:  # the first reply is the 220 greeting
            self._greeted = True
            await self.sink.fault("connect", self)
        await super().push(status)

    def session_task(self) -> asyncio.Task[None] | None:
        # aiosmtpd keeps the per-connection task here; awaiting it lets stop() leave no task pending.
        return self._handler_coroutine


class Sink:
    """An upstream SMTP server with per-test faults. Use ``async with Sink() as sink``."""

    def __init__(self, *, tls_context: ssl.SSLContext | None = None, requires_tls: bool = False,
                 implicit_tls: bool = False, auth: tuple[str, str] | None = None,
                 hostname: str = "sink.test") -> None:
        if (requires_tls or implicit_tls) and tls_context is None:
            raise ValueError("requires_tls and implicit_tls need a tls_context")
        self.tls_context = tls_context
        self.requires_tls = requires_tls
        # SMTPS (RFC 8314): TLS from the first byte instead of STARTTLS.
        self.implicit_tls = implicit_tls
        self.auth = auth  # (user, password) accepted by AUTH PLAIN / LOGIN; MAIL needs it when set
        self.hostname = hostname
        self.host = "127.0.0.1"
        self.port = 0
        # Faults, chosen per test.
        self.tempfail_rcpt: set[str] = set()
        self.permfail_rcpt: set[str] = set()
        self.data_reply: str | None = None
        self.hang_on: Stage | None = None
        self.hang_seconds: float | None = None
        self.disconnect_on: Stage | None = None
        # What the sink saw.
        self.messages: list[Delivered] = []
        self.connections = 0
        # Connections that said EHLO/HELO: the guard's relay sessions (its readiness probes only
        # connect, read the greeting and QUIT).
        self.smtp_sessions = 0
        self.transactions_started = 0  # MAIL commands accepted
        self.rsets = 0
        self.hangs = 0  # hang faults begun: a test can wait until the sink is holding back a reply
        self.failed_logins = 0  # (not auth_*: aiosmtpd treats handler auth_* names as mechanisms)
        self._server: asyncio.AbstractServer | None = None
        self.sessions: list[_SinkSMTP] = []  # connected sessions (TLS handshake done, for SMTPS)

    def __repr__(self) -> str:
        return (f"<Sink {self.host}:{self.port} connections={self.connections} "
                f"transactions={self.transactions_started} messages={len(self.messages)}>")

    def delivered_to(self) -> list[str]:
        """Every recipient of every delivered message, in delivery order."""
        return [rcpt for message in self.messages for rcpt in message.rcpt_tos]

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # --- life cycle --------------------------------------------------------------------------

    async def start(self) -> Sink:
        return await self.start_on(0)

    async def start_on(self, port: int) -> Sink:
        """Listen on ``port`` (0: any free one); a stopped sink can come back on its old port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_session, self.host, port, reuse_address=True,
                                                ssl=self.tls_context if self.implicit_tls else None)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Close the listener and every connection; wait until each session has ended."""
        if self._server is None:
            return
        self._server.close()
        self._server = None
        for session in self.sessions:
            assert session.raw_transport is not None
            session.raw_transport.abort()  # no flushing, no TLS close_notify: a peer that hangs cannot stall us
        await asyncio.gather(*(session.closed for session in self.sessions))
        tasks = [task for session in self.sessions if (task := session.session_task()) is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        self.sessions.clear()

    async def __aenter__(self) -> Sink:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _new_session(self) -> _SinkSMTP:
        self.connections += 1
        return _SinkSMTP(
            self, hostname=self.hostname, enable_SMTPUTF8=True,
            tls_context=None if self.implicit_tls else self.tls_context,
            require_starttls=self.requires_tls, authenticator=self._authenticate,
            # Without a TLS context a test must still be able to try AUTH over plain text.
            auth_require_tls=self.tls_context is not None and not self.implicit_tls,
            loop=asyncio.get_running_loop(),
        )

    # --- faults ------------------------------------------------------------------------------

    async def fault(self, stage: Stage, server: SMTP) -> None:
        """Apply the configured hang or disconnect for this stage of the conversation."""
        if self.disconnect_on == stage:
            assert isinstance(server, _SinkSMTP) and server.raw_transport is not None
            server.raw_transport.close()
            await _forever()  # connection_lost cancels the session task: no reply is sent
        if self.hang_on == stage:
            self.hangs += 1
            if self.hang_seconds is None:
                await _forever()  # until stop() closes the connection
            await asyncio.sleep(self.hang_seconds)

    # --- aiosmtpd hooks ----------------------------------------------------------------------

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                      mechanism: str, auth_data: Any) -> AuthResult:
        if (self.auth is not None and isinstance(auth_data, LoginPassword)
                and (auth_data.login.decode(), auth_data.password.decode()) == self.auth):
            return AuthResult(success=True, auth_data=auth_data.login.decode())
        self.failed_logins += 1
        return AuthResult(success=False, handled=False)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if not getattr(server, "greeted", False):  # once per connection, not again after STARTTLS
            server.greeted = True  # type: ignore[attr-defined]
            self.smtp_sessions += 1
        if self.auth is None:  # do not advertise AUTH the sink would refuse anyway
            responses = [line for line in responses if not line.startswith("250-AUTH")]
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        await self.fault("mail", server)
        if self.auth is not None and not session.authenticated:
            return AUTH_REQUIRED
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        self.transactions_started += 1
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        await self.fault("rcpt", server)
        if address in self.tempfail_rcpt:
            return TEMPFAIL_RCPT
        if address in self.permfail_rcpt:
            return PERMFAIL_RCPT
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.rsets += 1
        return "250 2.0.0 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await self.fault("data", server)
        if self.data_reply is not None and not self.data_reply.startswith("2"):
            return self.data_reply
        assert envelope.mail_from is not None and envelope.original_content is not None
        self.messages.append(Delivered(
            mail_from=envelope.mail_from, rcpt_tos=list(envelope.rcpt_tos),
            content=envelope.original_content, tls=self.implicit_tls or session.ssl is not None,
            login=session.auth_data if session.authenticated else None,
            mail_options=tuple(envelope.mail_options),
        ))
        return self.data_reply or "250 2.0.0 OK queued"

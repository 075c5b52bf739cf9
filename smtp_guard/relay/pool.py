"""Pooled upstream SMTP sessions (aiosmtplib), reused across transactions (RSET after an unfinished one).

Shaped like httpcore's pool: a bounded number of sessions, an idle list, a readable repr.
Every aiosmtplib exception is translated here into a Reply the client can be given:
connection trouble is always a 4xx (the platform retries), the upstream's own 4xx/5xx pass
through with their class.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from dataclasses import dataclass
from typing import Callable, NoReturn, Sequence

import aiosmtplib

from .. import replies
from ..addresses import PLAIN_ADDRESS
from ..config import UpstreamConfig
from ..replies import Reply
from ..wire import dot_stuffed, has_bare_line_ending
from .base import UpstreamError

log = logging.getLogger(__name__)

_CONNECTION_ERRORS = (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError, ConnectionError, OSError)
_TIMEOUTS = (aiosmtplib.SMTPTimeoutError, asyncio.TimeoutError, TimeoutError)
_PLAIN_ADDRESS = re.compile(PLAIN_ADDRESS)
_RCPT_ACCEPTED = (250, 251)  # RFC 5321 4.2.5 ("user not local; will forward")


@dataclass
class _Session:
    client: aiosmtplib.SMTP
    idle_since: float
    transactions: int = 0


def tls_context(config: UpstreamConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=config.ca_file or None)
    # Opportunistic TLS encrypts without authenticating (Postfix's "may" does not verify either):
    # a certificate that fails verification would only send the same mail in plaintext instead.
    if not config.tls_verify or config.tls == "opportunistic":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _TLSHandshakeFailed(Exception):
    """Opportunistic STARTTLS was offered but could not be completed."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error


def _is_refusal(code: int) -> bool:
    return 400 <= code < 600


def _cannot_take(client: aiosmtplib.SMTP, address: str) -> bool:
    """A non-ASCII address for an upstream that does not offer SMTPUTF8 (RFC 6531)."""
    return not address.isascii() and "smtputf8" not in client.esmtp_extensions


def _log_out_of_protocol(command: str, code: int, message: str) -> None:
    log.warning("upstream answered %s with %d %s, which that command cannot get; closing the session "
                "and deferring (451 4.5.0)", command, code, " ".join(message.split())[:200])


def _failure_reply(error: BaseException) -> Reply:
    if isinstance(error, _TIMEOUTS):
        return replies.UPSTREAM_TIMEOUT
    return replies.UPSTREAM_LOST


class SMTPUpstream:
    """The real upstream MTA, reached over plain SMTP, STARTTLS or implicit TLS."""

    def __init__(self, config: UpstreamConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._idle: list[_Session] = []
        self._slots = asyncio.Semaphore(config.max_connections)
        self._in_use = 0
        self._tls = tls_context(config) if config.tls != "none" else None
        self.connects = 0

    def __repr__(self) -> str:
        return (f"<SMTPUpstream {self._config.host}:{self._config.port} tls={self._config.tls} "
                f"idle={len(self._idle)} in_use={self._in_use} max={self._config.max_connections}>")

    async def begin(self, sender: str, mail_options: Sequence[str] = ()) -> "SMTPTransaction":
        if self._slots.locked():  # every slot taken: wait for one, not for ever
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can time out after the
                # semaphore was acquired, and the slot would be lost for good.
                async with asyncio.timeout(self._config.connect_timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise UpstreamError(replies.UPSTREAM_BUSY, "no upstream connection slot became free") from None
        else:
            await self._slots.acquire()  # free: taken at once, without a timer per message
        self._in_use += 1
        try:
            session = await self._mail_from(sender, mail_options)
        except BaseException:
            self._give_back_slot()
            raise
        return SMTPTransaction(self, session)

    async def _mail_from(self, sender: str, mail_options: Sequence[str]) -> _Session:
        # A pooled session may have been closed by the upstream while idle; such a failure is
        # retried once on a fresh connection before the client hears about it.
        for attempt in (1, 2):
            session = self._take_idle() or await self._connect()
            if _cannot_take(session.client, sender):
                self._park(session)  # nothing was sent on it
                raise UpstreamError(replies.UPSTREAM_NO_SMTPUTF8, "upstream offers no SMTPUTF8")
            options = [o for o in mail_options if o.split("=")[0].lower() in session.client.esmtp_extensions
                       or o.upper().startswith("BODY=") and "8bitmime" in session.client.esmtp_extensions]
            try:
                await _mail(session.client, sender, options)
                return session
            except aiosmtplib.SMTPResponseException as error:  # SMTPSenderRefused among them
                if not _is_refusal(error.code):
                    _log_out_of_protocol("MAIL", error.code, error.message)
                    await self._discard(session)
                    raise UpstreamError(replies.UPSTREAM_OUT_OF_PROTOCOL, "upstream MAIL out of protocol") from None
                await self._reset_and_park(session)
                raise UpstreamError(replies.upstream_reply(error.code, error.message)) from None
            except asyncio.CancelledError:
                # The client went away mid-command: the session is in an unknown state.
                session.client.close()
                raise
            except (*_CONNECTION_ERRORS, *_TIMEOUTS) as error:
                await self._discard(session)
                if attempt == 2 or session.transactions == 0:
                    raise UpstreamError(_failure_reply(error), f"upstream MAIL failed: {error!r}") from None
        raise AssertionError("unreachable")

    def _take_idle(self) -> _Session | None:
        now = self._clock()
        while self._idle:
            session = self._idle.pop()
            if session.client.is_connected and now - session.idle_since < self._config.idle_timeout:
                return session
            session.client.close()
        return None

    async def _connect(self) -> _Session:
        config = self._config
        if config.tls != "opportunistic":
            return await self._open(start_tls=config.tls == "starttls")
        # "opportunistic" (Postfix smtp_tls_security_level = may): STARTTLS when the upstream
        # advertises it, plaintext when it does not. A failed STARTTLS is retried once in
        # plaintext on a new connection, as Postfix does: whoever can break the handshake can
        # as well strip STARTTLS from the EHLO reply, so refusing would add no protection, only
        # an outage. Use tls = "starttls" when TLS is required.
        try:
            return await self._open(start_tls=False, opportunistic=True)
        except _TLSHandshakeFailed as failure:
            log.warning("STARTTLS with upstream %s:%d failed (%r); sending in plaintext (tls = \"opportunistic\")",
                        config.host, config.port, failure.error)
            return await self._open(start_tls=False)

    async def _open(self, start_tls: bool, opportunistic: bool = False) -> _Session:
        config = self._config
        client = aiosmtplib.SMTP(
            hostname=config.host,
            port=config.port,
            local_hostname=config.helo_name or None,
            timeout=config.command_timeout,
            use_tls=config.tls == "implicit",
            start_tls=start_tls,
            tls_context=self._tls,
        )
        try:
            await client.connect(timeout=config.connect_timeout)
            if opportunistic:
                await _starttls_if_offered(client)
            if config.username:
                await client.login(config.username, config.password)
            if client.is_ehlo_or_helo_needed:
                # Before the first MAIL: which of the client's MAIL parameters are passed on
                # (BODY, SMTPUTF8) is read from this reply.
                await _greet(client)
        except _TLSHandshakeFailed:
            await quietly_close(client)
            raise
        except aiosmtplib.SMTPAuthenticationError as error:
            await quietly_close(client)
            log.error("upstream %s:%d refused our credentials (%s %s); check [upstream] username/password",
                      config.host, config.port, error.code, error.message)
            raise UpstreamError(replies.UPSTREAM_UNAVAILABLE, "upstream authentication failed") from None
        except (aiosmtplib.SMTPException, *_CONNECTION_ERRORS, *_TIMEOUTS, ssl.SSLError) as error:
            await self._close_after_connect_failure(client, error)
        self.connects += 1
        return _Session(client, idle_since=self._clock())

    async def _close_after_connect_failure(self, client: aiosmtplib.SMTP, error: BaseException) -> NoReturn:
        config = self._config
        await quietly_close(client)
        log.warning("cannot connect to upstream %s:%d: %r", config.host, config.port, error)
        reply = replies.UPSTREAM_TIMEOUT if isinstance(error, _TIMEOUTS) else replies.UPSTREAM_UNAVAILABLE
        raise UpstreamError(reply, f"connect failed: {error!r}") from None

    async def _reset_and_park(self, session: _Session) -> None:
        try:
            await session.client.rset()
        except Exception:
            await quietly_close(session.client)
            return
        self._park(session)

    def _park(self, session: _Session) -> None:
        session.idle_since = self._clock()
        self._idle.append(session)

    async def _discard(self, session: _Session) -> None:
        await quietly_close(session.client)

    def _give_back_slot(self) -> None:
        self._in_use -= 1
        self._slots.release()

    async def finish(self, session: _Session, reusable: bool, delivered: bool = False) -> None:
        """Give a session back: parked for the next transaction, or closed. After a message
        the upstream accepted, no RSET: the end of DATA already cleared its transaction
        (RFC 5321 4.1.1.4), and a session that died meanwhile is caught by the next MAIL."""
        try:
            if reusable and session.client.is_connected:
                session.transactions += 1
                if delivered:
                    self._park(session)
                else:
                    await self._reset_and_park(session)
            else:
                await quietly_close(session.client)
        finally:
            self._give_back_slot()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for session in idle:
            await quietly_close(session.client)


class SMTPTransaction:
    """One lock-step transaction on a pooled session (MAIL already accepted).

    A session goes back to the pool only in a known state: never with a command whose reply is
    still to come. When a caller is cancelled while waiting for a reply (the SMTP client went
    away), the command stays in flight; ``finish`` then closes the connection instead of
    sending RSET, whose reply would be the pending one's (the next transaction on the session
    would read every reply one command late).
    """

    def __init__(self, upstream: SMTPUpstream, session: _Session) -> None:
        self._upstream = upstream
        self._session = session
        self._broken = False
        self._in_flight = False  # a command was sent and its reply not read
        self._delivered = False  # the upstream accepted the message: its transaction is over
        self._finished = False

    async def rcpt(self, address: str) -> Reply:
        if self._broken:
            return replies.UPSTREAM_LOST
        if _cannot_take(self._session.client, address):
            return replies.UPSTREAM_NO_SMTPUTF8  # nothing sent: the session stays as it was
        self._in_flight = True
        try:
            if _PLAIN_ADDRESS.fullmatch(address):
                # aiosmtplib's rcpt() runs the stdlib parseaddr on every address to quote it (7 %
                # of the CPU with 10 recipients); for a plain one the result is the address in
                # brackets (a property test holds them equal), sent the same way.
                response = await self._session.client.execute_command(b"RCPT", b"TO:<" + address.encode() + b">")
            else:
                # UTF-8 on the wire: internationalized addresses (RFC 6531) are valid input.
                response = await self._session.client.rcpt(address, encoding="utf-8")
        except aiosmtplib.SMTPResponseException as error:
            self._in_flight = False
            return self._refusal("RCPT", error.code, error.message)
        except (*_CONNECTION_ERRORS, *_TIMEOUTS) as error:
            self._broken = True
            log.warning("upstream lost during RCPT: %r", error)
            return _failure_reply(error)
        self._in_flight = False
        if response.code not in _RCPT_ACCEPTED:
            return self._refusal("RCPT", response.code, response.message)
        return replies.upstream_reply(response.code, response.message)

    async def data(self, content: bytes) -> Reply:
        if self._broken:
            return replies.UPSTREAM_LOST
        self._in_flight = True
        try:
            response = await _data(self._session.client, content)
        except aiosmtplib.SMTPResponseException as error:  # not 354 to DATA, or not 250 to the dot
            self._in_flight = False
            return self._refusal("DATA", error.code, error.message)
        except (*_CONNECTION_ERRORS, *_TIMEOUTS) as error:
            # The upstream may or may not have the message: answering 4xx risks a duplicate on
            # retry, answering 250 would risk losing it. Never lie.
            self._broken = True
            log.warning("upstream lost during DATA: %r", error)
            return _failure_reply(error)
        self._in_flight = False
        self._delivered = True
        return replies.upstream_reply(response.code, response.message)

    def _refusal(self, command: str, code: int, message: str) -> Reply:
        """The client's reply when the upstream did not accept ``command``: its own 4xx or 5xx,
        passed on. Anything else — a 250 to DATA instead of 354, a 354 to the final dot, a 221 —
        says it is out of step with this session, and passing that 2xx or 3xx on would tell the
        client its mail was taken when it was not: the session is dropped and the client told
        to retry."""
        if _is_refusal(code):
            return replies.upstream_reply(code, message)
        _log_out_of_protocol(command, code, message)
        self._broken = True
        return replies.UPSTREAM_OUT_OF_PROTOCOL

    async def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._in_flight:
            # Closed at once, not with QUIT, whose reply would be the pending one too; a caller
            # still waiting for that reply gets "connection lost".
            log.info("upstream session closed with a command still in flight (its caller was cancelled)")
            self._broken = True
            self._session.client.close()
        await self._upstream.finish(self._session, reusable=not self._broken, delivered=self._delivered)


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO from an upstream that refuses EHLO (aiosmtplib's own fallback)."""
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        await client.helo()


async def _mail(client: aiosmtplib.SMTP, sender: str, options: Sequence[str]) -> None:
    """MAIL FROM, raising SMTPSenderRefused unless the upstream answers 250, as aiosmtplib's
    mail() does. A plain address is written directly, like RCPT (see SMTPTransaction.rcpt);
    any other goes through aiosmtplib's quoting, in UTF-8 (RFC 6531 addresses are valid input)."""
    if not _PLAIN_ADDRESS.fullmatch(sender):
        await client.mail(sender, options=options, encoding="utf-8")
        return
    response = await client.execute_command(b"MAIL", b"FROM:<" + sender.encode() + b">",
                                            *[option.encode("ascii") for option in options])
    if response.code != 250:
        raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)


async def _data(client: aiosmtplib.SMTP, content: bytes) -> aiosmtplib.SMTPResponse:
    """DATA, then the content, raising as aiosmtplib's data() does (SMTPDataError unless 354,
    then 250; the connection closed on a timeout or a disconnect). Content with CRLF line
    endings only — all the front lets through, ``[smtp] bare_line_endings`` — is stuffed by
    ``wire.dot_stuffed`` instead of aiosmtplib's two regex passes (6 % of the CPU of a 5 kB
    message); anything else still goes through aiosmtplib, which normalizes it."""
    protocol = client.protocol
    if protocol is None or has_bare_line_ending(content):
        return await client.data(content)
    try:
        start = await client.execute_command(b"DATA")
        if start.code != 354:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        # Safe without aiosmtplib's command lock: a transaction is the session's only user.
        # The reply cannot arrive before read_response expects it: nothing yields in between.
        protocol.write(dot_stuffed(content))
        response = await protocol.read_response(timeout=client.timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()
        raise
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


async def _starttls_if_offered(client: aiosmtplib.SMTP) -> None:
    await client.ehlo()
    if not client.supports_extension("starttls"):
        return
    try:
        await client.starttls()
    except (aiosmtplib.SMTPException, ssl.SSLError, *_CONNECTION_ERRORS, *_TIMEOUTS) as error:
        raise _TLSHandshakeFailed(error) from None


async def quietly_close(client: aiosmtplib.SMTP) -> None:
    """QUIT within 2 s, else drop the connection; never raises."""
    try:
        if client.is_connected:
            async with asyncio.timeout(2):
                await client.quit()
    except Exception:
        client.close()

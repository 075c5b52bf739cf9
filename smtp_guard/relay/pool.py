"""Pooled upstream SMTP sessions (aiosmtplib), reused across transactions with RSET.

Shaped like httpcore's pool: a bounded number of sessions, an idle list, a readable repr.
Every aiosmtplib exception is translated here into a Reply the client can be given:
connection trouble is always a 4xx (the platform retries), the upstream's own 4xx/5xx pass
through with their class.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import aiosmtplib

from .. import replies
from ..config import UpstreamConfig
from ..replies import Reply
from .base import UpstreamError

log = logging.getLogger(__name__)

_CONNECTION_ERRORS = (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError, ConnectionError, OSError)
_TIMEOUTS = (aiosmtplib.SMTPTimeoutError, asyncio.TimeoutError, TimeoutError)


@dataclass
class _Session:
    client: aiosmtplib.SMTP
    idle_since: float
    transactions: int = 0


def tls_context(config: UpstreamConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=config.ca_file or None)
    if not config.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


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
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self._config.connect_timeout)
        except asyncio.TimeoutError:
            raise UpstreamError(replies.UPSTREAM_BUSY, "no upstream connection slot became free") from None
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
            options = [o for o in mail_options if o.split("=")[0].lower() in session.client.esmtp_extensions
                       or o.upper().startswith("BODY=") and "8bitmime" in session.client.esmtp_extensions]
            try:
                # UTF-8 on the wire: internationalized addresses (RFC 6531) are valid input.
                await session.client.mail(sender, options=options, encoding="utf-8")
                return session
            except aiosmtplib.SMTPSenderRefused as error:
                await self._reset_and_park(session)
                raise UpstreamError(replies.upstream_reply(error.code, error.message)) from None
            except aiosmtplib.SMTPResponseException as error:
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
        client = aiosmtplib.SMTP(
            hostname=config.host,
            port=config.port,
            local_hostname=config.helo_name or None,
            timeout=config.command_timeout,
            use_tls=config.tls == "implicit",
            start_tls=config.tls == "starttls",
            tls_context=self._tls,
        )
        try:
            await client.connect(timeout=config.connect_timeout)
            if config.username:
                await client.login(config.username, config.password)
        except aiosmtplib.SMTPAuthenticationError as error:
            await _quietly_close(client)
            log.error("upstream %s:%d refused our credentials (%s %s); check [upstream] username/password",
                      config.host, config.port, error.code, error.message)
            raise UpstreamError(replies.UPSTREAM_UNAVAILABLE, "upstream authentication failed") from None
        except (aiosmtplib.SMTPException, *_CONNECTION_ERRORS, *_TIMEOUTS, ssl.SSLError) as error:
            await _quietly_close(client)
            log.warning("cannot connect to upstream %s:%d: %r", config.host, config.port, error)
            reply = replies.UPSTREAM_TIMEOUT if isinstance(error, _TIMEOUTS) else replies.UPSTREAM_UNAVAILABLE
            raise UpstreamError(reply, f"connect failed: {error!r}") from None
        self.connects += 1
        return _Session(client, idle_since=self._clock())

    async def _reset_and_park(self, session: _Session) -> None:
        try:
            await session.client.rset()
        except Exception:
            await _quietly_close(session.client)
            return
        session.idle_since = self._clock()
        self._idle.append(session)

    async def _discard(self, session: _Session) -> None:
        await _quietly_close(session.client)

    def _give_back_slot(self) -> None:
        self._in_use -= 1
        self._slots.release()

    async def finish(self, session: _Session, reusable: bool) -> None:
        try:
            if reusable and session.client.is_connected:
                session.transactions += 1
                await self._reset_and_park(session)
            else:
                await _quietly_close(session.client)
        finally:
            self._give_back_slot()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for session in idle:
            await _quietly_close(session.client)


class SMTPTransaction:
    """One lock-step transaction on a pooled session (MAIL already accepted)."""

    def __init__(self, upstream: SMTPUpstream, session: _Session) -> None:
        self._upstream = upstream
        self._session = session
        self._broken = False
        self._finished = False

    async def rcpt(self, address: str) -> Reply:
        if self._broken:
            return replies.UPSTREAM_LOST
        try:
            response = await self._session.client.rcpt(address, encoding="utf-8")
            return replies.upstream_reply(response.code, response.message)
        except aiosmtplib.SMTPResponseException as error:
            return replies.upstream_reply(error.code, error.message)
        except (*_CONNECTION_ERRORS, *_TIMEOUTS) as error:
            self._broken = True
            log.warning("upstream lost during RCPT: %r", error)
            return _failure_reply(error)

    async def data(self, content: bytes) -> Reply:
        if self._broken:
            return replies.UPSTREAM_LOST
        try:
            response = await self._session.client.data(content)
            return replies.upstream_reply(response.code, response.message)
        except aiosmtplib.SMTPResponseException as error:
            return replies.upstream_reply(error.code, error.message)
        except (*_CONNECTION_ERRORS, *_TIMEOUTS) as error:
            # The upstream may or may not have the message: answering 4xx risks a duplicate on
            # retry, answering 250 would risk losing it. Never lie.
            self._broken = True
            log.warning("upstream lost during DATA: %r", error)
            return _failure_reply(error)

    async def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        await self._upstream.finish(self._session, reusable=not self._broken)


async def _quietly_close(client: aiosmtplib.SMTP) -> None:
    try:
        if client.is_connected:
            await asyncio.wait_for(client.quit(), timeout=2)
    except Exception:
        client.close()

"""Who may relay, and TLS on both sides: listener STARTTLS + AUTH, upstream STARTTLS/implicit TLS + AUTH.

The listener allows only 192.0.2.0/24 by network, so a loopback client must authenticate
(over TLS, unless plaintext AUTH on loopback is switched on). The upstream side is the real
sink with its own certificate from the same throwaway CA, requiring TLS and a login.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiosmtplib
import pytest

from smtp_guard import replies
from smtp_guard.smtp.auth import hash_password

from sink import Sink
from smtp_client import message, send, transact, without_trace

SENDER = "news@shop.test"
USER, PASSWORD = "platform", "s3cret"
PASSWORD_HASH = hash_password(PASSWORD)
UPSTREAM_USER, UPSTREAM_PASSWORD = "relay", "upstream-pw"


def listener(tls: Any, **tls_options: Any) -> dict[str, Any]:
    """Overrides: STARTTLS and AUTH on the listener, loopback not allowed by network."""
    return {
        "smtp": {"tls": {"cert": str(tls.cert_file), "key": str(tls.key_file), **tls_options},
                 "auth": {"users": {USER: PASSWORD_HASH}}},
        "access": {"allow_networks": ["192.0.2.0/24"]},
    }


async def connect(guard: Any, tls: Any) -> aiosmtplib.SMTP:
    host, port = guard.smtp_address
    client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, tls_context=tls.client_context, timeout=10)
    await client.connect()
    await client.ehlo()
    return client


async def close(client: aiosmtplib.SMTP) -> None:
    try:
        await client.quit()
    except aiosmtplib.SMTPException:
        client.close()


# --- the listener ------------------------------------------------------------------------------

async def test_mail_without_auth_is_refused(start_guard, sink, tls):
    guard = await start_guard(**listener(tls))
    outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message())
    assert outcome.mail == str(replies.AUTH_REQUIRED)
    assert sink.smtp_sessions == 0


async def test_auth_only_after_starttls_then_relayed(start_guard, sink, tls):
    guard = await start_guard(**listener(tls))
    client = await connect(guard, tls)
    try:
        assert "starttls" in client.esmtp_extensions
        assert "auth" not in client.esmtp_extensions  # never offered in plaintext
        await client.starttls()
        await client.ehlo()
        assert "auth" in client.esmtp_extensions
        assert "plain" in client.server_auth_methods
        response = await client.auth_plain(USER, PASSWORD)
        assert response.code == 235
        outcome = await transact(client, SENDER, ["a@example.com", "b@example.com"], message())
    finally:
        await close(client)
    assert outcome.mail == str(replies.SENDER_OK)
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == ["a@example.com", "b@example.com"]


async def test_wrong_password_is_535_and_still_no_relay(start_guard, sink, tls):
    guard = await start_guard(**listener(tls))
    client = await connect(guard, tls)
    try:
        await client.starttls()
        await client.ehlo()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
            await client.auth_plain(USER, "wrong")
        assert refused.value.code == 535
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as unknown:
            await client.auth_plain("nobody", PASSWORD)
        assert unknown.value.code == 535
        outcome = await transact(client, SENDER, ["a@example.com"], message())
    finally:
        await close(client)
    assert outcome.mail == str(replies.AUTH_REQUIRED)
    assert sink.smtp_sessions == 0


async def test_plaintext_auth_on_loopback_when_allowed(start_guard, sink, tls):
    overrides = listener(tls)
    overrides["smtp"]["auth"]["allow_plaintext_on_loopback"] = True
    guard = await start_guard(**overrides)
    client = await connect(guard, tls)
    try:
        assert "auth" in client.esmtp_extensions
        response = await client.auth_plain(USER, PASSWORD)
        assert response.code == 235
        outcome = await transact(client, SENDER, ["a@example.com"], message())
    finally:
        await close(client)
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == ["a@example.com"]


async def test_tls_required_refuses_mail_before_starttls(start_guard, sink, tls):
    guard = await start_guard(smtp={"tls": {"cert": str(tls.cert_file), "key": str(tls.key_file), "require": True}})
    client = await connect(guard, tls)
    try:
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await client.mail(SENDER)
        assert f"{refused.value.code} {refused.value.message}" == str(replies.STARTTLS_REQUIRED)
        await client.starttls()
        await client.ehlo()
        outcome = await transact(client, SENDER, ["a@example.com"], message())
    finally:
        await close(client)
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == ["a@example.com"]


# --- the upstream ------------------------------------------------------------------------------

def upstream(port: int, tls: Any, mode: str = "starttls", password: str = UPSTREAM_PASSWORD) -> dict[str, Any]:
    return {"upstream": {"port": port, "tls": mode, "ca_file": str(tls.ca_file),
                         "username": UPSTREAM_USER, "password": password}}


async def test_upstream_starttls_and_auth(start_guard, tls):
    async with Sink(tls_context=tls.server_context(), requires_tls=True,
                    auth=(UPSTREAM_USER, UPSTREAM_PASSWORD)) as secure:
        guard = await start_guard(**upstream(secure.port, tls))
        content = message(subject="Over TLS")
        outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], content)
        await guard.stop()
    assert outcome.data is not None and outcome.data.startswith("250")
    [delivered] = secure.messages
    assert delivered.tls and delivered.login == UPSTREAM_USER
    assert delivered.rcpt_tos == ["a@example.com"] and without_trace(delivered.content) == content


async def test_upstream_wrong_password_is_451_never_250_or_5xx(start_guard, tls):
    async with Sink(tls_context=tls.server_context(), requires_tls=True,
                    auth=(UPSTREAM_USER, UPSTREAM_PASSWORD)) as secure:
        guard = await start_guard(**upstream(secure.port, tls, password="wrong"))
        outcome = await send(guard.smtp_address, SENDER, ["a@example.com", "b@example.com"], message())
        await guard.stop()
    assert outcome.mail == str(replies.SENDER_OK)
    assert outcome.rcpt == {"a@example.com": str(replies.UPSTREAM_UNAVAILABLE),
                            "b@example.com": str(replies.UPSTREAM_UNAVAILABLE)}
    assert outcome.data is None
    assert secure.failed_logins >= 1 and secure.messages == []


async def test_upstream_certificate_not_trusted_is_451(start_guard, tls):
    async with Sink(tls_context=tls.server_context(), requires_tls=True) as secure:
        guard = await start_guard(upstream={"port": secure.port, "tls": "starttls"})  # system CAs only
        outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message())
        await guard.stop()
    assert outcome.rcpt == {"a@example.com": str(replies.UPSTREAM_UNAVAILABLE)}
    assert secure.messages == []


class ImplicitTLSSink(Sink):
    """The sink behind implicit TLS (SMTPS, RFC 8314): the TLS handshake comes before the greeting.

    Only for clients that complete the handshake: ``Sink.stop`` waits for sessions that
    connected, and a failed handshake never connects one.
    """

    def __init__(self, server_context: Any, **options: Any) -> None:
        super().__init__(**options)
        self._server_context = server_context

    async def start(self) -> "ImplicitTLSSink":
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_session, self.host, 0, ssl=self._server_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self


async def test_upstream_implicit_tls_and_auth(start_guard, tls):
    async with ImplicitTLSSink(tls.server_context(), auth=(UPSTREAM_USER, UPSTREAM_PASSWORD)) as secure:
        guard = await start_guard(**upstream(secure.port, tls, mode="implicit"))
        content = message(subject="Over SMTPS")
        outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], content)
        await guard.stop()
    assert outcome.data is not None and outcome.data.startswith("250")
    [delivered] = secure.messages
    # The sink's listener speaks only TLS, so a delivery proves the session was encrypted.
    assert delivered.login == UPSTREAM_USER and without_trace(delivered.content) == content


def test_network_verdicts_are_remembered_within_a_bound():
    """A client address is parsed once; a scan from more addresses than are kept only starts
    the memory over, and every verdict stays right (IPv4-mapped IPv6 counts as IPv4)."""
    import ipaddress

    from smtp_guard.smtp import access

    control = access.AccessControl([ipaddress.ip_network("192.0.2.0/24")])
    for round_ in range(2):
        assert control.is_allowed_network("192.0.2.7")
        assert control.is_allowed_network("::ffff:192.0.2.7")
        assert not control.is_allowed_network("198.51.100.7")
        assert not control.is_allowed_network("not an address")
    for n in range(access.VERDICTS_KEPT + 10):
        assert not control.is_allowed_network(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
    assert len(control._verdicts) <= access.VERDICTS_KEPT
    assert control.is_allowed_network("192.0.2.200")
    assert access.AccessControl.is_loopback("127.0.0.1") and access.AccessControl.is_loopback("::1")
    assert not access.AccessControl.is_loopback("192.0.2.1") and not access.AccessControl.is_loopback("x")

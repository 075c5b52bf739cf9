"""The PROXY protocol behind a load balancer ([smtp] proxy_protocol_from), with a real HAProxy
running the shipped config/haproxy.cfg (v2, and v1 with send-proxy).

The loopback range gives every party an address of its own: HAProxy connects to the guard
from 127.0.0.1 (the only address the guard takes PROXY headers from); clients come from
127.0.0.3 (in [access] allow_networks), 127.0.0.2 (not) and 127.0.0.4 (not a balancer).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtp_guard import replies
from smtp_guard.app import Guard
from smtp_guard.audit_model import AuditFilter

from conftest import wait_until
from haproxy import HAProxy
from smtp_client import message, read_reply, transact

SENDER = "news@shop.test"
ALLOWED, OUTSIDE, STRANGER = "127.0.0.3", "127.0.0.2", "127.0.0.4"
BEHIND_BALANCER: dict[str, Any] = dict(
    smtp={"proxy_protocol_from": ["127.0.0.1/32"], "proxy_protocol_timeout": 2.0},
    access={"allow_networks": [f"{ALLOWED}/32", "127.0.0.5/32"]},
)


async def send_from(source: str, address: tuple[str, int], recipients: list[str], content: bytes | None = None):  # type: ignore[no-untyped-def]
    """One transaction from the loopback address ``source``."""
    client = aiosmtplib.SMTP(hostname=address[0], port=address[1], start_tls=False, timeout=10,
                             source_address=(source, 0))
    await client.connect()
    try:
        return await transact(client, SENDER, recipients, content or message())
    finally:
        await client.quit()


def headers_counted(guard: Guard, result: str) -> float:
    return guard.metrics.proxy_headers.labels(result)._value.get()


def v2_header(client: str, client_port: int, server: str, server_port: int) -> bytes:
    addresses = socket.inet_aton(client) + socket.inet_aton(server) + struct.pack("!HH", client_port, server_port)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


async def open_from(source: str, address: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*address, local_addr=(source, 0))


async def closed_after(reader: asyncio.StreamReader) -> bytes:
    """Everything the guard sends until it closes the connection."""
    async with asyncio.timeout(10):
        return await reader.read()


@pytest.mark.parametrize("send_proxy", ["send-proxy-v2", "send-proxy"])
async def test_through_haproxy_the_guard_sees_the_real_client(start_guard, sink, tmp_path: Path,
                                                             send_proxy: str) -> None:
    guard = await start_guard(rate_limits=[{"name": "per-client", "key": "client", "rate": "1/h"}],
                              **BEHIND_BALANCER)
    assert guard.metrics_address is not None
    balancer = HAProxy(tmp_path / "haproxy", [(guard.smtp_address, guard.metrics_address)], send_proxy).start()
    try:
        allowed = await send_from(ALLOWED, balancer.address, ["a@example.com"])
        assert allowed.rcpt["a@example.com"].startswith("250") and allowed.data is not None
        # The Received header and the audit trail name the client, not the balancer.
        assert sink.messages[0].content.startswith(b"Received: from ")
        assert f"(unknown [{ALLOWED}])".encode() in sink.messages[0].content.split(b"\r\n", 1)[0]
        await guard.enforcement.audit.flush()
        assert {r.client for r in await guard.backends.audit.query(AuditFilter())} == {ALLOWED}

        # The rate limit by client counts the client: a second message from it is over ...
        again = await send_from(ALLOWED, balancer.address, ["b@example.com"])
        assert again.rcpt["b@example.com"] == str(replies.rate_limited("per-client"))
        # ... and another allowed client, through the same balancer, has a bucket of its own.
        other = await send_from("127.0.0.5", balancer.address, ["c@example.com"])
        assert other.rcpt["c@example.com"].startswith("250")

        # Outside allow_networks is refused, although the balancer itself may send headers.
        refused = await send_from(OUTSIDE, balancer.address, ["d@example.com"])
        assert refused.mail == str(replies.RELAY_DENIED)
        assert headers_counted(guard, "accepted") == 4
        assert sink.delivered_to() == ["a@example.com", "c@example.com"]
    finally:
        balancer.stop()


async def test_v1_header_from_the_balancer_names_the_client(start_guard, sink) -> None:
    guard = await start_guard(**BEHIND_BALANCER)
    host, port = guard.smtp_address
    reader, writer = await open_from("127.0.0.1", guard.smtp_address)
    try:
        writer.write(f"PROXY TCP4 {ALLOWED} {host} 40000 {port}\r\n".encode())
        assert (await read_reply(reader)).startswith("220 guard.test")
        for command, expected in ((b"EHLO platform.test", "250"), (f"MAIL FROM:<{SENDER}>".encode(), "250"),
                                  (b"RCPT TO:<a@example.com>", "250"), (b"DATA", "354"),
                                  (message() + b".", "250"), (b"QUIT", "221")):
            writer.write(command + b"\r\n")
            assert (await read_reply(reader)).startswith(expected), command
    finally:
        writer.close()
    assert f"(unknown [{ALLOWED}])".encode() in sink.messages[0].content.split(b"\r\n", 1)[0]
    assert headers_counted(guard, "accepted") == 1


async def test_a_local_header_keeps_the_balancers_own_address(start_guard) -> None:
    guard = await start_guard(**BEHIND_BALANCER)
    reader, writer = await open_from("127.0.0.1", guard.smtp_address)
    try:
        writer.write(b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0x00, 0x00]))  # v2 LOCAL: a health check
        assert (await read_reply(reader)).startswith("220")
        writer.write(f"EHLO lb\r\nMAIL FROM:<{SENDER}>\r\n".encode())
        await read_reply(reader)
        assert await read_reply(reader) == str(replies.RELAY_DENIED), "127.0.0.1 itself may not relay"
    finally:
        writer.close()
    assert headers_counted(guard, "local") == 1


async def test_a_balancer_connection_without_a_header_is_closed(start_guard) -> None:
    guard = await start_guard(**BEHIND_BALANCER)
    reader, writer = await open_from("127.0.0.1", guard.smtp_address)
    try:
        writer.write(b"EHLO sneaky.test\r\n")
        assert await closed_after(reader) == b"", "closed before any greeting"
    finally:
        writer.close()
    await wait_until(lambda: headers_counted(guard, "invalid") == 1, what="the missing header counted")


async def test_a_header_from_an_address_not_listed_is_refused_and_closed(start_guard) -> None:
    guard = await start_guard(**BEHIND_BALANCER)
    host, port = guard.smtp_address
    for header in (f"PROXY TCP4 {ALLOWED} {host} 40000 {port}\r\n".encode(),
                   v2_header(ALLOWED, 40000, host, port)):
        reader, writer = await open_from(STRANGER, guard.smtp_address)
        try:
            assert (await read_reply(reader)).startswith("220"), "served as any client is ..."
            writer.write(header + f"EHLO x\r\nMAIL FROM:<{SENDER}>\r\n".encode())
            assert await closed_after(reader) == f"{replies.PROXY_REFUSED}\r\n".encode(), "... until it sends one"
        finally:
            writer.close()
    assert headers_counted(guard, "untrusted") == 2
    assert headers_counted(guard, "accepted") == 0


async def test_without_proxy_protocol_a_header_is_refused_too(start_guard) -> None:
    guard = await start_guard()  # no [smtp] proxy_protocol_from at all
    reader, writer = await asyncio.open_connection(*guard.smtp_address)
    try:
        await read_reply(reader)
        writer.write(b"PROXY TCP4 192.0.2.1 127.0.0.1 40000 25\r\n")
        assert await closed_after(reader) == f"{replies.PROXY_REFUSED}\r\n".encode()
    finally:
        writer.close()

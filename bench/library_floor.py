#!/usr/bin/env python3
"""The least relay smtp-guard's libraries allow: what aiosmtpd and aiosmtplib cost on their own.

    python3 bench/library_floor.py --port PORT --upstream-port PORT

aiosmtpd's stock ``SMTP`` in front, pooled aiosmtplib sessions behind, on uvloop as
``smtp-guard serve`` runs by default, with the guard's reply semantics: MAIL, each RCPT and
the message are passed to the upstream in lock-step and the client gets the upstream's own
reply, so a 250 comes only after the upstream accepted. No policy, index, audit, metric or
log line; PIPELINING advertised as the guard does. ``fair_peer.py`` runs it as the
``lib-floor`` system beside the guard: the difference between the two is what the guard's own
work costs, and the floor itself is what no change inside the guard can go below while it
keeps these libraries. It prints ``ready`` once it listens, and stops on SIGTERM or SIGINT.
Not a product: no timeouts beyond aiosmtplib's, no TLS, no limits.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import aiosmtplib
import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session


class FloorHandler:
    """aiosmtpd's hooks, each a single upstream command on a pooled session."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.idle: list[aiosmtplib.SMTP] = []
        self.by_session: dict[int, aiosmtplib.SMTP] = {}

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        return responses[:-1] + ["250-PIPELINING", responses[-1]]

    async def _session(self) -> aiosmtplib.SMTP:
        while self.idle:
            client = self.idle.pop()
            if client.is_connected:  # the upstream may have closed it while idle
                return client
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.upstream_port, timeout=60, start_tls=False,
                                 local_hostname="floor.bench.test")
        await client.connect()
        await client.ehlo()  # else aiosmtplib's data() sends one first, which ends the upstream transaction
        return client

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        client = await self._session()
        reply = await client.execute_command(b"MAIL", b"FROM:<" + address.encode() + b">")
        if reply.code != 250:
            self.idle.append(client)
            return f"{reply.code} {reply.message}"
        self.by_session[id(session)] = client
        envelope.mail_from = address
        return f"{reply.code} {reply.message}"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        reply = await self.by_session[id(session)].execute_command(b"RCPT", b"TO:<" + address.encode() + b">")
        if reply.code == 250:
            envelope.rcpt_tos.append(address)
        return f"{reply.code} {reply.message}"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        client = self.by_session.pop(id(session))
        content = envelope.original_content
        assert isinstance(content, bytes)
        reply = await client.data(content)
        self.idle.append(client)
        return f"{reply.code} {reply.message}"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        client = self.by_session.pop(id(session), None)
        if client is not None:
            await client.rset()
            self.idle.append(client)
        return "250 OK"


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    handler = FloorHandler(upstream_port)
    server = await loop.create_server(lambda: SMTP(handler, hostname="floor.bench.test"), "127.0.0.1", port)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    for client in handler.idle:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="loopback port to listen on")
    parser.add_argument("--upstream-port", type=int, required=True, help="loopback port of the upstream (the sink)")
    args: Any = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream_port))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Two small SMTP clients that time every transaction, for ``fair_peer.py``; run as a
subprocess so their CPU never shares a GIL with the benchmark's own bookkeeping.

    python3 bench/smtp_load.py pipeline --port P [--messages N] [--sessions S] [--recipients R] [--size B]
    python3 bench/smtp_load.py probe --port P [--interval 0.02] [--max-seconds 600]
    python3 bench/smtp_load.py paced --port P --rate R [--seconds 10] [--sessions 20]

``pipeline``: S sessions, each one connection kept for all its messages; when the server's EHLO
advertises PIPELINING (RFC 2920) MAIL, every RCPT and DATA go in one write and their replies
are read together, then the body (after the 354). Without PIPELINING it falls back to
lock-step and says so. ``probe``: one lock-step session (like smtp-source) sending a 1-recipient
message every --interval seconds until SIGTERM/SIGINT, the sampler of transaction latency
while smtp-source drives the load. ``paced``: an open-loop load at a fixed rate — message k is
due at k / R seconds, sent by whichever of S lock-step sessions is free — for latency below
saturation (a send that starts more than 10 ms after it was due is counted as ``late``: too
few sessions for the rate).

A transaction's latency is from the first byte of MAIL written to the reply to the final "."
read. Both print one JSON object on stdout: messages and recipients accepted, errors,
elapsed seconds, latency percentiles in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import time

SENDER = "from@bench.test"
RECIPIENT = "to@bench.test"
TIMEOUT = 60.0  # per reply; a server that stalls longer fails the run instead of hanging it


class ReplyError(Exception):
    """The server answered outside the expected class."""


def message_body(size: int, hostname: str) -> bytes:
    """Headers plus ``size`` bytes of 78-byte lines, dot-stuffing unnecessary (no line starts with '.')."""
    headers = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench\r\n"
               f"Message-ID: <bench@{hostname}>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    body = line * (size // len(line)) + b"y" * (size % len(line)) + b"\r\n"
    return headers + body + b".\r\n"


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        async with asyncio.timeout(TIMEOUT):
            line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        lines.append(line.decode("latin-1").rstrip("\r\n"))
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), "\n".join(lines)


async def expect(reader: asyncio.StreamReader, first_digit: int) -> str:
    code, text = await read_reply(reader)
    if code // 100 != first_digit:
        raise ReplyError(text)
    return text


class Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pipelining: bool) -> None:
        self.reader, self.writer, self.pipelining = reader, writer, pipelining

    @classmethod
    async def open(cls, port: int, allow_pipelining: bool) -> "Session":
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await expect(reader, 2)
        writer.write(b"EHLO client.bench.test\r\n")
        ehlo = await expect(reader, 2)
        pipelining = allow_pipelining and any(line[4:].upper().startswith("PIPELINING")
                                              for line in ehlo.splitlines())
        return cls(reader, writer, pipelining)

    async def send(self, recipients: list[str], body: bytes) -> None:
        """One transaction; raises ReplyError (after RSET) when any reply is not positive."""
        commands = [f"MAIL FROM:<{SENDER}>\r\n".encode()] + [f"RCPT TO:<{r}>\r\n".encode() for r in recipients]
        try:
            if self.pipelining:
                self.writer.write(b"".join(commands) + b"DATA\r\n")
                replies = [await read_reply(self.reader) for _ in range(len(commands) + 1)]
                bad = [text for code, text in replies[:-1] if code // 100 != 2]
                if bad or replies[-1][0] != 354:
                    # RFC 2920: DATA after a failed RCPT gets 554/503; if it got 354, end the data at once.
                    if replies[-1][0] == 354:
                        self.writer.write(b".\r\n")
                        await read_reply(self.reader)
                    raise ReplyError("; ".join(bad) or replies[-1][1])
            else:
                for command in commands:
                    self.writer.write(command)
                    await expect(self.reader, 2)
                self.writer.write(b"DATA\r\n")
                await expect(self.reader, 3)
            self.writer.write(body)
            await expect(self.reader, 2)
        except ReplyError:
            self.writer.write(b"RSET\r\n")
            await read_reply(self.reader)
            raise

    async def close(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await read_reply(self.reader)
        except (OSError, ConnectionError, TimeoutError):
            pass
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


def percentiles(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None, "samples": 0}
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * p99, "max_ms": 1000 * ordered[-1],
            "samples": len(ordered)}


async def pipeline(args) -> dict:
    body = message_body(args.size, "client.bench.test")
    recipients = [f"{n}{RECIPIENT}" for n in range(1, args.recipients + 1)]
    remaining = args.messages
    latencies: list[float] = []
    errors: list[str] = []
    accepted = 0
    advertised: list[bool] = []

    async def one_session() -> None:
        nonlocal remaining, accepted
        session = await Session.open(args.port, allow_pipelining=True)
        advertised.append(session.pipelining)
        try:
            while remaining > 0 and len(errors) < 100:
                remaining -= 1
                started = time.perf_counter()
                try:
                    await session.send(recipients, body)
                except ReplyError as error:
                    errors.append(str(error)[:200])
                    continue
                latencies.append(time.perf_counter() - started)
                accepted += 1
        finally:
            await session.close()

    started = time.perf_counter()
    results = await asyncio.gather(*(one_session() for _ in range(args.sessions)), return_exceptions=True)
    elapsed = time.perf_counter() - started
    errors += [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    return {"elapsed_s": elapsed, "messages": accepted, "recipients": accepted * args.recipients,
            "pipelined": bool(advertised) and all(advertised), "errors": errors[:20], "error_count": len(errors),
            **percentiles(latencies)}


async def probe(args) -> dict:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    body = message_body(args.size, "probe.bench.test")
    latencies: list[float] = []
    errors: list[str] = []
    session = await Session.open(args.port, allow_pipelining=False)
    print("ready", file=sys.stderr, flush=True)
    deadline = time.monotonic() + args.max_seconds
    try:
        while not stop.is_set() and time.monotonic() < deadline and len(errors) < 100:
            started = time.perf_counter()
            try:
                await session.send([f"probe{RECIPIENT}"], body)
                latencies.append(time.perf_counter() - started)
            except ReplyError as error:
                errors.append(str(error)[:200])
            try:
                async with asyncio.timeout(args.interval):
                    await stop.wait()
            except TimeoutError:
                pass
    finally:
        await session.close()
    return {"messages": len(latencies), "recipients": len(latencies), "errors": errors[:20],
            "error_count": len(errors), **percentiles(latencies)}


async def paced(args) -> dict:
    body = message_body(args.size, "client.bench.test")
    total = max(1, int(args.rate * args.seconds))
    next_message = 0
    latencies: list[float] = []
    errors: list[str] = []
    late = 0

    async def one_session() -> None:
        nonlocal next_message, late
        session = await Session.open(args.port, allow_pipelining=False)
        try:
            while next_message < total and len(errors) < 100:
                due = begin + next_message / args.rate
                next_message += 1
                if (wait := due - time.perf_counter()) > 0:
                    await asyncio.sleep(wait)
                elif wait < -0.01:
                    late += 1
                started = time.perf_counter()
                try:
                    await session.send([RECIPIENT], body)
                except ReplyError as error:
                    errors.append(str(error)[:200])
                    continue
                latencies.append(time.perf_counter() - started)
        finally:
            await session.close()

    begin = time.perf_counter() + 0.5  # every session connected before the first is due
    results = await asyncio.gather(*(one_session() for _ in range(args.sessions)), return_exceptions=True)
    errors += [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    return {"elapsed_s": time.perf_counter() - begin, "messages": len(latencies), "recipients": len(latencies),
            "rate": args.rate, "late": late, "errors": errors[:20], "error_count": len(errors),
            **percentiles(latencies)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("pipeline", "probe", "paced"):
        mode = sub.add_parser(name)
        mode.add_argument("--port", type=int, required=True, help="server port on 127.0.0.1")
        mode.add_argument("--size", type=int, default=5120, help="body bytes (default 5120)")
    sub.choices["pipeline"].add_argument("--messages", type=int, default=2000)
    sub.choices["pipeline"].add_argument("--sessions", type=int, default=20)
    sub.choices["pipeline"].add_argument("--recipients", type=int, default=1)
    sub.choices["probe"].add_argument("--interval", type=float, default=0.02, help="pause between messages, s")
    sub.choices["probe"].add_argument("--max-seconds", type=float, default=600)
    sub.choices["paced"].add_argument("--rate", type=float, required=True, help="messages per second")
    sub.choices["paced"].add_argument("--seconds", type=float, default=10.0)
    sub.choices["paced"].add_argument("--sessions", type=int, default=20)
    args = parser.parse_args()
    if not (1 <= getattr(args, "messages", 1) <= 1_000_000 and 1 <= getattr(args, "sessions", 1) <= 200
            and 1 <= getattr(args, "recipients", 1) <= 1000 and 0 <= args.size <= 10_000_000):
        parser.error("bounded on purpose: messages 1..1e6, sessions 1..200, recipients 1..1000, size <= 10 MB")
    if args.mode == "paced" and not (0 < args.rate <= 100_000 and 0 < args.seconds <= 3600):
        parser.error("bounded on purpose: rate 0..1e5 msg/s, seconds 0..3600")
    modes = {"pipeline": pipeline, "probe": probe, "paced": paced}
    result = asyncio.run(modes[args.mode](args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""What deciding the message phase in the supervisor costs a worker: frame sizes, the codec,
and one round trip per message over the Unix socket, next to the same decision in place.

    python3 bench/decision_service.py [--messages 5000] [--in-flight 16]

1. **codec**: for contexts of 1, 10 and 100 recipients (nine ordinary header fields), the
   request frame's size, the answer's (nothing to say; every recipient held), and the µs to
   encode and decode each (``decision_service.encode`` / ``decode``: pickle with the wire
   allow-list), best of 5.
2. **round trip**: a real ``DecisionServer`` in a child process (as the supervisor will be),
   with the shipped default pipeline (breaker on, floor 1000; every message its own stream, so
   nothing trips); this process asks through a ``RemoteDecider``: ``--messages`` one after
   another (latency: mean, p50, p99 per message) and then with ``--in-flight`` requests at a
   time on the one connection (messages/s). Next to it, ``LocalDecider`` on the same messages
   in this process: the decision itself, what the single-process guard pays. The server's
   CPU per message (user+system of the child) is printed too.

No peer here: Postfix has no counterpart to a shared in-memory breaker (its nearest, a policy
service, is a separate program the operator supplies). This is a benchmark, not a test: it is
not part of the pytest suite (project rule).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

from checkout import code_version, cpu_model  # also puts this checkout first on sys.path

from smtp_guard import replies
from smtp_guard.addresses import AddressNormalizer, key_hash, parse_mailbox
from smtp_guard.breaker.state import BreakerState
from smtp_guard.config import build_config
from smtp_guard.decision_service import HEADER, DecisionServer, LocalDecider, RemoteDecider, decode, encode
from smtp_guard.erasure.index import TombstoneIndex
from smtp_guard.erasure.keys import KeyRing, new_key
from smtp_guard.index import SuppressionIndex
from smtp_guard.policy.base import Decision, MessageContext, RecipientContext, Verdict
from smtp_guard.policy.default import default_pipeline
from smtp_guard.policy.pipeline import MessageOutcome, Pipeline

HEADERS = {
    "from": "Shop <news@shop.example>", "to": "customer@example.com", "subject": "Spring sale: 20% off everything",
    "date": "Mon, 1 Apr 2024 10:00:00 +0000", "message-id": "<20240401100000.abc123@shop.example>",
    "mime-version": "1.0", "content-type": "text/html; charset=utf-8",
    "list-unsubscribe": "<mailto:unsubscribe@shop.example>, <https://shop.example/u/abc123>",
    "x-campaign-id": "spring-2024",
}
NORMALIZER = AddressNormalizer(build_config({}, "bench").addresses)


def recipient(address: str) -> RecipientContext:
    """As the SMTP front builds one at RCPT."""
    mailbox = parse_mailbox(address)
    key = NORMALIZER.key(mailbox)
    return RecipientContext(mailbox=mailbox, key=key, key_hash=key_hash(key),
                            domain_chain=tuple(NORMALIZER.domain_chain(mailbox.domain)),
                            sender="news@shop.example", client_ip="192.0.2.10", auth_user="platform")


def message(number: int, recipients: int) -> MessageContext:
    return MessageContext(
        sender="news@shop.example", client_ip="192.0.2.10", auth_user="platform", headers=HEADERS,
        subject=HEADERS["subject"], stream=f"stream-{number}", message_class="marketing",
        body_hash="9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        recipients=tuple(recipient(f"customer{number}.{i}@mail{i % 7}.example.com") for i in range(recipients)),
        now=time.time())


def pipeline() -> Pipeline:
    config = build_config({}, "bench")
    tombstones = TombstoneIndex(KeyRing(Path("unused"), [new_key()]))
    return default_pipeline(config, tombstones, SuppressionIndex(), breakers=BreakerState(config.breaker))


def best_us(action: object, repeat: int = 2000) -> float:
    assert callable(action)
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeat):
            action()
        runs.append((time.perf_counter() - started) / repeat * 1e6)
    return min(runs)


def codec() -> None:
    print("codec (best of 5)                     frame bytes   encode us   decode us")
    held = Decision(Verdict.HOLD, "breaker.volume", "stream paused by breaker.volume: more than 1000 recipients; "
                    "waiting for an admin (smtp-guard breaker show)", replies.HELD_FOR_REVIEW)
    for count in (1, 10, 100):
        request = message(0, count)
        frame = encode(1, request)
        payload = frame[HEADER.size:]
        print(f"  request, {count:3} recipient(s)          {len(frame):11,}   {best_us(lambda: encode(1, request)):9.1f}"
              f"   {best_us(lambda: decode(payload, MessageContext)):9.1f}")
        for what, outcome in (("pass", MessageOutcome()),
                              ("all held", MessageOutcome(recipients={r.mailbox.text: held for r in request.recipients}))):
            frame = encode(1, outcome)
            payload = frame[HEADER.size:]
            print(f"  answer, {count:3} recipient(s), {what:8}  {len(frame):11,}   "
                  f"{best_us(lambda: encode(1, outcome)):9.1f}   {best_us(lambda: decode(payload, MessageOutcome)):9.1f}")


def serve(path: str, ready: Connection, stop: Connection) -> None:
    """The supervisor's side, in its own process; reports its CPU seconds when told to stop."""
    async def run() -> None:
        server = DecisionServer(pipeline(), path)
        await server.start()
        ready.send("ready")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, stop.recv)
        await server.stop()
        times = os.times()
        ready.send((times.user + times.system, server.served))

    asyncio.run(run())


async def round_trips(path: str, messages: int, in_flight: int, recipients: int) -> None:
    contexts = [message(n, recipients) for n in range(messages)]
    local = LocalDecider(pipeline())
    started = time.perf_counter()
    for context in contexts:
        await local.decide_message(context)
    in_place = (time.perf_counter() - started) / messages * 1e6

    decider = RemoteDecider(path, timeout=30.0)
    await decider.decide_message(message(-1, recipients))  # connect
    contexts = [message(n, recipients) for n in range(messages, 2 * messages)]
    latencies = []
    for context in contexts:
        started = time.perf_counter()
        outcome = await decider.decide_message(context)
        latencies.append((time.perf_counter() - started) * 1e6)
        assert outcome.message is None, outcome
    latencies.sort()
    contexts = [message(n, recipients) for n in range(2 * messages, 3 * messages)]
    started = time.perf_counter()
    for first in range(0, messages, in_flight):
        outcomes = await asyncio.gather(*(decider.decide_message(c) for c in contexts[first:first + in_flight]))
        assert all(o.message is None for o in outcomes)
    rate = messages / (time.perf_counter() - started)
    await decider.close()
    print(f"  {recipients:3} recipient(s): in place {in_place:6.1f} us | remote one at a time: mean "
          f"{statistics.fmean(latencies):6.1f} us, p50 {latencies[len(latencies) // 2]:6.1f}, "
          f"p99 {latencies[int(len(latencies) * 0.99)]:7.1f} | {in_flight} in flight: {rate:8,.0f} msg/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--in-flight", type=int, default=16)
    args = parser.parse_args()
    if not 1 <= args.messages <= 1_000_000 or not 1 <= args.in_flight <= 1000:
        parser.error("--messages 1..1000000, --in-flight 1..1000")
    print(f"code: {code_version()}\ncpu: {cpu_model()}, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\npython {sys.version.split()[0]}\n")
    codec()
    with tempfile.TemporaryDirectory(prefix="dec-") as directory:
        path = str(Path(directory) / "run" / "decide.sock")
        spawn = multiprocessing.get_context("spawn")
        ready_here, ready_there = spawn.Pipe()
        stop_here, stop_there = spawn.Pipe()
        child = spawn.Process(target=serve, args=(path, ready_there, stop_there))
        child.start()
        try:
            if not ready_here.poll(30) or ready_here.recv() != "ready":
                raise SystemExit("the decision server did not start")
            print("\nround trip through a DecisionServer in another process")
            for recipients in (1, 10, 100):
                asyncio.run(round_trips(path, args.messages, args.in_flight, recipients))
            stop_here.send("stop")
            if ready_here.poll(30):
                cpu, served = ready_here.recv()
                print(f"  server CPU: {cpu / served * 1e6:.1f} us per message over {served:,} messages "
                      "(start-up included)")
        finally:
            child.join(30)
            if child.is_alive():
                child.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The release worker against a real SMTP peer (aiosmtpd on port 0) through the real pool.

The sink can tempfail or permfail chosen recipients at RCPT, or the whole message at DATA;
the clock is injected so that backoff and expiry are exact.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from smtp_guard.audit_model import AuditRecord
from smtp_guard.config import HoldConfig, UpstreamConfig
from smtp_guard.hold.model import HeldRecipient, NewHold, RecipientState
from smtp_guard.hold.worker import ReleaseWorker
from smtp_guard.relay.pool import SMTPUpstream
from smtp_guard.store.base import StoreError
from smtp_guard.store.sqlite.holds import SQLiteHoldStore

from conftest import ManualClock, open_engine_store

T0 = 1_700_000_000.0
CONTENT = b"From: news@shop.test\r\nSubject: Spring sale\r\n\r\nHello\r\n.leading dot\r\n"
HOLD = HoldConfig(retry_initial=60.0, retry_max=300.0, max_age=86400.0, poll_interval=0.01)


class Sink:
    """aiosmtpd handler: records deliveries, refuses what a test asks it to."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, str, bytes]] = []  # (sender, recipient, content)
        self.rcpt_replies: dict[str, str] = {}
        self.data_reply: str | None = None

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply is not None:
            return self.data_reply
        for recipient in envelope.rcpt_tos:
            self.delivered.append((str(envelope.mail_from), recipient, bytes(envelope.original_content or b"")))
        return "250 2.0.0 queued as 1"

    def recipients(self) -> list[str]:
        return [recipient for _, recipient, _ in self.delivered]


@pytest.fixture
async def sink() -> AsyncIterator[tuple[Sink, int]]:
    handler = Sink()
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(handler, hostname="sink.test"), "127.0.0.1", 0)
    yield handler, server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteHoldStore]:
    async with open_engine_store(tmp_path / "guard.sqlite3", clock=lambda: T0) as engine:
        yield engine.holds


class Harness:
    def __init__(self, store: SQLiteHoldStore, upstream: SMTPUpstream, sink: Sink) -> None:
        self.store = store
        self.upstream = upstream
        self.sink = sink
        self.clock = ManualClock(T0)
        self.audit: list[AuditRecord] = []
        self.worker = ReleaseWorker(store, upstream, HOLD, record=self.audit.append, clock=self.clock)

    async def hold(self, *addresses: str, release: bool = True) -> str:
        hold_id = await self.store.hold(NewHold(
            txn_id="txn-1", client="127.0.0.1", sender="news@shop.test", mail_options=("BODY=8BITMIME",),
            content=CONTENT, recipients=[HeldRecipient(a, "held", "breaker.volume", "too many") for a in addresses],
        ))
        if release:
            await self.store.release(hold_id, self.clock.now)
        return hold_id

    async def recipient(self, hold_id: str, address: str) -> HeldRecipient:
        message = await self.store.get(hold_id)
        assert message is not None
        return next(r for r in message.recipients if r.address == address)

    async def state(self, hold_id: str) -> dict[str, RecipientState]:
        message = await self.store.get(hold_id)
        assert message is not None
        return {r.address: r.state for r in message.recipients}


def upstream_for(port: int) -> SMTPUpstream:
    return SMTPUpstream(UpstreamConfig(mode="smtp", host="127.0.0.1", port=port, connect_timeout=2.0,
                                       command_timeout=5.0))


@pytest.fixture
async def harness(store: SQLiteHoldStore, sink: tuple[Sink, int]) -> AsyncIterator[Harness]:
    handler, port = sink
    upstream = upstream_for(port)
    yield Harness(store, upstream, handler)
    await upstream.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_released_recipients_delivered_exactly_once(harness: Harness) -> None:
    hold_id = await harness.hold("a@example.com", "b@example.com", "c@example.com", release=False)
    await harness.store.release(hold_id, harness.clock.now, ["a@example.com", "b@example.com"])

    assert await harness.worker.run_once() == 2
    for _ in range(3):
        assert await harness.worker.run_once() == 0
    harness.clock.now += 7 * 86400
    assert await harness.worker.run_once() == 0

    assert sorted(harness.sink.recipients()) == ["a@example.com", "b@example.com"]
    assert all(sender == "news@shop.test" and content == CONTENT for sender, _, content in harness.sink.delivered)
    assert await harness.state(hold_id) == {
        "a@example.com": "delivered", "b@example.com": "delivered", "c@example.com": "held"}
    assert [(r.kind, r.verdict, r.rule, r.recipient, r.txn_id) for r in harness.audit] == [
        ("delivery", "delivered", "hold.release", "a@example.com", "txn-1"),
        ("delivery", "delivered", "hold.release", "b@example.com", "txn-1"),
    ]


async def test_tempfail_is_retried_with_exponential_backoff(harness: Harness) -> None:
    harness.sink.rcpt_replies["b@example.com"] = "451 4.2.1 Mailbox busy"
    hold_id = await harness.hold("a@example.com", "b@example.com")

    assert await harness.worker.run_once() == 2
    assert harness.sink.recipients() == ["a@example.com"]
    b = await harness.recipient(hold_id, "b@example.com")
    assert (b.state, b.attempts, b.next_attempt_at, b.last_reply) == ("released", 1, T0 + 60, "451 4.2.1 Mailbox busy")
    assert harness.audit[-1].verdict == "deferred"

    harness.clock.now = T0 + 59
    assert await harness.worker.run_once() == 0
    harness.clock.now = T0 + 60
    assert await harness.worker.run_once() == 1
    assert (await harness.recipient(hold_id, "b@example.com")).next_attempt_at == T0 + 60 + 120
    harness.clock.now = T0 + 180
    assert await harness.worker.run_once() == 1
    assert (await harness.recipient(hold_id, "b@example.com")).next_attempt_at == T0 + 180 + 240
    harness.clock.now = T0 + 420
    assert await harness.worker.run_once() == 1
    assert (await harness.recipient(hold_id, "b@example.com")).next_attempt_at == T0 + 420 + 300  # retry_max

    del harness.sink.rcpt_replies["b@example.com"]
    harness.clock.now = T0 + 720
    assert await harness.worker.run_once() == 1
    assert harness.sink.recipients() == ["a@example.com", "b@example.com"]
    b = await harness.recipient(hold_id, "b@example.com")
    assert (b.state, b.attempts) == ("delivered", 5)


async def test_data_tempfail_marks_nobody_delivered(harness: Harness) -> None:
    harness.sink.data_reply = "452 4.3.1 Insufficient system storage"
    hold_id = await harness.hold("a@example.com", "b@example.com")
    assert await harness.worker.run_once() == 2
    assert await harness.state(hold_id) == {"a@example.com": "released", "b@example.com": "released"}

    harness.sink.data_reply = None
    harness.clock.now = T0 + 60
    assert await harness.worker.run_once() == 2
    assert sorted(harness.sink.recipients()) == ["a@example.com", "b@example.com"]
    assert await harness.state(hold_id) == {"a@example.com": "delivered", "b@example.com": "delivered"}


async def test_permfail_marks_failed_with_the_reply(harness: Harness) -> None:
    harness.sink.rcpt_replies["b@example.com"] = "550 5.1.1 No such user"
    hold_id = await harness.hold("a@example.com", "b@example.com")
    assert await harness.worker.run_once() == 2
    b = await harness.recipient(hold_id, "b@example.com")
    assert (b.state, b.last_reply, b.next_attempt_at) == ("failed", "550 5.1.1 No such user", None)
    assert harness.audit[-1].verdict == "failed"
    assert harness.sink.recipients() == ["a@example.com"]
    message = await harness.store.get(hold_id)
    assert message is not None and message.content is None  # nobody waits for it any more

    harness.sink.data_reply = "554 5.6.0 Content rejected"
    other = await harness.hold("c@example.com")
    assert await harness.worker.run_once() == 1
    c = await harness.recipient(other, "c@example.com")
    assert (c.state, c.last_reply) == ("failed", "554 5.6.0 Content rejected")


async def test_upstream_down_is_retried(store: SQLiteHoldStore, sink: tuple[Sink, int]) -> None:
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()  # nothing listens on this port any more
    upstream = upstream_for(port)
    harness = Harness(store, upstream, sink[0])
    hold_id = await harness.hold("a@example.com")
    assert await harness.worker.run_once() == 1
    a = await harness.recipient(hold_id, "a@example.com")
    assert (a.state, a.next_attempt_at) == ("released", T0 + 60)
    assert a.last_reply.startswith("451 4.4.1")
    await upstream.close()


async def test_gives_up_after_max_age(harness: Harness) -> None:
    harness.sink.rcpt_replies["a@example.com"] = "451 4.2.1 Mailbox busy"
    hold_id = await harness.hold("a@example.com")
    harness.clock.now = T0 + HOLD.max_age + 1
    assert await harness.worker.run_once() == 1  # one attempt even though the message is old
    a = await harness.recipient(hold_id, "a@example.com")
    assert a.state == "failed"
    assert a.last_reply.startswith("gave up after 1.0d in the hold queue; last reply: 451 4.2.1")
    assert harness.sink.delivered == []


async def test_discarded_recipients_are_never_delivered(harness: Harness) -> None:
    hold_id = await harness.hold("a@example.com", "b@example.com")
    await harness.store.discard(hold_id, ["a@example.com"])
    everyone = await harness.hold("c@example.com", "d@example.com")
    await harness.store.discard(everyone)

    assert await harness.worker.run_once() == 1
    assert await harness.worker.run_once() == 0
    assert harness.sink.recipients() == ["b@example.com"]


class ForgetfulStore:
    """The real store, made to fail the next record_attempt (the disk was full just then)."""

    fail_next = True

    def __init__(self, inner: SQLiteHoldStore) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def record_attempt(self, hold_id: str, address: str, state: RecipientState, reply: str,
                             next_attempt_at: float | None) -> None:
        if self.fail_next:
            self.fail_next = False
            raise StoreError("database or disk is full")
        await self.inner.record_attempt(hold_id, address, state, reply, next_attempt_at)


async def test_delivery_not_repeated_when_recording_it_failed(tmp_path: Path, sink: tuple[Sink, int]) -> None:
    async with open_engine_store(tmp_path / "guard.sqlite3", clock=lambda: T0) as engine:
        store = ForgetfulStore(engine.holds)
        upstream = upstream_for(sink[1])
        harness = Harness(store, upstream, sink[0])
        hold_id = await harness.hold("a@example.com")
        with pytest.raises(StoreError):
            await harness.worker.run_once()
        assert await harness.worker.run_once() == 0  # writes the outcome it kept, relays nothing
        assert await harness.worker.run_once() == 0
        assert harness.sink.recipients() == ["a@example.com"]
        assert await harness.state(hold_id) == {"a@example.com": "delivered"}
        await upstream.close()


async def test_started_worker_delivers_and_stops(store: SQLiteHoldStore, sink: tuple[Sink, int]) -> None:
    upstream = upstream_for(sink[1])
    audit: list[AuditRecord] = []
    worker = ReleaseWorker(store, upstream, HOLD, record=audit.append)
    worker.start()
    try:
        hold_id = await store.hold(NewHold(
            txn_id="txn-9", client="127.0.0.1", sender="", mail_options=(), content=CONTENT,
            recipients=[HeldRecipient("a@example.com", "held", "manual", "review")],
        ))
        await store.release(hold_id, 0.0)
        await wait_until(lambda: len(sink[0].delivered) == 1)
    finally:
        await worker.stop()
        await upstream.close()
    assert sink[0].delivered[0][:2] == ("<>", "a@example.com")
    assert [r.verdict for r in audit] == ["delivered"]

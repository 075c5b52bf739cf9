"""Rate limits end to end over loopback: client -> guard -> sink, replies asserted exactly.

Deferral tests drive the guard's injected clock (the buckets read it), so "after the window"
is exact and instant; the hold-and-pace test runs on real time (about two seconds), because
the release worker's pacing is what it proves.
"""

from __future__ import annotations

import time

import pytest

from smtp_guard import replies
from smtp_guard.app import Guard
from smtp_guard.audit_model import AuditFilter

from sink import Delivered
from smtp_client import message, send, without_trace

SENDER = "news@shop.test"
PER_DOMAIN = {"name": "per-domain", "key": "recipient_domain", "rate": "2/s", "burst": 2}
CAMPAIGNS = {"name": "campaigns", "key": "stream", "rate": "1/m", "burst": 2, "match": {"class": "marketing"}}
TRANSACTIONAL_RULE = {"rules": [{"class": "transactional", "header": "X-Message-Type", "pattern": "^receipt$"}]}
CAMPAIGN_HEADER = "X-Campaign-ID: spring-2024\r\n"


class Clock:
    """A wall clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.start = self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def at(self, seconds: float) -> None:
        self.now = self.start + seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def recipients_counted(guard: Guard, verdict: str, rule: str) -> float:
    return guard.metrics.recipients.labels(verdict, rule)._value.get()


async def test_over_the_limit_is_451_and_the_same_rcpt_passes_after_the_window(start_guard, sink, clock):
    guard = await start_guard(clock=clock, rate_limits=[PER_DOMAIN])
    rcpts = ["a@example.com", "b@example.com", "c@example.com", "d@example.org"]
    outcome = await send(guard.smtp_address, SENDER, rcpts, message())
    assert outcome.rcpt["c@example.com"] == str(replies.rate_limited("per-domain")) == \
        "451 4.7.1 Rate limit per-domain exceeded, try again later"
    assert outcome.rcpt["d@example.org"].startswith("250")  # another domain, another bucket
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == ["a@example.com", "b@example.com", "d@example.org"]

    clock.at(0.4)  # 0.8 of a token: still inside the window
    retry = await send(guard.smtp_address, SENDER, ["c@example.com"], message())
    assert retry.rcpt["c@example.com"] == str(replies.rate_limited("per-domain"))
    assert retry.data is None

    clock.at(0.5)  # one token back
    retry = await send(guard.smtp_address, SENDER, ["c@example.com"], message())
    assert retry.rcpt["c@example.com"].startswith("250")
    assert retry.data is not None and retry.data.startswith("250")
    assert sink.delivered_to()[-1] == "c@example.com"
    assert recipients_counted(guard, "defer", "ratelimit.per-domain") == 2

    await guard.enforcement.audit.flush()
    records = await guard.backends.audit.query(AuditFilter(verdict="defer", rule_prefix="ratelimit."))
    assert [r.rule for r in records] == ["ratelimit.per-domain"] * 2
    assert "example.com" not in records[0].reason  # key values stay out of reasons and logs


async def test_rule_matching_a_sender_leaves_other_senders_alone(start_guard, sink, clock):
    rule = {**PER_DOMAIN, "burst": 1, "match": {"sender": "@shop\\.test$"}}
    guard = await start_guard(clock=clock, rate_limits=[rule])
    shop = await send(guard.smtp_address, SENDER, ["a@example.com", "b@example.com"], message())
    assert shop.rcpt["b@example.com"] == str(replies.rate_limited("per-domain"))
    other = await send(guard.smtp_address, "billing@bank.test", ["a@example.com", "b@example.com"], message())
    assert other.accepted == ["a@example.com", "b@example.com"]


class TimedMessages(list[Delivered]):
    """The sink's delivered messages, with the wall-clock time each one arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: Delivered) -> None:
        self.times.append(time.time())
        super().append(item)


async def test_hold_and_pace_delivers_everything_no_faster_than_the_limit(start_guard, sink, wait_until):
    rule = {"name": "paced", "key": "sender", "rate": "5/s", "burst": 1, "action": "hold"}
    guard = await start_guard(rate_limits=[rule])
    sink.messages = timed = TimedMessages()
    rcpts = [f"r{i}@example.com" for i in range(10)]

    started = time.time()
    outcome = await send(guard.smtp_address, SENDER, rcpts, message())
    assert outcome.rcpt["r0@example.com"].startswith("250")  # the burst: relayed at once
    assert all(outcome.rcpt[r] == str(replies.PACED) for r in rcpts[1:])
    assert outcome.data is not None and outcome.data.startswith("250")

    await wait_until(lambda: len(sink.delivered_to()) == 10, timeout=5, what="all 10 recipients delivered")
    assert sorted(sink.delivered_to()) == sorted(rcpts), "each recipient exactly once"
    delivered = 0
    for at, item in zip(timed.times, timed):
        delivered += len(item.rcpt_tos)
        assert delivered <= 1 + 5 * (at - started) + 1e-6, f"{delivered} delivered {at - started:.3f}s in"
    assert timed.times[-1] - started >= 9 / 5  # the ninth held one waited for its token
    assert recipients_counted(guard, "hold", "ratelimit.paced") == 9

    async def hold_queue_empty() -> bool:
        # The sink has the last message a moment before the release worker commits it as
        # delivered: wait for the store, not for the sink.
        await guard.background.update_stats()
        return guard.metrics.hold_recipients._value.get() == 0

    await wait_until(hold_queue_empty, what="the hold queue gauge to reach 0 once every paced recipient is delivered")


async def test_stream_limit_defers_the_whole_marketing_message_not_the_receipt(start_guard, sink, clock):
    guard = await start_guard(clock=clock, rate_limits=[CAMPAIGNS], classify=TRANSACTIONAL_RULE)
    newsletter = message(subject="Spring sale", extra_headers=CAMPAIGN_HEADER)
    first = await send(guard.smtp_address, SENDER, ["a@example.com", "b@example.com"], newsletter)
    assert first.data is not None and first.data.startswith("250")  # the burst

    second = await send(guard.smtp_address, SENDER, ["c@example.com"], newsletter)
    assert second.rcpt["c@example.com"].startswith("250")  # the class is only known after DATA
    assert second.data == str(replies.rate_limited("campaigns"))

    receipt = message(subject="Your receipt", extra_headers=CAMPAIGN_HEADER + "X-Message-Type: receipt\r\n")
    passed = await send(guard.smtp_address, SENDER, ["c@example.com"], receipt)
    assert passed.data is not None and passed.data.startswith("250")
    assert sink.delivered_to() == ["a@example.com", "b@example.com", "c@example.com"]
    assert without_trace(sink.messages[-1].content) == receipt

    clock.at(60)  # one token back: a two-recipient message is still deferred, and takes nothing
    third = await send(guard.smtp_address, SENDER, ["d@example.com", "e@example.com"], newsletter)
    assert third.data == str(replies.rate_limited("campaigns"))
    retry = await send(guard.smtp_address, SENDER, ["c@example.com"], newsletter)
    assert retry.data is not None and retry.data.startswith("250")
    assert without_trace(sink.messages[-1].content) == newsletter
    assert guard.metrics.messages.labels("deferred")._value.get() == 2


async def test_stream_limit_in_hold_mode_holds_the_recipients_over_the_limit(start_guard, sink, wait_until):
    rule = {**CAMPAIGNS, "rate": "4/s", "burst": 1, "action": "hold"}
    guard = await start_guard(rate_limits=[rule])
    rcpts = ["a@example.com", "b@example.com", "c@example.com"]
    outcome = await send(guard.smtp_address, SENDER, rcpts, message(extra_headers=CAMPAIGN_HEADER))
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == ["a@example.com"]  # b and c wait for their tokens
    # The bucket is in debt: a message whose recipients are all paced says so.
    paced = await send(guard.smtp_address, SENDER, ["d@example.com"], message(extra_headers=CAMPAIGN_HEADER))
    assert paced.data == str(replies.QUEUED_PACED)
    await wait_until(lambda: sorted(sink.delivered_to()) == [*rcpts, "d@example.com"],
                     what="held recipients released")
    assert recipients_counted(guard, "hold", "ratelimit.campaigns") == 3


async def test_shadow_rule_delivers_everything_and_counts_what_it_would_have_deferred(start_guard, sink, clock):
    guard = await start_guard(clock=clock, rate_limits=[{**PER_DOMAIN, "shadow": True}])
    rcpts = ["a@example.com", "b@example.com", "c@example.com"]
    outcome = await send(guard.smtp_address, SENDER, rcpts, message())
    assert outcome.accepted == rcpts
    assert sink.delivered_to() == rcpts
    assert guard.metrics.shadow_decisions.labels("defer", "ratelimit.per-domain")._value.get() == 1
    assert recipients_counted(guard, "defer", "ratelimit.per-domain") == 0
    await guard.enforcement.audit.flush()
    records = await guard.backends.audit.query(AuditFilter(verdict="shadow-defer"))
    assert [r.rule for r in records] == ["ratelimit.per-domain"]


async def test_global_shadow_mode_covers_message_phase_limits(start_guard, sink, clock):
    guard = await start_guard(clock=clock, rate_limits=[CAMPAIGNS, {**PER_DOMAIN, "action": "hold"}],
                                      policy={"shadow": True})
    newsletter = message(subject="Spring sale", extra_headers=CAMPAIGN_HEADER)
    for rcpts in (["a@example.com", "b@example.com"], ["c@example.com"]):
        outcome = await send(guard.smtp_address, SENDER, rcpts, newsletter)
        assert outcome.accepted == rcpts
        assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == ["a@example.com", "b@example.com", "c@example.com"]
    # The first message used both bursts: the stream rule would have deferred the second
    # message, and the domain rule would have held its recipient.
    assert guard.metrics.shadow_decisions.labels("defer", "ratelimit.campaigns")._value.get() == 1
    assert guard.metrics.shadow_decisions.labels("hold", "ratelimit.per-domain")._value.get() == 1
    assert guard.metrics.hold_recipients._value.get() == 0
    await guard.enforcement.audit.flush()
    records = await guard.backends.audit.query(AuditFilter(verdict="shadow-defer"))
    assert [r.rule for r in records] == ["ratelimit.campaigns"]
    assert await guard.backends.audit.query(AuditFilter(verdict="shadow-defer", recipient="c@example.com")) == records

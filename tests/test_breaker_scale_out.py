"""Two guard instances behind one load balancer: one store, one Redis, the breaker global.

Two real ``Guard``s on their own SMTP ports share one SQLite store file (as two hosts would share
one PostgreSQL) and one real redis-server ([counters] url); the platform's connections alternate
between them, as a balancer spreads them. A stream spread over both trips once, at its size —
not at twice it — and is held on both from then on; one approval releases the held mail of
both exactly once (counted at the sink); approval gates and the fan-out detector count across
both; Redis gone is 451 4.3.0, except for a stream known to be tripped, which stays held.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from click.testing import CliRunner

from smtp_guard import replies
from smtp_guard.app import Guard
from smtp_guard.audit_model import AuditFilter
from smtp_guard.cli.main import main

from conftest import store_toml_of, wait_until
from smtp_client import message, send

SENDER = "news@shop.test"
STREAM = "spring-sale"
FLOOR = 10


def audience(count: int, start: int = 0) -> list[str]:
    return [f"member{i}@users.example" for i in range(start, start + count)]


def campaign(stream: str = STREAM) -> bytes:
    return message(subject="Spring sale", sender=SENDER, extra_headers=f"X-Campaign-ID: {stream}\r\n")


class Clock:
    """Wall time plus an offset the test moves forward (the hold queue's times are real ones)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def two_guards(start_guard: Callable[..., Awaitable[Guard]], redis_server: Any,
                     clock: Callable[[], float] = time.time, **overrides: Any) -> tuple[Guard, Guard]:
    """Two guards on one store (the fixture's shared data directory) and one Redis."""
    settings: dict[str, Any] = {"counters": {"url": redis_server.url, "timeout": 0.5},
                                "smtp": {"max_recipients": 1000}, **overrides}
    first = await start_guard(clock, **settings)
    second = await start_guard(clock, **settings)
    assert first.config.store == second.config.store and first.smtp_address != second.smtp_address
    return first, second


async def spread(guards: tuple[Guard, Guard], recipients: list[str], content: bytes, per_message: int) -> list[str]:
    """Send ``per_message`` recipients a message, the guards taking turns; each DATA reply."""
    data_replies = []
    for number, start in enumerate(range(0, len(recipients), per_message)):
        outcome = await send(guards[number % 2].smtp_address, SENDER, recipients[start:start + per_message], content)
        assert outcome.data is not None, outcome
        data_replies.append(outcome.data)
    return data_replies


def metric(guard: Guard, name: str, **labels: str) -> float:
    return guard.metrics.registry.get_sample_value(name, labels) or 0.0


def trips(guards: tuple[Guard, Guard], rule: str, message_class: str) -> float:
    return sum(metric(g, "smtp_guard_breaker_trips_total", rule=rule, **{"class": message_class}) for g in guards)


async def held(guard: Guard, stream: str = STREAM) -> int:
    return (await guard.backends.holds.stream_counts(stream)).get("held", 0)


async def admin(tmp_path: Path, guard: Guard, *args: str) -> str:
    """A CLI command on the guards' store, as an admin types it."""
    config_file = tmp_path / "smtp-guard.toml"
    config_file.write_text(f'[store]\n{store_toml_of(guard.config)}')
    result = await asyncio.to_thread(CliRunner().invoke, main, [*args, "--config", str(config_file)],
                                     env={"SMTP_GUARD_CONFIG": None})
    assert result.exit_code == 0, result.output
    return result.output


async def test_a_stream_spread_over_two_guards_trips_once_at_its_size_and_waits_on_both(
        start_guard, sink, redis_server, tmp_path):
    guards = await two_guards(start_guard, redis_server, breaker={"floor": FLOOR})
    # 3 recipients a message, alternately: 6 per guard when the stream reaches 12.
    data_replies = await spread(guards, audience(12), campaign(), per_message=3)
    assert data_replies[:3] == ["250 2.0.0 OK queued"] * 3
    assert data_replies[3].startswith("250") and data_replies[3] != str(replies.QUEUED_HELD)  # 1 relayed, 2 held
    assert sorted(sink.delivered_to()) == sorted(audience(FLOOR))  # at the floor of 10, not at 20
    assert trips(guards, "breaker.volume", "marketing") == 1
    first, second = guards
    trip = second.background.breaker_state.trips[STREAM]  # the second guard counted the 11th recipient
    assert (trip.status, trip.rule, trip.threshold, trip.recipients) == ("tripped", "breaker.volume", FLOOR, FLOOR + 1)

    # From now on both hold the stream, from their next message on: no sync interval to wait for.
    for guard, start in ((first, 100), (second, 200), (first, 300)):
        outcome = await send(guard.smtp_address, SENDER, audience(2, start=start), campaign())
        assert outcome.data == str(replies.QUEUED_HELD)
    assert first.background.breaker_state.trips[STREAM].status == "tripped"
    assert len(sink.delivered_to()) == FLOOR and await held(first) == 2 + 6
    assert trips(guards, "breaker.volume", "marketing") == 1  # adopted by the first guard, not tripped again

    # One trip in the store and in the audit trail; the audience is the global one.
    await wait_until(lambda: _stored_audience(first, 18), what="the audience of 18 to reach the store")
    await first.enforcement.audit.flush()
    await second.enforcement.audit.flush()
    assert [r.rule for r in await first.backends.audit.query(AuditFilter(verdict="trip"))] == ["breaker.volume"]


async def _stored_audience(guard: Guard, expected: int) -> bool:
    record = await guard.backends.breakers.get(STREAM)
    return record is not None and record.recipients == expected


async def test_one_approval_releases_the_held_mail_of_both_guards_exactly_once(
        start_guard, sink, redis_server, tmp_path):
    guards = await two_guards(start_guard, redis_server, breaker={"floor": FLOOR})
    await spread(guards, audience(40), campaign(), per_message=5)
    assert len(sink.delivered_to()) == FLOOR
    first, second = guards
    await wait_until(lambda: first.backends.breakers.get(STREAM), what="the trip to reach the store")
    holds = await first.backends.holds.list()
    assert {h.recipients[0].rule for h in holds} == {"breaker.volume"} and len(holds) == 6  # held on both guards

    output = await admin(tmp_path, first, "breaker", "approve", STREAM, "--ceiling", "50")
    assert "released 30 held recipient(s)" in output and "In force on 2 running guards." in output
    await wait_until(lambda: len(sink.delivered_to()) >= 40, timeout=15,
                     what="both release workers to deliver the held recipients")
    for guard in guards:
        assert guard.background.breaker_state.trips[STREAM].status == "approved"  # in force when it returned

    # Under the ceiling of 50 the stream goes on through both guards; past it, it trips again — once.
    data_replies = await spread(guards, audience(12, start=40), campaign(), per_message=3)
    assert data_replies[:3] == ["250 2.0.0 OK queued"] * 3 and data_replies[3] != str(replies.QUEUED_HELD)
    assert trips(guards, "breaker.volume", "marketing") == 2
    for guard in guards:
        await guard.background.release_worker.stop()
        assert await guard.background.release_worker.run_once() == 0
    delivered = sink.delivered_to()
    assert len(delivered) == len(set(delivered)) == 50 and set(delivered) == set(audience(50))


async def test_an_approval_gate_counts_across_both_guards(start_guard, sink, redis_server):
    guards = await two_guards(
        start_guard, redis_server, classify={"rules": [{"class": "sanction", "subject": "policy violation"}]},
        classes={"sanction": {"approval_after": 5}})
    notice = message(subject="Policy violation: earnings forfeited", sender=SENDER,
                     extra_headers="X-Campaign-ID: sanction-1\r\n")
    await spread(guards, audience(16), notice, per_message=2)
    assert sorted(sink.delivered_to()) == sorted(audience(5))  # 5 in all, not 5 per guard
    assert await held(guards[0], "sanction-1") == 11
    assert trips(guards, "gate.sanction", "sanction") == 1


async def test_the_fanout_detector_counts_across_both_guards(start_guard, sink, redis_server):
    guards = await two_guards(
        start_guard, redis_server,
        classify={"rules": [{"class": "transactional", "header": "X-Message-Type", "pattern": "^receipt$"}]},
        classes={"transactional": {"fanout_limit": 4}})
    receipt = message(subject="Your receipt", sender=SENDER, body="Receipt for partner 4711.\r\n",
                      extra_headers="X-Message-Type: receipt\r\n")
    await spread(guards, audience(10), receipt, per_message=1)
    assert sorted(sink.delivered_to()) == sorted(audience(4))
    assert trips(guards, "breaker.fanout", "transactional") == 1
    # Personal bodies of their own, one recipient each, go on: only the stream that fanned out waits.
    for number in range(4):
        own = message(subject="Your order", sender=SENDER, body=f"Order {number} for you.\r\n",
                      extra_headers="X-Message-Type: receipt\r\n")
        outcome = await send(guards[number % 2].smtp_address, SENDER, audience(1, start=100 + number), own)
        assert outcome.data == "250 2.0.0 OK queued"


async def test_a_finished_stream_teaches_its_senders_baseline_once_and_both_guards_learn_it(
        start_guard, sink, redis_server):
    clock = Clock()
    guards = await two_guards(start_guard, redis_server, clock,
                              breaker={"floor": FLOOR, "stream_idle": "30m", "learning_rate": 0.5})
    first, second = guards
    await spread(guards, audience(8), campaign("week-1"), per_message=2)  # 4 recipients through each
    clock.offset += 31 * 60
    await wait_until(lambda: _stored_baseline(first, 8.0, 1), what="the baseline of 8 (not 4, nor twice)")
    await wait_until(lambda: all(g.background.breaker_state.baseline(SENDER) == 8.0 for g in guards),
                     what="both guards to take the baseline up")

    # The sender's next stream, ended by one of them, is learned on top: 0.5 x 8 + 0.5 x 4.
    await spread((second, first), audience(4, start=100), campaign("week-2"), per_message=2)
    clock.offset += 31 * 60
    await wait_until(lambda: _stored_baseline(first, 6.0, 2), what="the baseline of 6 from two streams")
    await wait_until(lambda: all(g.background.breaker_state.baseline(SENDER) == 6.0 for g in guards),
                     what="both guards to take the new baseline up")


async def _stored_baseline(guard: Guard, baseline: float, streams: int) -> bool:
    stored = await guard.backends.breakers.baseline(SENDER)
    return stored is not None and (stored.baseline, stored.streams) == (baseline, streams)


async def test_redis_gone_defers_the_mail_the_breaker_counts(start_guard, sink, redis_server):
    guards = await two_guards(start_guard, redis_server, breaker={"floor": FLOOR})
    redis_server.stop()
    for guard in guards:
        outcome = await send(guard.smtp_address, SENDER, audience(2), campaign())
        assert outcome.data == str(replies.COUNTERS_UNAVAILABLE) == \
            "451 4.3.0 Rate limit counters unavailable, try again later"
        assert guard.metrics.recipients.labels("defer", "counters.unavailable")._value.get() == 2
        assert guard.metrics.redis_errors.labels("count", "connection")._value.get() == 1
    assert sink.messages == []

    redis_server.start()
    outcome = await send(guards[0].smtp_address, SENDER, audience(2), campaign())
    assert outcome.data == "250 2.0.0 OK queued"


async def test_a_tripped_stream_stays_held_on_both_while_redis_is_gone_even_with_on_error_allow(
        start_guard, sink, redis_server):
    guards = await two_guards(start_guard, redis_server, breaker={"floor": FLOOR},
                              counters={"url": redis_server.url, "timeout": 0.5, "on_error": "allow"})
    await spread(guards, audience(12), campaign(), per_message=6)  # tripped on the second guard
    first, second = guards
    # The first guard learns of the trip from the store (it has sent nothing of the stream since).
    await wait_until(lambda: STREAM in first.background.breaker_state.trips, what="the first guard to adopt the trip")
    redis_server.stop()
    for guard, start in ((first, 100), (second, 200)):
        outcome = await send(guard.smtp_address, SENDER, audience(2, start=start), campaign())
        assert outcome.data == str(replies.QUEUED_HELD)
    # Another stream passes uncounted, as on_error = "allow" says.
    outcome = await send(first.smtp_address, SENDER, audience(1, start=300), campaign("autumn-sale"))
    assert outcome.data == "250 2.0.0 OK queued"
    assert len(sink.delivered_to()) == FLOOR + 1 and await held(first) == 2 + 4


async def test_an_approval_is_in_force_on_both_guards_while_redis_is_gone(start_guard, sink, redis_server, tmp_path):
    """The breaker sync needs Redis for audiences and idle streams only: admin decisions never wait for it."""
    guards = await two_guards(start_guard, redis_server, breaker={"floor": FLOOR})
    await spread(guards, audience(16), campaign(), per_message=4)
    first, second = guards
    await wait_until(lambda: first.backends.breakers.get(STREAM), what="the trip to reach the store")
    redis_server.stop()
    output = await admin(tmp_path, first, "breaker", "approve", STREAM, "--ceiling", "100")
    assert "released 6 held recipient(s)" in output and "In force on 2 running guards." in output
    await wait_until(lambda: len(sink.delivered_to()) >= 16, what="the held recipients to be delivered")
    assert all(g.background.breaker_state.trips[STREAM].status == "approved" for g in guards)

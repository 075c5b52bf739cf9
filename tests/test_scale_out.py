"""Several guard instances on one Redis ([counters] url), end to end over loopback.

Each guard here has its own SMTP port and its own SQLite store, as two instances on two hosts
would (their store would be one PostgreSQL); what they share is the rate counters in a real
redis-server. The limits hold across them, survive a guard's restart, and Redis going away
defers the mail (451 4.3.0) — or lets it through, counted, with on_error = "allow".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from smtp_guard import replies
from smtp_guard.app import Guard
from smtp_guard.audit_model import AuditFilter

from conftest import running_guard, wait_until
from smtp_client import message, send

SENDER = "news@shop.test"
PER_SENDER = {"name": "per-sender", "key": "sender", "rate": "3/m", "burst": 3}


def counters(redis_server: Any, **settings: Any) -> dict[str, Any]:
    return {"url": redis_server.url, **settings}


def own_store(tmp_path: Path, name: str) -> dict[str, str]:
    return {"path": str(tmp_path / name / "guard.sqlite3")}


async def readyz(guard: Guard) -> tuple[int, str]:
    assert guard.metrics_address is not None
    host, port = guard.metrics_address
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{host}:{port}/readyz") as response:
            return response.status, await response.text()


async def test_a_limit_holds_across_two_guards_on_one_redis(start_guard, sink, redis_server, tmp_path):
    first = await start_guard(counters=counters(redis_server), rate_limits=[PER_SENDER],
                              store=own_store(tmp_path, "one"))
    second = await start_guard(counters=counters(redis_server), rate_limits=[PER_SENDER],
                               store=own_store(tmp_path, "two"))
    replies_seen = []
    for i in range(6):
        guard = (first, second)[i % 2]  # a platform's connections spread by the load balancer
        outcome = await send(guard.smtp_address, SENDER, [f"r{i}@example.com"], message())
        replies_seen.append(outcome.rcpt[f"r{i}@example.com"])
    assert [reply[:3] for reply in replies_seen] == ["250", "250", "250", "451", "451", "451"]
    assert replies_seen[3] == str(replies.rate_limited("per-sender"))
    assert sorted(sink.delivered_to()) == ["r0@example.com", "r1@example.com", "r2@example.com"]
    deferred = [guard.metrics.recipients.labels("defer", "ratelimit.per-sender")._value.get() for guard in (first, second)]
    assert deferred == [1, 2]  # r3 and r5 came to the second guard, r4 to the first


async def test_counters_survive_a_guard_restart(sink, redis_server, tmp_path):
    settings: dict[str, Any] = dict(counters=counters(redis_server), rate_limits=[PER_SENDER])
    async with running_guard(tmp_path, sink.port, **settings) as guard:
        outcome = await send(guard.smtp_address, SENDER, ["a@example.com", "b@example.com", "c@example.com"],
                             message())
        assert outcome.accepted == ["a@example.com", "b@example.com", "c@example.com"]
    async with running_guard(tmp_path, sink.port, **settings) as restarted:
        outcome = await send(restarted.smtp_address, SENDER, ["d@example.com"], message())
        assert outcome.rcpt["d@example.com"] == str(replies.rate_limited("per-sender"))


async def test_redis_gone_defers_with_451_430_and_service_resumes_when_it_is_back(start_guard, redis_server):
    guard = await start_guard(counters=counters(redis_server, timeout=0.5), rate_limits=[PER_SENDER])
    assert (await readyz(guard))[0] == 200
    redis_server.stop()
    outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message())
    assert outcome.rcpt["a@example.com"] == str(replies.COUNTERS_UNAVAILABLE) == \
        "451 4.3.0 Rate limit counters unavailable, try again later"
    assert outcome.data is None
    assert guard.metrics.recipients.labels("defer", "counters.unavailable")._value.get() == 1
    assert guard.metrics.redis_errors.labels("settle", "connection")._value.get() == 1
    status, text = await wait_until(lambda: _not_ready(guard), what="/readyz to report the counters")
    assert status == 503 and "counters: Redis at 127.0.0.1" in text and "cannot connect: Connection refused" in text

    redis_server.start()
    await wait_until(lambda: _ready(guard), what="/readyz to be ready again")
    outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message())
    assert outcome.rcpt["a@example.com"].startswith("250") and outcome.data is not None


async def _not_ready(guard: Guard) -> tuple[int, str] | None:
    status, text = await readyz(guard)
    return (status, text) if "counters: ok" not in text else None


async def _ready(guard: Guard) -> bool:
    return (await readyz(guard))[0] == 200


async def test_on_error_allow_lets_mail_through_uncounted_and_says_so(start_guard, sink, redis_server):
    guard = await start_guard(counters=counters(redis_server, on_error="allow", timeout=0.5),
                              rate_limits=[PER_SENDER])
    redis_server.stop()
    outcome = await send(guard.smtp_address, SENDER, ["a@example.com"], message())
    assert outcome.rcpt["a@example.com"].startswith("250") and outcome.data is not None
    assert sink.delivered_to() == ["a@example.com"]
    # Passed uncounted twice: by the rate limit at RCPT, by the breaker (its stream count) at DATA.
    assert guard.metrics.shadow_decisions.labels("defer", "counters.unavailable")._value.get() == 2
    await guard.enforcement.audit.flush()
    records = await guard.backends.audit.query(AuditFilter(verdict="shadow-defer"))
    assert [r.rule for r in records] == ["counters.unavailable"] * 2  # recipients are pseudonyms there
    assert all("not counted, allowed by [counters] on_error" in r.reason for r in records)

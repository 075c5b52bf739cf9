"""Metrics and health over real HTTP after real transactions, parsed by prometheus_client's parser."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import aiosmtplib
from prometheus_client.parser import text_string_to_metric_families

from smtp_guard import replies
from smtp_guard.app import Guard
from smtp_guard.suppression_model import SuppressionEntry

from conftest import ManualClock, wait_until
from smtp_client import message, send

SENDER = "news@shop.test"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def put_on_list(guard: Guard, address: str, list_name: str) -> None:
    await guard.backends.suppressions.add([SuppressionEntry("address", guard.backends.normalizer.key(address), list_name,
                                                   reason="test", source="test", created_at=time.time())])
    await guard.enforcement.reloader.refresh()


def url(guard: Guard, path: str) -> str:
    assert guard.metrics_address is not None
    host, port = guard.metrics_address
    return f"http://{host}:{port}{path}"


async def get(guard: Guard, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url(guard, path)) as response:
            return response.status, await response.text()


async def scrape(guard: Guard) -> Samples:
    status, text = await get(guard, "/metrics")
    assert status == 200
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_metrics_after_real_transactions(start_guard, sink):
    guard = await start_guard(lists={"manual": {"action": "hold"}})
    await put_on_list(guard, "gone@example.com", "unsubscribed")
    await put_on_list(guard, "held@example.com", "manual")

    # One suppressed + one delivered recipient: relayed.
    outcome = await send(guard.smtp_address, SENDER, ["gone@example.com", "ok@example.com"], message())
    assert outcome.rcpt["gone@example.com"] == str(replies.SUPPRESSED)
    assert outcome.data is not None and outcome.data.startswith("250")
    # The upstream refuses a recipient (5xx at RCPT), then a whole message (5xx to DATA).
    sink.permfail_rcpt.add("nouser@example.com")
    outcome = await send(guard.smtp_address, SENDER, ["nouser@example.com"], message())
    assert outcome.rcpt["nouser@example.com"].startswith("550")
    sink.data_reply = "554 5.7.1 content rejected"
    outcome = await send(guard.smtp_address, SENDER, ["spam@example.com"], message())
    assert outcome.data == "554 5.7.1 content rejected"
    sink.data_reply = None
    # Only a held recipient.
    outcome = await send(guard.smtp_address, SENDER, ["held@example.com"], message())
    assert outcome.data == str(replies.QUEUED_HELD)

    await guard.background.update_stats()
    await guard.background.update_list_sizes()
    samples = await scrape(guard)

    recipients = "smtp_guard_recipients_total"
    assert value(samples, recipients, verdict="reject", rule="suppression.unsubscribed") == 1
    assert value(samples, recipients, verdict="hold", rule="suppression.manual") == 1
    assert value(samples, recipients, verdict="pass", rule="pass") == 2  # ok@, spam@
    assert value(samples, recipients, verdict="reject", rule="upstream.rcpt") == 1

    messages = "smtp_guard_messages_total"
    assert value(samples, messages, outcome="relayed") == 1
    assert value(samples, messages, outcome="refused") == 1
    assert value(samples, messages, outcome="held") == 1
    assert value(samples, messages, outcome="dropped") == 0
    assert value(samples, messages, outcome="deferred") == 0
    assert value(samples, "smtp_guard_upstream_errors_total", **{"class": "5xx"}) == 2
    assert value(samples, "smtp_guard_upstream_errors_total", **{"class": "connection"}) == 0

    duration = "smtp_guard_upstream_duration_seconds"
    assert value(samples, f"{duration}_count", command="mail") == 3  # one pooled MAIL per relayed transaction
    assert value(samples, f"{duration}_count", command="rcpt") == 3
    assert value(samples, f"{duration}_count", command="data") == 2
    assert value(samples, f"{duration}_bucket", command="data", le="+Inf") == 2
    assert value(samples, f"{duration}_sum", command="rcpt") > 0

    assert value(samples, "smtp_guard_hold_messages") == 1
    assert value(samples, "smtp_guard_hold_recipients") == 1
    assert value(samples, "smtp_guard_hold_oldest_age_seconds") >= 0
    assert value(samples, "smtp_guard_suppression_entries", list="unsubscribed") == 1
    assert value(samples, "smtp_guard_suppression_entries", list="manual") == 1
    assert value(samples, "smtp_guard_relay_denied_total") == 0

    # Bounded labels: never an address (or anything else from the mail) as a label value.
    for _, labels in samples:
        for label_value in dict(labels).values():
            assert "@" not in label_value, labels
    assert all(name.startswith("smtp_guard_") for name, _ in samples)


READY = "ready\nindex: ok\nlistener: ok\nstore: ok\ncounters: ok\nupstream: ok\n"


async def test_health_and_readiness_through_shutdown(start_guard, sink):
    guard = await start_guard(smtp={"shutdown_grace": 10.0})
    assert await get(guard, "/healthz") == (200, "ok\n")
    assert await get(guard, "/readyz") == (200, READY)

    # A transaction in flight keeps the shutdown going, so readiness can be seen to drop.
    host, port = guard.smtp_address
    client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
    await client.connect()
    try:
        await client.mail(SENDER)
        await client.rcpt("a@example.com")
        stopping = asyncio.create_task(guard.stop())

        async def not_ready() -> bool:
            return (await get(guard, "/readyz"))[0] == 503

        await wait_until(not_ready, what="/readyz to answer 503 once shutdown began")
        assert not guard.ready
        assert await get(guard, "/healthz") == (200, "ok\n")  # alive while draining
        response = await client.data(message())
        assert response.code == 250
    finally:
        client.close()
    await stopping
    assert sink.delivered_to() == ["a@example.com"]


async def test_list_sizes_are_counted_again_only_after_a_change_or_an_expiry(start_guard, monkeypatch):
    # Counting scans the whole table (seconds at ten million entries): a count that cannot
    # have changed is not made again.
    clock = ManualClock(time.time())
    guard = await start_guard(clock=clock)
    suppressions = guard.backends.suppressions
    scans: list[float] = []
    count_by_list = suppressions.count_by_list

    async def counted(now: float) -> dict[str, int]:
        scans.append(now)
        return await count_by_list(now)

    monkeypatch.setattr(suppressions, "count_by_list", counted)

    async def entries(list_name: str) -> float:
        await guard.background.update_list_sizes()
        return value(await scrape(guard), "smtp_guard_suppression_entries", list=list_name)

    await suppressions.add([
        SuppressionEntry("address", "soon@example.com", "bounced", created_at=clock.now, expires_at=clock.now + 60),
        SuppressionEntry("address", "kept@example.com", "bounced", created_at=clock.now)])
    assert await entries("bounced") == 2 and len(scans) == 1
    assert await entries("bounced") == 2 and len(scans) == 1, "nothing changed: no scan"
    clock.advance(61)  # an entry expired: nothing was logged, yet the count is not the same
    assert await entries("bounced") == 1 and len(scans) == 2
    clock.advance(3600)
    assert await entries("bounced") == 1 and len(scans) == 2, "no entry left to expire: no scan"
    await suppressions.remove("address", "kept@example.com", "bounced")
    assert await entries("bounced") == 0 and len(scans) == 3, "an emptied list reads 0, not its last count"

"""The second incident, replayed over real loopback SMTP: a sanction notice addressed to a
whole user base, a campaign ten times its sender's usual size, a personal body sent to
everyone — each stopped before most of it left, and released or cancelled by an admin
through the real CLI. client -> guard -> hold queue (real SQLite) -> release worker -> sink.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from click.testing import CliRunner

from smtp_guard import replies
from smtp_guard.app import Guard, open_admin_context
from smtp_guard.audit_model import AuditFilter
from smtp_guard.breaker import service
from smtp_guard.breaker.model import BreakerRecord, BreakerStatus, BreakerStore
from smtp_guard.cli.main import main

from conftest import running_guard, wait_until, store_toml_of
from smtp_client import message, send

SENDER = "notices@platform.test"
STREAM = "sanction-2026-05"
APPROVAL_AFTER = 25
SANCTION = {
    "smtp": {"max_recipients": 1000},
    "classify": {"rules": [{"class": "sanction", "subject": "policy violation"}]},
    "classes": {"sanction": {"approval_after": APPROVAL_AFTER}},
}


class Clock:
    """Wall time plus an offset the test moves forward (never back: the hold queue's release
    times are written by the CLI on the real clock)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def write_config(tmp_path: Path, guard: Guard) -> Path:
    """The same settings as the running guard, as the TOML file an admin's CLI reads."""
    path = tmp_path / "smtp-guard.toml"
    path.write_text(
        f'[store]\n{store_toml_of(guard.config)}\n'
        '[classify]\nrules = [{ class = "sanction", subject = "policy violation" }]\n\n'
        f'[classes.sanction]\napproval_after = {APPROVAL_AFTER}\n')
    return path


async def admin(config_file: Path, *args: str) -> str:
    runner = CliRunner()
    result = await asyncio.to_thread(runner.invoke, main, [*args, "--config", str(config_file)],
                                     env={"SMTP_GUARD_CONFIG": None})
    assert result.exit_code == 0, result.output
    return result.output


def audience(count: int, start: int = 0) -> list[str]:
    return [f"member{i}@users.example" for i in range(start, start + count)]


def notice(stream: str = STREAM) -> bytes:
    return message(subject="Policy violation: earnings forfeited", sender=SENDER,
                   body="Partner 4711: your account may be closed.\r\n", extra_headers=f"X-Campaign-ID: {stream}\r\n")


async def send_in_batches(guard: Guard, recipients: list[str], content: bytes, batch: int = 1000) -> list[str]:
    """Send to everyone, ``batch`` recipients per message; returns each message's DATA reply."""
    replies_ = []
    for start in range(0, len(recipients), batch):
        outcome = await send(guard.smtp_address, SENDER, recipients[start:start + batch], content)
        assert outcome.accepted == recipients[start:start + batch]
        assert outcome.data is not None
        replies_.append(outcome.data)
    return replies_


async def held_recipients(guard: Guard, stream: str = STREAM) -> int:
    return (await guard.backends.holds.stream_counts(stream)).get("held", 0)


def metric(guard: Guard, name: str, **labels: str) -> float:
    return guard.metrics.registry.get_sample_value(name, labels) or 0.0


async def sanction_incident(guard: Guard, sink: Any) -> list[str]:
    """A sanction notice to 5,000 people: 25 go, the rest wait for an admin."""
    everyone = audience(5000)
    data_replies = await send_in_batches(guard, everyone, notice())
    assert data_replies[0].startswith("250") and data_replies[0] != str(replies.QUEUED_HELD)  # relayed + held
    assert data_replies[1:] == [str(replies.QUEUED_HELD)] * 4
    assert sink.delivered_to() == everyone[:APPROVAL_AFTER]
    assert await held_recipients(guard) == 5000 - APPROVAL_AFTER
    trip = guard.background.breaker_state.trips[STREAM]
    assert (trip.status, trip.rule, trip.threshold, trip.message_class) == ("tripped", "gate.sanction", 25, "sanction")
    assert metric(guard, "smtp_guard_breaker_trips_total", rule="gate.sanction", **{"class": "sanction"}) == 1
    assert metric(guard, "smtp_guard_breaker_recipients_total", verdict="hold", rule="gate.sanction",
                  **{"class": "sanction"}) == 5000 - APPROVAL_AFTER
    return everyone


async def test_sanction_stream_cancelled_is_never_delivered(tmp_path, sink):
    async with running_guard(tmp_path, sink.port, **SANCTION) as guard:
        await sanction_incident(guard, sink)
        config_file = write_config(tmp_path, guard)
        await wait_until(lambda: guard.backends.breakers.get(STREAM), what="the trip to reach the store")

        listed = await admin(config_file, "breaker", "list")
        assert STREAM in listed and "gate.sanction" in listed and "4975" in listed
        shown = await admin(config_file, "breaker", "show", STREAM)
        assert "Policy violation: earnings forfeited" in shown and "4975 held" in shown
        assert "member25@users.example" in shown  # the first held recipient, as a sample

        output = await admin(config_file, "breaker", "cancel", STREAM, "--yes")
        # The CLI sweeps before its decision is visible: no server can take the decision up
        # first, so the CLI discards (and reports) every held recipient itself.
        assert f"discarded {5000 - APPROVAL_AFTER} held recipient(s)" in output
        counts = await guard.backends.holds.stream_counts(STREAM)
        assert counts.get("held", 0) == 0 and counts.get("discarded") == 5000 - APPROVAL_AFTER
        await wait_until(lambda: guard.background.breaker_state.trips[STREAM].status == "cancelled",
                         what="the server to take the cancellation up")

        # Further mail of the stream is refused; nothing held is ever delivered.
        outcome = await send(guard.smtp_address, SENDER, audience(3, start=6000), notice())
        assert outcome.data == str(replies.STREAM_CANCELLED)
        await guard.background.release_worker.stop()
        assert await guard.background.release_worker.run_once() == 0
        assert await held_recipients(guard) == 0
        assert metric(guard, "smtp_guard_breaker_admin_actions_total", action="cancel", rule="gate.sanction",
                      **{"class": "sanction"}) == 1

        # One cancellation record, the CLI's: the server found nothing more to sweep.
        await guard.enforcement.audit.flush()
        [cancel] = await guard.backends.audit.query(AuditFilter(kind="admin", verdict="breaker.cancel"))
        assert cancel.actor.startswith("cli:") and f"discarded {5000 - APPROVAL_AFTER} held" in cancel.reason
        [trip] = await guard.backends.audit.query(AuditFilter(verdict="trip"))
        assert trip.rule == "gate.sanction" and STREAM in trip.reason

    async with running_guard(tmp_path, sink.port, **SANCTION) as guard:
        await guard.background.release_worker.stop()
        assert await guard.background.release_worker.run_once() == 0
        outcome = await send(guard.smtp_address, SENDER, audience(1, start=7000), notice())
        assert outcome.data == str(replies.STREAM_CANCELLED)
    assert sink.delivered_to() == audience(APPROVAL_AFTER)


async def test_sanction_stream_approved_delivers_each_held_recipient_exactly_once(tmp_path, sink):
    async with running_guard(tmp_path, sink.port, **SANCTION) as guard:
        everyone = await sanction_incident(guard, sink)
        config_file = write_config(tmp_path, guard)
        await wait_until(lambda: guard.backends.breakers.get(STREAM), what="the trip to reach the store")

        output = await admin(config_file, "breaker", "approve", STREAM, "--ceiling", "6000")
        assert f"released {5000 - APPROVAL_AFTER} held recipient(s)" in output
        await wait_until(lambda: len(sink.delivered_to()) >= 5000, timeout=30,
                         what="the release worker to deliver every held recipient")
        await wait_until(lambda: guard.background.breaker_state.trips[STREAM].status == "approved")
        # Under the new ceiling, more of the stream goes straight through.
        outcome = await send(guard.smtp_address, SENDER, audience(10, start=5000), notice())
        assert outcome.data is not None and outcome.data.startswith("250")
        assert outcome.data != str(replies.QUEUED_HELD)
        await guard.background.release_worker.stop()
        assert await guard.background.release_worker.run_once() == 0
    delivered = sink.delivered_to()
    assert len(delivered) == len(set(delivered)) == 5010
    assert set(delivered) == set(everyone) | set(audience(10, start=5000))


class DecisionTakenUpAtOnce:
    """The admin's breaker store, with the running server taking each decision up as soon as
    it is committed, before the admin's next statement: the widest the race can be."""

    def __init__(self, store: BreakerStore, take_up: Callable[[], Awaitable[None]]) -> None:
        self._store = store
        self._take_up = take_up

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def decide(self, stream: str, status: BreakerStatus, ceiling: int | None, actor: str,
                     now: float) -> BreakerRecord | None:
        decided = await self._store.decide(stream, status, ceiling, actor, now)
        await self._take_up()
        return decided


@pytest.mark.parametrize("verb", ["approve", "cancel"])
async def test_a_server_taking_the_decision_up_at_once_finds_the_admins_sweep_done(tmp_path, sink, verb):
    """Whenever the server reads the decision, the admin has already released (discarded) the
    held mail: the admin's count and its one audit record say what happened, and the server
    sweeps nothing twice."""
    async with running_guard(tmp_path, sink.port, **SANCTION) as guard:
        await send_in_batches(guard, audience(APPROVAL_AFTER + 15), notice())
        assert await held_recipients(guard) == 15
        await guard.background.breaker_sync.sync()  # the trip reaches the store
        async with open_admin_context(guard.config, actor="cli:ann") as ctx:
            ctx = dataclasses.replace(ctx, breakers=DecisionTakenUpAtOnce(ctx.breakers, guard.background.breaker_sync.sync))
            if verb == "approve":
                action = await service.approve_breaker(ctx, STREAM, ceiling=100)
            else:
                action = await service.cancel_breaker(ctx, STREAM)
        assert guard.background.breaker_state.trips[STREAM].status == action.record.status
        assert action.changed == 15
        await guard.enforcement.audit.flush()
        [record] = await guard.backends.audit.query(AuditFilter(kind="admin", verdict=f"breaker.{verb}"))
        assert record.actor == "cli:ann"
        assert f"{'released' if verb == 'approve' else 'discarded'} 15 held recipient(s)" in record.reason


async def test_campaign_ten_times_its_baseline_trips_one_within_does_not(tmp_path, sink):
    clock = Clock()
    overrides = {"breaker": {"floor": 10, "factor": 5.0, "stream_idle": "30m"}}
    async with running_guard(tmp_path, sink.port, clock, **overrides) as guard:
        # A first campaign (within the floor of a new sender) teaches the baseline once it has
        # been idle for 30 minutes.
        content = message(subject="Weekly news", sender=SENDER, extra_headers="X-Campaign-ID: week-1\r\n")
        await send_in_batches(guard, audience(10), content)
        clock.offset += 31 * 60
        await guard.background.breaker_sync.sync()
        baseline = await guard.backends.breakers.baseline(SENDER)
        assert baseline is not None and (baseline.baseline, baseline.streams) == (10.0, 1)

        # Within the baseline: everything goes.
        content = message(subject="Weekly news", sender=SENDER, extra_headers="X-Campaign-ID: week-2\r\n")
        assert await send_in_batches(guard, audience(10, start=100), content) == ["250 2.0.0 OK queued"]
        # Ten times the baseline: past max(floor, 5 x 10) = 50, the rest is held.
        content = message(subject="Weekly news", sender=SENDER, extra_headers="X-Campaign-ID: everyone\r\n")
        big = audience(100, start=1000)
        await send_in_batches(guard, big, content, batch=30)
        assert guard.background.breaker_state.trips.keys() == {"everyone"}
        trip = guard.background.breaker_state.trips["everyone"]
        assert (trip.rule, trip.threshold) == ("breaker.volume", 50)
        assert sink.delivered_to() == audience(10) + audience(10, start=100) + big[:50]
        assert await held_recipients(guard, "everyone") == 50


async def test_breaker_state_survives_a_restart_mid_incident(tmp_path, sink):
    overrides = {"breaker": {"floor": 10}}
    content = message(subject="Flash sale", sender=SENDER, extra_headers="X-Campaign-ID: flash\r\n")
    async with running_guard(tmp_path, sink.port, **overrides) as guard:
        await send_in_batches(guard, audience(30), content)
        assert sink.delivered_to() == audience(10)
        config_file = write_config(tmp_path, guard)
    # Stopped mid-incident: trip, audience and held mail are all on disk.
    async with running_guard(tmp_path, sink.port, **overrides) as guard:
        trip = guard.background.breaker_state.trips["flash"]
        assert (trip.status, trip.recipients) == ("tripped", 30)
        assert await send_in_batches(guard, audience(5, start=30), content) == [str(replies.QUEUED_HELD)]
        assert await held_recipients(guard, "flash") == 25

        output = await admin(config_file, "breaker", "approve", "flash", "--ceiling", "100")
        assert "released 25 held recipient(s)" in output
        await wait_until(lambda: len(sink.delivered_to()) >= 35, what="the held recipients to be delivered")
        await wait_until(lambda: guard.background.breaker_state.trips["flash"].status == "approved")
        await send_in_batches(guard, audience(5, start=35), content)
        await guard.background.release_worker.stop()
        assert await guard.background.release_worker.run_once() == 0
    delivered = sink.delivered_to()
    assert len(delivered) == len(set(delivered)) == 40 and set(delivered) == set(audience(40))


async def test_personal_body_to_fifty_trips_the_fanout_detector(start_guard, sink):
    guard = await start_guard(
        classify={"rules": [{"class": "transactional", "header": "X-Message-Type", "pattern": "^receipt$"}]},
        classes={"transactional": {"fanout_limit": 20}})
    content = message(subject="Your receipt", sender=SENDER, body="Receipt for partner 4711.\r\n",
                      extra_headers="X-Message-Type: receipt\r\n")
    await send_in_batches(guard, audience(50), content)
    assert sink.delivered_to() == audience(20)
    trip = guard.background.breaker_state.trips[f"{SENDER}|your receipt"]
    assert (trip.rule, trip.threshold, trip.message_class) == ("breaker.fanout", 20, "transactional")
    [held] = await guard.backends.holds.list()
    assert {r.rule for r in held.recipients} == {"breaker.fanout"} and len(held.recipients) == 30
    assert metric(guard, "smtp_guard_breaker_trips_total", rule="breaker.fanout", **{"class": "transactional"}) == 1


async def test_defer_action_answers_451_for_the_whole_message(start_guard, sink):
    guard = await start_guard(breaker={"floor": 10, "action": "defer"})
    content = message(subject="Promo", sender=SENDER, extra_headers="X-Campaign-ID: promo\r\n")
    assert await send_in_batches(guard, audience(15), content) == [str(replies.BREAKER_DEFERRED)]
    assert sink.messages == [] and await guard.backends.holds.list() == []
    assert metric(guard, "smtp_guard_breaker_recipients_total", verdict="defer", rule="breaker.volume",
                  **{"class": "marketing"}) == 15


async def test_shadow_breaker_delivers_everything_and_counts_what_it_would_have_held(start_guard, sink):
    guard = await start_guard(breaker={"floor": 10, "shadow": True})
    content = message(subject="Promo", sender=SENDER, extra_headers="X-Campaign-ID: promo\r\n")
    await send_in_batches(guard, audience(30), content)
    assert sink.delivered_to() == audience(30)
    assert metric(guard, "smtp_guard_shadow_decisions_total", verdict="hold", rule="breaker.volume") == 20
    assert guard.background.breaker_state.trips == {} and await guard.backends.holds.list() == []
    await guard.background.breaker_sync.sync()
    assert await guard.backends.breakers.list(None) == []

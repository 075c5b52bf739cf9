"""``smtp-guard breaker`` on a real temp store (SQLite, or PostgreSQL in that run), through the installed command group.

Breaker records and held mail are written through the stores as a running server writes
them; the CLI then lists, shows, approves and cancels.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import pytest
from click.testing import CliRunner, Result

from smtp_guard.app import open_admin_context
from smtp_guard.audit_model import AuditFilter, AuditRecord
from smtp_guard.breaker.model import Baseline, BreakerRecord
from smtp_guard.cli.breaker import breaker
from smtp_guard.cli.main import main
from smtp_guard.config import load_config
from smtp_guard.hold.model import HeldRecipient, NewHold
from smtp_guard.services.context import AdminContext

from conftest import create_store, store_toml

T = TypeVar("T")
SENDER = "notices@platform.test"
STREAM = "news@platform.test|policy violation: earnings forfeited"
CONTENT = (b"From: Platform <notices@platform.test>\r\nTo: you@users.example\r\n"
           b"Subject: Policy violation: earnings forfeited\r\n\r\nPartner 4711\r\n")


class Store:
    """The temp config file, and the stores a running server would have written."""

    def __init__(self, tmp_path: Path) -> None:
        self.db_path = tmp_path / "data" / "guard.sqlite3"
        self.config = tmp_path / "smtp-guard.toml"
        self.config.write_text(f'[store]\n{store_toml(self.db_path)}')
        create_store(self.config)

    def run(self, action: Callable[[AdminContext], Awaitable[T]]) -> T:
        async def go() -> T:
            async with open_admin_context(load_config(self.config), actor="test") as context:
                return await action(context)
        return asyncio.run(go())

    def trip(self, stream: str = STREAM, recipients: int = 40, rule: str = "gate.sanction") -> None:
        record = BreakerRecord(stream=stream, rule=rule, sender=SENDER, message_class="sanction", status="tripped",
                               threshold=25, ceiling=None, recipients=recipients, tripped_at=1_780_000_000.0,
                               updated_at=1_780_000_000.0)
        self.run(lambda ctx: ctx.breakers.save([record]))

    def hold(self, *addresses: str, rule: str = "gate.sanction", stream: str = STREAM) -> str:
        return self.run(lambda ctx: ctx.holds.hold(NewHold(
            txn_id="txn-1", client="192.0.2.7", sender=SENDER, mail_options=(), content=CONTENT,
            recipients=[HeldRecipient(a, "held", rule, "held by test") for a in addresses], stream=stream,
            message_class="sanction")))

    def states(self, hold_id: str) -> dict[str, str]:
        message = self.run(lambda ctx: ctx.holds.get(hold_id))
        assert message is not None
        return {r.address: r.state for r in message.recipients}

    def record(self, stream: str = STREAM) -> BreakerRecord:
        record = self.run(lambda ctx: ctx.breakers.get(stream))
        assert record is not None
        return record

    def audit(self, **filters: Any) -> list[AuditRecord]:
        async def query() -> list[AuditRecord]:
            async with open_admin_context(load_config(self.config), actor="test") as context:
                return await context.audit.query(AuditFilter(**filters))
        return asyncio.run(query())

    def cli(self, *args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(main, ["breaker", *args, "--config", str(self.config)], input=input,
                                  env={"SMTP_GUARD_CONFIG": None})


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path)


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def test_list_shows_stopped_streams_with_audience_and_held_count(store: Store) -> None:
    assert "No tripped streams." in ok(store.cli("list"))
    store.trip()
    store.hold(*[f"m{i}@users.example" for i in range(15)])
    output = ok(store.cli("list"))
    assert STREAM in output and "gate.sanction" in output and "sanction" in output
    row = next(line for line in output.splitlines() if line.startswith(STREAM))
    assert row.split()[-5:-2] == ["40", "25", "15"]  # audience, limit, held
    assert "smtp-guard breaker show STREAM" in output
    assert "No cancelled streams." in ok(store.cli("list", "--status", "cancelled"))


def test_show_gives_audience_baseline_and_samples(store: Store) -> None:
    store.trip()
    store.run(lambda ctx: ctx.breakers.save_baselines([Baseline(SENDER, 120.0, 7, 1.0)]))
    hold_id = store.hold(*[f"m{i}@users.example" for i in range(8)])
    output = ok(store.cli("show", STREAM))
    assert "Audience   40 distinct recipients" in output and "over a limit of 25" in output
    assert "Baseline   120 recipients per stream (learned from 7)" in output
    assert "Hold queue 8 held" in output
    assert f"hold {hold_id}: 8 held recipient(s)" in output
    assert "Subject: Policy violation: earnings forfeited" in output
    assert "m0@users.example, m1@users.example, m2@users.example, m3@users.example, m4@users.example and 3 more" in output
    assert f"smtp-guard breaker approve '{STREAM}' --ceiling 40" in output


def test_approve_releases_only_the_streams_breaker_holds_and_is_audited(store: Store) -> None:
    store.trip()
    gated = store.hold("a@users.example", "b@users.example")
    listed = store.hold("c@users.example", rule="suppression.manual")  # held for another reason
    other = store.hold("d@users.example", stream="another-stream")
    output = ok(store.cli("approve", STREAM, "--ceiling", "100"))
    assert "released 2 held recipient(s)" in output
    assert store.states(gated) == {"a@users.example": "released", "b@users.example": "released"}
    assert store.states(listed) == {"c@users.example": "held"}
    assert store.states(other) == {"d@users.example": "held"}
    record = store.record()
    assert (record.status, record.ceiling, record.decided_by.startswith("cli:")) == ("approved", 100, True)
    [audited] = store.audit(kind="admin")
    assert audited.verdict == "breaker.approve" and audited.rule == "gate.sanction" and "100" in audited.reason


def test_approve_below_the_audience_says_what_to_type(store: Store) -> None:
    store.trip(recipients=40)
    result = store.cli("approve", STREAM, "--ceiling", "10")
    assert result.exit_code == 1
    assert "already has 40 recipients" in result.output
    assert f"Type: smtp-guard breaker approve '{STREAM}' --ceiling 40" in result.output
    assert store.record().status == "tripped"


def test_cancel_asks_first_then_discards(store: Store) -> None:
    store.trip()
    hold_id = store.hold("a@users.example", "b@users.example")
    result = store.cli("cancel", STREAM, input="n\n")
    assert result.exit_code == 1 and "discard 2 held recipient(s)" in result.output
    assert "Policy violation" in result.output and store.record().status == "tripped"
    output = ok(store.cli("cancel", STREAM, "--yes"))
    assert "discarded 2 held recipient(s)" in output and "550 5.7.1" in output
    assert set(store.states(hold_id).values()) == {"discarded"}
    assert store.record().status == "cancelled"
    assert [r.verdict for r in store.audit(kind="admin")] == ["breaker.cancel"]


def test_unknown_stream_points_to_the_list(store: Store) -> None:
    for args in (("show", "nope"), ("approve", "nope", "--ceiling", "5"), ("cancel", "nope", "--yes")):
        result = store.cli(*args)
        assert result.exit_code == 1
        assert "no tripped stream 'nope'" in result.output
        assert "smtp-guard breaker list --status all" in result.output


@pytest.mark.parametrize("name", ["list", "show", "approve", "cancel"])
def test_every_command_has_help_with_an_example(name: str) -> None:
    result = CliRunner().invoke(main, ["breaker", name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output and "smtp-guard breaker " + name in result.output
    assert "--config" in result.output
    assert breaker.commands[name].help
    assert "smtp-guard breaker list" in CliRunner().invoke(main, ["--help"]).output

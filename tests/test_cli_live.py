"""A change is in force when the command returns (read-your-writes), on a running server.

The guard serves on loopback; ``smtp-guard … --config FILE`` runs as the console script does,
against the same store (a SQLite file, or PostgreSQL in that run). The guards here poll the
store's change log only once a minute (``[store] reload_interval = 60``), so what a test sees right after a command is the work of
the change generation alone: the command moved it, every running guard refreshed and said so,
and only then did the command return. No test waits between the command and the send.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from click.testing import CliRunner, Result

from smtp_guard import replies
from smtp_guard.app import Guard
from smtp_guard.change_model import ChangeStore, GuardInstance
from smtp_guard.startup import StartupError
from smtp_guard.change_sync import ChangeSync
from smtp_guard.cli.common import NOT_CONFIRMED
from smtp_guard.cli.main import main
from smtp_guard.services.propagation import FORGET_AFTER

from conftest import make_config, open_engine_store, wait_until, store_toml, store_toml_of
from smtp_client import dialogue, message, send

SENDER = "news@shop.test"
SLOW_RELOAD = {"store": {"reload_interval": 60}}  # only the change generation can be quick
SANCTION = {
    "classify": {"rules": [{"class": "sanction", "subject": "policy violation"}]},
    "classes": {"sanction": {"approval_after": 2}},
}


def write_cli_config(tmp_path: Path, guard: Guard, extra: str = "", confirm_timeout: str = "1s") -> Path:
    path = tmp_path / "smtp-guard.toml"
    path.write_text(f'[store]\n{store_toml_of(guard.config)}confirm_timeout = "{confirm_timeout}"\n{extra}')
    return path


async def cli(config_file: Path, *args: str, exit_code: int = 0) -> Result:
    """``smtp-guard ARGS --config FILE``. The CLI runs its own event loop (asyncio.run), so it
    runs in a thread while the guards keep serving on this one."""
    result = await asyncio.to_thread(CliRunner().invoke, main, [*args, "--config", str(config_file)],
                                     env={"SMTP_GUARD_CONFIG": None})
    assert result.exit_code == exit_code, result.output
    return result


async def rcpt_reply(guard: Guard, address: str) -> str:
    """The guard's RCPT reply for ``address``; the transaction is abandoned, nothing is sent."""
    answers = await dialogue(guard.smtp_address, [
        b"EHLO client.test", f"MAIL FROM:<{SENDER}>".encode(), f"RCPT TO:<{address}>".encode(), b"QUIT",
    ])
    return answers[2]


# --- every changing command is in force when it returns ------------------------------------------

async def test_suppress_add_then_send_at_once_is_refused(start_guard, sink, tmp_path):
    guard = await start_guard(**SLOW_RELOAD)
    config_file = write_cli_config(tmp_path, guard)
    assert (await rcpt_reply(guard, "x@example.com")).startswith("250")

    result = await cli(config_file, "suppress", "add", "x@example.com", "--list", "unsubscribed", "--wait")
    assert result.output.endswith("In force on 1 running guard.\n")
    outcome = await send(guard.smtp_address, SENDER, ["X+news@Example.com", "ok@example.com"], message())
    assert outcome.rcpt["X+news@Example.com"] == str(replies.SUPPRESSED)
    assert sink.delivered_to() == ["ok@example.com"]

    result = await cli(config_file, "suppress", "remove", "x@example.com")
    assert "In force on 1 running guard." in result.output
    outcome = await send(guard.smtp_address, SENDER, ["x@example.com"], message(subject="Again"))
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == ["ok@example.com", "x@example.com"]


async def test_domain_suppression_covers_subdomains_at_once(start_guard, sink, tmp_path):
    guard = await start_guard(**SLOW_RELOAD)
    config_file = write_cli_config(tmp_path, guard)
    await cli(config_file, "suppress", "add", "@corp.example", "--list", "manual", "--include-subdomains")
    outcome = await send(guard.smtp_address, SENDER, ["b@mail.corp.example", "c@corp.example.org"], message())
    assert outcome.rcpt["b@mail.corp.example"] == str(replies.SUPPRESSED)
    assert sink.delivered_to() == ["c@corp.example.org"]


async def test_suppress_import_then_send_at_once_is_refused(start_guard, sink, tmp_path):
    guard = await start_guard(**SLOW_RELOAD)
    config_file = write_cli_config(tmp_path, guard)
    export = tmp_path / "unsubscribes.txt"
    export.write_text("email\nimported@example.com\nalso@example.com\n")

    result = await cli(config_file, "suppress", "import", str(export), "--list", "unsubscribed", "--wait")
    assert "In force on 1 running guard." in result.output
    outcome = await send(guard.smtp_address, SENDER, ["Imported@Example.com", "ok@example.com"], message())
    assert outcome.rcpt["Imported@Example.com"] == str(replies.SUPPRESSED)
    assert sink.delivered_to() == ["ok@example.com"]


async def test_erase_then_send_at_once_is_refused(start_guard, sink, tmp_path):
    guard = await start_guard(**SLOW_RELOAD)
    config_file = write_cli_config(tmp_path, guard)
    result = await cli(config_file, "erase", "jane@example.com", "--ref", "DSR-1", "--wait")
    assert "In force on 1 running guard." in result.output
    outcome = await send(guard.smtp_address, SENDER, ["JANE+x@example.com", "ok@example.com"], message())
    assert outcome.rcpt["JANE+x@example.com"] == str(replies.ERASED)
    assert sink.delivered_to() == ["ok@example.com"]


async def test_breaker_cancel_then_send_at_once_is_refused(start_guard, sink, tmp_path):
    guard = await start_guard(**SLOW_RELOAD, **SANCTION)
    config_file = write_cli_config(tmp_path, guard, '[classify]\nrules = [{ class = "sanction", '
                                   'subject = "policy violation" }]\n[classes.sanction]\napproval_after = 2\n')
    notice = message(subject="Policy violation", sender=SENDER, extra_headers="X-Campaign-ID: notice-7\r\n")
    outcome = await send(guard.smtp_address, SENDER, [f"m{i}@users.example" for i in range(4)], notice)
    assert outcome.data is not None and outcome.data.startswith("250")  # two relayed, two held
    await guard.background.breaker_sync.sync()  # the trip reaches the store (an admin can only cancel what it sees)

    result = await cli(config_file, "breaker", "cancel", "notice-7", "--yes", "--wait")
    assert "In force on 1 running guard." in result.output
    outcome = await send(guard.smtp_address, SENDER, ["m9@users.example"], notice)
    assert outcome.data == str(replies.STREAM_CANCELLED)


async def test_hold_release_and_discard_report_the_running_guard(start_guard, sink, tmp_path):
    guard = await start_guard(lists={"manual": {"action": "hold"}}, **SLOW_RELOAD)
    config_file = write_cli_config(tmp_path, guard, '[lists.manual]\naction = "hold"\n')
    await cli(config_file, "suppress", "add", "a@example.com", "b@example.com", "--list", "manual")
    outcome = await send(guard.smtp_address, SENDER, ["a@example.com", "b@example.com"], message())
    assert outcome.data == str(replies.QUEUED_HELD)
    [held] = await guard.backends.holds.list()

    result = await cli(config_file, "hold", "discard", held.id, "--recipient", "b@example.com", "--yes", "--wait")
    assert "In force on 1 running guard." in result.output
    result = await cli(config_file, "hold", "release", held.id, "--wait")
    assert "In force on 1 running guard." in result.output
    await wait_until(lambda: sink.delivered_to() == ["a@example.com"], what="the release worker to deliver a only")


# --- who confirms, who does not --------------------------------------------------------------------

async def test_no_running_guard_is_said_and_fails_with_wait(tmp_path):
    config_file = tmp_path / "smtp-guard.toml"
    config_file.write_text(f'[store]\n{store_toml(tmp_path / "data" / "guard.sqlite3")}')
    await cli(config_file, "init")  # the store a guard would have created, no guard running
    result = await cli(config_file, "suppress", "add", "x@example.com", "--list", "manual")
    assert "No running guard uses this store" in result.output
    assert "the change applies when one starts" in result.output

    started = time.monotonic()
    result = await cli(config_file, "suppress", "add", "y@example.com", "--list", "manual", "--wait",
                       exit_code=NOT_CONFIRMED)
    assert time.monotonic() - started < 3.0  # nobody to wait for (confirm_timeout is 5 s)
    assert "No running guard uses this store" in result.output
    assert f"Exit status {NOT_CONFIRMED}" in result.output


async def test_two_guards_on_one_store_both_confirm(start_guard, sink, tmp_path):
    first = await start_guard(**SLOW_RELOAD)
    second = await start_guard(**SLOW_RELOAD)
    config_file = write_cli_config(tmp_path, first)
    result = await cli(config_file, "suppress", "add", "x@example.com", "--list", "manual", "--wait")
    assert "In force on 2 running guards." in result.output
    for guard in (first, second):
        assert await rcpt_reply(guard, "x@example.com") == str(replies.SUPPRESSED)


async def test_a_stopped_guard_is_no_longer_waited_for(start_guard, sink, tmp_path):
    first = await start_guard(**SLOW_RELOAD)
    second = await start_guard(**SLOW_RELOAD)
    await second.stop()
    config_file = write_cli_config(tmp_path, first)
    result = await cli(config_file, "suppress", "add", "x@example.com", "--list", "manual", "--wait")
    assert result.output.endswith("In force on 1 running guard.\n")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ChangeStore]:
    """A second connection to the guards' store, as another guard process would have."""
    async with open_engine_store(tmp_path / "data" / "guard.sqlite3") as engine:
        yield engine.changes


async def failing_refresh() -> None:
    raise RuntimeError("the index cannot be read")


async def test_guard_alive_but_not_applying_is_named_in_bounded_time(start_guard, sink, tmp_path, store):
    guard = await start_guard(**SLOW_RELOAD)
    stuck = ChangeSync(store, [failing_refresh], interval=0.05)  # heartbeats, never applies
    await stuck.start()
    try:
        config_file = write_cli_config(tmp_path, guard)
        started = time.monotonic()
        result = await cli(config_file, "suppress", "add", "x@example.com", "--list", "manual")
        assert time.monotonic() - started < 4.0  # confirm_timeout is 1 s
        assert (f"Not confirmed in 1s by guard {stuck.instance.name} (last heartbeat "
                in result.output), result.output
        assert "it may not enforce this change yet." in result.output
        assert "In force on 1 of 2 running guards." in result.output
        assert await rcpt_reply(guard, "x@example.com") == str(replies.SUPPRESSED)  # the healthy one does

        result = await cli(config_file, "suppress", "add", "y@example.com", "--list", "manual", "--wait",
                           exit_code=NOT_CONFIRMED)
        assert f"Not confirmed in 1s by guard {stuck.instance.name}" in result.output
    finally:
        await stuck.stop()


def instance(name: str, silent_for: float, applied: int | None = 0) -> GuardInstance:
    now = time.time()
    return GuardInstance(id=name, host="old-host", pid=4242 if name == "killed" else 4343,
                         started_at=now - silent_for - 60, heartbeat_at=now - silent_for, applied_generation=applied)


async def test_silent_guard_is_named_not_waited_for_and_forgotten_later(start_guard, sink, tmp_path, store):
    guard = await start_guard(**SLOW_RELOAD)
    await store.report(instance("killed", silent_for=30))
    await store.report(instance("long-gone", silent_for=FORGET_AFTER + 60))
    config_file = write_cli_config(tmp_path, guard, confirm_timeout="5s")

    started = time.monotonic()
    result = await cli(config_file, "suppress", "add", "x@example.com", "--list", "manual", "--wait")
    assert time.monotonic() - started < 3.0  # neither silent row is waited for
    assert "Guard old-host:4242 has sent no heartbeat for 30s (killed, or hung): not waited for" in result.output
    assert "old-host:4343" not in result.output  # silent for over an hour: forgotten
    assert result.output.endswith("In force on 1 running guard.\n")
    assert sorted(i.id for i in await store.instances()) == sorted(["killed", guard.change_sync.instance.id])


async def test_guard_row_is_removed_at_stop(start_guard, sink, store):
    guard = await start_guard(**SLOW_RELOAD)
    [row] = await store.instances()
    assert row == guard.change_sync.instance
    assert row.applied_generation == await store.generation()
    await guard.stop()
    assert await store.instances() == []


async def test_failed_refresh_keeps_heartbeat_and_old_generation(store: ChangeStore) -> None:
    calls: list[Any] = []

    async def refresh() -> None:
        calls.append(None)
        if len(calls) == 2:
            raise RuntimeError("store hiccup")

    sync = ChangeSync(store, [refresh], interval=60, heartbeat_interval=0)
    await sync.start()
    assert sync.applied_generation == 0 and len(calls) == 1
    await sync.poll()  # nothing changed: no refresh, a heartbeat
    assert len(calls) == 1
    generation = await store.bump_generation()
    await sync.poll()  # the refresh fails: still at 0, heartbeat written
    assert sync.applied_generation == 0
    [row] = await store.instances()
    assert row.applied_generation == 0 and row.heartbeat_at == sync.instance.heartbeat_at
    await sync.poll()  # retried
    assert sync.applied_generation == generation == (await store.instances())[0].applied_generation
    await sync.stop()
    assert await store.instances() == []


async def test_failed_start_leaves_no_guard_row(sink, tmp_path, store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = taken.getsockname()
        guard = Guard(make_config(tmp_path, sink.port, smtp={"listen": f"{host}:{port}"}))
        with pytest.raises(StartupError):
            await guard.start()  # registered, then the SMTP listener cannot bind
    await guard.stop()
    assert await store.instances() == []

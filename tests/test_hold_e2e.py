"""The hold queue end to end: a list with action "hold", a restart, and the real CLI.

client -> guard -> hold queue (real SQLite file) -> ``smtp-guard hold release`` -> release
worker -> real upstream sink. Held mail survives a restart and is delivered exactly once.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from click.testing import CliRunner, Result

from smtp_guard import replies
from smtp_guard.app import Guard
from smtp_guard.cli.main import main
from smtp_guard.hold.model import HeldMessage
from smtp_guard.suppression_model import SuppressionEntry

from conftest import running_guard, wait_until, store_toml_of
from smtp_client import message, send, without_trace

SENDER = "news@shop.test"
HOLD_LISTS = {"manual": {"action": "hold"}}


async def put_on_list(guard: Guard, address: str, list_name: str = "manual") -> None:
    """Add an entry through the store, as the CLI would, and wait for the running index."""
    await guard.backends.suppressions.add([SuppressionEntry("address", guard.backends.normalizer.key(address), list_name,
                                                   reason="test", source="test", created_at=time.time())])
    await guard.enforcement.reloader.refresh()


def write_cli_config(tmp_path: Path, guard: Guard) -> Path:
    """A TOML file for the CLI pointing at the running guard's store."""
    path = tmp_path / "smtp-guard.toml"
    path.write_text(f'[store]\n{store_toml_of(guard.config)}\n[lists.manual]\naction = "hold"\n')
    return path


async def cli(config_file: Path, *args: str) -> Result:
    """``smtp-guard ARGS --config FILE`` as the console script runs it. The CLI runs its own
    event loop (asyncio.run), so it runs in a thread while the guard keeps serving here."""
    runner = CliRunner()
    result = await asyncio.to_thread(runner.invoke, main, [*args, "--config", str(config_file)],
                                     env={"SMTP_GUARD_CONFIG": None})
    assert result.exit_code == 0, result.output
    return result


def states(message_: HeldMessage | None) -> dict[str, str]:
    assert message_ is not None
    return {r.address: r.state for r in message_.recipients}


async def test_held_and_normal_recipient_in_one_message(start_guard, sink):
    """The normal recipient is relayed now, the held one waits in the queue; the client gets 250."""
    guard = await start_guard(lists=HOLD_LISTS)
    await put_on_list(guard, "held@example.com")
    content = message(subject="Mixed")
    outcome = await send(guard.smtp_address, SENDER, ["held@example.com", "ok@example.com"], content)
    assert outcome.rcpt["held@example.com"] == str(replies.RECIPIENT_OK)
    assert outcome.rcpt["ok@example.com"].startswith("250")
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == ["ok@example.com"]
    held = await guard.backends.holds.list()
    assert len(held) == 1
    assert states(held[0]) == {"held@example.com": "held"}
    assert held[0].recipients[0].rule == "suppression.manual"
    assert held[0].sender == SENDER
    stored = await guard.backends.holds.get(held[0].id)
    assert stored is not None and without_trace(stored.content) == content


async def test_only_held_recipients_answers_queued_held(start_guard, sink):
    guard = await start_guard(lists=HOLD_LISTS)
    await put_on_list(guard, "held@example.com")
    outcome = await send(guard.smtp_address, SENDER, ["held@example.com"], message())
    assert outcome.data == str(replies.QUEUED_HELD)
    assert sink.messages == []
    assert sink.smtp_sessions == 0  # nothing to relay: the upstream is not even contacted
    assert [states(m) for m in await guard.backends.holds.list()] == [{"held@example.com": "held"}]


async def test_held_mail_survives_restart_and_cli_release_delivers_exactly_once(tmp_path, sink):
    content = message(subject="Held across restarts", body="Keep these bytes.\r\n..dot\r\n")
    async with running_guard(tmp_path, sink.port, lists=HOLD_LISTS) as guard:
        await put_on_list(guard, "held@example.com")
        outcome = await send(guard.smtp_address, SENDER, ["held@example.com"], content)
        assert outcome.data == str(replies.QUEUED_HELD)
        [held] = await guard.backends.holds.list()
        config_file = write_cli_config(tmp_path, guard)

    # A new Guard on the same config and SQLite file: the held message is still there.
    async with running_guard(tmp_path, sink.port, lists=HOLD_LISTS) as guard:
        [again] = await guard.backends.holds.list()
        assert again.id == held.id and states(again) == {"held@example.com": "held"}
        assert sink.messages == []

        result = await cli(config_file, "hold", "release", held.id)
        assert f"Released 1 recipient(s) of hold {held.id}" in result.output

        async def delivered_in_store() -> bool:
            return states(await guard.backends.holds.get(held.id)) == {"held@example.com": "delivered"}

        await wait_until(delivered_in_store, what="the release worker to record the delivery")
        assert sink.delivered_to() == ["held@example.com"]
        assert sink.messages[0].mail_from == SENDER
        assert without_trace(sink.messages[0].content) == content
        # More polls find nothing due (driven by hand once the worker's own loop has stopped:
        # run_once is not meant to run beside it); the delivered content is gone from the store.
        await guard.background.release_worker.stop()
        assert await guard.background.release_worker.run_once() == 0
        assert await guard.background.release_worker.run_once() == 0
        stored = await guard.backends.holds.get(held.id)
        assert stored is not None and stored.content is None
        assert await guard.backends.holds.list() == []

    async with running_guard(tmp_path, sink.port, lists=HOLD_LISTS) as guard:
        await guard.background.release_worker.stop()
        assert await guard.background.release_worker.run_once() == 0
        assert states(await guard.backends.holds.get(held.id)) == {"held@example.com": "delivered"}
    assert len(sink.messages) == 1


async def test_cli_discard_means_never_delivered(tmp_path, sink):
    async with running_guard(tmp_path, sink.port, lists=HOLD_LISTS) as guard:
        await put_on_list(guard, "held@example.com")
        await put_on_list(guard, "kept@example.com")
        outcome = await send(guard.smtp_address, SENDER, ["held@example.com", "kept@example.com"], message())
        assert outcome.data == str(replies.QUEUED_HELD)
        [held] = await guard.backends.holds.list()
        config_file = write_cli_config(tmp_path, guard)

        result = await cli(config_file, "hold", "discard", held.id, "--yes")
        assert f"Discarded 2 recipient(s) of hold {held.id}" in result.output
        # Releasing now finds nothing held.
        result = await cli(config_file, "hold", "release", held.id)
        assert "Nothing to release" in result.output
        await guard.background.release_worker.stop()
        assert await guard.background.release_worker.run_once() == 0
        assert await guard.backends.holds.list() == []
        stored = await guard.backends.holds.get(held.id)
        assert stored is not None and stored.content is None
        assert {r.state for r in stored.recipients} == {"discarded"}

    async with running_guard(tmp_path, sink.port, lists=HOLD_LISTS) as guard:
        await guard.background.release_worker.stop()
        assert await guard.background.release_worker.run_once() == 0
    assert sink.messages == []

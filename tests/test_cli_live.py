"""A CLI change takes effect on a running server, through the store's change log.

The guard serves on loopback; ``smtp-guard suppress add/remove --config FILE`` runs as the
console script does, against the same SQLite file; the server polls the change log every
``[store] reload_interval`` (0.1 s in tests) and enforces the change without a restart.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from click.testing import CliRunner, Result

from smtp_guard import replies
from smtp_guard.app import Guard
from smtp_guard.cli.main import main

from conftest import wait_until
from smtp_client import dialogue, message, send

SENDER = "news@shop.test"


def write_cli_config(tmp_path: Path, guard: Guard) -> Path:
    path = tmp_path / "smtp-guard.toml"
    path.write_text(f'[store]\npath = "{guard.config.store.path}"\n')
    return path


async def cli(config_file: Path, *args: str) -> Result:
    """``smtp-guard ARGS --config FILE``. The CLI runs its own event loop (asyncio.run), so it
    runs in a thread while the guard keeps serving on this one."""
    result = await asyncio.to_thread(CliRunner().invoke, main, [*args, "--config", str(config_file)],
                                     env={"SMTP_GUARD_CONFIG": None})
    assert result.exit_code == 0, result.output
    return result


async def rcpt_reply(guard: Guard, address: str) -> str:
    """The guard's RCPT reply for ``address``; the transaction is abandoned, nothing is sent."""
    answers = await dialogue(guard.smtp_address, [
        b"EHLO client.test", f"MAIL FROM:<{SENDER}>".encode(), f"RCPT TO:<{address}>".encode(), b"QUIT",
    ])
    return answers[2]


async def enforced(guard: Guard, address: str, reply: replies.Reply) -> bool:
    return await rcpt_reply(guard, address) == str(reply)


async def accepted(guard: Guard, address: str) -> bool:
    return (await rcpt_reply(guard, address)).startswith("250")


async def test_suppress_add_then_remove_on_running_server(start_guard, sink, tmp_path):
    guard = await start_guard()
    config_file = write_cli_config(tmp_path, guard)
    assert (await rcpt_reply(guard, "x@example.com")).startswith("250")

    await cli(config_file, "suppress", "add", "x@example.com", "--list", "unsubscribed", "--reason", "asked")
    await wait_until(lambda: enforced(guard, "x@example.com", replies.SUPPRESSED),
                     what="the running server to enforce the CLI's suppression")
    outcome = await send(guard.smtp_address, SENDER, ["X+news@Example.com", "ok@example.com"], message())
    assert outcome.rcpt["X+news@Example.com"] == str(replies.SUPPRESSED)
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == ["ok@example.com"]

    await cli(config_file, "suppress", "remove", "x@example.com")
    await wait_until(lambda: accepted(guard, "x@example.com"),
                     what="the running server to forget the removed suppression")
    outcome = await send(guard.smtp_address, SENDER, ["x@example.com"], message(subject="Again"))
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == ["ok@example.com", "x@example.com"]


async def test_domain_suppression_from_cli_covers_subdomains(start_guard, sink, tmp_path):
    guard = await start_guard()
    config_file = write_cli_config(tmp_path, guard)
    await cli(config_file, "suppress", "add", "@corp.example", "--list", "manual", "--include-subdomains")
    await wait_until(lambda: enforced(guard, "a@mail.corp.example", replies.SUPPRESSED),
                     what="the running server to enforce the domain entry")
    outcome = await send(guard.smtp_address, SENDER, ["b@corp.example", "c@corp.example.org"], message())
    assert outcome.rcpt["b@corp.example"] == str(replies.SUPPRESSED)
    assert sink.delivered_to() == ["c@corp.example.org"]

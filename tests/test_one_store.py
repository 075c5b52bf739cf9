"""One store, one truth: the CLI and the server agree on the store wherever they are started,
and an admin command never silently creates a second, empty one."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from smtp_guard import replies
from smtp_guard.cli.main import main

from conftest import wait_until, sqlite_only
from smtp_client import dialogue

pytestmark = sqlite_only


def smtp_guard(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The command as an operator runs it, from ``cwd``."""
    return subprocess.run([sys.executable, "-m", "smtp_guard", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, env={**os.environ, "SMTP_GUARD_CONFIG": ""})


async def test_cli_from_another_directory_reaches_the_servers_store(start_guard, tmp_path: Path) -> None:
    guard = await start_guard()
    etc = tmp_path / "etc"
    etc.mkdir()
    store = Path(guard.config.store.path)
    # A relative path, as an operator writes it: relative to the config file's directory.
    (etc / "guard.toml").write_text(f'[store]\npath = "{os.path.relpath(store, etc)}"\n')
    result = smtp_guard("suppress", "add", "x@example.com", "--list", "manual",
                        "--config", str(etc / "guard.toml"), cwd=Path("/"))
    assert result.returncode == 0, result.stderr
    assert not (Path("/") / "data").exists()

    async def refused() -> bool:
        answers = await dialogue(guard.smtp_address, [b"EHLO c.test", b"MAIL FROM:<n@shop.test>",
                                                      b"RCPT TO:<x@example.com>", b"QUIT"])
        return answers[2] == str(replies.SUPPRESSED)

    await wait_until(refused, what="the running guard to enforce the entry added from another directory")
    with sqlite3.connect(store) as connection:
        assert connection.execute("SELECT count(*) FROM suppressions").fetchone() == (1,)


def test_admin_command_on_a_missing_store_says_so_and_creates_nothing(tmp_path: Path) -> None:
    config_file = tmp_path / "guard.toml"
    config_file.write_text('[store]\npath = "data/guard.sqlite3"\n')
    result = CliRunner().invoke(main, ["suppress", "add", "x@example.com", "--list", "manual",
                                       "--config", str(config_file)], env={"SMTP_GUARD_CONFIG": None})
    assert result.exit_code == 1
    assert f"no store at {tmp_path / 'data' / 'guard.sqlite3'} ([store] path from {config_file})" in result.output
    assert "smtp-guard serve --config FILE" in result.output
    assert not (tmp_path / "data").exists()


def test_init_creates_the_store_once_and_admin_commands_then_work(tmp_path: Path) -> None:
    config_file = tmp_path / "guard.toml"
    config_file.write_text('[store]\npath = "data/guard.sqlite3"\n')
    runner = CliRunner()
    first = runner.invoke(main, ["init", "--config", str(config_file)], env={"SMTP_GUARD_CONFIG": None})
    assert first.exit_code == 0 and first.output.startswith(f"Created {tmp_path / 'data' / 'guard.sqlite3'}")
    again = runner.invoke(main, ["init", "--config", str(config_file)], env={"SMTP_GUARD_CONFIG": None})
    assert again.exit_code == 0 and again.output.startswith("Store already exists:")
    added = runner.invoke(main, ["suppress", "add", "x@example.com", "--list", "manual", "--config", str(config_file)],
                          env={"SMTP_GUARD_CONFIG": None})
    assert added.exit_code == 0, added.output


def test_erase_token_needs_no_store(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["erase", "token", "Jane@Example.com"], env={"SMTP_GUARD_CONFIG": None,
                                                                                   "HOME": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert not (tmp_path / ".local").exists()

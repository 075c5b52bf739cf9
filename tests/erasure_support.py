"""Helpers for the erasure tests: the real CLI against a running guard's store, byte-level
greps of the data directory, and RCPT probes.

The CLI runs as the console script does (``CliRunner`` over ``smtp_guard.cli.main``), in a
thread because it runs its own event loop while the guard keeps serving on the test's loop.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, Iterable

from click.testing import CliRunner, Result

from smtp_guard import replies
from smtp_guard.app import Guard
from smtp_guard.cli.main import main
from smtp_guard.config import Config

from smtp_client import dialogue

from conftest import store_toml, store_toml_of

SENDER = "news@shop.test"
HOLD_LISTS = {"manual": {"action": "hold"}}


def write_cli_config(path: Path, store: Config | Path | str, *, key_file: Path | None = None) -> Path:
    """A TOML config for the CLI on the store of a guard's config, or on the test store for a
    path (the manual list holds, as in the guard)."""
    lines = store_toml_of(store) if isinstance(store, Config) else store_toml(store)
    text = f'[store]\n{lines}\n[lists.manual]\naction = "hold"\n'
    if key_file is not None:
        text += f'\n[erasure]\nkey_file = "{key_file}"\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def cli_config_for(tmp_path: Path, guard: Guard, name: str = "smtp-guard.toml") -> Path:
    return write_cli_config(tmp_path / name, guard.config)


async def cli(config_file: Path, *args: str, exit_code: int | None = 0) -> Result:
    """``smtp-guard ARGS --config FILE``; asserts the exit status unless ``exit_code`` is None."""
    result = await asyncio.to_thread(CliRunner().invoke, main, [*args, "--config", str(config_file)],
                                     env={"SMTP_GUARD_CONFIG": None})
    if exit_code is not None:
        assert result.exit_code == exit_code, (result.exit_code, result.output, result.exception)
    return result


async def cli_json(config_file: Path, *args: str) -> Any:
    return json.loads((await cli(config_file, *args, "--json")).stdout)


def data_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (database, -wal, -shm, key file, sandbox Maildir…)."""
    return sorted(Path(directory) / name for directory, _, names in os.walk(root) for name in names
                  if (Path(directory) / name).is_file())


def occurrences(root: Path, spellings: Iterable[str]) -> list[tuple[str, str]]:
    """(file, spelling) for every spelling found in any file's raw bytes — exact, and
    ASCII-case-insensitively."""
    needles = {s.encode("utf-8") for s in spellings} | {s.encode("utf-8").lower() for s in spellings}
    found = []
    for path in data_files(root):
        data = path.read_bytes()
        lowered = data.lower()
        for needle in sorted(needles):
            if needle in data or needle.lower() in lowered:
                found.append((str(path.relative_to(root)), needle.decode("utf-8")))
    return found


def contains_any(text: str, spellings: Iterable[str]) -> list[str]:
    lowered = text.lower()
    return [s for s in spellings if s in text or s.lower() in lowered]


async def rcpt_reply(guard: Guard, address: str) -> str:
    """The guard's RCPT reply for ``address``; the transaction is abandoned, nothing is sent."""
    utf8 = b"" if address.isascii() else b" SMTPUTF8"
    answers = await dialogue(guard.smtp_address, [
        b"EHLO client.test", f"MAIL FROM:<{SENDER}>".encode() + utf8, f"RCPT TO:<{address}>".encode(), b"QUIT",
    ])
    return answers[2]


async def refuses(guard: Guard, address: str, reply: replies.Reply = replies.ERASED) -> bool:
    return await rcpt_reply(guard, address) == str(reply)


async def accepts(guard: Guard, address: str) -> bool:
    return (await rcpt_reply(guard, address)).startswith("250")


def mail(to: str, subject: str = "Spring sale", campaign: str | None = None) -> bytes:
    """A marketing message whose headers name its recipient (as real ones do)."""
    extra = f"X-Campaign-ID: {campaign}\r\n" if campaign else ""
    return (f"From: Shop <{SENDER}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@shop.test>\r\n{extra}\r\nHello {to}, it is on.\r\n"
            ).encode("utf-8")

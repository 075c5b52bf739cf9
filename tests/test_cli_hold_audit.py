"""``smtp-guard hold`` and ``smtp-guard audit`` on a real temp store (SQLite, or PostgreSQL in that run), through the CLI.

The command groups are invoked as ``smtp-guard`` registers them, through the same
``admin_context`` (and so the composition root's stores) that the installed command uses.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Sequence

import click
import pytest
from click.testing import CliRunner, Result

from smtp_guard.app import open_admin_context
from smtp_guard.audit_model import AuditFilter, AuditRecord
from smtp_guard.cli.audit import audit
from smtp_guard.cli.hold import hold
from smtp_guard.config import load_config
from smtp_guard.erasure.pseudonyms import Pseudonymizer
from smtp_guard.hold.model import HeldMessage, HeldRecipient, NewHold

from conftest import create_store, store_toml

GROUPS: dict[str, click.Group] = {"hold": hold, "audit": audit}
CONTENT = (b"From: Shop <news@shop.test>\r\nTo: undisclosed-recipients:;\r\n"
           b"Subject: =?utf-8?q?Verst=C3=B6=C3=9Fe?= and account notice\r\n\r\nBody line\r\n")


class Guard:
    """The temp config file and direct access to the same store the CLI uses.

    Audit records go through the composition root's (pseudonymizing) audit store, as the server
    and the CLI write them: the trail holds ``h:<16 hex>`` pseudonyms, never recipient addresses.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.db_path = tmp_path / "data" / "guard.sqlite3"
        self.config = tmp_path / "smtp-guard.toml"
        self.config.write_text(f'[store]\n{store_toml(self.db_path)}')
        create_store(self.config)
        self.runner = CliRunner()

    def cli(self, group: str, *args: str, input: str | None = None) -> Result:
        return self.runner.invoke(GROUPS[group], [*args, "--config", str(self.config)], input=input,
                                  env={"SMTP_GUARD_CONFIG": None})

    def hold(self, *addresses: str, rule: str = "breaker.volume", reason: str = "stream over 10x baseline") -> str:
        async def store_hold() -> str:
            async with open_admin_context(load_config(self.config), actor="test") as context:
                return await context.holds.hold(NewHold(
                    txn_id="txn-42", client="192.0.2.7", sender="news@shop.test", mail_options=(), content=CONTENT,
                    recipients=[HeldRecipient(a, "held", rule, reason) for a in addresses]))
        return asyncio.run(store_hold())

    def get(self, hold_id: str) -> HeldMessage:
        async def get() -> HeldMessage | None:
            async with open_admin_context(load_config(self.config), actor="test") as context:
                return await context.holds.get(hold_id)
        message = asyncio.run(get())
        assert message is not None
        return message

    def states(self, hold_id: str) -> dict[str, str]:
        return {r.address: r.state for r in self.get(hold_id).recipients}

    def append_audit(self, records: Sequence[AuditRecord]) -> None:
        async def append() -> None:
            async with open_admin_context(load_config(self.config), actor="test") as context:
                await context.audit.append(records)
        asyncio.run(append())

    def audit(self, **filters: str) -> list[AuditRecord]:
        async def query() -> list[AuditRecord]:
            async with open_admin_context(load_config(self.config), actor="test") as context:
                return await context.audit.query(AuditFilter(**filters))  # type: ignore[arg-type]
        return asyncio.run(query())

    def pseudonym(self, address: str) -> str:
        """What the audit trail stores in place of ``address``."""
        async def pseudonym() -> str:
            async with open_admin_context(load_config(self.config), actor="test") as context:
                return Pseudonymizer(context.normalizer, lambda: context.key_ring).pseudonym(address)
        return asyncio.run(pseudonym())


@pytest.fixture
def guard(tmp_path: Path) -> Guard:
    return Guard(tmp_path)


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def test_list_empty_queue_explains(guard: Guard) -> None:
    assert "No messages with held recipients." in ok(guard.cli("hold", "list"))


def test_list_shows_held_messages(guard: Guard) -> None:
    first = guard.hold("a@example.com", "b@example.com")
    second = guard.hold("c@example.com", rule="approval.sanctions")
    output = ok(guard.cli("hold", "list"))
    assert output.index(second) < output.index(first)  # newest first
    assert "2 held" in output and "approval.sanctions" in output
    assert "smtp-guard hold show ID" in output
    assert first not in ok(guard.cli("hold", "list", "--limit", "1"))
    assert "No messages with released recipients." in ok(guard.cli("hold", "list", "--state", "released"))


def test_show_headers_recipients_and_reason(guard: Guard) -> None:
    hold_id = guard.hold("a@example.com", "b@example.com")
    output = ok(guard.cli("hold", "show", hold_id))
    assert f"Hold       {hold_id}" in output
    assert "from 192.0.2.7 (transaction txn-42)" in output
    assert "  Subject: Verstöße and account notice" in output  # RFC 2047 decoded
    assert "  From: Shop <news@shop.test>" in output
    assert "a@example.com  held   breaker.volume  0" in output
    assert "breaker.volume: stream over 10x baseline (2 recipients)" in output
    assert f"smtp-guard hold release {hold_id}" in output


def test_show_raw_prints_the_message_bytes(guard: Guard) -> None:
    hold_id = guard.hold("a@example.com")
    result = guard.cli("hold", "show", hold_id, "--raw")
    assert result.exit_code == 0
    assert result.stdout_bytes == CONTENT


def test_unknown_hold_says_what_to_run(guard: Guard) -> None:
    guard.hold("a@example.com")
    for command in (("show", "abc"), ("release", "abc"), ("discard", "abc", "--yes")):
        result = guard.cli("hold", *command)
        assert result.exit_code == 1
        assert "no held message abc; run `smtp-guard hold list --state all`" in result.output


def test_release_some_then_all(guard: Guard) -> None:
    hold_id = guard.hold("a@example.com", "b@example.com")
    output = ok(guard.cli("hold", "release", hold_id, "--recipient", "A@Example.COM"))
    assert f"Released 1 recipient(s) of hold {hold_id}" in output
    assert "release worker delivers them within a second or two" in output
    assert guard.states(hold_id) == {"a@example.com": "released", "b@example.com": "held"}
    assert hold_id in ok(guard.cli("hold", "list", "--state", "released"))

    assert "Released 1 recipient(s)" in ok(guard.cli("hold", "release", hold_id))
    output = ok(guard.cli("hold", "release", hold_id))
    assert "Nothing to release" in output and "2 released" in output

    admin = guard.audit(kind="admin")
    pseudonym = guard.pseudonym("a@example.com")
    assert pseudonym.startswith("h:") and len(pseudonym) == 18
    assert [(r.verdict, r.recipient, r.txn_id, r.rule) for r in admin] == [
        ("hold.release", "", hold_id, "breaker.volume"),
        ("hold.release", "", hold_id, "breaker.volume"),
        ("hold.release", pseudonym, hold_id, "breaker.volume"),
    ]
    assert all(r.actor.startswith("cli:") for r in admin)
    assert not any("a@example.com" in f"{r.recipient} {r.reason}" for r in admin)  # the trail names no one
    # Asking for the person by address (any spelling) still finds their record.
    assert guard.audit(kind="admin", recipient="A@Example.COM") == admin[2:]


def test_release_unknown_recipient_lists_the_real_ones(guard: Guard) -> None:
    hold_id = guard.hold("a@example.com", "b@example.com")
    result = guard.cli("hold", "release", hold_id, "--recipient", "z@example.com")
    assert result.exit_code == 1
    assert (f"z@example.com is not a recipient of hold {hold_id}; its recipients are a@example.com, b@example.com"
            in result.output)
    assert guard.states(hold_id) == {"a@example.com": "held", "b@example.com": "held"}


def test_discard_asks_first_then_deletes_content(guard: Guard) -> None:
    hold_id = guard.hold("a@example.com", "b@example.com")
    result = guard.cli("hold", "discard", hold_id, input="n\n")
    assert result.exit_code == 1
    assert "Discard 2 recipient(s) of hold" in result.output and "Verstöße" in result.output
    assert guard.states(hold_id) == {"a@example.com": "held", "b@example.com": "held"}

    output = ok(guard.cli("hold", "discard", hold_id, "--recipient", "b@example.com", input="y\n"))
    assert f"Discarded 1 recipient(s) of hold {hold_id}" in output
    assert guard.states(hold_id) == {"a@example.com": "held", "b@example.com": "discarded"}

    ok(guard.cli("hold", "discard", hold_id, "--yes"))
    assert guard.get(hold_id).content is None
    output = ok(guard.cli("hold", "show", hold_id))
    assert "Content    deleted" in output
    result = guard.cli("hold", "show", hold_id, "--raw")
    assert result.exit_code == 1 and "was deleted" in result.output
    assert "Nothing to discard" in ok(guard.cli("hold", "discard", hold_id, "--yes"))
    assert [r.verdict for r in guard.audit(kind="admin")] == ["hold.discard"] * 3


def test_audit_list_filters_table_and_json(guard: Guard) -> None:
    now = time.time()
    guard.append_audit([
        AuditRecord(now - 7200, "decision", "reject", "suppression.unsubscribed", "on list unsubscribed",
                    txn_id="t1", sender="news@shop.test", recipient="old@example.com"),
        AuditRecord(now - 60, "decision", "hold", "breaker.volume", "stream over 10x baseline",
                    txn_id="t2", sender="news@shop.test", recipient="new@example.com"),
        AuditRecord(now - 30, "admin", "hold.release", "breaker.volume", "released 1 recipient(s)",
                    txn_id="3f2a", actor="cli:alice"),
    ])
    old, new = guard.pseudonym("old@example.com"), guard.pseudonym("new@example.com")
    output = ok(guard.cli("audit", "list", "--since", "1h"))
    assert new in output and "cli:alice" in output and old not in output
    assert "@example.com" not in output  # recipients are shown as their pseudonyms only
    assert output.index("hold.release") < output.index(new)  # newest first

    records = json.loads(ok(guard.cli("audit", "list", "--rule", "suppression", "--json")))
    assert [(r["recipient"], r["verdict"]) for r in records] == [(old, "reject")]
    assert records[0]["time_iso"].endswith("Z")

    assert "3f2a" in ok(guard.cli("audit", "list", "--kind", "admin", "--txn", "3f2a"))
    output = ok(guard.cli("audit", "list", "--recipient", "new@example.com",
                          "--verdict", "hold", "--sender", "news@shop.test"))
    assert new in output and old not in output and "new@example.com" not in output
    assert "No audit records match" in ok(guard.cli("audit", "list", "--until", "2000-01-01"))


def test_audit_list_bad_time_explains(guard: Guard) -> None:
    result = guard.cli("audit", "list", "--since", "yesterday")
    assert result.exit_code == 2
    assert "--since" in result.output and "30m, 1h, 2d" in result.output


@pytest.mark.parametrize("path", [("hold",), ("hold", "list"), ("hold", "show"), ("hold", "release"),
                                  ("hold", "discard"), ("audit",), ("audit", "list")])
def test_every_command_has_help_with_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(GROUPS[path[0]], [*path[1:], "--help"])
    assert result.exit_code == 0
    assert "smtp-guard " + path[0] in result.output
    if len(path) == 2:
        assert "Example:" in result.output and "--config" in result.output
    group = GROUPS[path[0]]
    command = group.commands[path[1]] if len(path) == 2 else group
    assert command.help

"""``smtp-guard suppress ...`` end to end: CliRunner over a temp config and a real SQLite file."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from smtp_guard import replies
from smtp_guard.cli.main import main
from smtp_guard.cli.suppress import suppress

from conftest import create_store, store_toml


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "smtp-guard.toml"
    path.write_text(f'[store]\n{store_toml(tmp_path / "data" / "guard.sqlite3")}', encoding="utf-8")
    create_store(path)
    return path


@pytest.fixture
def cli(config_file: Path):  # type: ignore[no-untyped-def]
    """Run ``smtp-guard suppress ARGS --config FILE``."""
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(main, ["suppress", *args, "--config", str(config_file)], catch_exceptions=False)

    return invoke


def test_every_command_has_help_with_an_example() -> None:
    runner = CliRunner()
    assert isinstance(suppress, click.Group)
    for name in suppress.commands:
        result = runner.invoke(main, ["suppress", name, "--help"])
        assert result.exit_code == 0, result.output
        assert "smtp-guard suppress" in result.output and "--config" in result.output, name
        assert suppress.commands[name].short_help or suppress.commands[name].help


def test_add_check_remove(cli, config_file: Path) -> None:
    added = cli("add", "Jane.Doe+news@GoogleMail.com", "--list", "unsubscribed", "--reason", "asked by phone")
    assert added.exit_code == 0, added.output
    assert "janedoe@gmail.com on unsubscribed" in added.output
    assert "Added 1 new entry" in added.output
    # The hint names the same config: pasted, it reads the same store, not the default one.
    assert f"Verify: smtp-guard suppress check janedoe@gmail.com --config {config_file}" in added.output

    checked = cli("check", "jane.doe@gmail.com")
    assert checked.exit_code == 0
    assert "Verdict   reject" in checked.output
    assert "Rule      suppression.unsubscribed" in checked.output
    assert f"Reply     {replies.SUPPRESSED}" in checked.output
    assert "asked by phone" in checked.output

    removed = cli("remove", "janedoe@gmail.com")
    assert removed.exit_code == 0 and "removed from 1 list" in removed.output
    after = cli("check", "jane.doe@gmail.com")
    assert "Verdict   pass" in after.output and "No list entry matches" in after.output


def test_check_explains_a_domain_entry_and_priority(cli) -> None:
    cli("add", "@example.org", "--list", "manual", "--include-subdomains")
    cli("add", "bob@mail.example.org", "--list", "bounced", "--expires-in", "7d")
    cli("add", "bob@mail.example.org", "--list", "complained")
    checked = cli("check", "Bob@Mail.Example.ORG")
    assert "Rule      suppression.complained" in checked.output
    for line in ("complained  address  bob@mail.example.org", "bounced     address  bob@mail.example.org",
                 "manual      domain   @example.org (+subdomains)"):
        assert line in checked.output
    other = cli("check", "alice@eu.example.org")
    assert "Reason    recipient's domain is on the manual list" in other.output


def test_errors_say_what_to_type_next(cli) -> None:
    unknown = cli("add", "jane@example.com", "--list", "unsubscribe")
    assert unknown.exit_code == 1
    assert "no list named 'unsubscribe'; configured lists are complained, unsubscribed" in unknown.output
    bare = cli("add", "example.com", "--list", "manual")
    assert bare.exit_code == 1 and "write @example.com" in bare.output
    invalid = cli("check", "not an address")
    assert invalid.exit_code == 1 and "jane@example.com" in invalid.output
    duration = cli("add", "jane@example.com", "--list", "manual", "--expires-in", "soon")
    assert duration.exit_code == 2 and "30s" in duration.output
    # A well-written target that may not be stored gets no lesson in spelling.
    address_with_subdomains = cli("add", "jane@example.com", "--list", "manual", "--include-subdomains")
    assert address_with_subdomains.exit_code == 1
    assert "applies to @domain targets only." in address_with_subdomains.output
    assert "Write an address like" not in address_with_subdomains.output


def test_list_with_filters(cli) -> None:
    cli("add", "a@example.com", "b@example.net", "--list", "bounced", "--source", "sendgrid")
    cli("add", "c@example.com", "--list", "complained")
    cli("add", "old@example.com", "--list", "bounced", "--expires-in", "1s")
    listed = cli("list", "--list", "bounced", "--contains", "EXAMPLE.COM", "--include-expired")
    assert listed.exit_code == 0
    assert "a@example.com" in listed.output and "b@example.net" not in listed.output
    assert "c@example.com" not in listed.output
    by_source = cli("list", "--source", "sendgrid", "--limit", "1")
    assert "a@example.com" in by_source.output and "(first 1;" in by_source.output
    assert "No entries match" in cli("list", "--kind", "domain").output


def test_export_csv_and_jsonl(cli, tmp_path) -> None:
    cli("add", "a@example.com", "--list", "complained", "--reason", "fbl, via ARF")
    out = tmp_path / "export.csv"
    exported = cli("export", "-o", str(out))
    assert exported.exit_code == 0 and "Exported 1 entry" in exported.stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "kind,value,list,reason,source,created_at,expires_at,include_subdomains"
    assert lines[1].startswith('address,a@example.com,complained,"fbl, via ARF",cli,')
    jsonl = cli("export", "--format", "jsonl")
    row = json.loads(jsonl.stdout.splitlines()[0])
    assert (row["value"], row["list"], row["expires_at"]) == ("a@example.com", "complained", None)


def test_import_reports_bad_rows_and_counts(cli, tmp_path) -> None:
    data = tmp_path / "suppression_bounces.csv"
    data.write_text("email,created,reason,status\n"
                    "gone@example.com,1704844800,550 5.1.1 unknown,5.1.1\n"
                    "broken,1704844800,x,5.1.1\n", encoding="utf-8")
    imported = cli("import", str(data))
    assert imported.exit_code == 0, imported.output
    assert f"{data}:3: 'broken' is not an address" in imported.stderr
    assert "(sendgrid): 2 rows read, 1 new, 0 already present, 0 already expired, 0 erased (never stored again), 1 bad" in imported.stdout
    again = cli("import", str(data))
    assert "0 new, 1 already present" in again.stdout
    assert "Verdict   reject" in cli("check", "gone@example.com").output


def test_import_of_a_plain_list_and_an_unreadable_file(cli, tmp_path) -> None:
    plain = tmp_path / "unsubs.txt"
    plain.write_text("a@example.com\nb@example.com\n", encoding="utf-8")
    missing = tmp_path / "missing.csv"
    result = cli("import", str(plain), str(missing), "--list", "unsubscribed")
    assert result.exit_code == 1
    assert "2 new" in result.stdout
    assert f"cannot read {missing}" in result.stderr
    assert "could not import" in result.stderr
    no_list = cli("import", str(plain))
    assert no_list.exit_code == 1 and "--list unsubscribed" in no_list.stderr


def test_import_with_nothing_importable_fails(cli, tmp_path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("nope\n", encoding="utf-8")
    result = cli("import", str(bad), "--list", "manual")
    assert result.exit_code == 1 and "no row was imported" in result.stderr


def test_a_domain_without_at_gets_the_domain_hint_and_other_text_does_not(cli) -> None:
    assert "to suppress a whole domain write @example.com" in cli("add", "example.com", "--list", "manual").output
    assert "write @" not in cli("add", "not an address", "--list", "manual").output

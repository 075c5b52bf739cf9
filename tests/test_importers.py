"""Import of suppression exports (plain CSV, SendGrid, Mailchimp, SES) into a real SQLite store."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import AsyncIterator

import pytest

from smtp_guard.app import open_admin_context
from smtp_guard.backends import init_store
from smtp_guard.audit_model import AuditFilter
from smtp_guard.config import Config, StoreConfig
from smtp_guard.services import importers
from smtp_guard.services import suppressions as service
from smtp_guard.services.context import AdminContext
from smtp_guard.services.importers import BadRow, ImportFailed, ImportProgress, import_file
from smtp_guard.suppression_model import SuppressionEntry, SuppressionFilter

NOW = datetime(2024, 1, 15, tzinfo=timezone.utc).timestamp()
DAY = 86400.0


@asynccontextmanager
async def admin(tmp_path: Path, now: float = NOW) -> AsyncIterator[AdminContext]:
    """An AdminContext over a real SQLite file in tmp_path, with a fixed clock."""
    config = Config(store=StoreConfig(path=str(tmp_path / "guard.sqlite3")))
    await init_store(config)
    async with open_admin_context(config, actor="test:importer") as context:
        yield replace(context, clock=lambda: now)


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[AdminContext]:
    async with admin(tmp_path) as context:
        yield context


async def stored(ctx: AdminContext) -> dict[tuple[str, str], SuppressionEntry]:
    return {(e.value, e.list_name): e async for e in ctx.suppressions.query(SuppressionFilter(include_expired=True), NOW)}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


async def run_import(ctx: AdminContext, path: Path, **options: object) -> tuple[importers.ImportResult, list[str]]:
    bad: list[BadRow] = []
    result = await import_file(ctx, path, on_bad_row=bad.append, **options)  # type: ignore[arg-type]
    return result, [str(b) for b in bad]


# --- plain CSV ------------------------------------------------------------------------------------


async def test_plain_list_one_address_per_line(ctx, tmp_path) -> None:
    path = write(tmp_path, "unsubs.txt", "Jane+news@Example.com\n\nnot-an-address\n@Example.ORG\nbob@example.net\n")
    result, bad = await run_import(ctx, path, list_name="unsubscribed")
    assert (result.format, result.read, result.new, result.present, result.bad) == ("csv", 4, 3, 0, 1)
    assert bad == [f"{path}:3: 'not-an-address' is not an address"]
    entries = await stored(ctx)
    assert set(entries) == {("jane@example.com", "unsubscribed"), ("example.org", "unsubscribed"),
                            ("bob@example.net", "unsubscribed")}
    assert entries[("example.org", "unsubscribed")].kind == "domain"
    assert entries[("bob@example.net", "unsubscribed")].source == "import:unsubs.txt"


async def test_plain_list_needs_a_list(ctx, tmp_path) -> None:
    path = write(tmp_path, "unsubs.txt", "jane@example.com\n")
    with pytest.raises(ImportFailed, match="--list unsubscribed"):
        await import_file(ctx, path)


async def test_csv_with_header_list_column_and_bad_rows(ctx, tmp_path) -> None:
    path = write(tmp_path, "mixed.csv", (
        "Email,List,Reason,Created\n"
        "a@example.com,complained,fbl,2024-01-10T00:00:00Z\n"
        "b@example.com,nosuchlist,,\n"
        "c@example.com,bounced,mailbox full,yesterday\n"
        "d@example.com,bounced,mailbox full,2024-01-01 10:00:00\n"
        "e@example.com,bounced,old bounce,2023-01-01\n"
    ))
    result, bad = await run_import(ctx, path)
    assert (result.new, result.bad, result.expired) == (2, 2, 1)
    assert bad == [
        f"{path}:3: no list named 'nosuchlist'; configured lists are complained, unsubscribed, invalid, bounced, manual",
        f"{path}:4: created time 'yesterday' is not a date (write 2024-05-01T12:30:00Z or epoch seconds)",
    ]
    entries = await stored(ctx)
    bounced = entries[("d@example.com", "bounced")]
    created = datetime(2024, 1, 1, 10, tzinfo=timezone.utc).timestamp()
    assert (bounced.created_at, bounced.expires_at) == (created, created + 90 * DAY)
    assert entries[("a@example.com", "complained")].reason == "fbl"


async def test_list_option_overrides_the_files_lists(ctx, tmp_path) -> None:
    path = write(tmp_path, "mixed.csv", "address,list\na@example.com,complained\n")
    await run_import(ctx, path, list_name="manual", source="ticket-42")
    (entry,) = (await stored(ctx)).values()
    assert (entry.list_name, entry.source) == ("manual", "ticket-42")


async def test_an_export_reads_back_unchanged(ctx, tmp_path) -> None:
    await service.add(ctx, ["a@example.com"], "complained", reason="fbl")
    await service.add(ctx, ["@example.org"], "manual", include_subdomains=True)
    export = tmp_path / "export.csv"
    with export.open("w", encoding="utf-8", newline="") as file:
        assert await service.export(ctx, SuppressionFilter(), file) == 2
    async with admin(tmp_path / "other") as fresh:
        result, bad = await run_import(fresh, export)
        assert (result.new, bad) == (2, [])
        entries = await stored(fresh)
    assert entries[("example.org", "manual")].include_subdomains
    assert entries[("example.org", "manual")].kind == "domain"
    assert entries[("a@example.com", "complained")].reason == "fbl"
    assert entries[("a@example.com", "complained")].created_at == NOW


# --- SendGrid -------------------------------------------------------------------------------------


async def test_sendgrid_bounces_map_by_status(ctx, tmp_path) -> None:
    path = write(tmp_path, "suppression_bounces.csv", (
        "email,created,reason,status\n"
        "gone@example.com,1704844800,550 5.1.1 User unknown,5.1.1\n"
        "full@example.com,1704844800,552 5.2.2 Mailbox full,5.2.2\n"
        ",1704844800,empty,5.1.1\n"
    ))
    result, bad = await run_import(ctx, path)
    assert (result.format, result.new, result.bad) == ("sendgrid", 2, 1)
    assert bad == [f"{path}:4: '' is not an address"]
    entries = await stored(ctx)
    assert entries[("gone@example.com", "invalid")].reason == "550 5.1.1 User unknown"
    full = entries[("full@example.com", "bounced")]
    assert (full.source, full.created_at, full.expires_at) == ("sendgrid", 1704844800.0, 1704844800.0 + 90 * DAY)


@pytest.mark.parametrize(("name", "header", "row", "list_name"), [
    ("spam_reports.csv", "email,created,ip", "x@example.com,1704844800,192.0.2.1", "complained"),
    ("export.csv", "email,created,ip", "x@example.com,1704844800,192.0.2.1", "complained"),
    ("global_unsubscribes.csv", "email,created", "x@example.com,1704844800", "unsubscribed"),
    ("export.csv", "email,created", "x@example.com,1704844800", "unsubscribed"),
    ("invalid_emails.csv", "email,created,reason", "x@example.com,1704844800,Mail domain mentioned", "invalid"),
    ("blocks.csv", "email,created,reason,status", "x@example.com,1704844800,blocked,5.1.1", "bounced"),
])
async def test_sendgrid_export_kinds(ctx, tmp_path, name, header, row, list_name) -> None:
    result, bad = await run_import(ctx, write(tmp_path, name, f"{header}\n{row}\n"))
    assert (result.format, result.new, bad) == ("sendgrid", 1, [])
    assert list(await stored(ctx)) == [("x@example.com", list_name)]


# --- Mailchimp ------------------------------------------------------------------------------------

MAILCHIMP_UNSUBSCRIBED = (
    '"Email Address","First Name","Last Name",MEMBER_RATING,OPTIN_TIME,OPTIN_IP,CONFIRM_TIME,CONFIRM_IP,'
    'LATITUDE,LONGITUDE,GMTOFF,DSTOFF,TIMEZONE,CC,REGION,UNSUB_TIME,UNSUB_CAMPAIGN_TITLE,UNSUB_CAMPAIGN_ID,'
    'LEID,EUID,UNSUB_REASON,UNSUB_REASON_OTHER,NOTES\n'
    'jane@example.com,Jane,Doe,2,"2021-03-01 10:00:00",,"2021-03-01 10:01:00",,,,,,,,,"2023-12-01 08:30:00",'
    '"December News",abc123,1,x1,"I no longer want to receive these emails",,\n'
    'not an address,Bob,,2,,,,,,,,,,,,"2023-12-02 08:30:00",,,2,x2,Other,"too many",\n'
    'max@example.org,Max,,2,,,,,,,,,,,,"2023-12-03 08:30:00",,,3,x3,Other,"too many",\n'
)


async def test_mailchimp_unsubscribed_export(ctx, tmp_path) -> None:
    path = write(tmp_path, "unsubscribed_members_export.csv", MAILCHIMP_UNSUBSCRIBED)
    result, bad = await run_import(ctx, path)
    assert (result.format, result.new, result.bad) == ("mailchimp", 2, 1)
    assert bad[0].startswith(f"{path}:3: 'not an address' is not an address")
    entries = await stored(ctx)
    jane = entries[("jane@example.com", "unsubscribed")]
    assert jane.reason == "I no longer want to receive these emails"
    assert jane.created_at == datetime(2023, 12, 1, 8, 30, tzinfo=timezone.utc).timestamp()
    assert (jane.source, jane.expires_at) == ("mailchimp", None)
    assert entries[("max@example.org", "unsubscribed")].reason == "Other: too many"


async def test_mailchimp_cleaned_export(ctx, tmp_path) -> None:
    path = write(tmp_path, "cleaned.csv", (
        '"Email Address","First Name",MEMBER_RATING,CLEAN_TIME,CLEAN_CAMPAIGN_TITLE,CLEAN_CAMPAIGN_ID\n'
        'dead@example.com,Dee,1,"2023-11-20 12:00:00","Black Friday",cf01\n'
    ))
    result, _ = await run_import(ctx, path)
    (entry,) = (await stored(ctx)).values()
    assert (entry.list_name, entry.reason) == ("invalid", "cleaned by Mailchimp after campaign 'Black Friday'")


async def test_mailchimp_subscribed_export_is_refused(ctx, tmp_path) -> None:
    path = write(tmp_path, "subscribed.csv", '"Email Address","First Name",OPTIN_TIME\njane@example.com,Jane,\n')
    with pytest.raises(ImportFailed, match="subscribed members"):
        await import_file(ctx, path)


# --- Amazon SES -----------------------------------------------------------------------------------


def ses_json(*summaries: object, trailer: str = '    "NextToken": null\n}\n') -> str:
    body = ",\n".join("        " + json.dumps(s) for s in summaries)
    return '{\n    "SuppressedDestinationSummaries": [\n' + body + "\n    ],\n" + trailer


async def test_ses_json_export(ctx, tmp_path) -> None:
    path = write(tmp_path, "ses.json", ses_json(
        {"EmailAddress": "bounce@example.com", "Reason": "BOUNCE", "LastUpdateTime": "2024-01-10T18:39:20.622000+00:00"},
        {"EmailAddress": "spam@example.com", "Reason": "COMPLAINT", "LastUpdateTime": "2024-01-11T00:00:00+00:00"},
        {"EmailAddress": "odd@example.com", "Reason": "OTHER"},
        {"EmailAddress": "x@@example.com", "Reason": "BOUNCE"},
    ))
    result, bad = await run_import(ctx, path)
    assert (result.format, result.read, result.new, result.bad) == ("ses", 4, 2, 2)
    assert bad[0] == f"{path}:5: SES reason 'OTHER' is neither BOUNCE nor COMPLAINT"
    assert bad[1].startswith(f"{path}:6: 'x@@example.com' is not a valid address")
    entries = await stored(ctx)
    bounce = entries[("bounce@example.com", "bounced")]
    assert bounce.created_at == pytest.approx(datetime(2024, 1, 10, 18, 39, 20, 622000, tzinfo=timezone.utc).timestamp())
    assert entries[("spam@example.com", "complained")].source == "ses"


async def test_ses_json_streams_across_read_chunks(ctx, tmp_path) -> None:
    summaries = [{"EmailAddress": f"user{i}@example.com", "Reason": "COMPLAINT", "LastUpdateTime": "2024-01-11T00:00:00Z"}
                 for i in range(3000)]  # about 300 kB: many 64 kB reads
    result, bad = await run_import(ctx, write(tmp_path, "ses.json", ses_json(*summaries)))
    assert (result.new, bad) == (3000, [])


async def test_truncated_ses_json_keeps_the_good_rows(ctx, tmp_path) -> None:
    text = ses_json({"EmailAddress": "a@example.com", "Reason": "BOUNCE"},
                    {"EmailAddress": "b@example.com", "Reason": "BOUNCE"})
    path = write(tmp_path, "ses.json", text[: text.index('{"EmailAddress": "b') + 10])
    result, bad = await run_import(ctx, path)
    assert result.new == 1
    assert bad == [f"{path}:4: not valid JSON (Unterminated string starting at); the rest of the file is not read"]


async def test_json_without_summaries_is_refused(ctx, tmp_path) -> None:
    with pytest.raises(ImportFailed, match="list-suppressed-destinations"):
        await import_file(ctx, write(tmp_path, "other.json", '{"Items": []}'))


async def test_ses_csv_export(ctx, tmp_path) -> None:
    path = write(tmp_path, "ses.csv", "EmailAddress,Reason,LastUpdateTime\nspam@example.com,COMPLAINT,2024-01-11T00:00:00Z\n")
    result, _ = await run_import(ctx, path)
    assert result.format == "ses"
    assert list(await stored(ctx)) == [("spam@example.com", "complained")]


# --- guarantees -----------------------------------------------------------------------------------


async def test_reimport_changes_nothing(ctx, tmp_path) -> None:
    path = write(tmp_path, "bounces.csv", "a@example.com\nb@example.com\n")
    first, _ = await run_import(ctx, path, list_name="bounced")
    db_seq = (await ctx.suppressions.load_snapshot(list(ctx.config.lists), NOW)).seq
    before = await stored(ctx)
    again, _ = await run_import(ctx, path, list_name="bounced")
    assert (first.new, again.new, again.present) == (2, 0, 2)
    assert await stored(ctx) == before
    # No change logged, so running servers do not reload their index for nothing.
    assert (await ctx.suppressions.load_snapshot(list(ctx.config.lists), NOW)).seq == db_seq


async def test_progress_and_resume_with_skip_rows(ctx, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(importers, "BATCH_SIZE", 2)
    path = write(tmp_path, "five.csv", "".join(f"user{i}@example.com\n" for i in range(5)))
    progress: list[ImportProgress] = []
    await import_file(ctx, path, list_name="manual", on_progress=progress.append)
    assert [p.rows for p in progress] == [2, 4, 5]
    assert progress[-1].bytes_read == progress[-1].bytes_total == path.stat().st_size
    async with admin(tmp_path / "resumed") as fresh:
        result, _ = await run_import(fresh, path, list_name="manual", skip_rows=4)
        assert (result.skipped, result.read, result.new) == (4, 1, 1)
        assert list(await stored(fresh)) == [("user4@example.com", "manual")]


async def test_import_is_audited(ctx, tmp_path) -> None:
    await run_import(ctx, write(tmp_path, "u.csv", "a@example.com\n"), list_name="unsubscribed")
    (record,) = await ctx.audit.query(AuditFilter(kind="admin"))
    assert (record.verdict, record.rule, record.actor) == ("suppress.import", "suppression.unsubscribed", "test:importer")
    assert "1 new" in record.reason


async def test_unreadable_and_empty_files_fail_whole(ctx, tmp_path) -> None:
    with pytest.raises(ImportFailed, match="cannot read .*missing.csv"):
        await import_file(ctx, tmp_path / "missing.csv", list_name="manual")
    with pytest.raises(ImportFailed, match="empty"):
        await import_file(ctx, write(tmp_path, "empty.csv", ""), list_name="manual")


async def test_invalid_utf8_is_a_bad_row_not_a_failed_file(ctx, tmp_path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"ok@example.com\nj\xf6rg@example.com\n")
    result, bad = await run_import(ctx, path, list_name="manual")
    assert (result.new, result.bad) == (1, 1)
    assert bad[0].startswith(f"{path}:2: ")


async def test_a_small_import_is_logged_entry_by_entry_and_a_large_one_as_one_reload(ctx, tmp_path, monkeypatch) -> None:
    """A running server applies a small import to its index in place; only a large one makes it
    reload the whole index."""
    monkeypatch.setattr(importers, "INCREMENTAL_MAX", 3)
    lists = list(ctx.config.lists)
    start = await ctx.suppressions.current_seq()
    await run_import(ctx, write(tmp_path, "few.csv", "a@example.com\nb@example.com\n@example.org\n"),
                     list_name="bounced")
    small = await ctx.suppressions.changes_since(start, lists, NOW)
    assert not small.full_reload
    assert sorted(small.addresses.values()) == ["bounced", "bounced"] and list(small.domains) == ["example.org"]
    await run_import(ctx, write(tmp_path, "many.csv", "".join(f"user{i}@example.com\n" for i in range(4))),
                     list_name="bounced")
    large = await ctx.suppressions.changes_since(small.seq, lists, NOW)
    assert large.full_reload and large.seq == small.seq + 1  # one marker for the four

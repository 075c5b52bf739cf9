"""Properties of the suppression importers over generated files (hypothesis), on real temp
files and a real SQLite store: any bytes give a result or ImportFailed, never another
exception; bad rows are reported as FILE:LINE with the line the row starts on and the good
rows are kept; an export imports back to the same entries.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import tempfile
from contextlib import asynccontextmanager
from dataclasses import astuple, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import AsyncIterator, Awaitable, TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from smtp_guard.app import open_admin_context
from smtp_guard.backends import init_store
from smtp_guard.config import Config, StoreConfig
from smtp_guard.services import suppressions as service
from smtp_guard.services.context import AdminContext
from smtp_guard.services.importers import BadRow, ImportFailed, ImportResult, import_file
from smtp_guard.suppression_model import SuppressionEntry, SuppressionFilter

# Each example opens a real SQLite store (about 50 ms): few examples, chosen to hit the edges.
PROPERTIES = settings(max_examples=25, deadline=None, derandomize=bool(os.environ.get("CI")), database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
NOW = datetime(2024, 1, 15, tzinfo=timezone.utc).timestamp()
LISTS = ("complained", "unsubscribed", "invalid", "bounced", "manual")
T = TypeVar("T")


def run(coroutine: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await coroutine
    return asyncio.run(wrapper())


@asynccontextmanager
async def admin(directory: Path) -> AsyncIterator[AdminContext]:
    """An AdminContext over a real SQLite file in ``directory``, with a fixed clock."""
    config = Config(store=StoreConfig(path=str(directory / "guard.sqlite3")))
    await init_store(config)
    async with open_admin_context(config, actor="test:properties") as context:
        yield replace(context, clock=lambda: NOW)


async def stored(ctx: AdminContext) -> set[SuppressionEntry]:
    return {entry async for entry in ctx.suppressions.query(SuppressionFilter(include_expired=True), NOW)}


# --- generated files ------------------------------------------------------------------------------

addresses = st.builds(lambda local, domain: f"{local}@{domain}.example",
                      st.from_regex(r"[A-Za-z0-9+_'-]{1,6}(\.[A-Za-z0-9_-]{1,4})?", fullmatch=True),
                      st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True))
domains = st.from_regex(r"@[a-z][a-z0-9]{0,6}\.example", fullmatch=True)
times = st.sampled_from(["2024-01-10T00:00:00Z", "2024-01-01 10:00:00", "1704067200", "1704067200000", "0", "-1",
                         "nan", "inf", "-inf", "1e400", "1e20", "9999-12-31T23:59:59-14:00",
                         "0001-01-01T00:00:00+14:00", "yesterday", ""])
cells = st.one_of(addresses, domains, st.sampled_from(LISTS + ("nosuchlist", "domain", "address", "5.1.1", "4.2.0",
                                                               "BOUNCE", "COMPLAINT", "true")),
                  times, st.text(max_size=12))
HEADERS = ["", "email", "Email,List,Reason,Created", "address,list,expires_at",
           ",".join(service.EXPORT_COLUMNS), "email,created,reason,status", "email,created", "email,created,ip",
           "Email Address,UNSUB_TIME,UNSUB_REASON,UNSUB_REASON_OTHER", "Email Address,CLEAN_TIME,CLEAN_CAMPAIGN_TITLE",
           "Email Address,First Name", "EmailAddress,Reason,LastUpdateTime"]


def _csv_text(header: str, rows: list[list[str]], newline: str) -> str:
    lines = [header] if header else []
    lines += [",".join('"' + c.replace('"', '""') + '"' if set(c) & set(',"\r\n') else c for c in row)
              for row in rows]
    return newline.join(lines)


csv_files = st.builds(_csv_text, st.sampled_from(HEADERS), st.lists(st.lists(cells, max_size=8), max_size=8),
                      st.sampled_from(["\n", "\r\n", "\r"])).map(lambda text: text.encode("utf-8"))
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8), addresses),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=8)
ses_items = st.fixed_dictionaries({"EmailAddress": st.one_of(addresses, json_values),
                                   "Reason": st.one_of(st.sampled_from(["BOUNCE", "COMPLAINT", "bounce"]), json_values)},
                                  optional={"LastUpdateTime": st.one_of(times, json_values)})
json_files = st.builds(lambda items, indent: json.dumps({"SuppressedDestinationSummaries": items}, indent=indent),
                       st.lists(st.one_of(ses_items, json_values), max_size=6), st.sampled_from([None, 2])
                       ).map(lambda text: text.encode("utf-8"))


def _splice(data: bytes, at: int, noise: bytes) -> bytes:
    at = at % (len(data) + 1)
    return data[:at] + noise + data[at:]


any_bytes = st.one_of(
    st.binary(max_size=300),
    csv_files,
    json_files,
    st.builds(_splice, st.one_of(csv_files, json_files), st.integers(0, 10_000),
              st.sampled_from([b"\x00", b"\xff\xfe", b"\xef\xbb\xbf", b'"', b"\r", b"{", b"]", b"\xc3"])),
)


@pytest.fixture(scope="module")
def shared_store() -> AsyncIterator[Path]:
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


@settings(PROPERTIES, max_examples=100)
@given(data=any_bytes, fmt=st.sampled_from(["auto", "csv", "sendgrid", "mailchimp", "ses"]),
       list_name=st.sampled_from([None, "manual"]), name=st.sampled_from(["export.csv", "spam_reports.csv", "ses.json"]))
@example(data=b'{"SuppressedDestinationSummaries": [' + b"[" * 5000, fmt="auto", list_name=None, name="ses.json")
@example(data=b'{"SuppressedDestinationSummaries": [' + b"1" * 5000 + b"]}", fmt="auto", list_name=None,
         name="ses.json")
@example(data=b"email,list,created\na@example.com,manual,1e400\nb@example.com,manual,nan\n", fmt="auto",
         list_name=None, name="export.csv")
@example(data=b"email,list,created\na@example.com,manual,9999-12-31T23:59:59-14:00\n", fmt="auto",
         list_name=None, name="export.csv")
def test_any_bytes_import_or_fail_whole_and_bad_rows_name_their_line(shared_store: Path, data: bytes, fmt: str,
                                                                     list_name: str | None, name: str) -> None:
    path = shared_store / name
    path.write_bytes(data)
    lines = max(1, len(data.splitlines()) + (1 if data.endswith((b"\n", b"\r")) else 0))

    async def scenario() -> tuple[ImportResult | None, list[BadRow]]:
        bad: list[BadRow] = []
        async with admin(shared_store) as ctx:
            try:
                result = await import_file(ctx, path, fmt, list_name=list_name, on_bad_row=bad.append)
            except ImportFailed as error:
                assert str(path) in str(error)
                return None, bad
            # Everything imported reads back and exports (a stored time must be a real date).
            for entry in await stored(ctx):
                service.export_row(entry)
                if entry.kind == "address":
                    assert ctx.normalizer.key(entry.value) == entry.value
            return result, bad

    result, bad = run(scenario())
    for row in bad:
        assert str(row).startswith(f"{path}:{row.line}: ") and 1 <= row.line <= lines, (str(row), lines)
    if result is not None:
        assert result.read == result.new + result.present + result.expired + result.bad + result.erased
        assert result.bad == len(bad)


# --- good rows kept, bad rows reported -------------------------------------------------------------

bad_targets = st.one_of(st.from_regex(r"[a-z]{1,8}", fullmatch=True).filter(lambda s: s not in ("email", "address",
                                                                                               "value", "recipient")),
                        st.sampled_from(["a@@b.example", "a b@c.example", "@", "@-x.example", "x@\u00e9\x85.example"]))


@PROPERTIES
@given(st.lists(st.tuples(st.booleans(), addresses, bad_targets), min_size=1, max_size=12))
def test_a_plain_list_keeps_every_good_row_and_reports_every_bad_line(rows: list[tuple[bool, str, str]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "unsubs.csv"
        targets = [good if is_good else bad for is_good, good, bad in rows]
        with path.open("w", encoding="utf-8", newline="") as file:
            csv.writer(file).writerows([target] for target in targets)

        async def scenario() -> tuple[list[BadRow], set[str], set[str]]:
            bad: list[BadRow] = []
            async with admin(Path(directory)) as ctx:
                await import_file(ctx, path, list_name="unsubscribed", on_bad_row=bad.append)
                expected = {ctx.normalizer.key(t) for (is_good, _, _), t in zip(rows, targets) if is_good}
                return bad, {entry.value for entry in await stored(ctx)}, expected

        bad, values, expected = run(scenario())
    assert [row.line for row in bad] == [number for number, (is_good, _, _) in enumerate(rows, start=1) if not is_good]
    assert values == expected


@PROPERTIES
@given(st.lists(st.tuples(addresses, st.sampled_from(LISTS + ("nosuchlist",)), st.text(max_size=10)),
                min_size=1, max_size=8))
def test_a_bad_row_is_reported_at_the_line_where_it_starts(rows: list[tuple[str, str, str]]) -> None:
    """Reasons may span lines (a quoted CSV field with a line break): the reported line is the
    one the row starts on, the line an operator opens the file at."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "mixed.csv"
        with path.open("w", encoding="utf-8", newline="") as file:
            writer = csv.writer(file)  # quotes a field with CR or LF, as ``suppress export`` does
            writer.writerow(["email", "list", "reason"])
            starts = []
            line = 2
            for row in rows:
                starts.append(line)
                writer.writerow(row)
                line += 1 + sum(row[2].count(end) for end in ("\r\n", "\n")) + row[2].replace("\r\n", "").count("\r")

        async def scenario() -> list[BadRow]:
            bad: list[BadRow] = []
            async with admin(Path(directory)) as ctx:
                await import_file(ctx, path, on_bad_row=bad.append)
            return bad

        bad = run(scenario())
    assert [row.line for row in bad] == [start for start, row in zip(starts, rows) if row[1] == "nosuchlist"]


def test_a_multi_line_row_is_reported_at_its_first_line(tmp_path: Path) -> None:
    """Regression: the csv reader's line_num is the row's last line, so a bad row whose reason
    spans two lines was reported one line too far down."""
    path = tmp_path / "mixed.csv"
    path.write_text('email,list,reason\na@example.com,manual,"two\nlines"\nb@example.com,nosuchlist,x\n')

    async def scenario() -> list[str]:
        bad: list[BadRow] = []
        async with admin(tmp_path) as ctx:
            await import_file(ctx, path, on_bad_row=bad.append)
        return [str(row) for row in bad]

    assert run(scenario()) == [f"{path}:4: no list named 'nosuchlist'; configured lists are "
                               "complained, unsubscribed, invalid, bounced, manual"]


@pytest.mark.parametrize("created", ["nan", "inf", "1e400", "-1e20", "9999-12-31T23:59:59-14:00"])
def test_a_time_that_is_no_date_is_a_bad_row(tmp_path: Path, created: str) -> None:
    """Regression: "nan" and "inf" were stored as times (and then broke ``suppress export``),
    and a date beyond the calendar's range raised OverflowError out of the import."""
    path = tmp_path / "times.csv"
    path.write_text(f"email,list,created\na@example.com,manual,{created}\nb@example.com,manual,2024-01-01\n")

    async def scenario() -> tuple[list[str], set[str]]:
        bad: list[BadRow] = []
        async with admin(tmp_path) as ctx:
            await import_file(ctx, path, on_bad_row=bad.append)
            return [str(row) for row in bad], {entry.value for entry in await stored(ctx)}

    bad, values = run(scenario())
    assert len(bad) == 1 and bad[0].startswith(f"{path}:2: created time {created!r} is not a date")
    assert values == {"b@example.com"}


@pytest.mark.parametrize("body", [b"[" * 5000, b"1" * 5000 + b"]}"])
def test_a_pathological_ses_json_is_a_bad_row(tmp_path: Path, body: bytes) -> None:
    """Regression: deep nesting (RecursionError) and a 5000-digit number (ValueError from
    Python's integer size limit) escaped the JSON reader instead of being reported."""
    path = tmp_path / "ses.json"
    path.write_bytes(b'{"SuppressedDestinationSummaries": [\n{"EmailAddress": "a@example.com", "Reason": "BOUNCE"},\n'
                     + body)

    async def scenario() -> tuple[ImportResult, list[str]]:
        bad: list[BadRow] = []
        async with admin(tmp_path) as ctx:
            result = await import_file(ctx, path, on_bad_row=bad.append)
        return result, [str(row) for row in bad]

    result, bad = run(scenario())
    assert result.new == 1
    assert len(bad) == 1 and bad[0].startswith(f"{path}:3: not valid JSON")


# --- export, then import -------------------------------------------------------------------------

reasons = st.text(st.characters(exclude_categories=("Cs",)), max_size=15).map(str.strip)
targets = st.one_of(addresses, domains, st.sampled_from(["a.+tag@example.com", '"john doe"@example.com',
                                                         "jürgen@bücher.example", "x@[IPv6:2001:db8::1]"]))
additions = st.lists(st.tuples(st.lists(targets, min_size=1, max_size=3), st.sampled_from(LISTS), reasons,
                               st.from_regex(r"[a-z:]{1,10}", fullmatch=True), st.booleans()),
                     min_size=1, max_size=5)


@settings(PROPERTIES, max_examples=20)
@given(additions)
def test_an_export_imports_back_to_the_same_entries(batches: list[tuple[list[str], str, str, str, bool]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        export = Path(directory) / "export.csv"

        async def scenario() -> tuple[set[SuppressionEntry], set[SuppressionEntry], list[BadRow]]:
            async with admin(Path(directory) / "a") as ctx:
                for batch, list_name, reason, source, subdomains in batches:
                    domains_only = subdomains and all(target.startswith("@") for target in batch)
                    await service.add(ctx, batch, list_name, reason=reason, source=source,
                                      include_subdomains=domains_only)
                with export.open("w", encoding="utf-8", newline="") as file:
                    await service.export(ctx, SuppressionFilter(), file)
                original = await stored(ctx)
            bad: list[BadRow] = []
            async with admin(Path(directory) / "b") as fresh:
                await import_file(fresh, export, on_bad_row=bad.append)
                return original, await stored(fresh), bad

        original, imported, bad = run(scenario())
    assert bad == []
    assert sorted(map(astuple, imported)) == sorted(map(astuple, original))

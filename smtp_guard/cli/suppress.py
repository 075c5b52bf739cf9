"""``smtp-guard suppress``: add, remove, check, list, export and import suppression entries.

A thin adapter over ``services.suppressions`` and ``services.importers``: it parses options,
prints results and turns service errors into messages that say what to type next.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Awaitable, Sequence, TypeVar

import click

from ..config import Config, ConfigError, parse_duration
from ..services import importers
from ..services.audit import BadTime, parse_time
from ..services import suppressions as service
from ..suppression_model import EntryKind, SuppressionEntry, SuppressionFilter
from .common import admin_context, confirm_in_force, follow_up, run, wait_option, with_config

T = TypeVar("T")


@click.group()
def suppress() -> None:
    """Manage suppression lists: who must never be mailed again, and why.

    A target is an address (jane@example.com) or a whole domain written with a leading @
    (@example.com).

    \b
    Suppress:         smtp-guard suppress add jane@example.com --list unsubscribed
    Explain:          smtp-guard suppress check Jane+news@Example.com
    Browse:           smtp-guard suppress list --list bounced --contains example.com
    Lift:             smtp-guard suppress remove jane@example.com
    Import an ESP:    smtp-guard suppress import sendgrid_bounces.csv
    Back up:          smtp-guard suppress export -o suppressions.csv
    """


def _call(coroutine: Awaitable[T]) -> T:
    """Run a service call; service errors become operator messages (store errors: see run())."""
    try:
        return run(coroutine)
    except service.UnknownList as error:
        raise click.ClickException(
            f"{error}. Pick one with --list, or add [lists.{error.name}] to your config.") from None
    except service.InvalidTarget as error:
        example = " Write an address like jane@example.com or a domain like @example.com." if error.misspelled else ""
        raise click.ClickException(f"{error}.{example}") from None


def _filters(list_name: str | None, kind: str | None, source: str | None, contains: str | None,
             include_expired: bool, since: str | None) -> SuppressionFilter:
    chosen_kind: EntryKind | None = kind  # type: ignore[assignment]  # click.Choice guarantees it
    try:
        since_time = None if since is None else parse_time(since, time.time())
    except BadTime as error:
        raise click.BadParameter(str(error), param_hint="--since") from None
    return SuppressionFilter(list_name, chosen_kind, source, contains, include_expired, since_time)


def _filter_options(function: Any) -> Any:
    """The filters shared by ``list`` and ``export``."""
    for option in reversed((
        click.option("--list", "list_name", metavar="NAME", help="Only entries on this list."),
        click.option("--kind", type=click.Choice(("address", "domain")), help="Only addresses or only domains."),
        click.option("--source", metavar="TEXT", help="Only entries with this source (e.g. sendgrid, cli)."),
        click.option("--contains", metavar="TEXT", help="Only values containing TEXT (case-insensitive)."),
        click.option("--include-expired", is_flag=True, help="Also entries whose expiry has passed."),
        click.option("--since", metavar="TIME",
                     help="Only entries added at or after TIME: 30m, 1h, 2d, 1w ago, or an ISO 8601 time (UTC "
                          "without a zone), e.g. the unsubscribes a platform has not fetched yet."),
    )):
        function = option(function)
    return function


# --- add / remove ---------------------------------------------------------------------------------


@suppress.command("add")
@click.argument("targets", nargs=-1, required=True, metavar="TARGET...")
@click.option("--list", "list_name", required=True, metavar="NAME",
              help="The list: complained, unsubscribed, invalid, bounced, manual, or one from [lists].")
@click.option("--reason", default="", help="Why, for the audit trail and `check`.")
@click.option("--source", default="cli", help="Where the entry comes from.")
@click.option("--expires-in", metavar="DURATION",
              help="Lifetime such as 30d, 12h or never. Default: the list's lifetime from the config.")
@click.option("--include-subdomains", is_flag=True, help="For @domain targets: also match every subdomain.")
@wait_option
@with_config
def add_command(config: Config, targets: tuple[str, ...], list_name: str, reason: str, source: str,
                expires_in: str | None, include_subdomains: bool, wait: bool) -> None:
    """Put addresses or @domains on a list.

    An entry that is already on the list gets the new reason, source and expiry.
    When the command returns, every guard running on this store enforces the change, or the
    command says which one did not confirm it (see --wait).

    \b
    Examples:
      smtp-guard suppress add jane@example.com --list unsubscribed --reason "asked by phone"
      smtp-guard suppress add @competitor.example --list manual --include-subdomains
      smtp-guard suppress add bob@example.net --list bounced --expires-in 7d
    """
    lifetime = _lifetime(expires_in)
    result = _call(_add(config, targets, list_name, reason, source, lifetime, include_subdomains))
    for entry in result.entries:
        until = f", expires {service.iso_time(entry.expires_at)}" if entry.expires_at is not None else ""
        click.echo(f"{_target(entry.kind, entry.value)} on {entry.list_name}{until}")
    updated = len(result.entries) - result.new
    first = result.entries[0]
    example = first.value if first.kind == "address" else f"someone@{first.value}"
    click.echo(f"Added {result.new} new entr{'y' if result.new == 1 else 'ies'}"
               f"{f', updated {updated} existing' if updated else ''}. Verify: {follow_up(config, f'suppress check {example}')}")
    confirm_in_force(config, wait)


def _lifetime(expires_in: str | None) -> float | None:
    if expires_in is None:
        return None
    try:
        seconds = parse_duration(expires_in, "--expires-in")
    except ConfigError as error:
        raise click.BadParameter(str(error).removeprefix("--expires-in: "), param_hint="--expires-in") from None
    return service.FOREVER if seconds is None else seconds


async def _add(config: Config, targets: Sequence[str], list_name: str, reason: str, source: str,
               lifetime: float | None, include_subdomains: bool) -> service.AddResult:
    async with admin_context(config) as ctx:
        return await service.add(ctx, targets, list_name, reason, source, lifetime, include_subdomains)


@suppress.command("remove")
@click.argument("targets", nargs=-1, required=True, metavar="TARGET...")
@click.option("--list", "list_name", metavar="NAME", help="Remove from this list only. Default: from every list.")
@wait_option
@with_config
def remove_command(config: Config, targets: tuple[str, ...], list_name: str | None, wait: bool) -> None:
    """Take addresses or @domains off a list, or off every list.

    When the command returns, every guard running on this store lets them be mailed again, or
    the command says which one did not confirm it (see --wait).

    \b
    Examples:
      smtp-guard suppress remove jane@example.com
      smtp-guard suppress remove @example.net --list bounced
    """
    result = _call(_remove(config, targets, list_name))
    where = f"the {list_name} list" if list_name else "any list"
    for target, count in result.removed:
        shown = _target(target.kind, target.value)
        if count:
            click.echo(f"{shown}: removed from {count} list{'s' if count != 1 else ''}")
        else:
            click.echo(f"{shown}: not on {where} (see `{follow_up(config, f'suppress list --contains {target.value}')}`)")
    click.echo(f"Removed {result.total} entr{'y' if result.total == 1 else 'ies'}.")
    if result.total:
        confirm_in_force(config, wait)


async def _remove(config: Config, targets: Sequence[str], list_name: str | None) -> service.RemoveResult:
    async with admin_context(config) as ctx:
        return await service.remove(ctx, targets, list_name)


# --- check ----------------------------------------------------------------------------------------


@suppress.command("check")
@click.argument("address")
@with_config
def check_command(config: Config, address: str) -> None:
    """Explain what would happen to mail to ADDRESS now.

    Runs the server's own suppression decision on the entries that match, so the answer is
    exactly what enforcement does.

    \b
    Example:
      smtp-guard suppress check Jane.Doe+news@GoogleMail.com
    """
    result = _call(_check(config, address))
    decision = result.decision
    click.echo(f"Address   {result.address}")
    click.echo(f"Key       {result.key}   (the normalized form every list entry is matched by)")
    click.echo(f"Verdict   {decision.verdict.value}")
    click.echo(f"Rule      {decision.rule}")
    click.echo(f"Reason    {decision.reason}")
    click.echo(f"Reply     {decision.reply if decision.reply is not None else '(default for the verdict)'}")
    if not result.entries:
        click.echo("No list entry matches this address or its domain.")
        return
    click.echo("\nMatching entries (the first list in [lists] order decides)")
    _print_entries(result.entries, indent="  ")
    click.echo("\nLift:")
    for entry in result.entries:
        click.echo(f"  {follow_up(config, f'suppress remove {_target(entry.kind, entry.value)} --list {entry.list_name}')}")


async def _check(config: Config, address: str) -> service.CheckResult:
    async with admin_context(config) as ctx:
        return await service.check(ctx, address)


# --- list / export --------------------------------------------------------------------------------


@suppress.command("list")
@_filter_options
@click.option("--limit", type=click.IntRange(min=1), default=50, help="At most this many entries, oldest first.")
@with_config
def list_command(config: Config, list_name: str | None, kind: str | None, source: str | None,
                 contains: str | None, include_expired: bool, since: str | None, limit: int) -> None:
    """List entries, oldest first.

    \b
    Examples:
      smtp-guard suppress list --list unsubscribed --limit 20
      smtp-guard suppress list --contains @example.com --include-expired
    """
    entries = _call(_list(config, _filters(list_name, kind, source, contains, include_expired, since), limit))
    if not entries:
        click.echo(f"No entries match. Add one: {follow_up(config, 'suppress add jane@example.com --list unsubscribed')}")
        return
    _print_entries(entries)
    if len(entries) == limit:
        click.echo(f"(first {limit}; use --limit for more, or `{follow_up(config, 'suppress export')}` for all)")


async def _list(config: Config, filters: SuppressionFilter, limit: int) -> list[SuppressionEntry]:
    async with admin_context(config) as ctx:
        return await service.list_entries(ctx, filters, limit)


@suppress.command("export")
@_filter_options
@click.option("--format", "fmt", type=click.Choice(("csv", "jsonl")), default="csv",
              help="CSV with a header row, or one JSON object per line.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="Write to this file; - is standard output.")
@with_config
def export_command(config: Config, list_name: str | None, kind: str | None, source: str | None,
                   contains: str | None, include_expired: bool, since: str | None, fmt: str, output: str) -> None:
    """Write entries to a file or standard output.

    The CSV reads back with `smtp-guard suppress import`.

    Columns: kind, value, list, reason, source, created_at, expires_at, include_subdomains.

    \b
    Examples:
      smtp-guard suppress export -o suppressions.csv
      smtp-guard suppress export --list complained --format jsonl > complained.jsonl
      smtp-guard suppress export --list unsubscribed --source one-click --since 1d   # the guard's own unsubscribes
    """
    filters = _filters(list_name, kind, source, contains, include_expired, since)
    count = _call(_export(config, filters, output, fmt))
    click.echo(f"Exported {count} entr{'y' if count == 1 else 'ies'}"
               f"{f' to {output}' if output != '-' else ''}.", err=True)


async def _export(config: Config, filters: SuppressionFilter, output: str, fmt: str) -> int:
    async with admin_context(config) as ctx:
        if filters.list_name is not None:
            service.require_list(ctx, filters.list_name)
        chosen: service.ExportFormat = "jsonl" if fmt == "jsonl" else "csv"
        if output == "-":
            return await service.export(ctx, filters, sys.stdout, chosen)
        try:
            # newline="": the csv module writes its own CRLF line ends (RFC 4180).
            with open(output, "w", encoding="utf-8", newline="") as file:
                return await service.export(ctx, filters, file, chosen)
        except OSError as error:
            raise click.ClickException(f"cannot write {output}: {error.strerror or error}; "
                                       "choose another file with -o") from None


# --- import ---------------------------------------------------------------------------------------


@suppress.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="FILE...")
@click.option("--format", "fmt", type=click.Choice(importers.FORMATS), default="auto",
              help="Export format; auto tells csv, sendgrid, mailchimp and ses apart by the header.")
@click.option("--list", "list_name", metavar="NAME",
              help="Put every row on this list (overrides the list the format maps each row to).")
@click.option("--source", metavar="TEXT", help="Source of the entries. Default: the format (or import:FILE for csv).")
@click.option("--skip-rows", type=click.IntRange(min=0), default=0,
              help="Skip this many data rows first: resume an interrupted import where it stopped.")
@wait_option
@with_config
def import_command(config: Config, files: tuple[str, ...], fmt: str, list_name: str | None, source: str | None,
                   skip_rows: int, wait: bool) -> None:
    """Import suppression exports (CSV, SendGrid, Mailchimp, SES).

    Safe to repeat (an entry already present is not added twice). Bad rows are printed to
    standard error as FILE:LINE: reason and skipped; the good rows are kept. When the command
    returns, every guard running on this store enforces the imported entries, or the command
    says which one did not confirm it in time (a very large import takes a guard a few
    seconds to load; see --wait).

    \b
    Examples:
      smtp-guard suppress import unsubscribes.txt --list unsubscribed
      smtp-guard suppress import sendgrid_spam_reports.csv mailchimp_cleaned.csv
      aws sesv2 list-suppressed-destinations --output json > ses.json
      smtp-guard suppress import ses.json
      smtp-guard suppress import big.csv --list bounced --skip-rows 2380000
    """
    failed = []
    imported = 0
    for path in files:
        try:
            result = _import_one(config, path, fmt, list_name, source, skip_rows if len(files) == 1 else 0)
        except importers.ImportFailed as error:
            click.echo(f"Error: {error}", err=True)
            failed.append(path)
            continue
        imported += result.new + result.present
        skipped = f", {result.skipped} skipped" if result.skipped else ""
        lists = f"; lists: {', '.join(result.lists)}" if result.lists else ""
        click.echo(f"{path} ({result.format}): {result.read} rows read, {result.new} new, "
                   f"{result.present} already present, {result.expired} already expired, "
                   f"{result.erased} erased (never stored again), {result.bad} bad"
                   f"{skipped}{lists}")
    if imported:  # entries already present may have a new expiry
        confirm_in_force(config, wait)
    if failed:
        raise click.ClickException(f"could not import {', '.join(failed)} (see above); "
                                   "fix the file or choose its layout with --format, then run the command again")
    if not imported:
        raise click.ClickException("no row was imported; see the bad rows above, or `--format`/`--list` if the "
                                   "layout was not recognized")


def _import_one(config: Config, path: str, fmt: str, list_name: str | None, source: str | None,
                skip_rows: int) -> importers.ImportResult:
    """One file with a progress bar over its bytes; on Ctrl-C, say how to resume."""
    committed = skip_rows
    with click.progressbar(length=1, label=f"Importing {path}", file=sys.stderr) as bar:

        def on_progress(progress: importers.ImportProgress) -> None:
            nonlocal committed
            committed = progress.rows
            bar.length = max(progress.bytes_total, 1)
            bar.update(progress.bytes_read - bar.pos)

        try:
            return _call(_import(config, path, fmt, list_name, source, skip_rows, on_progress))
        except KeyboardInterrupt:
            raise click.ClickException(
                f"interrupted; the first {committed} rows of {path} are imported. Continue with the same command "
                f"plus --skip-rows {committed} (running it again from the start is safe too, only slower)."
            ) from None


async def _import(config: Config, path: str, fmt: str, list_name: str | None, source: str | None, skip_rows: int,
                  on_progress: Any) -> importers.ImportResult:
    async with admin_context(config) as ctx:
        return await importers.import_file(ctx, path, fmt, list_name, source, skip_rows, on_progress=on_progress,
                                           on_bad_row=lambda bad: click.echo(str(bad), err=True))


# --- output ---------------------------------------------------------------------------------------


def _target(kind: str, value: str) -> str:
    """An entry as an operator types it: domains with their leading @."""
    return f"@{value}" if kind == "domain" else value


def _print_entries(entries: Sequence[SuppressionEntry], indent: str = "") -> None:
    rows = [("LIST", "KIND", "VALUE", "REASON", "SOURCE", "CREATED (UTC)", "EXPIRES (UTC)")]
    for e in entries:
        rows.append((e.list_name, e.kind, _target(e.kind, e.value) + (" (+subdomains)" if e.include_subdomains else ""), e.reason,
                     e.source, service.iso_time(e.created_at),
                     "never" if e.expires_at is None else service.iso_time(e.expires_at)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo(indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())

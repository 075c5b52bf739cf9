"""``smtp-guard audit``: read the audit trail of decisions, deliveries and admin actions."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import cast

import click

from ..audit_model import AuditFilter, AuditKind, AuditRecord
from ..config import Config
from ..services.audit import BadTime, format_time, parse_time, query_audit
from .common import admin_context, follow_up, print_table, run, with_config

KINDS: tuple[AuditKind, ...] = ("decision", "admin", "delivery")


@click.group()
def audit() -> None:
    """Read the audit trail: every recipient decision, delivery of held mail, and admin action.

    \b
    Last hour:        smtp-guard audit list --since 1h
    One recipient:    smtp-guard audit list --recipient jane@example.com --since 30d
    Admin actions:    smtp-guard audit list --kind admin
    """


@audit.command("list")
@click.option("--since", metavar="TIME", help="Only records at or after TIME: 30m, 1h, 2d, 1w ago, or an ISO date "
              "such as 2024-05-01 or 2024-05-01T12:30 (UTC).")
@click.option("--until", metavar="TIME", help="Only records before TIME (same forms as --since).")
@click.option("--kind", type=click.Choice(KINDS), help="Only this kind of record.")
@click.option("--verdict", help="Only this verdict: pass, reject, defer, hold, drop; delivered, deferred, failed; "
              "or an admin verb such as hold.release.")
@click.option("--rule", help="Only rules starting with this, e.g. suppression or suppression.unsubscribed.")
@click.option("--recipient", metavar="ADDR", help="Only this recipient: an address (matched in its normalized form) or a pseudonym from a log line (h:…).")
@click.option("--sender", metavar="ADDR", help="Only this envelope sender, exactly as received.")
@click.option("--txn", help="Only this SMTP transaction id (or hold id, for admin actions on held mail).")
@click.option("--limit", type=click.IntRange(min=1), default=100, help="At most this many records, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of records instead of a table.")
@with_config
def list_command(config: Config, since: str | None, until: str | None, kind: str | None, verdict: str | None,
                 rule: str | None, recipient: str | None, sender: str | None, txn: str | None, limit: int,
                 as_json: bool) -> None:
    """List audit records, newest first. Times are shown in UTC.

    \b
    Example:
      smtp-guard audit list --since 2d --rule suppression --verdict reject
      smtp-guard audit list --txn 3f2a9c1d0b7e4a55 --json
    """
    now = time.time()
    filters = AuditFilter(
        since=_time("--since", since, now), until=_time("--until", until, now),
        kind=cast("AuditKind | None", kind),  # click.Choice(KINDS) admits nothing else
        verdict=verdict, rule_prefix=rule, recipient=recipient, sender=sender, txn_id=txn,
    )
    records = run(_query(config, filters, limit))
    if as_json:
        click.echo(json.dumps([_as_json(r) for r in records], indent=2))
        return
    if not records:
        click.echo(f"No audit records match. Widen the search, e.g. `{follow_up(config, 'audit list --since 7d')}`.")
        return
    rows = [("TIME (UTC)", "KIND", "VERDICT", "RULE", "RECIPIENT", "SENDER", "TXN", "ACTOR", "REASON")]
    for r in records:
        rows.append((format_time(r.time), r.kind, r.verdict, r.rule, r.recipient, r.sender, r.txn_id, r.actor,
                     r.reason))
    print_table(rows)
    if len(records) == limit:
        click.echo(f"(newest {limit}; use --limit or --until to see more)")


async def _query(config: Config, filters: AuditFilter, limit: int) -> list[AuditRecord]:
    async with admin_context(config) as ctx:
        return await query_audit(ctx, filters, limit)


def _time(option: str, text: str | None, now: float) -> float | None:
    if text is None:
        return None
    try:
        return parse_time(text, now)
    except BadTime as error:
        raise click.BadParameter(str(error), param_hint=option) from None


def _as_json(record: AuditRecord) -> dict[str, object]:
    fields = dataclasses.asdict(record)
    fields["time_iso"] = format_time(record.time)
    return fields

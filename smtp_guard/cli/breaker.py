"""``smtp-guard breaker``: streams stopped by the volume breaker, an approval gate or the
fan-out detector — look at them, approve them (with a new ceiling) or cancel them."""

from __future__ import annotations

import click

from ..breaker import service
from ..breaker.model import BreakerStatus
from ..config import Config
from ..services.audit import format_time
from .common import admin_context, confirm_in_force, follow_up, print_table, run, wait_option, with_config

STATUSES = ("tripped", "approved", "cancelled")


@click.group()
def breaker() -> None:
    """Streams stopped before most of them left: by the volume breaker (far more recipients than
    the sender's baseline), an approval gate (sensitive classes) or the fan-out detector (one
    personal body to many people).

    \b
    Stopped streams:  smtp-guard breaker list
    Look at one:      smtp-guard breaker show 'spring-sale-2026'
    Let it go:        smtp-guard breaker approve 'spring-sale-2026' --ceiling 60000
    Stop it:          smtp-guard breaker cancel 'spring-sale-2026'
    """


@breaker.command("list")
@click.option("--status", type=click.Choice((*STATUSES, "all")), default="tripped",
              help="Show streams in this state.")
@click.option("--limit", type=click.IntRange(min=1), default=50, help="At most this many streams, newest first.")
@with_config
def list_command(config: Config, status: str, limit: int) -> None:
    """List streams whose breaker or gate tripped, newest first, with their audience size and
    how many recipients wait in the hold queue.

    \b
    Example:
      smtp-guard breaker list
      smtp-guard breaker list --status all --limit 20
    """
    wanted: BreakerStatus | None = None if status == "all" else status  # type: ignore[assignment]
    summaries = run(_list(config, wanted, limit))
    if not summaries:
        click.echo(f"No {status} streams." if wanted else "No stream has tripped a breaker or gate.")
        if wanted == "tripped":
            click.echo("Streams appear here when a breaker or gate stops them; "
                       f"`{follow_up(config, 'breaker list --status all')}` shows decided ones.")
        return
    rows = [("STREAM", "STATUS", "RULE", "CLASS", "RECIPIENTS", "LIMIT", "HELD", "TRIPPED AT (UTC)", "SENDER")]
    for s in summaries:
        r = s.record
        limit_text = str(r.ceiling) if r.status == "approved" and r.ceiling is not None else str(r.threshold)
        rows.append((r.stream, r.status, r.rule, r.message_class, str(r.recipients), limit_text, str(s.held),
                     format_time(r.tripped_at), r.sender or "<>"))
    print_table(rows)
    if len(summaries) == limit:
        click.echo(f"(first {limit}; use --limit to see more)")
    click.echo(f"Details and sample messages: {follow_up(config, 'breaker show STREAM')}")


@breaker.command("show")
@click.argument("stream")
@click.option("--samples", type=click.IntRange(min=0), default=3, help="Sample held messages to show.")
@with_config
def show_command(config: Config, stream: str, samples: int) -> None:
    """Show a stopped stream: audience size, the limit it crossed, the sender's usual size,
    the hold queue, and sample held messages (subject, From, some recipients).

    \b
    Example:
      smtp-guard breaker show 'spring-sale-2026'
      smtp-guard breaker show 'news@shop.test|your account was suspended' --samples 5
    """
    details = run(_show(config, stream, samples))
    r = details.record
    click.echo(f"Stream     {r.stream}")
    click.echo(f"Status     {r.status}" + (f" by {r.decided_by} at {format_time(r.decided_at)}" if r.decided_at else ""))
    click.echo(f"Rule       {r.rule} (class {r.message_class})")
    click.echo(f"Sender     {r.sender or '<>'}")
    click.echo(f"Audience   {r.recipients} distinct recipients (tripped at {format_time(r.tripped_at)}, "
               f"over a limit of {r.threshold})")
    if r.ceiling is not None:
        click.echo(f"Ceiling    {r.ceiling} (approved)")
    baseline = details.baseline
    click.echo("Baseline   " + (f"{baseline.baseline:.0f} recipients per stream (learned from {baseline.streams})"
                                if baseline else "none yet for this sender"))
    counts = ", ".join(f"{count} {state}" for state, count in sorted(details.recipients_by_state.items()))
    click.echo(f"Hold queue {counts or 'nothing held'}")
    for sample in details.samples:
        more = sample.held - len(sample.recipients)
        click.echo(f"\nSample     hold {sample.hold_id}: {sample.held} held recipient(s)")
        click.echo(f"  Subject: {sample.subject}")
        click.echo(f"  From:    {sample.from_header}")
        click.echo(f"  To:      {', '.join(sample.recipients)}" + (f" and {more} more" if more > 0 else ""))
        click.echo(f"  Whole message: {follow_up(config, f'hold show {sample.hold_id}')}")
    if r.status != "cancelled":
        click.echo(f"\nApprove:  {follow_up(config, f'breaker approve {_quoted(r.stream)} --ceiling {r.recipients}')}")
        click.echo(f"Cancel:   {follow_up(config, f'breaker cancel {_quoted(r.stream)}')}")


@breaker.command("approve")
@click.argument("stream")
@click.option("--ceiling", type=click.IntRange(min=0), required=True,
              help="The stream may grow to this many distinct recipients; past it, it trips again.")
@wait_option
@with_config
def approve_command(config: Config, stream: str, ceiling: int, wait: bool) -> None:
    """Approve a stopped stream: release its held mail for delivery and let it grow to CEILING
    recipients.

    When the command returns, every guard running on this store applies the new ceiling (or
    the command says which one did not confirm it, see --wait); the release worker delivers
    the released recipients (each exactly once) within a second or two.

    \b
    Example:
      smtp-guard breaker approve 'spring-sale-2026' --ceiling 60000
    """
    action = run(_approve(config, stream, ceiling))
    click.echo(f"Approved stream {stream!r} up to {ceiling} recipients; released {action.changed} held "
               f"recipient(s) for delivery. Follow with `{follow_up(config, f'breaker show {_quoted(stream)}')}`.")
    confirm_in_force(config, wait)


@breaker.command("cancel")
@click.argument("stream")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@wait_option
@with_config
def cancel_command(config: Config, stream: str, yes: bool, wait: bool) -> None:
    """Cancel a stopped stream: its held mail is discarded (never delivered) and further mail
    of the stream is refused with 550 5.7.1 by every running guard when the command returns
    (or the command says which one did not confirm it, see --wait).

    \b
    Example:
      smtp-guard breaker cancel 'spring-sale-2026' --yes
    """
    if not yes:
        details = run(_show(config, stream, 1))
        subject = details.samples[0].subject if details.samples else ""
        click.confirm(f"Cancel stream {stream!r} from {details.record.sender or '<>'}"
                      f"{f' ({subject!r})' if subject else ''}: discard {details.held} held recipient(s) and "
                      "refuse the rest of it?", abort=True)
    action = run(_cancel(config, stream))
    click.echo(f"Cancelled stream {stream!r}; discarded {action.changed} held recipient(s). Further mail of it "
               "is refused with 550 5.7.1.")
    confirm_in_force(config, wait)


async def _list(config: Config, status: BreakerStatus | None, limit: int) -> list[service.BreakerSummary]:
    async with admin_context(config) as ctx:
        return await service.list_breakers(ctx, status, limit)


async def _show(config: Config, stream: str, samples: int) -> service.BreakerDetails:
    async with admin_context(config) as ctx:
        try:
            return await service.show_breaker(ctx, stream, samples)
        except service.BreakerNotFound:
            raise _not_found(stream) from None


async def _approve(config: Config, stream: str, ceiling: int) -> service.BreakerAction:
    async with admin_context(config) as ctx:
        try:
            return await service.approve_breaker(ctx, stream, ceiling)
        except service.BreakerNotFound:
            raise _not_found(stream) from None
        except service.CeilingTooLow as error:
            raise click.ClickException(
                f"stream {stream!r} already has {error.record.recipients} recipients; a ceiling below that would "
                f"trip it again at once. Type: "
                f"{follow_up(config, f'breaker approve {_quoted(stream)} --ceiling {error.record.recipients}')}") from None


async def _cancel(config: Config, stream: str) -> service.BreakerAction:
    async with admin_context(config) as ctx:
        try:
            return await service.cancel_breaker(ctx, stream)
        except service.BreakerNotFound:
            raise _not_found(stream) from None


def _not_found(stream: str) -> click.ClickException:
    return click.ClickException(
        f"no tripped stream {stream!r}; `smtp-guard breaker list --status all` shows the stream ids "
        "(quote ids with spaces or '|')")


def _quoted(stream: str) -> str:
    return "'" + stream.replace("'", "'\\''") + "'"

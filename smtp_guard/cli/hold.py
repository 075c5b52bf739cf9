"""``smtp-guard hold``: review held mail, release it for delivery, or discard it."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import click

from ..config import Config
from ..hold.model import HeldMessage, RecipientState
from ..services import holds as service
from ..services.audit import format_time
from .common import admin_context, confirm_in_force, follow_up, print_table, run, wait_option, with_config

STATES = ("held", "released", "delivered", "failed", "discarded")


@click.group()
def hold() -> None:
    """Review and act on mail held by a policy (volume breaker, approval gate, hold lists).

    \b
    Waiting mail:     smtp-guard hold list
    Look at one:      smtp-guard hold show 3f2a9c1d0b7e4a55
    Deliver it:       smtp-guard hold release 3f2a9c1d0b7e4a55
    Throw it away:    smtp-guard hold discard 3f2a9c1d0b7e4a55
    """


@hold.command("list")
@click.option("--state", type=click.Choice((*STATES, "all")), default="held",
              help="Show messages with a recipient in this state.")
@click.option("--limit", type=click.IntRange(min=1), default=50, help="At most this many messages, newest first.")
@with_config
def list_command(config: Config, state: str, limit: int) -> None:
    """List held messages, newest first.

    \b
    Example:
      smtp-guard hold list --state released --limit 20
    """
    wanted: RecipientState | None = None if state == "all" else state  # type: ignore[assignment]
    messages = run(_list(config, wanted, limit))
    if not messages:
        click.echo(f"No messages with {state} recipients." if wanted else "The hold queue is empty.")
        if state == "held":
            click.echo(f"Mail a policy holds appears here; `{follow_up(config, 'audit list --verdict hold')}` shows past holds.")
        return
    rows = [("ID", "HELD AT (UTC)", "SENDER", "RECIPIENTS", "RULE")]
    for message in messages:
        rows.append((message.id, format_time(message.created_at), message.sender, _states(message),
                     ",".join(sorted({r.rule for r in message.recipients}))))
    print_table(rows)
    if len(messages) == limit:
        click.echo(f"(first {limit}; use --limit to see more)")
    click.echo(f"Details: {follow_up(config, 'hold show ID')}")


@hold.command("show")
@click.argument("hold_id")
@click.option("--raw", is_flag=True, help="Print the message itself (headers and body, as received).")
@with_config
def show_command(config: Config, hold_id: str, raw: bool) -> None:
    """Show a held message: headers, recipients with their state, and why it was held.

    \b
    Example:
      smtp-guard hold show 3f2a9c1d0b7e4a55
      smtp-guard hold show 3f2a9c1d0b7e4a55 --raw > message.eml
    """
    details = run(_show(config, hold_id))
    message = details.message
    if raw:
        if message.content is None:
            raise click.ClickException(
                f"the content of hold {hold_id} was deleted: no recipient waits for it any more. "
                f"`{follow_up(config, f'hold show {hold_id}')}` shows what happened to each recipient."
            )
        click.echo(message.content, nl=False)
        return
    click.echo(f"Hold       {message.id}")
    click.echo(f"Held at    {format_time(message.created_at)} from {message.client} (transaction {message.txn_id})")
    click.echo(f"Sender     {message.sender or '<>'}")
    click.echo(f"Size       {message.size} bytes")
    if message.content is None:
        click.echo("Content    deleted (no recipient waits for delivery)")
    if details.headers:
        click.echo("\nHeaders")
        for name, value in details.headers:
            click.echo(f"  {name}: {value}")
    click.echo("\nRecipients")
    rows = [("ADDRESS", "STATE", "RULE", "ATTEMPTS", "NEXT ATTEMPT", "LAST REPLY")]
    for r in message.recipients:
        next_attempt = format_time(r.next_attempt_at) if r.next_attempt_at is not None and r.state == "released" else ""
        rows.append((r.address, r.state, r.rule, str(r.attempts), next_attempt, r.last_reply))
    print_table(rows, indent="  ")
    click.echo("\nWhy held")
    for (rule, reason), count in Counter((r.rule, r.reason) for r in message.recipients).items():
        click.echo(f"  {rule}: {reason} ({count} recipient{'s' if count != 1 else ''})")
    if any(r.state == "held" for r in message.recipients):
        click.echo(f"\nDeliver: {follow_up(config, f'hold release {message.id}')}    "
               f"Discard: {follow_up(config, f'hold discard {message.id}')}")


@hold.command("release")
@click.argument("hold_id")
@click.option("--recipient", "recipients", multiple=True, metavar="ADDR",
              help="Release only this recipient (repeat for several). Default: every held recipient.")
@wait_option
@with_config
def release_command(config: Config, hold_id: str, recipients: tuple[str, ...], wait: bool) -> None:
    """Release held recipients for delivery.

    The release worker of a running guard delivers them within a second or two ([hold]
    poll_interval) and retries if the upstream defers. The command ends by saying which
    running guards confirmed the change (see --wait).

    \b
    Example:
      smtp-guard hold release 3f2a9c1d0b7e4a55
      smtp-guard hold release 3f2a9c1d0b7e4a55 --recipient jane@example.com
    """
    action = run(_release(config, hold_id, recipients))
    if action.changed == 0:
        click.echo(f"Nothing to release: no {_named(recipients)}recipient of hold {hold_id} is held "
                   f"({_states(action.message)}). See `{follow_up(config, f'hold show {hold_id}')}`.")
        return
    click.echo(f"Released {action.changed} recipient(s) of hold {hold_id}. The running server's release worker "
               f"delivers them within a second or two; follow with `{follow_up(config, f'hold show {hold_id}')}`.")
    confirm_in_force(config, wait)


@hold.command("discard")
@click.argument("hold_id")
@click.option("--recipient", "recipients", multiple=True, metavar="ADDR",
              help="Discard only this recipient (repeat for several). Default: every waiting recipient.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@wait_option
@with_config
def discard_command(config: Config, hold_id: str, recipients: tuple[str, ...], yes: bool, wait: bool) -> None:
    """Discard held (or released, not yet delivered) recipients: they never get the message.

    The message content is deleted once no recipient waits for it. No delivery attempt starts
    after the command returns; one that a release worker had already started finishes (`hold
    show` then says delivered).

    \b
    Example:
      smtp-guard hold discard 3f2a9c1d0b7e4a55 --yes
      smtp-guard hold discard 3f2a9c1d0b7e4a55 --recipient jane@example.com
    """
    if not yes:
        details = run(_show(config, hold_id))
        waiting = [r for r in details.message.recipients if r.state in ("held", "released")]
        subject = dict(details.headers).get("Subject", "")
        count = len(recipients) if recipients else len(waiting)
        click.confirm(f"Discard {count} recipient(s) of hold {hold_id} from {details.message.sender or '<>'}"
                      f"{f' ({subject!r})' if subject else ''}? They will never get it", abort=True)
    action = run(_discard(config, hold_id, recipients))
    if action.changed == 0:
        click.echo(f"Nothing to discard: no {_named(recipients)}recipient of hold {hold_id} is waiting "
                   f"({_states(action.message)}). See `{follow_up(config, f'hold show {hold_id}')}`.")
        return
    click.echo(f"Discarded {action.changed} recipient(s) of hold {hold_id}.")
    confirm_in_force(config, wait)


async def _list(config: Config, state: RecipientState | None, limit: int) -> list[HeldMessage]:
    async with admin_context(config) as ctx:
        return await service.list_holds(ctx, state, limit)


async def _show(config: Config, hold_id: str) -> service.HoldDetails:
    async with admin_context(config) as ctx:
        try:
            return await service.show_hold(ctx, hold_id)
        except service.HoldNotFound:
            raise _not_found(hold_id) from None


async def _release(config: Config, hold_id: str, recipients: Sequence[str]) -> service.HoldAction:
    async with admin_context(config) as ctx:
        try:
            return await service.release_hold(ctx, hold_id, recipients)
        except service.HoldNotFound:
            raise _not_found(hold_id) from None
        except service.NotARecipient as error:
            raise _not_a_recipient(error) from None


async def _discard(config: Config, hold_id: str, recipients: Sequence[str]) -> service.HoldAction:
    async with admin_context(config) as ctx:
        try:
            return await service.discard_hold(ctx, hold_id, recipients)
        except service.HoldNotFound:
            raise _not_found(hold_id) from None
        except service.NotARecipient as error:
            raise _not_a_recipient(error) from None


def _not_found(hold_id: str) -> click.ClickException:
    return click.ClickException(f"no held message {hold_id}; run `smtp-guard hold list --state all` to see the ids")


def _not_a_recipient(error: service.NotARecipient) -> click.ClickException:
    return click.ClickException(
        f"{', '.join(error.addresses)} is not a recipient of hold {error.hold_id}; its recipients are "
        f"{', '.join(error.recipients)} (see `smtp-guard hold show {error.hold_id}`)"
    )


def _named(recipients: Sequence[str]) -> str:
    return "named " if recipients else ""


def _states(message: HeldMessage) -> str:
    counts = Counter[str](r.state for r in message.recipients)
    return ", ".join(f"{counts[state]} {state}" for state in STATES if counts[state])

"""``smtp-guard erase``: erase addresses for good, prove it, and see who still tries to mail them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import click

from ..addresses import AddressNormalizer
from ..config import Config
from ..erasure.model import ErasureReceipt
from ..services import erasure as service
from ..services.audit import BadTime, format_time, parse_time
from .common import admin_context, confirm_in_force, follow_up, print_table, run, wait_option, with_config


class _EraseGroup(click.Group):
    """``smtp-guard erase ADDRESS...`` runs ``erase add``: the common case needs no verb."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["add", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_EraseGroup, short_help="Erase addresses (GDPR): tombstone, purge, receipt, proof.")
def erase() -> None:
    """Erase addresses (GDPR Art. 17): tombstone, purge, receipt, proof, evidence.

    An erasure keeps only a keyed hash of the address (a tombstone), removes every plaintext
    copy from the guard's stores and disk files, and returns a receipt that names no address.
    Later attempts to mail the address are refused and recorded as evidence that an upstream
    system still holds it.

    \b
    Erase:            smtp-guard erase jane@example.com --ref DSR-2026-0042
    From a file:      smtp-guard erase --file erasures.txt --ref DSR-batch-7
    By token only:    smtp-guard erase --token 9f86d08...  --ref DSR-2026-0043
    Prove it:         smtp-guard erase verify jane@example.com
    Receipts:         smtp-guard erase receipts
    Who still tries:  smtp-guard erase attempts --since 30d
    """


@erase.command("add")
@click.argument("addresses", nargs=-1)
@click.option("--ref", "reference", required=True,
              help="Reference of the erasure request (ticket number); stored with the tombstone and receipt.")
@click.option("--file", "files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File with one address or token per line (# comments allowed).")
@click.option("--token", "tokens", multiple=True, help="An erasure token (64 hex) instead of an address.")
@click.option("--json", "as_json", is_flag=True, help="Print the receipts as JSON.")
@wait_option
@with_config
def add_command(config: Config, addresses: Sequence[str], reference: str, files: Sequence[Path],
                tokens: Sequence[str], as_json: bool, wait: bool) -> None:
    """Erase ADDRESSES (or --token / --file entries) under one reference.

    When the command returns, every guard running on this store refuses the erased addresses
    (before any list), or the command says which one did not confirm it (see --wait).

    \b
    Example:
      smtp-guard erase jane@example.com Jane.Doe+news@gmail.com --ref DSR-2026-0042
    """
    if not (addresses or files or tokens):
        raise click.UsageError("give at least one ADDRESS, --token or --file")
    receipts, problems = run(_erase(config, addresses, files, tokens, reference))
    for problem in problems:
        click.echo(problem, err=True)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in receipts], indent=2))
    else:
        for receipt in receipts:
            _print_receipt(receipt)
        if receipts:
            click.echo(f"Prove it: {follow_up(config, 'erase verify ADDRESS')}   (scans every file in the data directory)")
    if receipts:
        confirm_in_force(config, wait)
    if problems:
        raise click.ClickException(f"{len(problems)} entr{'y' if len(problems) == 1 else 'ies'} not erased (see above)")


async def _erase(config: Config, addresses: Sequence[str], files: Sequence[Path], tokens: Sequence[str],
                 reference: str) -> tuple[list[ErasureReceipt], list[str]]:
    async with admin_context(config) as ctx:
        targets, problems = [], []
        for value in (*addresses, *tokens):
            try:
                targets.append(service.target_from_text(ctx, value))
            except service.ErasureInputError as error:
                problems.append(str(error))
        for path in files:
            found, bad = service.targets_from_file(ctx, path)
            targets += found
            problems += bad
        try:
            receipts = await service.erase(ctx, targets, reference)
        except service.ErasureInputError as error:
            raise click.UsageError(str(error)) from None
        return receipts, problems


def _print_receipt(receipt: ErasureReceipt) -> None:
    click.echo(f"Erased under {receipt.reference}: receipt {receipt.id}, tombstone {receipt.tombstone_id} "
               f"(key {receipt.key_id}), {format_time(receipt.created_at)}")
    for purge in receipt.purged:
        if purge.count:
            click.echo(f"  purged {purge.count} {purge.what.replace('_', ' ')} from {purge.store.replace('_', ' ')}")
    for what, how in receipt.storage.items():
        click.echo(f"  {what}: {how}")


@erase.command("verify")
@click.argument("address")
@with_config
def verify_command(config: Config, address: str) -> None:
    """Prove that ADDRESS is enforced and that no plaintext copy of it remains.

    Checks the tombstone with the server's own erasure policy, then scans every file in the
    data directory (database, WAL, sandbox captures, …) and, with a PostgreSQL store, every
    table of it for every spelling that would match:
    any case, any +tag, dots for dot-insensitive providers, alias and IDNA domains.
    Exit status 0 only when both hold.

    \b
    Example:
      smtp-guard erase verify jane@example.com
    """
    result = run(_verify(config, address))
    if result.decision is not None and result.tombstone is not None:
        click.echo(f"ENFORCED: tombstone {result.tombstone.id} (reference {result.tombstone.reference}); "
                   f"a recipient {address} gets: {result.decision.reply}")
    else:
        click.echo(f"NOT ENFORCED: no tombstone matches {address}; erase it with: "
                   f"{follow_up(config, f'erase {address} --ref REFERENCE')}")
    if result.is_clean:
        tables = f" nor any table of {config.store.location}" if config.store.is_postgresql else ""
        click.echo(f"NO COPIES: no file under {config.store.data_dir}{tables} contains any spelling of the address.")
    else:
        click.echo(f"COPIES FOUND: {len(result.findings)} plaintext occurrence(s):")
        for finding in result.findings[:50]:
            click.echo(f"  {finding.location}: {finding.text}")
        click.echo("Held messages still addressed to others may mention it; discard or release them "
                   f"({follow_up(config, 'hold list')}), then erase again.")
    if not result.ok:
        raise SystemExit(1)


async def _verify(config: Config, address: str) -> service.Verification:
    async with admin_context(config) as ctx:
        try:
            return await service.verify(ctx, address)
        except service.ErasureInputError as error:
            raise click.UsageError(str(error)) from None


@erase.command("receipts")
@click.option("--limit", type=click.IntRange(min=1), default=50, help="At most this many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON (for export to a records system).")
@with_config
def receipts_command(config: Config, limit: int, as_json: bool) -> None:
    """List erasure receipts (they name no address).

    \b
    Example:
      smtp-guard erase receipts --json > receipts.json
    """
    receipts = run(_receipts(config, limit))
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in receipts], indent=2))
        return
    if not receipts:
        click.echo(f"No erasures yet. Erase with: {follow_up(config, 'erase ADDRESS --ref REFERENCE')}")
        return
    rows = [("RECEIPT", "TIME (UTC)", "REFERENCE", "TOMBSTONE", "PURGED")]
    for receipt in receipts:
        purged = sum(p.count for p in receipt.purged)
        rows.append((receipt.id, format_time(receipt.created_at), receipt.reference, str(receipt.tombstone_id),
                     str(purged)))
    print_table(rows)


async def _receipts(config: Config, limit: int) -> list[ErasureReceipt]:
    async with admin_context(config) as ctx:
        return await service.receipts(ctx, limit)


@erase.command("receipt")
@click.argument("receipt_id")
@with_config
def receipt_command(config: Config, receipt_id: str) -> None:
    """Print one receipt as JSON.

    \b
    Example:
      smtp-guard erase receipt 4f1c2a9e01bd77aa
    """
    found = run(_receipt(config, receipt_id))
    if found is None:
        raise click.ClickException(f"no receipt {receipt_id}; run `{follow_up(config, 'erase receipts')}` to see the ids")
    click.echo(json.dumps(found.as_dict(), indent=2))


async def _receipt(config: Config, receipt_id: str) -> ErasureReceipt | None:
    async with admin_context(config) as ctx:
        return await service.receipt(ctx, receipt_id)


@erase.command("attempts")
@click.option("--since", help="Only attempts since then: 30m, 12h, 7d, 2w or an ISO date (UTC).")
@click.option("--ref", "reference", help="Only attempts on erasures with this reference.")
@click.option("--limit", type=click.IntRange(min=1), default=100, help="At most this many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@with_config
def attempts_command(config: Config, since: str | None, reference: str | None, limit: int, as_json: bool) -> None:
    """Show later attempts to mail erased addresses: evidence that the sending platform (or
    whoever fed it) still holds the data. Each row: when, which client and sender, the
    campaign/stream header if present, and the erasure reference — never the address.

    \b
    Example:
      smtp-guard erase attempts --since 30d
    """
    try:
        start = parse_time(since, time.time()) if since else None
    except BadTime as error:
        raise click.BadParameter(str(error), param_hint="--since") from None
    attempts = run(_attempts(config, start, reference, limit))
    if as_json:
        click.echo(json.dumps([a.__dict__ for a in attempts], indent=2))
        return
    if not attempts:
        click.echo("No attempts to mail an erased address" + (" in that period." if since else "."))
        return
    rows = [("TIME (UTC)", "REFERENCE", "CLIENT", "SENDER", "STREAM", "TXN")]
    for attempt in attempts:
        rows.append((format_time(attempt.time), attempt.reference, attempt.client, attempt.sender,
                     attempt.stream or "-", attempt.txn_id))
    print_table(rows)


async def _attempts(config: Config, since: float | None, reference: str | None, limit: int) -> list[Any]:
    async with admin_context(config) as ctx:
        return await service.attempts(ctx, since, reference, limit)


@erase.command("token")
@click.argument("addresses", nargs=-1, required=True)
@with_config
def token_command(config: Config, addresses: Sequence[str]) -> None:
    """Print the erasure token of each address (SHA-256 of its normalized form).

    A privacy team's system can send tokens (`smtp-guard erase --token TOKEN`) instead of
    addresses; the guard turns them into tombstones with its secret key.

    \b
    Example:
      smtp-guard erase token Jane.Doe+news@Example.com
    """
    try:
        pairs = service.tokens(AddressNormalizer(config.addresses), addresses)
    except service.ErasureInputError as error:
        raise click.UsageError(str(error)) from None
    for address, token in pairs:
        click.echo(f"{token}  {address}")


@erase.command("rotate-key")
@with_config
def rotate_key_command(config: Config) -> None:
    """Add a new erasure key; new tombstones use it, old ones keep matching with old keys.

    Back up the key file afterwards: a guard whose key file cannot verify its tombstones
    refuses to start rather than stop enforcing them.
    """
    key_id = run(_rotate(config))
    click.echo(f"New primary erasure key {key_id} in {config.erasure_key_file}. Back this file up; "
               "running servers pick the key up on their next erasure.")


async def _rotate(config: Config) -> str:
    async with admin_context(config) as ctx:
        return await service.rotate_key(ctx)

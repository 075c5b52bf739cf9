"""``smtp-guard store``: the store itself — its schema, and moving it from SQLite to PostgreSQL."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import click

from ..config import Config, redact_url
from .common import run, with_config


@click.group()
def store() -> None:
    """The store's schema, and moving a SQLite store to PostgreSQL.

    \b
    Create or upgrade the schema:  smtp-guard store migrate --config /etc/smtp-guard/smtp-guard.toml
    SQLite to PostgreSQL:          smtp-guard store copy --from sqlite:///var/lib/smtp-guard/guard.sqlite3 \\
                                     --to postgresql://smtpguard@db.internal/smtpguard
    """


@store.command("migrate")
@with_config
def migrate_command(config: Config) -> None:
    """Create the store's schema, or bring it up to this smtp-guard's version, and say what changed.

    The guard does the same at every start; run this to prepare a PostgreSQL database before
    the first guard starts, or to upgrade it at a moment of your choosing. Other admin
    commands never create or change the schema. Safe to repeat.

    \b
    Example:
      smtp-guard store migrate --config /etc/smtp-guard/smtp-guard.toml
    """
    from ..backends import migrate_store

    before, applied = run(migrate_store(config))
    engine = "PostgreSQL" if config.store.is_postgresql else "SQLite"
    where = f"{engine} store at {config.store.location}"
    if not applied:
        click.echo(f"{where}: schema version {before}, up to date; nothing to do.")
        return
    click.echo(f"{where}: schema version {before} -> {applied[-1].version}; applied {len(applied)} "
               f"migration{'s' if len(applied) != 1 else ''}:")
    for migration in applied:
        click.echo(f"  {migration.version}: {migration.description}")


@store.command("copy")
@click.option("--from", "source", metavar="sqlite:///PATH",
              help="The SQLite store to copy: sqlite:///absolute/path or a file path. Default: [store] path of "
                   "--config.")
@click.option("--to", "target", required=True, metavar="postgresql://…",
              help="The PostgreSQL store to fill (an empty database; its schema is created). The password "
                   "from PGPASSWORD or ~/.pgpass, not the command line.")
@with_config
def copy_command(config: Config, source: str | None, target: str) -> None:
    """Copy an installation's SQLite store into an empty PostgreSQL database.

    Every table (suppressions and their change log, hold queue, audit trail, tombstones,
    receipts, breakers, baselines, the change generation) is copied in one transaction: if it
    fails, the target is left empty and the copy can run again. A target that already holds
    data is refused. Stop the guards on the SQLite store first, so nothing changes meanwhile.
    Afterwards set [store] url (and remove path) in every instance's config, and give every
    instance the same erasure key file.

    \b
    Example:
      smtp-guard store copy --from sqlite:///var/lib/smtp-guard/guard.sqlite3 \\
        --to postgresql://smtpguard@db.internal/smtpguard
      smtp-guard store copy --config /etc/smtp-guard/smtp-guard.toml --to postgresql://smtpguard@db.internal/smtpguard
    """
    from ..backends import copy_sqlite_store
    from ..store.copy import CopiedTable, TargetNotEmpty

    if source is None and config.store.is_postgresql:
        raise click.UsageError("--config names a PostgreSQL store; give the SQLite store to copy with --from")
    path = Path(config.store.path) if source is None else _sqlite_path(source)
    if urllib.parse.urlsplit(target).scheme not in ("postgresql", "postgres"):
        raise click.BadParameter("write a PostgreSQL URL: postgresql://USER@HOST[:PORT]/DATABASE", param_hint="--to")

    def progress(copied: CopiedTable) -> None:
        if copied.finished:
            click.echo(f"  {copied.table}: {copied.rows} row{'s' if copied.rows != 1 else ''}")
        elif copied.rows % 500_000 == 0:
            click.echo(f"  {copied.table}: {copied.rows} rows so far …")

    click.echo(f"Copying {path} to {redact_url(target)}:")
    try:
        tables = run(copy_sqlite_store(path, target, progress))
    except TargetNotEmpty as error:
        raise click.ClickException(str(error)) from None
    total = sum(table.rows for table in tables if table.table != "change_generation")
    click.echo(f"Copied {total} rows. Now set [store] url = \"{redact_url(target)}\" (without path) in every "
               "instance's config, give each the same erasure key file, and start them.")


def _sqlite_path(source: str) -> Path:
    if source.startswith("sqlite://"):
        parts = urllib.parse.urlsplit(source)
        if parts.netloc or not parts.path:
            raise click.BadParameter("write sqlite:///ABSOLUTE/PATH (three slashes) or a file path",
                                     param_hint="--from")
        return Path(urllib.parse.unquote(parts.path))
    if "://" in source:
        raise click.BadParameter("only a SQLite store can be copied: sqlite:///PATH or a file path",
                                 param_hint="--from")
    return Path(source)

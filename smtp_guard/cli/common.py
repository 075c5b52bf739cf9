"""Shared CLI plumbing: the --config option every command takes, error translation, and the
"in force" report every changing command ends with."""

from __future__ import annotations

import asyncio
import functools
import getpass
import shlex
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import click

from ..config import EMBEDDED_DEFAULTS, Config, ConfigError, load_config
from ..erasure.keys import ErasureKeyError
from ..services import propagation
from ..services.context import AdminContext, StoreNotFound
from ..store.base import StoreError

T = TypeVar("T")

# Exit status of a changing command with --wait whose change is stored but not confirmed by
# every running guard (1 stays "the command failed, nothing was changed").
NOT_CONFIRMED = 3

config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=None, envvar="SMTP_GUARD_CONFIG",
    show_envvar=True,
    help="The guard's config file (TOML). Default: embedded defaults, store in ~/.local/share/smtp-guard/.",
)


def load(config_path: str | None) -> Config:
    try:
        return load_config(config_path)
    except ConfigError as error:
        raise click.ClickException(f"{error}") from None


def run(coroutine: Awaitable[T]) -> T:
    """Run an admin coroutine, turning store failures into a message that says what to do."""
    try:
        return asyncio.run(coroutine)  # type: ignore[arg-type]
    except StoreError as error:
        raise click.ClickException(
            f"store error: {error}\nCheck [store] in your config: with path, that the file is readable and "
            "writable; with url, that PostgreSQL is reachable and the role may log in (password from "
            "PGPASSWORD, ~/.pgpass or SMTP_GUARD__STORE__URL)."
        ) from None
    except ErasureKeyError as error:
        raise click.ClickException(f"erasure key problem: {error}") from None
    except StoreNotFound as error:
        raise click.ClickException(str(error)) from None


@asynccontextmanager
async def admin_context(config: Config) -> AsyncIterator[AdminContext]:
    from ..app import open_admin_context  # the composition root builds the concrete stores

    async with open_admin_context(config, actor=f"cli:{_user()}") as context:
        yield context


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def with_config(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add --config to a command and pass the loaded Config as its first argument."""

    @config_option
    @functools.wraps(function)
    def wrapper(config_path: str | None, **kwargs: Any) -> Any:
        return function(load(config_path), **kwargs)

    return wrapper


def follow_up(config: Config, arguments: str) -> str:
    """``smtp-guard ARGUMENTS`` as a hint for the next command: with this command's config file
    when it had one, so that the hint, pasted, acts on the same store (not the default one)."""
    if config.source == EMBEDDED_DEFAULTS:
        return f"smtp-guard {arguments}"
    return f"smtp-guard {arguments} --config {shlex.quote(config.source)}"


wait_option = click.option(
    "--wait", is_flag=True,
    help=f"Exit with status {NOT_CONFIRMED} unless every guard running on this store confirmed the change "
         "within [store] confirm_timeout (also when no guard runs on it). Without it the command waits as "
         "long and says the same, but exits 0.")


def confirm_in_force(config: Config, wait: bool) -> None:
    """After a change committed: wait for the running guards, say who enforces it, and with
    ``--wait`` exit NOT_CONFIRMED unless all do. Written to standard error, so ``--json``
    output stays clean."""
    result = run(_in_force(config))
    for line in in_force_lines(result, config.store.location, config.store.setting.split(" ", 2)[1]):
        click.echo(line, err=True)
    if wait and not result.is_confirmed:
        click.echo(f"Exit status {NOT_CONFIRMED}: the change is stored but not confirmed by every running guard.",
                   err=True)
        click.get_current_context().exit(NOT_CONFIRMED)


async def _in_force(config: Config) -> propagation.Propagation:
    from ..backends import open_change_store  # only the change generation: no key ring, no tombstones

    async with open_change_store(config) as changes:
        return await propagation.in_force(changes, config.store.confirm_timeout)


def in_force_lines(result: propagation.Propagation, store: str, setting: str = "path") -> list[str]:
    """The "in force" report; ``store`` is where the change was made, ``setting`` the [store]
    key that names it (path or url)."""
    lines = []
    for instance in result.unconfirmed:
        lines.append(f"Not confirmed in {result.timeout:g}s by guard {instance.name} (last heartbeat "
                     f"{result.heartbeat_age(instance):.1f}s ago): it may not enforce this change yet.")
    for instance in result.silent:
        lines.append(f"Guard {instance.name} has sent no heartbeat for {result.heartbeat_age(instance):.0f}s "
                     "(killed, or hung): not waited for; if it still runs, it does not enforce this change.")
    running = len(result.confirmed) + len(result.unconfirmed)
    if not running:
        lines.append(f"No running guard uses this store ({store}); the change applies when one starts. "
                     f"If a guard is running, it uses another store: compare its [store] {setting} with this one.")
    elif result.unconfirmed:
        lines.append(f"In force on {len(result.confirmed)} of {running} running guard{'s' if running != 1 else ''}.")
    else:
        lines.append(f"In force on {running} running guard{'s' if running != 1 else ''}.")
    return lines


def print_table(rows: Sequence[Sequence[str]], indent: str = "") -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo(indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())

"""Shared CLI plumbing: the --config option every command takes, and error translation."""

from __future__ import annotations

import asyncio
import functools
import getpass
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import click

from ..config import Config, ConfigError, load_config
from ..erasure.keys import ErasureKeyError
from ..services.context import AdminContext, StoreNotFound
from ..store.base import StoreError

T = TypeVar("T")

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
            f"store error: {error}\nCheck [store] path in your config and that the file is readable and writable."
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


def print_table(rows: Sequence[Sequence[str]], indent: str = "") -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo(indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())

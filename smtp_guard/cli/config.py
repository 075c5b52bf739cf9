"""``smtp-guard config``: print the commented example, and check a config before using it."""

from __future__ import annotations

import os
from importlib import resources

import click

from ..config import ENV_PREFIX, Config
from .common import with_config

EXAMPLE = "config_example.toml"


@click.group()
def config() -> None:
    """Write and check config files.

    \b
    Start a config:   smtp-guard config example > /etc/smtp-guard/smtp-guard.toml
    Check it:         smtp-guard config check --config /etc/smtp-guard/smtp-guard.toml
    """


@config.command()
def example() -> None:
    """Print the commented example config: every setting, its default and what it does.

    Loaded as it is, it behaves exactly like the embedded defaults (loopback, sandbox).

    \b
    Example:
      smtp-guard config example > /etc/smtp-guard/smtp-guard.toml
    """
    click.echo(resources.files("smtp_guard").joinpath(EXAMPLE).read_text(encoding="utf-8"), nl=False)


@config.command()
@click.option("--strict", is_flag=True, help="Exit 2 when there is any warning (for a config repository's CI).")
@with_config
def check(config: Config, strict: bool) -> None:
    """Validate a config and warn about dangerous settings.

    An invalid config exits 1 with the file, the key and what to write instead (the same
    message `serve` would stop with). A valid one prints where the store is and every setting
    that is legal but risky: open relay, plaintext addresses in logs, shadow mode, the
    sandbox upstream, unencrypted hops, files others can read.

    \b
    Example:
      smtp-guard config check --config /etc/smtp-guard/smtp-guard.toml
      SMTP_GUARD__UPSTREAM__MODE=smtp SMTP_GUARD__UPSTREAM__HOST=mx.internal \\
        smtp-guard config check --config guard.toml --strict
    """
    from ..config_check import dangers

    found = dangers(config)
    click.echo(f"{config.source}: valid. Store: {config.store.location}; upstream: "
               + ("sandbox (captured, not delivered)" if config.upstream.mode == "sandbox"
                  else f"{config.upstream.host}:{config.upstream.port} tls={config.upstream.tls}")
               + f"; SMTP on {config.smtp.listen}.")
    overrides = sorted(name for name in os.environ if name.startswith(ENV_PREFIX))
    if overrides:  # they win over the file, and nothing else in the output says which came from where
        click.echo(f"Set by the environment, over the file: {', '.join(overrides)}.")
    for danger in found:
        click.echo(f"warning: {danger}", err=True)
    if found:
        click.echo(f"{len(found)} warning{'s' if len(found) != 1 else ''}.", err=True)
        if strict:
            raise SystemExit(2)

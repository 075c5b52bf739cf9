"""The ``smtp-guard`` command: serve, and the admin command groups."""

from __future__ import annotations

import click

from .. import __version__
from .common import run, with_config


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="smtp-guard")
def main() -> None:
    """smtp-guard: an SMTP smarthost that enforces suppression lists at the last hop.

    \b
    Start it:         smtp-guard serve                 (loopback, sandbox upstream)
    With a config:    smtp-guard serve --config /etc/smtp-guard/smtp-guard.toml
    Suppress:         smtp-guard suppress add jane@example.com --list unsubscribed
    Explain:          smtp-guard suppress check jane+news@Example.com
    Held mail:        smtp-guard hold list
    Stopped streams:  smtp-guard breaker list
    Audit trail:      smtp-guard audit list --since 1h
    Erase (GDPR):     smtp-guard erase jane@example.com --ref DSR-2026-0042
    New config:       smtp-guard config example > guard.toml
    Check it:         smtp-guard config check --config guard.toml
    API token:        smtp-guard admin token create ops --role admin
    Domain DNS:       smtp-guard doctor --config guard.toml   (DKIM, SPF, DMARC, MX, upstream TLS)

    Every command that reads a config takes --config FILE (or SMTP_GUARD_CONFIG); run
    `smtp-guard COMMAND --help`.
    """


@main.command()
@with_config
def serve(config) -> None:  # type: ignore[no-untyped-def]
    """Run the relay: SMTP listener, metrics listener and the hold release worker.

    Stops gracefully on SIGTERM, SIGHUP or Ctrl-C: stops accepting, lets sessions in flight finish
    (up to [smtp] shutdown_grace seconds), and never acknowledges a half-relayed message.

    With [smtp] workers = N above 1 it runs a supervisor and N worker processes on the one
    listen port; the supervisor restarts a worker that dies and serves /metrics for all.
    """
    from ..app import serve_forever
    from ..startup import StartupError

    try:
        serve_forever(config)
    except StartupError as error:
        raise click.ClickException(f"cannot start: {error}") from None


@main.command()
@with_config
def init(config) -> None:  # type: ignore[no-untyped-def]
    """Create the store and erasure key the guard will use, without starting it.

    The guard creates them at its first start; admin commands never do (a second, empty store
    would take changes no running guard enforces). Run this to import lists before the first
    start. Safe to repeat: an existing store is left as it is.

    \b
    Example:
      smtp-guard init --config /etc/smtp-guard/smtp-guard.toml
      smtp-guard suppress import unsubscribes.csv --list unsubscribed --config /etc/smtp-guard/smtp-guard.toml
    """
    from ..backends import init_store

    created = run(init_store(config))
    state = "Created" if created else "Store already exists:"
    click.echo(f"{state} {config.store.location} (erasure key {config.erasure_key_file}; back both up).")


@main.command("hash-password")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True,
              help="The password to hash (prompted when omitted).")
def hash_password_command(password: str) -> None:
    """Print a hash for [smtp.auth.users] (never put a plaintext password in the config)."""
    from ..smtp.auth import hash_password

    click.echo(hash_password(password))


def _register() -> None:
    from .admin import admin
    from .audit import audit
    from .breaker import breaker
    from .config import config
    from .dkim import dkim
    from .doctor import doctor
    from .erase import erase
    from .hold import hold
    from .store import store
    from .suppress import suppress

    main.add_command(suppress)
    main.add_command(erase)
    main.add_command(hold)
    main.add_command(audit)
    main.add_command(breaker)
    main.add_command(config)
    main.add_command(admin)
    main.add_command(dkim)
    main.add_command(doctor)
    main.add_command(store)


_register()

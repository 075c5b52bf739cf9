"""``smtp-guard admin``: credentials for the admin API and web console."""

from __future__ import annotations

import re
from typing import cast

import click

from ..api_tokens import config_line, new_token
from ..config import AdminRole


@click.group()
def admin() -> None:
    """Credentials for the admin API (/api/v1/) and web console ([admin] listen).

    \b
    New admin token:   smtp-guard admin token create ops --role admin
    Read-only token:   smtp-guard admin token create auditor --role viewer
    """


@admin.group()
def token() -> None:
    """Create API and console tokens (the config keeps only their hashes)."""


@token.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "admin"]), required=True,
              help="viewer: reads everything; admin: may also change (suppress, release, approve, erase).")
def create(name: str, role: str) -> None:
    """Make a new token for NAME and print it once, with the [admin.tokens] line to add.

    NAME is recorded as the actor of every change made with the token (e.g. a person or a
    system: "alice", "crm-sync"). The token is shown only now; the config holds its hash, so a
    lost token cannot be recovered: create a new one and replace the old line. Restart the
    guard after editing [admin.tokens].

    \b
    Example:
      smtp-guard admin token create ops --role admin
      curl -H "Authorization: Bearer sgt_…" http://127.0.0.1:8025/api/v1/holds
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise click.BadParameter("letters, digits, '.', '_' and '-', at most 64, starting with a letter or digit",
                                 param_hint="NAME")
    secret = new_token()
    click.echo(f"Token for {name} (role {role}); shown only now, give it to its user:\n\n  {secret}\n")
    click.echo("Add this line under [admin.tokens] in the guard's config, then restart the guard:\n")
    click.echo(f"  {config_line(name, cast(AdminRole, role), secret)}")

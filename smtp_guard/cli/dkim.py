"""``smtp-guard dkim``: make the keys the guard signs with."""

from __future__ import annotations

import re
from pathlib import Path
from typing import cast

import click



@click.group()
def dkim() -> None:
    """DKIM keys for signing relayed mail ([[dkim.keys]]).

    \b
    New key:   smtp-guard dkim keygen example.com s2026
    Ed25519:   smtp-guard dkim keygen example.com s2026e --algorithm ed25519
    Check DNS: smtp-guard doctor example.com
    """


@dkim.command()
@click.argument("domain")
@click.argument("selector")
@click.option("--algorithm", type=click.Choice(["rsa", "ed25519"]), default="rsa",
              help="rsa (2048 bits, verified everywhere) or ed25519 (RFC 8463; configure it beside an RSA "
                   "key, not instead: not every receiver verifies it yet).")
@click.option("--bits", type=click.IntRange(1024, 4096), default=2048, help="RSA key size.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the private key (never over an existing file). Default: DOMAIN.SELECTOR.key "
                   "in the current directory.")
def keygen(domain: str, selector: str, algorithm: str, bits: int, out: Path | None) -> None:
    """Write a new private key for DOMAIN and SELECTOR (mode 0600) and print the DNS TXT record
    to publish and the [[dkim.keys]] lines to add.

    \b
    Example:
      smtp-guard dkim keygen example.com s2026 --out /etc/smtp-guard/dkim/example.com.s2026.key
      # publish the printed record, add the printed lines to the config, restart, then:
      smtp-guard doctor example.com --config /etc/smtp-guard/smtp-guard.toml
    """
    domain = domain.lower().rstrip(".")
    selector = selector.lower()
    if not re.fullmatch(r"([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]*[a-z0-9]", domain):
        raise click.BadParameter(f"{domain!r} is not a domain name, e.g. example.com", param_hint="DOMAIN")
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", selector):
        raise click.BadParameter(f"{selector!r} is not a DNS label, e.g. s2026", param_hint="SELECTOR")
    path = (out or Path(f"{domain}.{selector}.key")).absolute()
    # Imported here, not with the CLI: cryptography is ~10 MiB of every process that imports it,
    # and every `smtp-guard serve` process (workers included) loads the whole CLI.
    from ..dkim.keys import Algorithm, from_pem, generate, write_private, zone_lines

    pem = generate(cast(Algorithm, algorithm), bits)
    try:
        write_private(path, pem)
    except FileExistsError:
        raise click.ClickException(f"{path} exists; a key is never overwritten (choose another --out or selector)")
    except OSError as error:
        raise click.ClickException(f"cannot write {path}: {error.strerror or error}")
    key = from_pem(pem, domain, selector, str(path))
    size = f"RSA {key.bits}" if key.algorithm == "rsa" else "Ed25519"
    click.echo(f"Wrote {path} ({size}, mode 0600): keep it secret and back it up.\n")
    click.echo(f"1. Publish this TXT record in the DNS of {domain}:\n\n   {zone_lines(key)}\n")
    click.echo("2. Add to the guard's config, then restart the guard:\n")
    click.echo(f'   [[dkim.keys]]\n   domain = "{domain}"\n   selector = "{selector}"\n   key_file = "{path}"\n')
    click.echo(f"3. When the record is published: smtp-guard doctor {domain} --config FILE")

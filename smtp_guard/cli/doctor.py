"""``smtp-guard doctor``: check the sending domains' DNS and the upstream, say what to fix."""

from __future__ import annotations

import asyncio
import ipaddress
import json

import click

from ..addresses import InvalidAddress, normalize_domain
from ..config import Config
from .common import with_config

FAILED = 1  # exit status when a check failed


@click.command()
@click.argument("domains", nargs=-1, metavar="[DOMAIN]...")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (stable keys) instead of text.")
@click.option("--sending-ip", "sending_ips", multiple=True, metavar="IP",
              help="An address SPF must authorize (repeatable). Default: the addresses of [upstream] host; give the "
                   "upstream's public address when it sends from another one (NAT, a relay chain).")
@with_config
def doctor(config: Config, domains: tuple[str, ...], as_json: bool, sending_ips: tuple[str, ...]) -> None:
    """Check the sending domains' DNS (DKIM, SPF, DMARC, MX) and the upstream; say what to fix.

    DOMAIN defaults to every domain of [[dkim.keys]]. For each one:

    \b
      dkim          each key's TXT record at SELECTOR._domainkey.DOMAIN is there, parses and
                    publishes the same public key as the configured key file
      spf           exactly one "v=spf1" record; spf.lookups: at most 10 DNS lookups
                    (RFC 7208 4.6.4); spf.upstream: it authorizes the upstream's addresses
      dmarc         a record at _dmarc.DOMAIN (or the organizational domain's); dmarc.policy:
                    p=none enforces nothing; dmarc.alignment: the DKIM d= domain aligns
      mx            where mail to the domain goes (a null MX or none is a warning)

    and for [upstream] host:port: it accepts a connection, answers EHLO, offers STARTTLS (or
    speaks implicit TLS), and its certificate is valid for the host (system CAs or [upstream]
    ca_file) for 14 more days. A sandbox upstream skips these.

    Each check is OK, WARN, FAIL or SKIP; a problem comes with its fix, and a missing or wrong
    record with the exact zone file line to publish. DNS is asked through [dns] servers (or
    /etc/resolv.conf), as the guard itself asks.

    \b
    Exit status:
      0  no check failed (warnings may remain)
      1  a check failed (or the config could not be read: the message says which)
      2  the command line is wrong

    \b
    Examples:
      smtp-guard doctor --config /etc/smtp-guard/smtp-guard.toml
      smtp-guard doctor shop.example news.shop.example --json
      smtp-guard doctor --sending-ip 203.0.113.25
    """
    from ..doctor.runner import diagnose

    targets = []
    for domain in domains:
        try:
            targets.append(normalize_domain(domain))
        except InvalidAddress:
            raise click.BadParameter(f"{domain!r} is not a domain name", param_hint="DOMAIN") from None
    addresses = []
    for text in sending_ips:
        try:
            addresses.append(ipaddress.ip_address(text))
        except ValueError:
            raise click.BadParameter(f"{text!r} is not an IP address", param_hint="--sending-ip") from None
    report = asyncio.run(diagnose(config, targets, addresses))
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        click.echo(report.as_text(), nl=False)
    if report.status.value == "fail":
        click.get_current_context().exit(FAILED)

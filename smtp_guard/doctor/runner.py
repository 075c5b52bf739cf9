"""Run every check for the sending domains and the upstream: ``await diagnose(config)``."""

from __future__ import annotations

import asyncio
import ipaddress
from datetime import datetime
from typing import Sequence

from ..config import Config, DKIMKeyConfig
from ..dns_resolver import resolver
from .dkim_record import check_dkim
from .dmarc_record import check_dmarc
from .lookup import DNS, DNSFailure, IPAddress
from .mx_record import check_mx
from .report import DomainReport, Finding, Report, Status
from .spf_record import check_spf
from .upstream import check_upstream


def sending_domains(config: Config) -> list[str]:
    """The domains of ``[[dkim.keys]]``, in the config's order, each once."""
    return list(dict.fromkeys(key.domain for key in config.dkim.keys))


def signing_keys(config: Config, domain: str) -> tuple[str | None, list[DKIMKeyConfig]]:
    """The domain whose keys sign ``domain``'s mail (it, or its most specific configured
    parent, as the signer picks them) and those keys."""
    domain = domain.lower().rstrip(".")
    covering = [key.domain for key in config.dkim.keys if domain == key.domain or domain.endswith("." + key.domain)]
    if not covering:
        return None, []
    chosen = max(covering, key=len)
    return chosen, [key for key in config.dkim.keys if key.domain == chosen]


async def diagnose(config: Config, domains: Sequence[str] = (), sending_ips: Sequence[IPAddress] = (),
                   now: datetime | None = None) -> Report:
    """Check ``domains`` (default: the configured sending domains) and the upstream.
    ``sending_ips``: the addresses SPF must authorize (default: the upstream host's)."""
    dns = DNS(resolver(config.dns))
    targets = [d.lower().rstrip(".") for d in domains] or sending_domains(config)
    notes = []
    if not targets:
        notes.append("No sending domain: the config has no [[dkim.keys]]. Name domains to check: "
                     "smtp-guard doctor example.com")
    ips, why_skipped, ip_problem = await _sending_ips(dns, config, sending_ips)
    checked = await asyncio.gather(*(_check_domain(dns, config, domain, ips, why_skipped, ip_problem)
                                     for domain in targets))
    upstream = await check_upstream(config.upstream, now)
    return Report(tuple(checked), upstream, tuple(notes))


async def _sending_ips(dns: DNS, config: Config, given: Sequence[IPAddress]
                       ) -> tuple[list[IPAddress] | None, str, Finding | None]:
    """The addresses SPF must authorize, or None with the reason (and a finding when that is a problem)."""
    if given:
        return list(given), "", None
    up = config.upstream
    if up.mode == "sandbox":
        return None, "[upstream] mode = \"sandbox\" (no upstream; give --sending-ip to check an address)", None
    try:
        return [ipaddress.ip_address(up.host)], "", None
    except ValueError:
        pass
    try:
        found = await dns.addresses(up.host)
    except DNSFailure as error:
        return None, f"the upstream's address is unknown ({error})", Finding(
            "spf.upstream", Status.FAIL, up.host, f"could not resolve [upstream] host: {error}",
            fix="check [dns] servers, or give the sending addresses with --sending-ip")
    if not found:
        return None, "the upstream has no address", Finding(
            "spf.upstream", Status.FAIL, up.host, f"[upstream] host {up.host} has no A or AAAA record",
            fix="correct [upstream] host, or give the sending addresses with --sending-ip")
    return found, "", None


async def _check_domain(dns: DNS, config: Config, domain: str, ips: list[IPAddress] | None, why_skipped: str,
                        ip_problem: Finding | None) -> DomainReport:
    signing_domain, keys = signing_keys(config, domain)
    findings = [*await check_dkim(dns, domain, signing_domain, keys)]
    spf = await check_spf(dns, domain, ips, why_skipped)
    if ip_problem is not None:
        spf = [ip_problem if f.check == "spf.upstream" else f for f in spf]
    findings += spf
    findings += await check_dmarc(dns, domain, signing_domain)
    findings.append(await check_mx(dns, domain))
    return DomainReport(domain, tuple(findings))

"""The DMARC check (RFC 7489): a policy record at ``_dmarc.domain`` or, failing that, at the
organizational domain's; what it enforces; and whether the guard's DKIM signatures align with
the From domain, which is what lets DMARC pass.

The organizational domain is the public suffix plus one label, from the Public Suffix List
(the ``publicsuffixlist`` package, which ships the list and is released as it changes), as
RFC 7489 section 3.2 prescribes: "mail.shop.example.co.uk" belongs to "example.co.uk". A name
under a suffix the list does not know (".test") is treated as under a one-label suffix.
"""

from __future__ import annotations

import functools
import re

from publicsuffixlist import PublicSuffixList

from .lookup import DNS, DNSFailure
from .report import Finding, Status, txt_record

_VERSION = re.compile(r"v\s*=\s*DMARC1\s*(;|$)")


@functools.lru_cache(maxsize=1)
def _public_suffixes() -> PublicSuffixList:
    return PublicSuffixList()  # parses the shipped list once (~50 ms)


def organizational_domain(domain: str) -> str:
    return _public_suffixes().privatesuffix(domain.lower()) or domain.lower()


def tags(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            found.setdefault(name.strip().lower(), value.strip())
    return found


def is_aligned(signing_domain: str, from_domain: str, mode: str) -> bool:
    """RFC 7489 section 3.1.1: strict needs the same name; relaxed the same organizational domain."""
    if mode == "s":
        return signing_domain.lower() == from_domain.lower()
    return organizational_domain(signing_domain) == organizational_domain(from_domain)


async def check_dmarc(dns: DNS, domain: str, signing_domain: str | None) -> list[Finding]:
    organization = organizational_domain(domain)
    looked_at = [f"_dmarc.{domain}"] + ([f"_dmarc.{organization}"] if organization != domain else [])
    suggested = txt_record(f"_dmarc.{domain}", f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}")
    found: list[str] = []
    name = looked_at[0]
    try:
        for name in looked_at:
            found = [text for text in await dns.txt(name) if _VERSION.match(text)]
            if found:
                break
    except DNSFailure as error:
        return [Finding("dmarc", Status.FAIL, name, f"could not look up the DMARC record: {error}",
                        fix="check [dns] servers (or /etc/resolv.conf) and run doctor again")]
    if not found:
        return [Finding("dmarc", Status.FAIL, looked_at[0],
                        f"no DMARC record at {' or '.join(looked_at)}: receivers apply no policy, anyone can send "
                        "as this domain, and large mailbox providers refuse or spam-folder bulk mail without one",
                        fix="publish one; start with p=none and read the reports sent to rua=, then move to "
                            "p=quarantine and p=reject once all your mail passes", publish=suggested)]
    if len(found) > 1:
        return [Finding("dmarc", Status.FAIL, name, f"{len(found)} DMARC records at {name}: receivers ignore them all "
                        "(RFC 7489 section 6.6.3)", fix="keep exactly one", data={"records": found})]
    record = tags(found[0])
    inherited = name != looked_at[0]
    data = {"record": found[0], "name": name}
    policy = record.get("sp", record.get("p", "")) if inherited else record.get("p", "")
    if record.get("p") not in ("none", "quarantine", "reject") or policy not in ("none", "quarantine", "reject"):
        return [Finding("dmarc", Status.FAIL, name, f"\"{found[0]}\" has no valid p= (none, quarantine or reject): "
                        "receivers ignore the record", fix="correct p=", publish=suggested if not inherited else "",
                        data=data)]
    where = f"inherited from {organization}" if inherited else f"at {name}"
    findings = [Finding("dmarc", Status.OK, name, f"DMARC record {where}: \"{found[0]}\"", data=data),
                _policy_finding(name, policy, record, inherited),
                _alignment_finding(name, domain, signing_domain, record)]
    return findings


def _policy_finding(name: str, policy: str, record: dict[str, str], inherited: bool) -> Finding:
    tag = "sp" if inherited and "sp" in record else "p"
    data = {"policy": policy, "pct": record.get("pct", "100")}
    if policy == "none":
        return Finding("dmarc.policy", Status.WARN, name, f"{tag}=none: nothing is enforced, mail that fails DMARC "
                       "(spoofed mail) is delivered", fix="once the aggregate reports (rua=) show your own mail "
                       "passing, move to p=quarantine, then p=reject", data=data)
    if record.get("pct", "100") != "100":
        return Finding("dmarc.policy", Status.WARN, name, f"{tag}={policy}, but only for pct={record['pct']}% of "
                       "failing mail", fix="raise pct to 100 (or remove it)", data=data)
    return Finding("dmarc.policy", Status.OK, name, f"{tag}={policy}: receivers {'refuse' if policy == 'reject' else 'quarantine'} "
                   "mail that fails DMARC", data=data)


def _alignment_finding(name: str, domain: str, signing_domain: str | None, record: dict[str, str]) -> Finding:
    adkim, aspf = record.get("adkim", "r"), record.get("aspf", "r")
    data = {"adkim": adkim, "aspf": aspf, "dkim_domain": signing_domain}
    modes = f"adkim={adkim}, aspf={aspf}"
    if signing_domain is None:
        return Finding("dmarc.alignment", Status.WARN, name, f"{modes}; the guard has no DKIM key for {domain}, so DMARC "
                       "can pass only through SPF, for the envelope sender's domain (which must align too)",
                       fix=f"add a [[dkim.keys]] key for {domain}", data=data)
    mode = "strict" if adkim == "s" else "relaxed"
    if is_aligned(signing_domain, domain, adkim):
        return Finding("dmarc.alignment", Status.OK, name, f"{modes}; the guard signs with d={signing_domain}, "
                       f"aligned with From: {domain} ({mode})", data=data)
    return Finding("dmarc.alignment", Status.FAIL, name, f"{modes}; the guard signs with d={signing_domain}, which is "
                   f"not aligned with From: {domain} under {mode} alignment: DKIM cannot make DMARC pass",
                   fix=f"add a [[dkim.keys]] key for {domain} itself" + (", or publish adkim=r" if adkim == "s" else ""),
                   data=data)

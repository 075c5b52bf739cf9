"""The SPF check: one ``v=spf1`` record at the domain, that parses, costs a receiver at most 10
DNS lookups, and authorizes the addresses the upstream sends from (RFC 7208).

SPF is evaluated by receivers for the envelope sender's (MAIL FROM) domain; this checks the
sending domain itself, as the platform's MAIL FROM and the From header usually share it.
"""

from __future__ import annotations

from typing import Sequence

from . import spf
from .lookup import DNS, DNSFailure, IPAddress
from .report import Finding, Status, txt_record


async def check_spf(dns: DNS, domain: str, sending_ips: Sequence[IPAddress] | None, why_skipped: str) -> list[Finding]:
    """``sending_ips``: the upstream's addresses, None when there is no upstream to check
    (``why_skipped`` says why)."""
    mechanisms = " ".join(_mechanism(ip) for ip in sending_ips or ()) or "ip4:UPSTREAM-ADDRESS"
    suggested = txt_record(domain, f"v=spf1 {mechanisms} -all")
    try:
        texts = [text for text in await dns.txt(domain) if spf.is_spf(text)]
    except DNSFailure as error:
        return [Finding("spf", Status.FAIL, domain, f"could not look up the SPF record: {error}",
                        fix="check [dns] servers (or /etc/resolv.conf) and run doctor again")]
    if not texts:
        return [Finding("spf", Status.FAIL, domain, f"no SPF record (TXT \"v=spf1 …\") at {domain}: receivers cannot "
                        "tell which servers may send its mail", fix="publish one that names the upstream's addresses "
                        "and ends in -all (or ~all while you are unsure)", publish=suggested)]
    if len(texts) > 1:
        return [Finding("spf", Status.FAIL, domain, f"{len(texts)} SPF records at {domain}: receivers return "
                        "permerror and SPF fails (RFC 7208 section 4.5)",
                        fix="merge them into one record (one v=spf1, the mechanisms of both, one all at the end)",
                        data={"records": texts})]
    text = texts[0]
    try:
        record = spf.parse(text)
    except spf.PermError as error:
        return [Finding("spf", Status.FAIL, domain, f"the SPF record does not parse: {error}", fix="correct the record",
                        data={"record": text})]
    return [_record_finding(domain, record), await _lookups_finding(dns, domain, record),
            await _upstream_finding(dns, domain, record, sending_ips, why_skipped)]


def _mechanism(ip: IPAddress) -> str:
    return f"ip{ip.version}:{ip}"


def _record_finding(domain: str, record: spf.Record) -> Finding:
    data = {"record": record.text}
    last = record.all_term
    if last is None and record.redirect is None:
        return Finding("spf", Status.WARN, domain, f"\"{record.text}\" has no all mechanism: mail from any other "
                       "server is \"neutral\", not refused", fix="end the record with -all (or ~all)", data=data)
    if last is not None and last.qualifier == "+":
        return Finding("spf", Status.FAIL, domain, f"\"{record.text}\" ends in +all: every server on the internet "
                       "may send as this domain", fix="end the record with -all (or ~all)", data=data)
    if last is not None and last.qualifier == "?":
        return Finding("spf", Status.WARN, domain, f"\"{record.text}\" ends in ?all: other servers are only "
                       "\"neutral\"", fix="end the record with -all (or ~all)", data=data)
    return Finding("spf", Status.OK, domain, f"one SPF record: \"{record.text}\"", data=data)


async def _lookups_finding(dns: DNS, domain: str, record: spf.Record) -> Finding:
    try:
        count = await spf.count_lookups(dns, domain)
    except (DNSFailure, spf.PermError) as error:
        return Finding("spf.lookups", Status.FAIL, domain, f"could not count the DNS lookups: {error}")
    data = {"lookups": count.total, "limit": spf.MAX_LOOKUPS, "by_term": dict(count.by_term),
            "problems": count.problems}
    costly = ", ".join(f"{term} {cost}" for term, cost in sorted(count.by_term, key=lambda item: -item[1]) if cost)
    if count.total > spf.MAX_LOOKUPS:
        return Finding("spf.lookups", Status.FAIL, domain,
                       f"the record needs {count.total} DNS lookups, more than {spf.MAX_LOOKUPS}: receivers stop with "
                       f"permerror and SPF fails (RFC 7208 section 4.6.4); {costly}",
                       fix="replace includes by the ip4:/ip6: ranges they stand for, or drop the ones you do not "
                           "send through", data=data)
    if count.problems:
        return Finding("spf.lookups", Status.FAIL, domain,
                       f"{count.total} DNS lookups, but: {'; '.join(count.problems)}",
                       fix="fix or remove the includes named", data=data)
    return Finding("spf.lookups", Status.OK, domain,
                   f"{count.total} DNS lookup{'s' if count.total != 1 else ''} (at most {spf.MAX_LOOKUPS})", data=data)


async def _upstream_finding(dns: DNS, domain: str, record: spf.Record, sending_ips: Sequence[IPAddress] | None,
                            why_skipped: str) -> Finding:
    if sending_ips is None:
        return Finding("spf.upstream", Status.SKIP, domain, f"whether SPF authorizes the upstream is not checked: "
                       f"{why_skipped}")
    results = {str(ip): await spf.check_host(dns, ip, domain) for ip in sending_ips}
    data = {"results": {ip: {"result": e.result, "reason": e.reason} for ip, e in results.items()}}
    refused = {ip: e for ip, e in results.items() if e.result != "pass"}
    if not refused:
        return Finding("spf.upstream", Status.OK, domain,
                       f"SPF passes for the upstream's address{'es' if len(results) > 1 else ''} "
                       f"{', '.join(results)}", data=data)
    explained = "; ".join(f"{ip}: {e.result} ({e.reason})" for ip, e in refused.items())
    if any(e.result in ("permerror", "temperror") for e in refused.values()):
        return Finding("spf.upstream", Status.FAIL, domain, f"SPF cannot be evaluated for the upstream: {explained}",
                       fix="a permerror is a broken record or include: correct it; a temperror is DNS that did not "
                           "answer: check it and run doctor again", data=data)
    missing = [ip for ip in sending_ips if str(ip) in refused]
    fixed = record.text.split(None, 1)
    new_text = " ".join([fixed[0], *(_mechanism(ip) for ip in missing), *fixed[1:]])
    return Finding("spf.upstream", Status.FAIL, domain,
                   f"SPF does not authorize the upstream: {explained}",
                   fix=f"add {' '.join(_mechanism(ip) for ip in missing)} to the record (receivers see the upstream's "
                       "address as the sender)", publish=txt_record(domain, new_text), data=data)

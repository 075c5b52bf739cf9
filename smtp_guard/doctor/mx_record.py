"""The MX check: where mail to the sending domain goes (replies, bounces, DMARC reports)."""

from __future__ import annotations

from .lookup import DNS, DNSFailure
from .report import Finding, Status


async def check_mx(dns: DNS, domain: str) -> Finding:
    try:
        records = await dns.query(domain, "MX")
        exchanges = await dns.mx(domain)
    except DNSFailure as error:
        return Finding("mx", Status.FAIL, domain, f"could not look up the MX records: {error}",
                       fix="check [dns] servers (or /etc/resolv.conf) and run doctor again")
    if not records.exists:
        return Finding("mx", Status.FAIL, domain, f"{domain} does not exist in DNS (NXDOMAIN): receivers refuse mail "
                       "from it", fix="register the domain or correct its name in the config")
    data = {"mx": [{"preference": preference, "exchange": exchange} for preference, exchange in exchanges]}
    if exchanges == [(0, ".")] or [exchange for _, exchange in exchanges] == ["."]:
        return Finding("mx", Status.WARN, domain, f"{domain} publishes a null MX (RFC 7505): it receives no mail, so "
                       "bounces and replies to it are lost, and receivers may refuse mail that uses it as the "
                       "envelope sender (550 5.7.27)", fix="if this domain sends, give it an MX that receives the "
                       "bounces (or send with an envelope sender in a domain that has one)", data=data)
    if not exchanges:
        return Finding("mx", Status.WARN, domain, f"no MX record: mail to {domain} (replies, bounces, DMARC reports "
                       "sent there) goes to its A/AAAA record, if it has one", fix=f"publish an MX naming the server "
                       f"that receives mail for {domain}, e.g. \"{domain}. IN MX 10 mail.{domain}.\"", data=data)
    listed = ", ".join(f"{preference} {exchange}" for preference, exchange in exchanges)
    return Finding("mx", Status.OK, domain, f"MX {listed}", data=data)

"""DNS as the doctor's checks need it: answers as plain values, "does not exist" apart from
"has no such record", and a lookup that could not be answered as ``DNSFailure``.

Built on the guard's one resolver (``dns_resolver.resolver(config.dns)``). Answers are kept for
the run, so a record several checks read (an SPF include, the upstream's address) is asked once.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DNSFailure(Exception):
    """The question got no answer (timeout, SERVFAIL, REFUSED): nothing is known about the name."""


@dataclass(frozen=True)
class Records:
    exists: bool  # False: NXDOMAIN
    values: tuple[Any, ...] = ()  # dnspython rdata

    @property
    def is_void(self) -> bool:
        """No records (NXDOMAIN or an empty answer): a "void lookup" in RFC 7208 section 4.6.4."""
        return not self.values


class DNS:
    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self._resolver = resolver
        self._answers: dict[tuple[str, str], Records | DNSFailure] = {}

    async def query(self, name: str, rdtype: str) -> Records:
        key = (name.lower().rstrip("."), rdtype)
        if key not in self._answers:
            self._answers[key] = await self._ask(*key)
        answer = self._answers[key]
        if isinstance(answer, DNSFailure):
            raise answer
        return answer

    async def _ask(self, name: str, rdtype: str) -> Records | DNSFailure:
        try:
            qname = dns.name.from_text(name)  # absolute: no search list of /etc/resolv.conf applies
            answer = await self._resolver.resolve(qname, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return Records(exists=False)
        except dns.exception.Timeout:
            return DNSFailure(f"{rdtype} {name}: timed out")
        except dns.resolver.NoNameservers:
            return DNSFailure(f"{rdtype} {name}: no name server answered (SERVFAIL or REFUSED)")
        except (dns.name.NameTooLong, dns.name.EmptyLabel, dns.name.LabelTooLong) as error:
            return DNSFailure(f"{rdtype} {name}: not a valid DNS name ({error})")
        except dns.exception.DNSException as error:
            return DNSFailure(f"{rdtype} {name}: {type(error).__name__}: {error}")
        return Records(exists=True, values=tuple(answer.rrset) if answer.rrset else ())

    async def txt(self, name: str) -> list[str]:
        """Each TXT record's text (its strings joined, RFC 7208 section 3.3); [] when none."""
        records = await self.query(name, "TXT")
        return [b"".join(record.strings).decode("utf-8", "replace") for record in records.values]

    async def addresses(self, name: str, version: int | None = None) -> list[IPAddress]:
        """A and AAAA (or only the ``version`` given) records of ``name``."""
        found: list[IPAddress] = []
        for rdtype, ip_version in (("A", 4), ("AAAA", 6)):
            if version in (None, ip_version):
                found += [ipaddress.ip_address(record.address) for record in (await self.query(name, rdtype)).values]
        return found

    async def mx(self, name: str) -> list[tuple[int, str]]:
        """(preference, exchange) pairs, exchange without the final dot ("." for a null MX)."""
        records = await self.query(name, "MX")
        return sorted((record.preference, record.exchange.to_text(omit_final_dot=True)) for record in records.values)

    async def ptr(self, ip: IPAddress) -> list[str]:
        records = await self.query(dns.reversename.from_address(str(ip)).to_text(), "PTR")
        return [record.target.to_text(omit_final_dot=True) for record in records.values]

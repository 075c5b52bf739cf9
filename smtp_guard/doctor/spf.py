"""SPF (RFC 7208): parse a record, evaluate ``check_host`` for an IP address, and count the DNS
lookups a record costs a receiver.

Written here rather than taken from PyPI: pyspf (last release 2.0.14, January 2020) is
synchronous, asks DNS through dnspython's module-level resolver (so not through ``[dns]
servers``) with ``dns.resolver.query``, which dnspython 2 deprecates, and its forks add
nothing on those points; checkdmarc is synchronous too and brings a dozen dependencies. The
evaluator below is the part of RFC 7208 a sender needs checked: the mechanisms all, include,
a, mx, ptr, ip4, ip6 and exists with their qualifiers, the redirect modifier, macros (section
7), and the processing limits of section 4.6.4 (10 DNS-querying terms, 2 void lookups, 10
MX or PTR names). The exp modifier only matters to a receiver explaining a failure and is
ignored.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal

from .lookup import DNS, DNSFailure, IPAddress

Result = Literal["pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"]

MAX_LOOKUPS = 10  # include, a, mx, ptr, exists, redirect (RFC 7208 section 4.6.4)
MAX_VOID_LOOKUPS = 2
MAX_NAMES = 10  # MX names per mx mechanism, PTR names per ptr mechanism

QUALIFIERS: dict[str, Result] = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
LOOKUP_TERMS = ("include", "a", "mx", "ptr", "exists", "redirect")

_VERSION = re.compile(r"v=spf1(?: |$)", re.IGNORECASE)
# qualifier, name, then ":" or "=" and the argument, or a prefix length right after the name ("a/24").
_TERM = re.compile(r"([+\-~?]?)([a-z0-9]+)(?:([:=])(.*)|(/.*))?", re.IGNORECASE | re.DOTALL)
_DUAL_CIDR = re.compile(r"^(.*?)(?:/(\d{1,2}))?(?://(\d{1,3}))?$", re.DOTALL)
_MACRO = re.compile(r"%\{([slodiphcrtv])(\d*)(r?)([.\-+,/_=]*)\}|%%|%_|%-|%", re.IGNORECASE)


class PermError(Exception):
    """The record is broken (RFC 7208 "permerror"): receivers treat the domain as failing SPF."""


class TempError(Exception):
    """A DNS lookup failed (RFC 7208 "temperror")."""


@dataclass(frozen=True)
class Term:
    qualifier: str  # "+", "-", "~" or "?"
    mechanism: str  # one of MECHANISMS
    argument: str = ""  # domain-spec or network, "" when none
    cidr4: int | None = None
    cidr6: int | None = None
    text: str = ""  # as written

    @property
    def result(self) -> Result:
        return QUALIFIERS[self.qualifier]


@dataclass(frozen=True)
class Record:
    text: str
    terms: tuple[Term, ...]
    redirect: str | None = None

    @property
    def all_term(self) -> Term | None:
        return next((term for term in self.terms if term.mechanism == "all"), None)


def is_spf(text: str) -> bool:
    """A TXT record that is an SPF record: "v=spf1" alone or followed by a space (section 4.5)."""
    return bool(_VERSION.match(text))


def parse(text: str) -> Record:
    """Parse an SPF record (section 12's grammar); PermError names what is wrong."""
    if not is_spf(text):
        raise PermError(f"{text!r} does not start with \"v=spf1\"")
    terms: list[Term] = []
    redirect: str | None = None
    for word in text.split()[1:]:
        match = _TERM.fullmatch(word)
        if not match:
            raise PermError(f"{word!r} is not an SPF mechanism or modifier")
        qualifier, name, separator, argument = match.group(1) or "+", match.group(2).lower(), match.group(3), match.group(4)
        if separator == "=":
            if match.group(1):
                raise PermError(f"{word!r}: a modifier takes no qualifier")
            if name == "redirect":
                if redirect is not None:
                    raise PermError("redirect= appears twice")
                redirect = _domain_spec(argument, word)
            # exp= and unknown modifiers are allowed and ignored (section 6).
            continue
        if name not in MECHANISMS:
            raise PermError(f"{word!r}: unknown mechanism {name!r}")
        if match.group(5) and name not in ("a", "mx"):
            raise PermError(f"{word!r}: only a and mx take a prefix length without a domain")
        terms.append(_mechanism(qualifier, name, argument, match.group(5) or "", word))
    return Record(text, tuple(terms), redirect)


def _mechanism(qualifier: str, name: str, argument: str | None, prefix: str, word: str) -> Term:
    if name == "all":
        if argument is not None:
            raise PermError(f"{word!r}: all takes no argument")
        return Term(qualifier, name, text=word)
    if name in ("ip4", "ip6"):
        if not argument:
            raise PermError(f"{word!r}: {name} needs a network, e.g. {name}:{'192.0.2.0/24' if name == 'ip4' else '2001:db8::/32'}")
        try:
            network = ipaddress.ip_network(argument, strict=False)
        except ValueError:
            raise PermError(f"{word!r}: {argument!r} is not an IPv{name[-1]} network") from None
        length = argument.rsplit("/", 1)[1] if "/" in argument else "0"
        if network.version != int(name[-1]) or not length.isdigit():  # "/255.255.255.0" is not CIDR
            raise PermError(f"{word!r}: {argument!r} is not an IPv{name[-1]} network")
        return Term(qualifier, name, str(network), text=word)
    if name in ("include", "exists"):
        if not argument:
            raise PermError(f"{word!r}: {name} needs a domain")
        return Term(qualifier, name, _domain_spec(argument, word), text=word)
    # a, mx, ptr: an optional domain-spec; a and mx also take a dual CIDR length.
    spec, cidr4, cidr6 = (argument or "") + prefix, None, None
    if name in ("a", "mx"):
        cidrs = _DUAL_CIDR.match(spec)
        assert cidrs is not None  # the pattern matches every string
        spec = cidrs.group(1)
        cidr4 = int(cidrs.group(2)) if cidrs.group(2) else None
        cidr6 = int(cidrs.group(3)) if cidrs.group(3) else None
        if cidr4 is not None and cidr4 > 32 or cidr6 is not None and cidr6 > 128:
            raise PermError(f"{word!r}: a prefix length out of range")
    if argument is not None and not spec:
        raise PermError(f"{word!r}: empty domain after ':'")
    return Term(qualifier, name, _domain_spec(spec, word) if spec else "", cidr4, cidr6, word)


def _domain_spec(spec: str, word: str) -> str:
    if not spec or any(ch.isspace() or ch == "/" for ch in spec) or "%" not in spec and not _looks_like_domain(spec):
        raise PermError(f"{word!r}: {spec!r} is not a domain")
    expand(spec, _MacroValues("postmaster@example.com", "example.com", ipaddress.ip_address("192.0.2.1")))
    return spec


def _looks_like_domain(spec: str) -> bool:
    labels = spec.rstrip(".").split(".")
    return len(labels) >= 1 and all(0 < len(label) <= 63 for label in labels)


# --- macros (section 7) --------------------------------------------------------------------------

@dataclass(frozen=True)
class _MacroValues:
    sender: str
    domain: str
    ip: IPAddress
    helo: str = ""

    def letter(self, letter: str) -> str:
        local, _, sender_domain = self.sender.rpartition("@")
        values = {
            "s": self.sender, "l": local or "postmaster", "o": sender_domain, "d": self.domain,
            "i": _dotted(self.ip), "c": str(self.ip), "p": "unknown", "h": self.helo or self.domain,
            "v": "in-addr" if self.ip.version == 4 else "ip6", "r": "unknown", "t": "0",
        }
        return values[letter]


def _dotted(ip: IPAddress) -> str:
    if ip.version == 4:
        return str(ip)
    return ".".join(ip.exploded.replace(":", ""))  # one label per nibble (section 7.3)


def expand(spec: str, values: _MacroValues) -> str:
    """A domain-spec with its macros replaced; PermError for a malformed one."""
    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "%%":
            return "%"
        if token == "%_":
            return " "
        if token == "%-":
            return "%20"
        if token == "%":
            raise PermError(f"{spec!r}: '%' must start a macro (write %% for a percent sign)")
        value = values.letter(match.group(1).lower())
        parts = re.split("[" + re.escape(match.group(4) or ".") + "]", value)
        if match.group(3):
            parts.reverse()
        if match.group(2):
            keep = int(match.group(2))
            if keep == 0:
                raise PermError(f"{spec!r}: a macro keeps at least one label")
            parts = parts[-keep:]
        return ".".join(parts)

    expanded = _MACRO.sub(replace, spec)
    # Section 7.3: a result longer than 253 characters loses labels on the left.
    while len(expanded) > 253 and "." in expanded:
        expanded = expanded.split(".", 1)[1]
    return expanded


# --- check_host (section 4) ----------------------------------------------------------------------

@dataclass
class Evaluation:
    """One check_host run: its result, the term that decided, and the limits it used."""

    result: Result
    reason: str = ""
    matched: str = ""  # the mechanism that matched, as written, and the domain whose record has it
    lookups: int = 0
    void_lookups: int = 0


@dataclass
class _Run:
    dns: DNS
    ip: IPAddress
    sender: str
    helo: str
    lookups: int = 0
    void_lookups: int = 0
    matched: str = ""

    def count(self, term: str) -> None:
        self.lookups += 1
        if self.lookups > MAX_LOOKUPS:
            raise PermError(f"more than {MAX_LOOKUPS} DNS lookups (at {term}; RFC 7208 section 4.6.4)")

    def void(self, name: str) -> None:
        self.void_lookups += 1
        if self.void_lookups > MAX_VOID_LOOKUPS:
            raise PermError(f"more than {MAX_VOID_LOOKUPS} lookups found nothing (the last: {name}; "
                            "RFC 7208 section 4.6.4)")

    async def check_host(self, domain: str) -> Result:
        try:
            texts = [text for text in await self.dns.txt(domain) if is_spf(text)]
        except DNSFailure as error:
            raise TempError(str(error)) from None
        if not texts:
            return "none"
        if len(texts) > 1:
            raise PermError(f"{domain} has {len(texts)} SPF records (RFC 7208 section 4.5 allows one)")
        record = parse(texts[0])
        values = _MacroValues(self.sender, domain, self.ip, self.helo)
        for term in record.terms:
            if await self._matches(term, domain, values):
                if term.mechanism != "include":  # an include that passed keeps what matched inside it
                    self.matched = f"{term.text} in {domain}"
                return term.result
        if record.redirect is not None:
            self.count(f"redirect={record.redirect}")
            target = expand(record.redirect, values)
            result = await self.check_host(target)
            if result == "none":
                raise PermError(f"redirect={target}: {target} has no SPF record")
            return result
        return "neutral"

    async def _matches(self, term: Term, domain: str, values: _MacroValues) -> bool:
        ip = self.ip
        if term.mechanism == "all":
            return True
        if term.mechanism in ("ip4", "ip6"):
            return ip in ipaddress.ip_network(term.argument) if ip.version == int(term.mechanism[-1]) else False
        self.count(term.text)
        target = expand(term.argument, values) if term.argument else domain
        try:
            if term.mechanism == "include":
                result = await self.check_host(target)
                if result == "none":
                    raise PermError(f"{term.text}: {target} has no SPF record")
                if result != "pass":
                    self.matched = ""  # what failed inside the include decides nothing here
                return result == "pass"
            if term.mechanism == "exists":
                return bool(await self._addresses(target, 4))
            if term.mechanism == "a":
                return self._in(await self._addresses(target, ip.version), term)
            if term.mechanism == "mx":
                exchanges = await self.dns.mx(target)
                if not exchanges:
                    self.void(target)
                if len(exchanges) > MAX_NAMES:
                    raise PermError(f"{term.text}: {target} has {len(exchanges)} MX names (at most {MAX_NAMES})")
                for _, exchange in exchanges:
                    if exchange != "." and self._in(await self.dns.addresses(exchange, ip.version), term):
                        return True
                return False
            return await self._ptr_matches(target)
        except DNSFailure as error:
            raise TempError(str(error)) from None

    async def _addresses(self, name: str, version: int) -> list[IPAddress]:
        found = await self.dns.addresses(name, version)
        if not found:
            self.void(name)
        return found

    def _in(self, addresses: list[IPAddress], term: Term) -> bool:
        prefix = term.cidr4 if self.ip.version == 4 else term.cidr6
        return any(self.ip in ipaddress.ip_network(f"{address}/{prefix if prefix is not None else address.max_prefixlen}",
                                                   strict=False) for address in addresses)

    async def _ptr_matches(self, target: str) -> bool:
        """Section 5.5: a validated reverse name equal to or under ``target`` (a deprecated mechanism)."""
        names = (await self.dns.ptr(self.ip))[:MAX_NAMES]
        for name in names:
            if name.lower() == target.lower() or name.lower().endswith("." + target.lower()):
                if self.ip in await self.dns.addresses(name, self.ip.version):
                    return True
        return False


async def check_host(dns: DNS, ip: IPAddress, domain: str, sender: str = "", helo: str = "") -> Evaluation:
    """RFC 7208 check_host(): what a receiver decides for mail from ``ip`` with MAIL FROM
    ``sender`` (default postmaster@``domain``)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # section 5: an IPv4-mapped address is evaluated as IPv4
    run = _Run(dns, ip, sender or f"postmaster@{domain}", helo)
    try:
        result = await run.check_host(domain)
        reason = f"matched {run.matched}" if run.matched else \
            "no SPF record" if result == "none" else "no mechanism matched"
    except PermError as error:
        result, reason = "permerror", str(error)
    except TempError as error:
        result, reason = "temperror", str(error)
    return Evaluation(result, reason, run.matched, run.lookups, run.void_lookups)


# --- the lookup count of a record, whatever the address (section 4.6.4) ---------------------------

@dataclass
class LookupCount:
    """The DNS-querying terms a receiver may evaluate for a domain: every include and the
    redirect followed, whichever address the mail came from (the worst case)."""

    total: int = 0
    by_term: list[tuple[str, int]] = field(default_factory=list)  # top-level term -> lookups it costs
    problems: list[str] = field(default_factory=list)  # broken includes, loops, macros not followed


async def count_lookups(dns: DNS, domain: str) -> LookupCount:
    """Count a domain's SPF lookups by walking its record (raises DNSFailure, PermError for the
    record itself; problems further down are listed in ``problems``)."""
    count = LookupCount()
    texts = [text for text in await dns.txt(domain) if is_spf(text)]
    if len(texts) != 1:
        raise PermError(f"{domain} has {len(texts)} SPF records")
    record = parse(texts[0])
    for text, target in _lookup_terms(record):
        cost = 1 + (await _walk(dns, target, {domain}, count.problems) if target else 0)
        count.by_term.append((text, cost))
        count.total += cost
    return count


def _lookup_terms(record: Record) -> list[tuple[str, str]]:
    """(term, domain to follow or "") for each DNS-querying term; redirect only without all."""
    terms = [(term.text, term.argument if term.mechanism == "include" else "")
             for term in record.terms if term.mechanism in LOOKUP_TERMS]
    if record.redirect is not None and record.all_term is None:
        terms.append((f"redirect={record.redirect}", record.redirect))
    return terms


async def _walk(dns: DNS, domain: str, seen: set[str], problems: list[str]) -> int:
    if "%" in domain:
        problems.append(f"{domain}: has macros, its lookups depend on the mail and are not counted")
        return 0
    if domain.lower() in seen:
        problems.append(f"{domain}: included in a loop")
        return 0
    try:
        texts = [text for text in await dns.txt(domain) if is_spf(text)]
        if len(texts) != 1:
            problems.append(f"{domain}: {len(texts)} SPF records (an include needs exactly one)")
            return 0
        record = parse(texts[0])
    except DNSFailure as error:
        problems.append(f"{domain}: {error}")
        return 0
    except PermError as error:
        problems.append(f"{domain}: {error}")
        return 0
    total = 0
    for _, target in _lookup_terms(record):
        total += 1 + (await _walk(dns, target, seen | {domain.lower()}, problems) if target else 0)
    return total

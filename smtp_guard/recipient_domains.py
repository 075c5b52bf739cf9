"""The recipient domain check (``[recipient_domains]``): can the recipient's domain receive mail?

RFC 5321 section 5.1: mail for a domain goes to its MX hosts or, when it has no MX, to the
domain's own address (the implicit MX). A domain that does not exist (NXDOMAIN), one that
publishes a null MX (RFC 7505: a single MX whose exchange is the root, "MX 0 .") and one with
neither an MX nor an address record receive nothing: the upstream would take the mail and
bounce it later, so the guard refuses the recipient at RCPT instead (550 5.1.2) and the
platform learns at once that the address is dead. A DNS timeout or failure says nothing about
the domain: the recipient is deferred (451 4.4.3), never refused.

Answers are remembered in memory (bounded; least recently used forgotten first; ``ttl`` for a
domain that receives mail, ``negative_ttl`` for a refused one), so the RCPT path does DNS I/O
only for a domain it has not seen lately, and RCPTs for one domain in several sessions at once
wait for one shared query. Failures are never remembered: the next RCPT asks again. Each
guard process has its own memory.

The RCPT pipeline (policy/) is synchronous and does no I/O by design; this check is the one
asynchronous step, run by ``smtp/transaction.py`` after the pipeline let a recipient pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Callable, Literal, Mapping

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from . import replies
from .addresses import InvalidAddress, normalize_domain
from .config import RecipientDomainsConfig
from .metrics import Metrics
from .policy.base import Decision, Verdict

log = logging.getLogger(__name__)

# What DNS said about a domain (metrics.DOMAIN_LOOKUP_RESULTS).
DomainStatus = Literal["ok", "null_mx", "nxdomain", "no_mail_server", "dns_timeout", "dns_error"]

_REFUSALS: Mapping[DomainStatus, tuple[Verdict, replies.Reply, str]] = {
    "null_mx": (Verdict.REJECT, replies.DOMAIN_NULL_MX, "the recipient domain publishes a null MX (RFC 7505)"),
    "nxdomain": (Verdict.REJECT, replies.DOMAIN_NOT_FOUND, "the recipient domain does not exist (NXDOMAIN)"),
    "no_mail_server": (Verdict.REJECT, replies.DOMAIN_NO_MAIL_SERVER,
                       "the recipient domain has neither an MX nor an A/AAAA record"),
    "dns_timeout": (Verdict.DEFER, replies.DOMAIN_LOOKUP_FAILED, "the recipient domain's DNS lookup timed out"),
    "dns_error": (Verdict.DEFER, replies.DOMAIN_LOOKUP_FAILED,
                  "the recipient domain's DNS lookup failed (SERVFAIL or no usable name server)"),
}


def decision_for(status: DomainStatus) -> Decision | None:
    """The RCPT decision for a domain's status: None when it receives mail."""
    if status == "ok":
        return None
    verdict, reply, reason = _REFUSALS[status]
    return Decision(verdict, f"recipient_domain.{status}", reason, reply)


class RecipientDomains:
    """Looks up recipient domains and remembers the answers. ``await check(domain)``."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, config: RecipientDomainsConfig, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic, shadow: bool = False) -> None:
        self._resolver = resolver
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self.shadow = shadow or config.shadow  # decide and record "would have", never enforce
        self._known: OrderedDict[str, tuple[DomainStatus, float]] = OrderedDict()  # domain -> (status, expiry)
        self._pending: dict[str, asyncio.Task[DomainStatus]] = {}

    def __repr__(self) -> str:
        return f"<RecipientDomains known={len(self._known)} pending={len(self._pending)} max={self._config.cache_size}>"

    async def check(self, domain: str) -> Decision | None:
        """The decision for a recipient at ``domain`` (as given in the address), None to let it
        pass. Address literals ("[192.0.2.1]") name no domain and always pass."""
        if domain.startswith("["):
            return None
        try:
            name = normalize_domain(domain)
        except InvalidAddress:  # the SMTP front validated the address; nothing to look up
            return None
        return decision_for(await self.status(name))

    async def status(self, domain: str) -> DomainStatus:
        """What DNS says about ``domain`` (lower-case A-label form), from memory when known."""
        known = self._known.get(domain)
        if known is not None:
            status, expires = known
            if self._clock() < expires:
                self._known.move_to_end(domain)
                self._metrics.domain_cache_hits.inc()
                return status
            del self._known[domain]
        lookup = self._pending.get(domain)
        if lookup is None:
            lookup = asyncio.get_running_loop().create_task(self._resolve(domain), name=f"domain lookup {domain}")
            self._pending[domain] = lookup
            lookup.add_done_callback(lambda _: self._pending.pop(domain, None))
        # Shielded: a client that disconnects must not cancel the lookup other sessions wait for.
        return await asyncio.shield(lookup)

    async def close(self) -> None:
        """Cancel lookups still running (the listener has stopped; nobody waits for them)."""
        pending = list(self._pending.values())
        for lookup in pending:
            lookup.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _resolve(self, domain: str) -> DomainStatus:
        started = time.monotonic()
        try:
            status = await self._lookup(domain)
        except Exception:
            # Fail closed and temporary: an unexpected error defers, it never refuses.
            log.exception("recipient domain lookup failed unexpectedly; deferring")
            status = "dns_error"
        self._metrics.domain_lookup_duration.observe(time.monotonic() - started)
        self._metrics.domain_lookups.labels(status).inc()
        if status not in ("dns_timeout", "dns_error"):
            ttl = self._config.ttl if status == "ok" else self._config.negative_ttl
            self._known[domain] = (status, self._clock() + ttl)
            self._known.move_to_end(domain)
            while len(self._known) > self._config.cache_size:
                self._known.popitem(last=False)
        return status

    async def _lookup(self, domain: str) -> DomainStatus:
        # Absolute: no search list of /etc/resolv.conf may turn "example" into "example.corp".
        name = dns.name.from_text(domain)
        try:
            mx = await self._resolver.resolve(name, dns.rdatatype.MX, raise_on_no_answer=False)
            if mx.rrset:
                exchanges = [record.exchange for record in mx.rrset]
                # RFC 7505 section 3: a null MX is the domain's only MX. A "." beside real
                # exchanges is not one (and mail can go to the others).
                return "null_mx" if exchanges == [dns.name.root] else "ok"
            # No MX: the implicit MX, the domain's own address (RFC 5321 section 5.1).
            for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                address = await self._resolver.resolve(name, rdtype, raise_on_no_answer=False)
                if address.rrset:
                    return "ok"
            return "no_mail_server"
        except dns.resolver.NXDOMAIN:
            return "nxdomain"
        except dns.exception.Timeout:
            return "dns_timeout"
        except dns.exception.DNSException as error:  # SERVFAIL or REFUSED from every server, and the like
            log.warning("recipient domain lookup failed (%s); deferring its recipients", type(error).__name__)
            return "dns_error"

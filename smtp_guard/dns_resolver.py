"""The one DNS resolver every DNS-using feature builds from ``[dns]`` (dnspython): the system's
name servers, or the configured ones (a test's DNS server on loopback, a site's own resolver)."""

from __future__ import annotations

import dns.asyncresolver
import dns.nameserver

from .config import DNSConfig


def resolver(config: DNSConfig) -> dns.asyncresolver.Resolver:
    if config.servers:
        found = dns.asyncresolver.Resolver(configure=False)
        found.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in config.nameservers()]
    else:
        found = dns.asyncresolver.Resolver()  # /etc/resolv.conf
    found.lifetime = config.timeout
    found.timeout = config.timeout
    return found

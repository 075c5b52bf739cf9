"""The PROXY protocol on the SMTP listener: the real client's address, from a load balancer.

Behind a TCP load balancer (HAProxy ``send-proxy-v2``) every connection comes from the
balancer; the client's own address — which access control (``[access] allow_networks``),
rate limits by client, the Received header and the audit trail are about — comes first on
the connection, in a PROXY header (v1 text or v2 binary; haproxy.org's proxy-protocol.txt).

Whoever sends that header chooses the address the guard believes, so it is believed only
from the balancers listed in ``[smtp] proxy_protocol_from``:

* a connection from a listed address must start with a header (aiosmtpd 1.4 reads it,
  within ``proxy_protocol_timeout``, before its greeting); a missing or malformed one closes
  the connection. A header of the LOCAL command (v2) or UNKNOWN family (v1) is the balancer
  speaking for itself (a health check): its own address is the client's;
* from any other address, a connection is served as it always was — and one that starts
  with a PROXY header (v1's ``PROXY`` or v2's signature) is refused (554 5.7.0) and closed:
  a client trying to choose its own address is never served.

Each header is counted by result (``smtp_guard_proxy_headers_total``): accepted, local,
invalid (from a listed balancer), untrusted (from anyone else).
"""

from __future__ import annotations

from typing import Any, Sequence

from aiosmtpd.proxy_protocol import AF, PROTO, V2_CMD, V2_SIGNATURE, ProxyData

from .access import AccessControl, Network

# How a PROXY header starts: v1 with the word PROXY, v2 with its 12-byte signature. aiosmtpd
# decides on the first five bytes; so does the check of untrusted connections.
_STARTS = (b"PROXY", V2_SIGNATURE[:5])
_DECIDED_AFTER = 5


def client_ip(session: Any) -> str:
    """A session's client address: the one a listed balancer's PROXY header named, else the
    peer of the connection itself."""
    proxied = getattr(session, "proxied_ip", None)
    if proxied:
        return str(proxied)
    peer = getattr(session, "peer", None)
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


def starts_with_header(first: bytes) -> bool | None:
    """Whether the first bytes of a connection are a PROXY header: None while too few came to
    tell (they are a beginning of one)."""
    if len(first) >= _DECIDED_AFTER:
        return first[:_DECIDED_AFTER] in _STARTS
    if any(start.startswith(first) for start in _STARTS):
        return None
    return False


class ProxyProtocol:
    """``[smtp] proxy_protocol_from`` and ``proxy_protocol_timeout``, compiled."""

    def __init__(self, trusted: Sequence[Network], timeout: float) -> None:
        self._trusted = AccessControl(trusted)
        self.timeout = timeout

    def is_trusted(self, peer_ip: str) -> bool:
        """Connections from ``peer_ip`` must start with a PROXY header, and it is believed."""
        return self._trusted.is_allowed_network(peer_ip)

    @staticmethod
    def client_of(header: ProxyData) -> str | None:
        """The client address a valid header names; "" when it names none (LOCAL, UNKNOWN:
        the balancer's own connection); None for one the guard cannot serve (a datagram or
        Unix socket client)."""
        if header.command == V2_CMD.LOCAL or header.family == AF.UNSPEC:
            return ""
        if header.protocol != PROTO.STREAM or header.family not in (AF.INET, AF.INET6):
            return None
        return str(header.src_addr)

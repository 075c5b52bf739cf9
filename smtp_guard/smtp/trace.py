"""The Received: trace header the guard adds to every message it relays or holds.

RFC 5321 section 4.4 asks every relay to prepend one; its syntax is RFC 5322 section 3.6.7
(``received-token``s, then ``;`` and a date-time). The layout follows Postfix's, folded so
each line stays far below the 998-octet limit::

    Received: from client.example (unknown [192.0.2.1])
    \tby guard.example with ESMTPSA id 3f9a1c0b2d4e;
    \tTue, 24 Oct 2023 10:00:00 +0000

What it deliberately leaves out: the software's name (Postfix writes "(Postfix)"), and
Postfix's ``for <recipient>`` clause — the guard must not become one more copy of an address
in every message's headers. The client name is always ``unknown``: the guard looks up no
reverse DNS (its clients are a few known platforms on private networks, and a lookup per
connection would put DNS latency on the hot path for a name nobody checks).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from datetime import datetime, timezone
from email.utils import format_datetime

# A HELO name is whatever the client typed: keep what a domain or address literal may hold,
# so it can neither end the header nor open a comment.
_NOT_IN_HELO = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_MAX_HELO = 255  # RFC 1035 2.3.4: longest domain name


def received_header(*, helo: str, client_ip: str, hostname: str, protocol: str, txn_id: str,
                    when: float) -> bytes:
    """The complete header, CRLF-terminated, ready to prepend to the message."""
    helo = _NOT_IN_HELO.sub("?", helo)[:_MAX_HELO] or "unknown"
    date = _date(int(when))
    return (f"Received: from {helo} (unknown {_address_literal(client_ip)})\r\n"
            f"\tby {hostname} with {protocol} id {txn_id};\r\n"
            f"\t{date}\r\n").encode("ascii", "replace")


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    """RFC 5322 date of a whole second (the header shows no fraction): formatted once per
    second, not once per message."""
    return format_datetime(datetime.fromtimestamp(second, timezone.utc))


def protocol_name(*, extended: bool, tls: bool, authenticated: bool) -> str:
    """The ``with`` keyword: SMTP for HELO; ESMTP, ESMTPS, ESMTPA, ESMTPSA (RFC 3848) for EHLO."""
    if not extended:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def _address_literal(client_ip: str) -> str:
    """RFC 5321 4.1.3: ``[192.0.2.1]``, ``[IPv6:2001:db8::1]``."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return "[unknown]"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"[{address.ipv4_mapped}]"
        return f"[IPv6:{address.compressed}]"
    return f"[{address}]"

"""Relay access control: who may send through the guard (docs/design.md: not an open relay)."""

from __future__ import annotations

import ipaddress
from typing import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AccessControl:
    def __init__(self, allow_networks: Sequence[Network]) -> None:
        self._networks = tuple(allow_networks)

    def is_allowed_network(self, client_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    @staticmethod
    def is_loopback(client_ip: str) -> bool:
        try:
            return ipaddress.ip_address(client_ip).is_loopback
        except ValueError:
            return False

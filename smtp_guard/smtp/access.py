"""Relay access control: who may send through the guard (docs/design.md: not an open relay)."""

from __future__ import annotations

import functools
import ipaddress
from typing import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Client addresses whose verdict is remembered. Platforms connect from a handful of addresses,
# and parsing one is most of the cost of checking it (1-2 % of the CPU with one message per
# connection); the bound keeps a scan from many addresses from growing the memory.
VERDICTS_KEPT = 4096


class AccessControl:
    def __init__(self, allow_networks: Sequence[Network]) -> None:
        self._networks = tuple(allow_networks)
        self._verdicts: dict[str, bool] = {}

    def is_allowed_network(self, client_ip: str) -> bool:
        verdict = self._verdicts.get(client_ip)
        if verdict is None:
            verdict = self._judge(client_ip)
            if len(self._verdicts) >= VERDICTS_KEPT:
                self._verdicts.clear()
            self._verdicts[client_ip] = verdict
        return verdict

    def _judge(self, client_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    @staticmethod
    @functools.lru_cache(maxsize=VERDICTS_KEPT)
    def is_loopback(client_ip: str) -> bool:
        try:
            return ipaddress.ip_address(client_ip).is_loopback
        except ValueError:
            return False

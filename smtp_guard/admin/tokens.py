"""Who is calling the admin listener: the principal a presented token belongs to (tokens are
made by ``smtp-guard admin token create``, see ``api_tokens``)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Literal, Mapping

from ..api_tokens import hash_token
from ..config import AdminRole, AdminToken


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name and role, and whether through the API or the console;
    changes are recorded with the actor ``api:NAME`` or ``console:NAME``."""

    name: str
    role: AdminRole
    channel: Literal["api", "console"] = "api"

    @property
    def may_change(self) -> bool:
        return self.role == "admin"

    @property
    def actor(self) -> str:
        return f"{self.channel}:{self.name}"


class TokenCheck:
    """Finds the principal a presented token belongs to. Every configured hash is compared in
    constant time, so the answer's timing says nothing about which token nearly matched."""

    def __init__(self, tokens: Mapping[str, AdminToken]) -> None:
        self._tokens = [(name, entry.role, entry.hash.encode("ascii")) for name, entry in tokens.items()]

    def principal(self, presented: str) -> Principal | None:
        digest = hash_token(presented).encode("ascii")
        found = None
        for name, role, expected in self._tokens:
            if hmac.compare_digest(digest, expected):
                found = Principal(name, role)
        return found

"""Admin API tokens: made once, shown once, kept only as a hash.

A token is 32 random bytes (URL-safe base64 behind a recognizable ``sgt_`` prefix, so a leaked
one is easy to grep for). With that much entropy a plain SHA-256 is enough to keep the config
from being a credential: nobody can guess back from the hash, so a slow password hash (scrypt,
as for SMTP AUTH passwords) would only cost every request time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal, Mapping

from ..config import AdminRole, AdminToken

PREFIX = "sgt_"


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


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def config_line(name: str, role: AdminRole, token: str) -> str:
    """The ``[admin.tokens]`` line that lets ``token`` in."""
    return f'{name} = {{ role = "{role}", hash = "{hash_token(token)}" }}'


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

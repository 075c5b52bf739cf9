"""Admin API tokens: made once, shown once, kept only as a hash.

A token is 32 random bytes (URL-safe base64 behind a recognizable ``sgt_`` prefix, so a leaked
one is easy to grep for). With that much entropy a plain SHA-256 is enough to keep the config
from being a credential: nobody can guess back from the hash, so a slow password hash (scrypt,
as for SMTP AUTH passwords) would only cost every request time. Shared by the CLI, which makes
tokens, and the admin listener, which checks them.
"""

from __future__ import annotations

import hashlib
import secrets

from .config import AdminRole

PREFIX = "sgt_"


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def config_line(name: str, role: AdminRole, token: str) -> str:
    """The ``[admin.tokens]`` line that lets ``token`` in."""
    return f'{name} = {{ role = "{role}", hash = "{hash_token(token)}" }}'

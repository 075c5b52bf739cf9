"""SMTP AUTH credentials: scrypt hashes in the config, verified by aiosmtpd's authenticator hook."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Any, Mapping

from aiosmtpd.smtp import AuthResult, LoginPassword

# scrypt parameters: ~16 MiB and ~50 ms per check on a 2020s core; stored with each hash so
# they can be raised later without invalidating existing hashes.
_N, _R, _P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return "scrypt${}${}${}${}${}".format(
        _N, _R, _P, base64.b64encode(salt).decode(), base64.b64encode(digest).decode()
    )


def verify_password(password: bytes, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password, salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


class Authenticator:
    """aiosmtpd authenticator: PLAIN and LOGIN against the configured users."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = dict(users)

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        stored = self._users.get(user)
        # Spend the same work for unknown users so timing does not reveal which names exist.
        ok = verify_password(auth_data.password, stored or _DUMMY_HASH) and stored is not None
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)


_DUMMY_HASH = hash_password("not a real password")

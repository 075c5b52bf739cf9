"""SMTP AUTH: scrypt hashes in the config, verified by aiosmtpd's authenticator hook, and the
per-address throttle that stops password guessing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import deque
from typing import Any, Callable, Mapping

from aiosmtpd.smtp import AuthResult, LoginPassword

from .. import replies

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
        # Checked against for unknown users. Made here, not at import: a scrypt hash costs
        # ~50 ms and 16 MiB, which every guard process paid at start-up, AUTH configured or not.
        self._dummy_hash = hash_password("not a real password")

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        stored = self._users.get(user)
        # Spend the same work for unknown users so timing does not reveal which names exist.
        ok = verify_password(auth_data.password, stored or self._dummy_hash) and stored is not None
        if not ok:
            return AuthResult(success=False, handled=False, message=str(replies.AUTH_FAILED))
        return AuthResult(success=True, handled=False, auth_data=user)


class AuthThrottle:
    """Failed AUTH attempts per client address within a sliding window (password guessing).

    Once an address has ``max_failures`` failures within ``window`` seconds, ``is_throttled``
    says so until the oldest of them has left the window, and the listener refuses AUTH from
    it without checking a password at all (so guessing costs the guard no scrypt work). IPv6
    clients are counted per /64: one host usually owns the whole prefix and could otherwise
    rotate through addresses for free. ``clock`` is injected so tests move time by hand.
    """

    # Past this many tracked addresses, expired entries are swept on the next failure, so a
    # spread-out guessing campaign cannot grow the table without bound.
    SWEEP_ABOVE = 10_000

    def __init__(self, max_failures: int, window: float, clock: Callable[[], float] = time.time) -> None:
        self._max = max(1, max_failures)
        self._window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def record_failure(self, client_ip: str) -> None:
        now = self._clock()
        if len(self._failures) > self.SWEEP_ABOVE:
            self._failures = {key: times for key, times in self._failures.items() if now - times[-1] < self._window}
        times = self._failures.setdefault(_client_key(client_ip), deque(maxlen=self._max))
        times.append(now)

    def is_throttled(self, client_ip: str) -> bool:
        times = self._failures.get(_client_key(client_ip))
        return times is not None and len(times) == self._max and self._clock() - times[0] < self._window


def _client_key(client_ip: str) -> str:
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else address)

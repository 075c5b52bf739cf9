"""Console sessions and their forgery protection.

A login exchanges an admin token for a session: a random id in a cookie (HttpOnly,
SameSite=Strict, Secure over TLS) naming a record kept only in this process's memory, so a
restart logs everybody out and nothing about a session is ever written to disk. A session
ends ``[admin] session_lifetime`` after the login, or at logout.

Every POST must carry the session's CSRF token in a form field (compared in constant time),
and a POST that the browser says comes from another origin (``Origin``, ``Sec-Fetch-Site``) is
refused before its form is read: SameSite=Strict already keeps the cookie off cross-site
requests, and these two keep a page on another port or subdomain of the same site from
posting either.
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Literal
from urllib.parse import urlsplit

from aiohttp import web

from .tokens import Principal

COOKIE = "smtp_guard_session"
CSRF_FIELD = "csrf"
MAX_SESSIONS = 10_000  # past this, the oldest logins are ended first

FlashLevel = Literal["ok", "warn"]


@dataclass(frozen=True)
class Flash:
    """A one-time message shown on the next page (after a change's redirect)."""

    level: FlashLevel
    text: str


@dataclass
class Session:
    id: str
    principal: Principal  # channel "console": changes are recorded as console:NAME
    csrf_token: str
    expires_at: float
    flashes: list[Flash] = field(default_factory=list)

    def flash(self, text: str, level: FlashLevel = "ok") -> None:
        self.flashes.append(Flash(level, text))

    def take_flashes(self) -> list[Flash]:
        taken, self.flashes = self.flashes, []
        return taken


class SessionStore:
    def __init__(self, lifetime: float, secure: bool, clock: Callable[[], float] = time.time) -> None:
        self.lifetime = lifetime
        self.secure = secure  # the listener serves TLS: the cookie is sent over HTTPS only
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, who: Principal) -> Session:
        now = self._clock()
        self._sessions = {key: s for key, s in self._sessions.items() if s.expires_at > now}
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]  # dicts keep insertion (login) order
        session = Session(secrets.token_urlsafe(32), dataclasses.replace(who, channel="console"),
                          secrets.token_urlsafe(32), now + self.lifetime)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id; None for no id, an unknown one, or an expired one."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires_at <= self._clock():
            del self._sessions[session_id]
            return None
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def set_cookie(self, response: web.StreamResponse, session: Session) -> None:
        response.set_cookie(COOKIE, session.id, max_age=int(self.lifetime), path="/", httponly=True,
                            samesite="Strict", secure=self.secure)

    def clear_cookie(self, response: web.StreamResponse) -> None:
        response.del_cookie(COOKIE, path="/", httponly=True, samesite="Strict", secure=self.secure)


def has_csrf_token(session: Session, presented: object) -> bool:
    return isinstance(presented, str) and hmac.compare_digest(presented.encode(), session.csrf_token.encode())


def is_cross_origin(request: web.Request) -> bool:
    """The browser says the request comes from a page of another origin: ``Origin`` names
    another scheme, host or port, or ``Sec-Fetch-Site`` says ``cross-site`` or ``same-site``.

    ``Origin: null`` is not judged: a browser sends it for the console's own forms, because the
    console's ``Referrer-Policy: no-referrer`` also hides the origin of a POST (Fetch standard,
    "serializing a request origin"). Neither is a request without these headers. The CSRF
    token still guards both, and the SameSite=Strict cookie is not sent cross-site anyway.
    """
    if request.headers.get("Sec-Fetch-Site", "same-origin").lower() in ("cross-site", "same-site"):
        return True
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return False
    parts = urlsplit(origin)
    if not parts.scheme or not parts.netloc:
        return True
    return (parts.scheme.lower(), _with_port(parts.scheme, parts.netloc)) != (
        request.scheme.lower(), _with_port(request.scheme, request.host))


def _with_port(scheme: str, host: str) -> str:
    host = host.lower()
    if host.endswith("]") or ":" not in host:  # no port: the scheme's default
        return f"{host}:{443 if scheme.lower() == 'https' else 80}"
    return host


SESSIONS = web.AppKey("sessions", SessionStore)
SESSION = web.RequestKey("session", Session)

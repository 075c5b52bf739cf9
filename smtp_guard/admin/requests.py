"""What every admin handler (API and console) takes from a request: who is calling, the
admin context to act with, validated input, and the "in force" report after a change."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from aiohttp import web

from ..config import Config
from ..metrics import Metrics
from ..services import propagation
from ..services.context import AdminContext
from ..smtp.auth import AuthThrottle
from .problems import Problem, bad_input, malformed
from .tokens import Principal, TokenCheck

if TYPE_CHECKING:  # imports.py reports "in force" with this module's in_force
    from .imports import ImportJobs

ContextFactory = Callable[[str], AdminContext]  # actor -> context on the guard's own backends

CONFIG = web.AppKey("config", Config)
CONTEXTS: web.AppKey[ContextFactory] = web.AppKey("contexts")
JOBS: web.AppKey[ImportJobs] = web.AppKey("jobs")
METRICS = web.AppKey("metrics", Metrics)
# The API's bearer check and the console's login share both: a failed login counts the same.
TOKENS = web.AppKey("tokens", TokenCheck)
THROTTLE = web.AppKey("throttle", AuthThrottle)
PRINCIPAL = web.RequestKey("principal", Principal)  # set by the bearer check or the console's session


def principal(request: web.Request) -> Principal:
    found = request.get(PRINCIPAL)
    if not isinstance(found, Principal):  # a route reached without authentication is a bug
        raise RuntimeError(f"{request.path} reached without a principal")
    return found


def require_admin(request: web.Request) -> Principal:
    who = principal(request)
    if not who.may_change:
        raise Problem(403, "Forbidden", f"token {who.name!r} has role {who.role!r}; this needs role 'admin'")
    return who


def context(request: web.Request) -> AdminContext:
    return request.app[CONTEXTS](principal(request).actor)


async def json_object(request: web.Request, allowed: set[str],
                      required: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """The request's JSON object; an unknown member is refused (a typo must not be ignored)."""
    if request.content_type != "application/json":
        raise Problem(415, "Unsupported media type", "send the body as application/json")
    try:
        body = json.loads(await request.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise malformed(f"the body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise malformed("the body must be a JSON object")
    for name in body:
        if name not in allowed:
            raise bad_input(name, f"unknown field; known fields are {', '.join(sorted(allowed))}")
    for name in sorted(required - body.keys()):
        raise bad_input(name, "required")
    for name, value in body.items():
        if not _is_unicode(value):
            raise bad_input(name, "holds text that is not valid Unicode (an unpaired surrogate such as \\ud800)")
    return body


def _is_unicode(value: Any) -> bool:
    """JSON can escape an unpaired surrogate (RFC 8259 section 8.2), which no UTF-8 store or
    log takes: refused here rather than failing on its way to the disk."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def optional_json_object(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    """Like ``json_object``, for a route whose body may be left out (an empty object then)."""
    if not request.body_exists:
        return {}
    return await json_object(request, allowed)


def string(body: Mapping[str, Any], name: str, default: str | None = None, max_length: int = 1000) -> str:
    value = body.get(name, default)
    if not isinstance(value, str):
        raise bad_input(name, "required" if value is None else "must be a string")
    if len(value) > max_length:
        raise bad_input(name, f"longer than {max_length} characters")
    return value


def strings(body: Mapping[str, Any], name: str, max_items: int = 10_000) -> list[str]:
    value = body.get(name)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise bad_input(name, "must be a string or a non-empty list of strings")
    if len(value) > max_items:
        raise bad_input(name, f"more than {max_items} items; use the import for more")
    return value


def integer(value: Any, name: str, minimum: int, maximum: int) -> int:
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise bad_input(name, f"{value!r} is not an integer") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_input(name, "must be an integer")
    if not minimum <= value <= maximum:
        raise bad_input(name, f"must be between {minimum} and {maximum}")
    return value


@dataclass(frozen=True)
class InForce:
    """Whether every guard running on the store enforces a change (as the CLI reports it)."""

    confirmed: int
    unconfirmed: list[str]
    silent: list[str]

    @classmethod
    def of(cls, result: propagation.Propagation) -> InForce:
        return cls(len(result.confirmed), [i.name for i in result.unconfirmed], [i.name for i in result.silent])

    def as_json(self) -> dict[str, Any]:
        return {"confirmed": self.confirmed, "unconfirmed": self.unconfirmed, "silent": self.silent,
                "all_confirmed": not self.unconfirmed}


async def in_force(ctx: AdminContext) -> InForce:
    """Wait, like a CLI command, until every running guard confirmed the change just committed."""
    return InForce.of(await propagation.in_force(ctx.changes, ctx.config.store.confirm_timeout, ctx.clock))

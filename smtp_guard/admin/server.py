"""The admin listener (``[admin] listen``): the API under ``/api/v1/``, the web console at
``/``, and ``/healthz`` + ``/readyz``, in the guard's own event loop.

It acts on the guard's own backends through the same ``services`` as the CLI, so an API or
console change takes the CLI's path: committed, then confirmed "in force" by every running
guard before the response returns. Middleware, outermost first: metrics (route template and
status), errors (RFC 7807 problem details under /api/, HTML pages elsewhere, the console's
security headers on every non-API response), the bearer-token check for /api/, the console's
session and CSRF check for the rest; a client that keeps failing to authenticate (bad token or
failed login alike) is throttled.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Awaitable, Callable

from aiohttp import web

from ..config import Config
from ..http_site import Site, add_health_routes
from ..metrics import Metrics
from ..readiness import Readiness
from ..smtp.auth import AuthThrottle
from . import api, console
from .imports import ImportJobs
from .problems import Problem
from .requests import CONFIG, CONTEXTS, JOBS, METRICS, PRINCIPAL, THROTTLE, TOKENS, ContextFactory
from .sessions import SessionStore
from .tokens import TokenCheck

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminListener:
    def __init__(self, config: Config, contexts: ContextFactory, readiness: Readiness, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        admin = config.admin
        self._config = config
        self.jobs = ImportJobs(Path(config.store.data_dir) / "uploads", admin.max_upload, clock)
        app = web.Application(middlewares=[_observe, _errors, _authenticate, console.authenticate])
        app[CONFIG] = config
        app[CONTEXTS] = contexts
        app[JOBS] = self.jobs
        app[METRICS] = metrics
        app[TOKENS] = TokenCheck(admin.tokens)
        app[THROTTLE] = AuthThrottle(admin.auth_max_failures, admin.auth_failure_window, clock)
        add_health_routes(app, readiness)
        api.add_routes(app)
        console.add_routes(app, SessionStore(admin.session_lifetime, admin.tls_enabled, clock))
        self.app = app
        self._site = Site(app)

    async def start(self) -> None:
        admin = self._config.admin
        assert admin.listen is not None
        if not admin.tokens:
            log.warning("[admin] listen is set but [admin.tokens] is empty: the API and console refuse every "
                        "request; create a token with `smtp-guard admin token create NAME --role admin`")
        await self._site.start(admin.listen, "admin", admin.tls_cert, admin.tls_key)
        log.info("admin API and console on %s://%s", "https" if admin.tls_enabled else "http",
                 self._site.address_text)

    @property
    def address(self) -> tuple[str, int] | None:
        return self._site.address

    async def stop(self) -> None:
        await self.jobs.close()
        await self._site.stop()


def _route(request: web.Request) -> str:
    """A bounded label: the route's template (/api/v1/holds/{id}), never the path itself."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as error:
        status = error.status
        raise
    finally:
        request.app[METRICS].admin_requests.labels(request.method, _route(request), str(status)).inc()


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    is_api = request.path.startswith("/api/")
    try:
        response = await handler(request)
    except Problem as refused:
        if refused.status in (401, 403, 429):
            request.app[METRICS].admin_auth_failures.labels(_reason(refused)).inc()
        response = refused.response() if is_api else console.error_page(
            request, refused.status, refused.title, refused.detail, refused.headers)
    except web.HTTPException as error:
        if not is_api:
            response = console.http_error_page(request, error)
        elif error.status < 400:
            raise
        else:
            field = "body" if error.status == 413 else None
            response = Problem(error.status, error.reason, f"{request.method} {request.path}: {error.reason}",
                               field=field).response()
    except Exception:
        log.exception("admin request %s %s failed", request.method, request.path)
        title, detail = "Internal error", "the guard could not complete this request; its log says why"
        response = Problem(500, title, detail).response() if is_api else console.error_page(
            request, 500, title, detail.capitalize() + ".")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Cache-Control", "no-store")
    if not is_api:
        console.harden(response)
    return response


def _reason(problem: Problem) -> str:
    return {401: "invalid" if problem.extra.get("token_presented") else "missing", 403: "forbidden",
            429: "throttled"}[problem.status]


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer tokens for /api/ (``console.authenticate`` checks the console's session cookie)."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    throttle = request.app[THROTTLE]
    client = request.remote or ""
    if throttle.is_throttled(client):
        window = request.app[CONFIG].admin.auth_failure_window
        raise Problem(429, "Too many failed logins", f"too many failed logins from {client}; wait and retry "
                      "with a valid token", headers={"Retry-After": str(int(window))})
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    who = request.app[TOKENS].principal(token) if scheme.lower() == "bearer" and token else None
    if who is None:
        throttle.record_failure(client)
        detail = ("the token is not valid (not in [admin.tokens])" if token
                  else "send Authorization: Bearer TOKEN (smtp-guard admin token create makes one)")
        raise Problem(401, "Unauthorized", detail, token_presented=bool(token),
                      headers={"WWW-Authenticate": 'Bearer realm="smtp-guard"'})
    request[PRINCIPAL] = who
    return await handler(request)

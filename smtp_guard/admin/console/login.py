"""Logging in and out, and the session check every console request passes.

A login posts an admin token, checked by the API's own TokenCheck; a wrong or missing token
counts toward the same per-address throttle as a wrong bearer token and the same
``admin_auth_failures`` metric. The check (``authenticate``) lets public paths through,
refuses cross-origin POSTs, sends a browser without a live session to the login page, and
checks the CSRF token of every other POST before its handler runs.
"""

from __future__ import annotations

import logging
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.typedefs import Handler

from ..problems import Problem
from ..requests import CONFIG, METRICS, PRINCIPAL, THROTTLE, TOKENS
from ..sessions import COOKIE, CSRF_FIELD, SESSION, SESSIONS, has_csrf_token, is_cross_origin
from .forms import posted
from .pages import local_path, redirect, render

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/login", "/healthz", "/readyz"})
STATIC_PREFIX = "/static/"
# Paths whose POST is multipart (a file upload): the handler checks the CSRF field itself, as
# the first part, before it reads the file.
MULTIPART_PATHS = frozenset({"/imports"})
NOTICES = {
    "expired": "Your session has ended. Log in again to continue.",
    "out": "You are logged out.",
}


def add_routes(app: web.Application) -> None:
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/api/"):  # the API checks its bearer token
        return await handler(request)
    if request.method == "POST" and is_cross_origin(request):
        raise web.HTTPForbidden(text="This form was sent from a page of another site and is refused. "
                                     "Open the console itself and submit it there.")
    if request.path in PUBLIC_PATHS or request.path.startswith(STATIC_PREFIX):
        return await handler(request)
    sessions = request.app[SESSIONS]
    cookie = request.cookies.get(COOKIE)
    session = sessions.get(cookie)
    if session is None:
        query = {"next": request.path_qs} if request.method == "GET" and request.path != "/" else {}
        if cookie:
            query["m"] = "expired"
        response = redirect("/login" + (f"?{urlencode(query)}" if query else ""))
        if cookie:
            sessions.clear_cookie(response)
        return response
    request[SESSION] = session
    request[PRINCIPAL] = session.principal
    if request.method not in ("GET", "HEAD") and request.match_info.http_exception is None:  # else 404/405
        if request.content_type == "application/x-www-form-urlencoded":
            if not has_csrf_token(session, (await request.post()).get(CSRF_FIELD)):
                raise csrf_refused()
        elif not (request.content_type == "multipart/form-data" and request.path in MULTIPART_PATHS):
            raise web.HTTPUnsupportedMediaType(text="Console forms are sent as web forms; use the API "
                                                    "(/api/v1/) for anything else.")
    return await handler(request)


def csrf_refused() -> web.HTTPForbidden:
    return web.HTTPForbidden(text="This form is out of date or was not sent by the console (its security token "
                                  "does not match your session). Nothing was changed; open the page again and "
                                  "resubmit.")


async def login_page(request: web.Request) -> web.StreamResponse:
    next_path = local_path(request.query.get("next"), "/")
    if request.app[SESSIONS].get(request.cookies.get(COOKIE)) is not None:
        return redirect(next_path)
    return render(request, "login.html", next_path=next_path, notice=NOTICES.get(request.query.get("m", "")),
                  error=None)


async def login(request: web.Request) -> web.StreamResponse:
    throttle = request.app[THROTTLE]
    client = request.remote or ""
    if throttle.is_throttled(client):
        window = request.app[CONFIG].admin.auth_failure_window
        raise Problem(429, "Too many failed logins", f"Too many failed logins from {client}. Wait "
                      f"{int(window)} seconds, then log in with a valid token.", headers={"Retry-After": str(int(window))})
    form = await posted(request)
    token = form.value("token").strip()
    next_path = local_path(form.value("next"), "/")
    who = request.app[TOKENS].principal(token) if token else None
    if who is None:
        throttle.record_failure(client)
        request.app[METRICS].admin_auth_failures.labels("invalid" if token else "missing").inc()
        error = ("This token is not valid (it is not in [admin.tokens])." if token else
                 "Enter an admin token (smtp-guard admin token create NAME makes one).")
        return render(request, "login.html", status=401, next_path=next_path, notice=None, error=error)
    sessions = request.app[SESSIONS]
    if (previous := request.cookies.get(COOKIE)) is not None:
        sessions.end(previous)
    session = sessions.create(who)
    log.info("console login with token %r (role %s) from %s", who.name, who.role, client)
    response = redirect(next_path if next_path != "/login" else "/")
    sessions.set_cookie(response, session)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    sessions = request.app[SESSIONS]
    session = request[SESSION]
    sessions.end(session.id)
    response = redirect("/login?m=out")
    sessions.clear_cookie(response)
    return response

"""The web console at ``/`` of the admin listener: server-rendered pages (Jinja2, no script) for
the tasks of the CLI, through the same ``services`` functions, as the token's name
(``console:NAME``).

One module per area: ``login`` (login, logout, the session check), ``suppressions`` (lists and
``check``), ``uploads`` (imports), ``holds``, ``breakers``, ``erasures``, ``audit``; ``pages``
renders and ``forms`` reads what a form sent. Templates and the one stylesheet live beside them.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from ..sessions import SESSIONS, SessionStore
from . import audit, breakers, erasures, holds, login, suppressions, uploads
from .login import authenticate
from .pages import error_page, harden, http_error_page, redirect

__all__ = ["add_routes", "authenticate", "error_page", "harden", "http_error_page"]

_STATIC_TYPES = {".css": "text/css", ".svg": "image/svg+xml"}  # served with charset utf-8


def add_routes(app: web.Application, sessions: SessionStore) -> None:
    app[SESSIONS] = sessions
    app.router.add_get("/", home)
    app.router.add_get("/static/{name}", static_file)
    for area in (login, suppressions, uploads, holds, breakers, erasures, audit):
        area.add_routes(app)


async def home(request: web.Request) -> web.Response:
    return redirect("/suppressions")


def _static_files() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("smtp_guard.admin.console").joinpath("static")
    return {entry.name: (entry.read_bytes(), _STATIC_TYPES[entry.name[entry.name.rfind("."):]])
            for entry in folder.iterdir() if entry.name[entry.name.rfind("."):] in _STATIC_TYPES}


_STATIC = _static_files()


async def static_file(request: web.Request) -> web.Response:
    """The stylesheet and icon, read once at import; nothing else is served from disk."""
    found = _STATIC.get(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound()
    body, content_type = found
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers={"Cache-Control": "no-cache"})

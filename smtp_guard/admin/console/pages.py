"""Rendering console pages: the Jinja2 environment, the headers every console response carries,
redirects after a change with its "in force" message, and HTML error pages.

Templates autoescape everything (there is no ``|safe`` anywhere): whatever a held message, an
import file or an operator typed is shown as text. The page needs no script at all, so the
Content-Security-Policy allows none, and only the console's own stylesheet and images.
"""

from __future__ import annotations

import html
from typing import Any, Mapping
from urllib.parse import quote

from aiohttp import web
from jinja2 import Environment, PackageLoader, StrictUndefined

from ...config import ListConfig
from ...services.audit import format_time
from ...services.context import AdminContext
from ..requests import InForce, in_force
from ..sessions import SESSION, FlashLevel, Session

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}

# The main navigation: (path, label). A page is "current" when its path starts with the entry's.
NAV = (
    ("/suppressions", "Suppressions"),
    ("/check", "Check"),
    ("/imports", "Imports"),
    ("/holds", "Held mail"),
    ("/breakers", "Stopped streams"),
    ("/erasures", "Erasure"),
    ("/audit", "Audit"),
)

ENV = Environment(loader=PackageLoader("smtp_guard.admin.console", "templates"), autoescape=True,
                  undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
ENV.filters["time"] = format_time
ENV.filters["quote"] = lambda text: quote(str(text), safe="")


def list_choices(lists: Mapping[str, ListConfig], blank: str = "", described: bool = True) -> list[tuple[str, str]]:
    """(value, label) options for a list <select>; ``blank`` labels the no-choice option."""
    choices = [("", blank)] if blank else []
    return choices + [(name, f"{name} — {config.description}" if config.description and described else name)
                      for name, config in lists.items()]


ENV.globals["list_choices"] = list_choices


def harden(response: web.StreamResponse) -> None:
    """The headers every console response carries, error pages and redirects included."""
    response.headers.update(SECURITY_HEADERS)


def session(request: web.Request) -> Session:
    found = request.get(SESSION)
    if not isinstance(found, Session):  # a console route reached without a session is a bug
        raise RuntimeError(f"{request.path} reached without a session")
    return found


def render(request: web.Request, template: str, *, status: int = 200, headers: Mapping[str, str] | None = None,
           **values: Any) -> web.Response:
    current = request.get(SESSION)
    section = next((path for path, _ in NAV if request.path.startswith(path)), "")
    text = ENV.get_template(template).render(
        who=current.principal if current else None, csrf=current.csrf_token if current else "",
        flashes=current.take_flashes() if current else [], nav=NAV, section=section, **values)
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8", headers=headers)


def redirect(location: str) -> web.Response:
    """303 See Other: the browser follows with a GET (post/redirect/get)."""
    return web.Response(status=303, headers={"Location": location})


def local_path(candidate: object, default: str, prefix: str = "/") -> str:
    """``candidate`` when it is a path on this listener under ``prefix``, else ``default``: a
    redirect target taken from a form or query must never lead off the console."""
    if (isinstance(candidate, str) and candidate.startswith(prefix) and candidate.startswith("/")
            and not candidate.startswith("//") and "\\" not in candidate and not any(c < " " for c in candidate)):
        return candidate
    return default


async def changed(request: web.Request, ctx: AdminContext, done: str) -> None:
    """After a change committed: wait until every running guard enforces it (as the CLI does),
    then tell the admin on the next page what was done and where it is in force."""
    text, level = in_force_text(await in_force(ctx))
    session(request).flash(f"{done} {text}", level)


def in_force_text(report: InForce) -> tuple[str, FlashLevel]:
    running = report.confirmed + len(report.unconfirmed)
    silent = "".join(f" Guard {name} sent no heartbeat lately and was not waited for; if it still runs, it does "
                     "not enforce this yet." for name in report.silent)
    if report.unconfirmed:
        return (f"In force on {report.confirmed} of {running} running guards; not confirmed by "
                f"{', '.join(report.unconfirmed)}, which may not enforce it yet.{silent}", "warn")
    if not running:
        return f"No running guard uses this store; it applies when one starts.{silent}", "warn"
    return f"In force on {running} guard{'s' if running != 1 else ''}.{silent}", "warn" if silent else "ok"


def error_page(request: web.Request, status: int, title: str, detail: str,
               headers: Mapping[str, str] | None = None) -> web.Response:
    try:
        return render(request, "error.html", status=status, headers=headers, status_code=status, title=title,
                      detail=detail)
    except Exception:  # the error page itself must not fail: plain escaped HTML
        body = f"<!doctype html><title>{status}</title><h1>{html.escape(title)}</h1><p>{html.escape(detail)}</p>"
        return web.Response(text=body, status=status, content_type="text/html", headers=headers)


_DETAILS = {
    404: "There is no page at this address. Use the navigation above.",
    405: "This page cannot be used that way.",
    413: "The request is larger than this listener accepts.",
}


def http_error_page(request: web.Request, error: web.HTTPException) -> web.Response:
    """An aiohttp HTTPException (404 from the router, 413, a refusal raised by a handler) as a
    console page; a redirect stays a redirect."""
    if error.status < 400:
        location = error.headers.get("Location")
        return web.Response(status=error.status, headers={"Location": location} if location else None)
    detail = error.text if error.text and not error.text.startswith(f"{error.status}:") else \
        _DETAILS.get(error.status, error.reason)
    return error_page(request, error.status, error.reason, detail or error.reason)

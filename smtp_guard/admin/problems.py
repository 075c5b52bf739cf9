"""RFC 7807 problem details: every error the admin API answers, in one shape.

``{"type", "title", "status", "detail"}`` plus, for bad input, ``field`` naming what to fix
(a JSON member, a query parameter, a form field or the upload) so a client can point at it.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

CONTENT_TYPE = "application/problem+json"
_TYPE_BASE = "https://smtp-guard.invalid/problems/"  # documentation anchors, never fetched


class Problem(Exception):
    """Raised by a handler; the error middleware turns it into the response."""

    def __init__(self, status: int, title: str, detail: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": _TYPE_BASE + self.title.lower().replace(" ", "-"), "title": self.title,
                                "status": self.status, "detail": self.detail}
        if self.field is not None:
            body["field"] = self.field
        body.update(self.extra)
        return body

    def response(self) -> web.Response:
        return web.Response(status=self.status, text=json.dumps(self.body()), content_type=CONTENT_TYPE,
                            headers=self.headers)


def bad_input(field: str, detail: str) -> Problem:
    """422: the request was well-formed but ``field`` holds a value the guard cannot take."""
    return Problem(422, "Invalid field", f"{field}: {detail}", field=field)


def malformed(detail: str, field: str | None = None) -> Problem:
    """400: the request itself could not be read (not JSON, not a JSON object, bad encoding)."""
    return Problem(400, "Malformed request", detail, field=field)


def not_found(what: str, field: str | None = None) -> Problem:
    return Problem(404, "Not found", what, field=field)

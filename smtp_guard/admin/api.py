"""The admin API under ``/api/v1/``: JSON in and out, one handler per operation, each calling the
same ``services`` function as the CLI command of the same name. One module per resource; this
one puts their routes together and serves the OpenAPI document that describes them all.

Every changing route needs role ``admin``, returns only after the change is in force on every
running guard (``in_force`` in the response, as the CLI reports it), and refuses bad input
whole with a problem naming the field, before anything is written. A query parameter a route
does not know is refused like an unknown JSON member.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from . import api_audit, api_breakers, api_erasures, api_holds, api_imports, api_suppressions
from .query import Query

PREFIX = "/api/v1"
# In the package (pyproject's package-data); tests/test_admin_api_openapi.py keeps it and the
# routes in step.
OPENAPI = web.AppKey("openapi", bytes)


def add_routes(app: web.Application) -> None:
    app[OPENAPI] = resources.files(__package__).joinpath("openapi.json").read_bytes()
    app.router.add_routes([
        *api_suppressions.routes(PREFIX),
        *api_imports.routes(PREFIX),
        *api_erasures.routes(PREFIX),
        *api_holds.routes(PREFIX),
        *api_breakers.routes(PREFIX),
        *api_audit.routes(PREFIX),
        web.get(f"{PREFIX}/openapi.json", openapi, allow_head=False),
    ])


async def openapi(request: web.Request) -> web.Response:
    """GET /openapi.json: the OpenAPI 3.1 document of this API."""
    Query(request, ())
    return web.Response(body=request.app[OPENAPI], content_type="application/json")

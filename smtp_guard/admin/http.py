"""The metrics and health listener: ``GET /metrics``, ``/healthz``, ``/readyz`` (aiohttp).

Kept off the SMTP port so a scrape or a load balancer's probe never competes with mail.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..config import ListenAddress
from ..http_site import Site, add_health_routes
from ..readiness import Readiness


class HTTPListener:
    def __init__(self, registry: CollectorRegistry, readiness: Readiness) -> None:
        self._registry = registry
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        add_health_routes(app, readiness)
        self.app = app
        self._site = Site(app)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self, listen: ListenAddress) -> None:
        await self._site.start(listen, "metrics")

    @property
    def address(self) -> tuple[str, int] | None:
        return self._site.address

    async def stop(self) -> None:
        await self._site.stop()

"""The metrics and health listener: ``GET /metrics``, ``/healthz``, ``/readyz`` (aiohttp).

Kept off the SMTP port so a scrape or a load balancer's probe never competes with mail.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..readiness import Readiness


class HTTPListener:
    def __init__(self, registry: CollectorRegistry, readiness: Readiness) -> None:
        self._registry = registry
        self._readiness = readiness
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self.app = app

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        # Liveness: the event loop answers.
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        # Readiness: index loaded, SMTP listening (not shutting down), the store answers and the
        # upstream accepted its last probe. One line per check says what to fix.
        ready = self._readiness.is_ready
        lines = ["ready" if ready else "not ready", *map(str, self._readiness.checks())]
        return web.Response(status=200 if ready else 503, text="\n".join(lines) + "\n")

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, host, port)
        await self._site.start()

    @property
    def address(self) -> tuple[str, int] | None:
        if self._runner is None or not self._runner.addresses:
            return None
        host, port = self._runner.addresses[0][:2]
        return host, port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

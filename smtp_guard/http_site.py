"""One aiohttp application served on one address: what the metrics, admin and unsubscribe
listeners share (start with errors that name the setting, optional HTTPS, the bound address,
stop), and the health routes a load balancer or orchestrator probes."""

from __future__ import annotations

import ssl

from aiohttp import web

from .config import ListenAddress
from .readiness import Readiness
from .startup import naming_setting


class Site:
    def __init__(self, app: web.Application) -> None:
        self.app = app
        self._runner: web.AppRunner | None = None

    async def start(self, listen: ListenAddress, section: str, tls_cert: str = "", tls_key: str = "") -> None:
        """Bind ``listen`` (from ``[section]``); HTTPS when a certificate and key are given."""
        tls = None
        if tls_cert and tls_key:
            with naming_setting(f"[{section}] tls_cert {tls_cert} / tls_key {tls_key}", True, OSError):
                tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                tls.load_cert_chain(tls_cert, tls_key)
        # A request still running at stop gets two seconds: the guard's own shutdown waits on it.
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        with naming_setting(f"[{section}] listen {listen}", True, OSError):
            await web.TCPSite(self._runner, listen.host, listen.port, ssl_context=tls).start()

    @property
    def address(self) -> tuple[str, int] | None:
        if self._runner is None or not self._runner.addresses:
            return None
        host, port = self._runner.addresses[0][:2]
        return host, port

    @property
    def address_text(self) -> str:
        host, port = self.address or ("?", 0)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def add_health_routes(app: web.Application, readiness: Readiness) -> None:
    """``/healthz``: the event loop answers. ``/readyz``: every readiness check passes (index
    loaded, listener up, store answers, upstream probed); one line per check says what to fix."""

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        ready = readiness.is_ready
        lines = ["ready" if ready else "not ready", *map(str, readiness.checks())]
        return web.Response(status=200 if ready else 503, text="\n".join(lines) + "\n")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

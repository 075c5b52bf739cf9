"""The one-click unsubscribe listener (``[unsubscribe] listen``), reachable from the internet.

``POST {base}/u/TOKEN`` (RFC 8058: a mailbox provider's one-click, or the confirmation page's
button) unsubscribes and answers once the unsubscribe is in force; ``GET`` only shows a page
with that button, because link scanners and previews fetch every URL in a message and must
never unsubscribe anyone. The pages never show the address. A token that does not open gets
400 (altered, forged) or 410 (expired), and a store that cannot take it 503, never a 200.
"""

from __future__ import annotations

import html
import logging
from urllib.parse import urlsplit

from aiohttp import web

from ..config import UnsubscribeConfig
from ..http_site import Site
from .service import Outcome, Unsubscriber

log = logging.getLogger(__name__)

_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
_REFUSED = {
    "malformed": (400, "This unsubscribe link is not valid", "It may have been cut or altered. Use the "
                  "unsubscribe link in the message itself, or contact the sender."),
    "forged": (400, "This unsubscribe link is not valid", "It may have been cut or altered. Use the "
               "unsubscribe link in the message itself, or contact the sender."),
    "expired": (410, "This unsubscribe link has expired", "Use the unsubscribe link in a more recent "
                "message, or contact the sender."),
    "unavailable": (503, "Please try again in a minute", "Your request could not be recorded just now."),
}


class UnsubscribeListener:
    def __init__(self, config: UnsubscribeConfig, unsubscriber: Unsubscriber) -> None:
        self._config = config
        self._unsubscriber = unsubscriber
        prefix = urlsplit(config.base_url).path.rstrip("/")
        app = web.Application(client_max_size=4096)  # a one-click body is 26 bytes
        app.router.add_get(f"{prefix}/u/{{token}}", self._confirm_page)
        app.router.add_post(f"{prefix}/u/{{token}}", self._unsubscribe)
        app.router.add_get("/healthz", self._healthz)
        self.app = app
        self._site = Site(app)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _confirm_page(self, request: web.Request) -> web.Response:
        # Changes nothing: the button POSTs the same body a mailbox provider's one-click sends.
        return _page(200, "Unsubscribe?", "Press the button to stop receiving this mail.",
                     form='<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
                          '<button type="submit">Unsubscribe</button></form>')

    async def _unsubscribe(self, request: web.Request) -> web.Response:
        outcome: Outcome = await self._unsubscriber.apply(request.match_info["token"], "one_click")
        if outcome.done:
            return _page(200, "You are unsubscribed", "You will not receive this mail any more.")
        status, title, text = _REFUSED[outcome.result]
        response = _page(status, title, text)
        if status == 503:
            response.headers["Retry-After"] = "60"
        return response

    async def start(self) -> None:
        config = self._config
        assert config.listen is not None
        await self._site.start(config.listen, "unsubscribe", config.tls_cert, config.tls_key)
        log.info("one-click unsubscribe on %s (links %s/u/…)", self._site.address_text, config.base_url.rstrip("/"))

    @property
    def address(self) -> tuple[str, int] | None:
        return self._site.address

    async def stop(self) -> None:
        await self._site.stop()


def _page(status: int, title: str, text: str, form: str = "") -> web.Response:
    body = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{html.escape(title)}</title>'
            '<style>body{font:1.1rem/1.5 system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem}'
            'button{font:inherit;padding:.5rem 1.5rem}</style></head>'
            f'<body><main><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>{form}</main></body></html>')
    return web.Response(status=status, text=body, content_type="text/html", headers=_HEADERS)

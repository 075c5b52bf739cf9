"""A browser-like HTTP client for the web console (aiohttp, real loopback): it keeps the session
cookie, reads the CSRF token from the page it last loaded, and does not follow redirects, so a
test sees each 303 and where it leads.

``console = await open_console(admin)`` on an ``AdminAPI`` from the ``start_admin`` fixture;
``await console.login()`` logs in with the admin token (``login(admin.viewer_token)`` as viewer).
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp

from admin_client import AdminAPI

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Page:
    status: int
    text: str
    response: aiohttp.ClientResponse

    @property
    def location(self) -> str:
        return self.response.headers.get("Location", "")


@dataclass
class Console:
    admin: AdminAPI
    http: aiohttp.ClientSession
    ssl_context: ssl.SSLContext | None = None
    csrf: str = ""

    def url(self, path: str) -> str:
        return self.admin.url(path)

    async def request(self, method: str, path: str, **kwargs: Any) -> Page:
        kwargs.setdefault("allow_redirects", False)
        if self.ssl_context is not None:
            kwargs.setdefault("ssl", self.ssl_context)
        async with self.http.request(method, self.url(path), **kwargs) as response:
            page = Page(response.status, await response.text(), response)
        if found := CSRF.search(page.text):
            self.csrf = found.group(1)
        return page

    async def get(self, path: str, **kwargs: Any) -> Page:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, data: dict[str, Any] | list[tuple[str, str]] | aiohttp.FormData,
                   csrf: str | None = "", **kwargs: Any) -> Page:
        """POST a form; ``csrf=""`` sends the session's token, None sends none, any other value that."""
        if isinstance(data, dict):
            data = list(data.items())
        if isinstance(data, list) and csrf is not None:
            data = [("csrf", csrf or self.csrf), *data]
        return await self.request("POST", path, data=data, **kwargs)

    async def follow(self, page: Page) -> Page:
        assert page.status in (302, 303), (page.status, page.text[:500])
        return await self.get(page.location)

    async def login(self, token: str | None = None) -> Page:
        await self.get("/login")
        page = await self.post("/login", {"token": self.admin.admin_token if token is None else token}, csrf=None)
        assert page.status == 303, page.text[:1000]
        await self.get("/suppressions")  # a page with the session's CSRF token
        return page

    def session_cookie(self) -> str | None:
        for cookie in self.http.cookie_jar:
            if cookie.key == "smtp_guard_session":
                return cookie.value
        return None


async def open_console(admin: AdminAPI, ssl_context: ssl.SSLContext | None = None) -> Console:
    """A client with its own cookie jar (``unsafe``: the listener is an IP address, whose cookies
    aiohttp's default jar drops). Closed with ``await console.http.close()``."""
    http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    return Console(admin, http, ssl_context)

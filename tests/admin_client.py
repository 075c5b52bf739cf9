"""A running guard with its admin listener, and an HTTP client for it (aiohttp, real loopback).

``admin = await start_admin(**overrides)`` starts a Guard relaying to the test sink with
``[admin] listen`` on a free loopback port and two tokens: ``admin.admin_token`` (role admin,
named "ops") and ``admin.viewer_token`` (role viewer, named "auditor").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

from smtp_guard.api_tokens import hash_token, new_token
from smtp_guard.app import Guard

ADMIN_TOKEN = new_token()
VIEWER_TOKEN = new_token()
TOKENS = {"ops": {"role": "admin", "hash": hash_token(ADMIN_TOKEN)},
          "auditor": {"role": "viewer", "hash": hash_token(VIEWER_TOKEN)}}


def admin_overrides(**admin: Any) -> dict[str, Any]:
    return {"listen": "127.0.0.1:0", "tokens": TOKENS, **admin}


@dataclass
class AdminAPI:
    guard: Guard
    http: aiohttp.ClientSession
    scheme: str = "http"
    admin_token: str = ADMIN_TOKEN
    viewer_token: str = VIEWER_TOKEN

    @property
    def base(self) -> str:
        assert self.guard.admin is not None and self.guard.admin.address is not None
        host, port = self.guard.admin.address
        return f"{self.scheme}://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    async def call(self, method: str, path: str, token: str | None = ADMIN_TOKEN, **kwargs: Any
                   ) -> tuple[int, Any, aiohttp.ClientResponse]:
        """One request; returns (status, body as JSON when it is JSON else text, response)."""
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.http.request(method, self.url(path), headers=headers, **kwargs) as response:
            if response.content_type in ("application/json", "application/problem+json"):
                body = await response.json(content_type=None)
            else:
                body = await response.text()
            return response.status, body, response

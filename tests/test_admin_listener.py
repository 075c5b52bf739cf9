"""The admin listener as an operator sets it up: a token made by the CLI and pasted into the
config, HTTPS, a broken TLS setting that stops the start, metrics by route template."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import pytest

from conftest import TLSFiles, wait_until, store_toml
from smtp_guard.app import Guard
from smtp_guard.audit_model import AuditFilter
from smtp_guard.services.audit import query_audit
from smtp_guard.config import load_config
from smtp_guard.startup import StartupError
from sink import Sink

Start = Callable[..., Awaitable[Any]]


def create_token(name: str, role: str) -> tuple[str, str]:
    """Run `smtp-guard admin token create` as an operator would; return (token, config line)."""
    done = subprocess.run([sys.executable, "-m", "smtp_guard", "admin", "token", "create", name, "--role", role],
                          capture_output=True, text=True, check=True, timeout=60)
    token = re.search(r"^\s+(sgt_\S+)$", done.stdout, re.M)
    line = re.search(rf"^\s+({re.escape(name)} = .*)$", done.stdout, re.M)
    assert token and line, done.stdout
    return token.group(1), line.group(1)


async def test_a_token_made_by_the_cli_and_pasted_into_the_config_lets_its_user_in(tmp_path: Path,
                                                                                  sink: Sink) -> None:
    token, line = create_token("alice", "admin")
    assert token not in line  # the config holds only the hash
    config_file = tmp_path / "guard.toml"
    config_file.write_text(f"""
[smtp]
listen = "127.0.0.1:0"
[metrics]
listen = ""
[store]
{store_toml(tmp_path / "data" / "guard.sqlite3")}[upstream]
mode = "smtp"
host = "127.0.0.1"
port = {sink.port}
[admin]
listen = "127.0.0.1:0"
[admin.tokens]
{line}
""")
    guard = Guard(load_config(str(config_file)))
    await guard.start()
    try:
        assert guard.admin is not None and guard.admin.address is not None
        host, port = guard.admin.address
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {token}"}
            async with http.post(f"http://{host}:{port}/api/v1/suppressions", headers=headers,
                                 json={"values": ["a@example.com"], "list": "manual"}) as response:
                assert response.status == 201
            async with http.get(f"http://{host}:{port}/api/v1/check?address=a@example.com",
                                headers={"Authorization": f"Bearer {token}x"}) as response:
                assert response.status == 401
        # The change is audited under the token's name.
        ctx = guard.backends.admin_context(guard.config, "test")
        records = await wait_until(lambda: query_audit(ctx, AuditFilter(kind="admin")), what="the audit record")
        assert [(r.verdict, r.actor) for r in records] == [("suppress.add", "api:alice")]
    finally:
        await guard.stop()


def test_token_create_refuses_a_name_that_cannot_be_a_config_key() -> None:
    done = subprocess.run([sys.executable, "-m", "smtp_guard", "admin", "token", "create", "a b", "--role", "admin"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "NAME" in done.stderr and "sgt_" not in done.stdout


async def test_the_api_over_https(start_admin: Start, tls: TLSFiles) -> None:
    admin = await start_admin(admin={"tls_cert": str(tls.cert_file), "tls_key": str(tls.key_file)})
    admin.scheme = "https"
    status, body, _ = await admin.call("GET", "/api/v1/check?address=a@example.com", ssl=tls.client_context)
    assert status == 200 and body["verdict"] == "pass"
    with pytest.raises(aiohttp.ClientError):  # plain HTTP on the TLS port gets no answer
        async with admin.http.get(admin.url("/healthz").replace("https:", "http:")) as response:
            await response.read()


async def test_a_missing_certificate_stops_the_start_naming_the_setting(start_guard: Start, tmp_path: Path) -> None:
    from admin_client import admin_overrides

    with pytest.raises(StartupError, match=r"\[admin\] tls_cert"):
        await start_guard(admin=admin_overrides(tls_cert=str(tmp_path / "nope.pem"), tls_key=str(tmp_path / "k.pem")))


async def test_a_taken_admin_port_stops_the_start_naming_the_setting(start_admin: Start, start_guard: Start,
                                                                     tmp_path: Path) -> None:
    from admin_client import admin_overrides

    first = await start_admin()
    host, port = first.guard.admin.address
    with pytest.raises(StartupError, match=r"\[admin\] listen"):
        await start_guard(admin=admin_overrides(listen=f"{host}:{port}"),
                          store={"path": str(tmp_path / "other" / "guard.sqlite3")})


async def test_requests_are_counted_by_route_template_never_by_path(start_admin: Start) -> None:
    admin = await start_admin()
    for address in ("a@example.com", "b@example.com"):
        await admin.call("GET", f"/api/v1/check?address={address}")
    await admin.call("GET", "/api/v1/no/such/route/for/jane@example.com")
    registry = admin.guard.metrics.registry
    assert registry.get_sample_value("smtp_guard_admin_requests_total",
                                     {"method": "GET", "route": "/api/v1/check", "status": "200"}) == 2
    assert registry.get_sample_value("smtp_guard_admin_requests_total",
                                     {"method": "GET", "route": "unmatched", "status": "404"}) == 1
    routes = {sample.labels["route"] for family in registry.collect() if family.name == "smtp_guard_admin_requests"
              for sample in family.samples}
    assert not any("@" in route for route in routes)

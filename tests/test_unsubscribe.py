"""One-click unsubscribe handled by the guard: the headers it adds, the RFC 8058 POST, the
mailto: mailbox on its own SMTP listener, and the tokens that must not be forged or read."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import unquote, urlsplit

import aiohttp
import dkim
import pytest
from click.testing import CliRunner

from admin_client import ADMIN_TOKEN, admin_overrides
from conftest import ManualClock, wait_until, store_toml_of
from dns_server import Zone
from sink import Sink
from smtp_client import message, send
from smtp_guard import replies
from smtp_guard.cli.main import main
from smtp_guard.services.erasure import erase, target_of
from smtp_guard.services.propagation import in_force
from smtp_guard.suppression_model import SuppressionEntry
from smtp_guard.unsubscribe.tokens import InvalidToken, UnsubscribeTokens
from test_dkim import dkim_config, make_key, verifier, verifies

Start = Callable[..., Awaitable[Any]]
SENDER = "news@shop.test"
UNSUBSCRIBE = {"listen": "127.0.0.1:0", "base_url": "https://unsub.test/mail", "mailto": "unsubscribe@unsub.test"}


def links(content: bytes) -> tuple[str, str]:
    """The https and mailto URIs of the List-Unsubscribe header the guard added."""
    head = content.split(b"\r\n\r\n", 1)[0].decode()
    field = re.search(r"^List-Unsubscribe:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.M)
    assert field, head
    https, mailto = re.findall(r"<([^>]+)>", field.group(1))
    return https, mailto


async def one_click(guard: Any, url: str, method: str = "POST", token: str | None = None) -> tuple[int, str]:
    """The request a mailbox provider makes for the URL, sent to the guard's listener."""
    host, port = guard.unsubscribe.address
    path = urlsplit(url).path
    if token is not None:
        path = path.rsplit("/", 1)[0] + "/" + token
    async with aiohttp.ClientSession() as http:
        async with http.request(method, f"http://{host}:{port}{path}",
                                data="List-Unsubscribe=One-Click" if method == "POST" else None,
                                headers={"Content-Type": "application/x-www-form-urlencoded"}) as response:
            return response.status, await response.text()


async def start(start_guard: Start, **overrides: Any) -> Any:
    unsubscribe = {**UNSUBSCRIBE, **overrides.pop("unsubscribe", {})}
    return await start_guard(unsubscribe=unsubscribe, **overrides)


async def test_selected_mail_gets_both_headers_and_the_token_hides_the_address(start_guard: Start,
                                                                               sink: Sink) -> None:
    guard = await start(start_guard)
    await send(guard.smtp_address, SENDER, ["Jane.Doe@Example.com"], message())
    content = sink.messages[-1].content
    https, mailto = links(content)
    assert https.startswith("https://unsub.test/mail/u/")
    assert mailto.startswith("mailto:unsubscribe@unsub.test?subject=unsubscribe%20")
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in content
    token = https.rsplit("/", 1)[1]
    assert unquote(mailto).endswith(token)
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert b"jane" not in raw.lower() and b"example" not in raw.lower()
    assert guard.metrics.registry.get_sample_value("smtp_guard_list_unsubscribe_total", {"outcome": "added"}) == 1


async def test_get_changes_nothing_and_the_one_click_post_unsubscribes_at_once(start_guard: Start,
                                                                               sink: Sink) -> None:
    guard = await start(start_guard)
    await send(guard.smtp_address, SENDER, ["jane@example.com"], message())
    https, _ = links(sink.messages[-1].content)
    status, page = await one_click(guard, https, "GET")  # a link scanner, or the person's browser
    assert status == 200 and "<form method=\"post\">" in page and "jane" not in page
    outcome = await send(guard.smtp_address, SENDER, ["jane@example.com"], message())
    assert outcome.rcpt["jane@example.com"].startswith("250")

    status, page = await one_click(guard, https)
    assert status == 200 and "You are unsubscribed" in page and "jane" not in page
    outcome = await send(guard.smtp_address, SENDER, ["jane+other@example.com"], message())
    assert outcome.rcpt["jane+other@example.com"].startswith("550 5.7.1")
    [entry] = await guard.backends.suppressions.find("jane@example.com", ["example.com"], time.time())
    assert (entry.list_name, entry.source) == ("unsubscribed", "one-click")
    registry = guard.metrics.registry
    assert registry.get_sample_value("smtp_guard_unsubscribes_total", {"via": "one_click", "result": "unsubscribed"}) == 1
    records = await wait_until(lambda: guard.backends.audit.query(_admin_filter(), 10), what="the audit record")
    assert records[0].actor == "unsubscribe:one_click"


def _admin_filter() -> Any:
    from smtp_guard.audit_model import AuditFilter

    return AuditFilter(kind="admin")


async def test_forged_altered_and_expired_tokens_are_refused(start_guard: Start, sink: Sink) -> None:
    guard = await start(start_guard)
    await send(guard.smtp_address, SENDER, ["jane@example.com"], message())
    https, _ = links(sink.messages[-1].content)
    token = https.rsplit("/", 1)[1]
    altered = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
    assert (await one_click(guard, https, token=altered))[0] == 400
    assert (await one_click(guard, https, token="not-a-token"))[0] == 400
    stranger = UnsubscribeTokens(_other_ring(), lifetime=3600).issue("jane@example.com", "x")
    assert (await one_click(guard, https, token=stranger))[0] == 400  # sealed with another guard's key
    expired = UnsubscribeTokens(guard.backends.tombstones.ring, lifetime=60, clock=lambda: time.time() - 3600)
    status, page = await one_click(guard, https, token=expired.issue("jane@example.com", "x"))
    assert status == 410 and "expired" in page
    outcome = await send(guard.smtp_address, SENDER, ["jane@example.com"], message())
    assert outcome.rcpt["jane@example.com"].startswith("250")  # nothing was stored
    registry = guard.metrics.registry
    assert registry.get_sample_value("smtp_guard_unsubscribes_total", {"via": "one_click", "result": "forged"}) == 2


def _other_ring() -> Any:
    from smtp_guard.erasure.keys import KeyRing, new_key

    return KeyRing(Path("other"), [new_key()])


def test_a_token_opens_until_it_expires() -> None:
    clock = ManualClock(1_800_000_000)
    ring = _other_ring()
    tokens = UnsubscribeTokens(ring, lifetime=86400, clock=clock)
    token = tokens.issue("jane@example.com", "spring-sale")
    opened = tokens.open(token)
    assert (opened.address, opened.stream) == ("jane@example.com", "spring-sale")
    clock.advance(86400)
    with pytest.raises(InvalidToken) as refused:
        tokens.open(token)
    assert refused.value.reason == "expired"


async def test_mail_to_the_mailto_address_unsubscribes_and_is_never_relayed(start_guard: Start, sink: Sink) -> None:
    guard = await start(start_guard)
    await send(guard.smtp_address, SENDER, ["jane@example.com"], message())
    _, mailto = links(sink.messages[-1].content)
    relayed = len(sink.messages)
    subject = unquote(mailto.split("subject=", 1)[1])
    request = f"From: jane@example.com\r\nTo: unsubscribe@unsub.test\r\nSubject: {subject}\r\n\r\n".encode()
    outcome = await send(guard.smtp_address, "jane@example.com", ["unsubscribe@unsub.test"], request)
    assert outcome.data == str(replies.UNSUBSCRIBED)
    assert len(sink.messages) == relayed  # read by the guard, not relayed
    outcome = await send(guard.smtp_address, SENDER, ["jane@example.com"], message())
    assert outcome.rcpt["jane@example.com"].startswith("550 5.7.1")
    forged = request.replace(subject.encode(), b"unsubscribe " + b"A" * 120)
    outcome = await send(guard.smtp_address, "x@example.com", ["unsubscribe@unsub.test"], forged)
    assert outcome.data == str(replies.UNSUBSCRIBE_INVALID)


async def test_a_client_that_may_not_relay_may_still_write_to_the_unsubscribe_mailbox_only(
        start_guard: Start, sink: Sink) -> None:
    guard = await start(start_guard)
    await send(guard.smtp_address, SENDER, ["jane@example.com"], message())
    _, mailto = links(sink.messages[-1].content)
    subject = unquote(mailto.split("subject=", 1)[1])
    await guard.stop()
    # The same store and key ring, but loopback is no longer an allowed network: a mailbox
    # provider on the internet.
    outsider = await start(start_guard, access={"allow_networks": ["10.0.0.0/8"]})
    outcome = await send(outsider.smtp_address, "jane@example.com", ["someone@example.org", "unsubscribe@unsub.test"],
                         f"Subject: {subject}\r\n\r\n".encode())
    assert outcome.rcpt["someone@example.org"] == str(replies.RELAY_DENIED)
    assert outcome.rcpt["unsubscribe@unsub.test"].startswith("250")
    assert outcome.data == str(replies.UNSUBSCRIBED)
    assert len(sink.messages) == 1


async def test_no_header_where_the_platform_has_one_or_for_several_recipients(start_guard: Start,
                                                                              sink: Sink) -> None:
    guard = await start(start_guard)
    own = message(extra_headers="List-Unsubscribe: <https://shop.test/u/1>\r\n")
    await send(guard.smtp_address, SENDER, ["jane@example.com"], own)
    assert sink.messages[-1].content.count(b"List-Unsubscribe:") == 1
    await send(guard.smtp_address, SENDER, ["a@example.com", "b@example.com"], message())
    assert b"List-Unsubscribe" not in sink.messages[-1].content
    transactional = await start(start_guard, unsubscribe={"classes": ["transactional"]},
                                store={"path": str(guard.config.store.data_dir.parent / "t" / "g.sqlite3")})
    await send(transactional.smtp_address, SENDER, ["a@example.com"], message())
    assert b"List-Unsubscribe" not in sink.messages[-1].content  # default class is marketing
    registry = guard.metrics.registry
    assert registry.get_sample_value("smtp_guard_list_unsubscribe_total", {"outcome": "platform_header"}) == 1
    assert registry.get_sample_value("smtp_guard_list_unsubscribe_total", {"outcome": "several_recipients"}) == 1


async def test_the_added_header_is_dkim_signed_and_verifies(start_guard: Start, sink: Sink, tmp_path: Path,
                                                            dns_server: Any) -> None:
    key = make_key(tmp_path, "s1", domain="shop.test")
    server = dns_server(Zone(txt={key[0].dns_name: [key[0].txt_record()]}))
    guard = await start(start_guard, dkim=dkim_config(key))
    await send(guard.smtp_address, SENDER, ["jane@example.com"], message())
    content = sink.messages[-1].content
    assert links(content)
    assert verifies(content, server) == [True]
    assert dkim.DKIM(content).verify(dnsfunc=verifier(server))
    assert b"list-unsubscribe : list-unsubscribe : list-unsubscribe-post" in content.replace(b"\r\n ", b" ")


async def test_an_erased_address_is_acknowledged_and_not_stored_again(start_guard: Start, sink: Sink) -> None:
    guard = await start(start_guard)
    await send(guard.smtp_address, SENDER, ["jane@example.com"], message())
    https, _ = links(sink.messages[-1].content)
    ctx = guard.backends.admin_context(guard.config, "test")
    await erase(ctx, [target_of(ctx.normalizer, "jane@example.com")], "DSR-1")
    await in_force(ctx.changes, 5.0)  # as `smtp-guard erase` waits before it returns
    status, _ = await one_click(guard, https)
    assert status == 200
    assert await guard.backends.suppressions.find("jane@example.com", ["example.com"], time.time()) == []


async def test_the_platform_fetches_the_unsubscribes_it_has_not_seen(start_guard: Start, sink: Sink,
                                                                     tmp_path: Path) -> None:
    guard = await start(start_guard, admin=admin_overrides())
    before = time.time()
    await send(guard.smtp_address, SENDER, ["old@example.com"], message())
    await guard.backends.suppressions.add([SuppressionEntry("address", "earlier@example.com", "unsubscribed",
                                                            source="one-click", created_at=before - 7200)])
    await one_click(guard, links(sink.messages[-1].content)[0])

    config_file = tmp_path / "cli.toml"
    config_file.write_text(f'[store]\n{store_toml_of(guard.config)}')
    result = await asyncio.to_thread(CliRunner().invoke, main, [
        "suppress", "export", "--list", "unsubscribed", "--source", "one-click", "--since", "1h",
        "--format", "jsonl", "--config", str(config_file)], env={"SMTP_GUARD_CONFIG": None})
    assert result.exit_code == 0, result.output
    assert [line for line in result.stdout.splitlines() if "@" in line] == [
        line for line in result.stdout.splitlines() if "old@example.com" in line]

    host, port = guard.admin.address
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{host}:{port}/api/v1/suppressions",
                            params={"list": "unsubscribed", "source": "one-click", "since": "1h"},
                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as response:
            body = await response.json()
    assert [item["value"] for item in body["items"]] == ["old@example.com"]

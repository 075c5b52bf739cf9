"""DKIM signing at the wire: mail relayed through the guard to a real upstream sink verifies
with dkimpy's own verifier, resolving the key through a real DNS server on loopback (dnsmasq)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable
from unittest import mock

import dkim
import dns.resolver
import pytest

from conftest import wait_until
from dns_server import DNSServer, Zone
from sink import Sink
from smtp_client import message, send
from smtp_guard import replies
from smtp_guard.dkim import openssl_rsa
from smtp_guard.dkim.keys import SigningKey, from_pem, generate, write_private
from smtp_guard.startup import StartupError
from smtp_guard.suppression_model import SuppressionEntry

Start = Callable[..., Awaitable[Any]]
DOMAIN = "example.test"


def make_key(tmp_path: Path, selector: str, algorithm: str = "rsa", domain: str = DOMAIN) -> tuple[SigningKey, Path]:
    pem = generate(algorithm)  # type: ignore[arg-type]
    path = tmp_path / f"{domain}.{selector}.key"
    write_private(path, pem)
    return from_pem(pem, domain, selector, str(path)), path


def dkim_config(*keys: tuple[SigningKey, Path]) -> dict[str, Any]:
    return {"keys": [{"domain": key.domain, "selector": key.selector, "key_file": str(path)} for key, path in keys]}


def publish(dns_server: Callable[..., DNSServer], *keys: SigningKey, extra: dict[str, list[str]] | None = None
            ) -> DNSServer:
    return dns_server(Zone(txt={**{key.dns_name: [key.txt_record()] for key in keys}, **(extra or {})}))


def verifier(server: DNSServer) -> Callable[..., bytes]:
    """dkimpy's ``dnsfunc``: TXT lookups through the test's DNS server (dnspython)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port

    def lookup(name: bytes, timeout: float = 5) -> bytes:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        except dns.resolver.NXDOMAIN:
            return b""
        return b"".join(answer[0].strings)

    return lookup


def signatures(content: bytes) -> list[dict[str, str]]:
    head = content.split(b"\r\n\r\n", 1)[0].decode()
    found = re.findall(r"^DKIM-Signature:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.M | re.I)
    return [{k.strip(): "".join(v.split()) for k, _, v in (t.partition("=") for t in sig.split(";")) if k.strip()}
            for sig in found]


def verifies(content: bytes, server: DNSServer) -> list[bool]:
    """Each signature on ``content``, top to bottom, checked by dkimpy against the DNS record."""
    results = []
    for index in range(len(signatures(content))):
        try:
            results.append(bool(dkim.DKIM(content).verify(idx=index, dnsfunc=verifier(server))))
        except dkim.DKIMException:  # dkimpy raises for some failures (body hash) and returns False for others
            results.append(False)
    return results


async def test_relayed_mail_verifies_for_rsa_and_ed25519_signed_together(start_guard: Start, sink: Sink,
                                                                         tmp_path: Path, dns_server: Any) -> None:
    rsa_key, ed_key = make_key(tmp_path, "s1"), make_key(tmp_path, "s2", "ed25519")
    server = publish(dns_server, rsa_key[0], ed_key[0])
    guard = await start_guard(dkim=dkim_config(rsa_key, ed_key))
    outcome = await send(guard.smtp_address, f"news@{DOMAIN}", ["you@example.com"],
                         message(sender=f"news@{DOMAIN}", extra_headers="List-Unsubscribe: <mailto:u@example.test>\r\n"))
    assert outcome.data is not None and outcome.data.startswith("250")
    relayed = sink.messages[-1].content
    assert sorted(s["a"] for s in signatures(relayed)) == ["ed25519-sha256", "rsa-sha256"]
    assert all(s["d"] == DOMAIN for s in signatures(relayed))
    assert verifies(relayed, server) == [True, True]
    # From, Subject and List-Unsubscribe are over-signed (one more than present): a second
    # one added later breaks the signature instead of slipping in.
    signed = signatures(relayed)[0]["h"].split(":")
    assert signed.count("from") == 2 and signed.count("subject") == 2 and signed.count("list-unsubscribe") == 2
    assert signed.count("list-unsubscribe-post") == 1  # absent, and over-signed so it cannot be added
    assert guard.metrics.registry.get_sample_value("smtp_guard_dkim_messages_total", {"outcome": "signed"}) == 1


async def test_a_tampered_message_fails_verification(start_guard: Start, sink: Sink, tmp_path: Path,
                                                     dns_server: Any) -> None:
    key = make_key(tmp_path, "s1")
    server = publish(dns_server, key[0])
    guard = await start_guard(dkim=dkim_config(key))
    await send(guard.smtp_address, f"news@{DOMAIN}", ["you@example.com"], message(sender=f"news@{DOMAIN}"))
    relayed = sink.messages[-1].content
    assert verifies(relayed, server) == [True]
    assert verifies(relayed.replace(b"Hi there.", b"Hi thero."), server) == [False]  # body
    assert verifies(relayed.replace(b"Subject: Hello", b"Subject: Hell0"), server) == [False]  # signed header
    added = relayed.replace(b"\r\n\r\n", b"\r\nFrom: attacker@evil.test\r\n\r\n", 1)
    assert verifies(added, server) == [False]  # a second From after signing


async def test_a_subdomain_is_signed_by_its_configured_parent_and_other_domains_pass_unsigned(
        start_guard: Start, sink: Sink, tmp_path: Path, dns_server: Any) -> None:
    key = make_key(tmp_path, "s1")
    server = publish(dns_server, key[0])
    guard = await start_guard(dkim=dkim_config(key))
    await send(guard.smtp_address, "a@news.example.test", ["you@example.com"], message(sender="a@news.example.test"))
    assert [s["d"] for s in signatures(sink.messages[-1].content)] == [DOMAIN]
    assert verifies(sink.messages[-1].content, server) == [True]
    await send(guard.smtp_address, "a@other.test", ["you@example.com"], message(sender="a@other.test"))
    assert signatures(sink.messages[-1].content) == []
    registry = guard.metrics.registry
    assert registry.get_sample_value("smtp_guard_dkim_messages_total", {"outcome": "not_configured"}) == 1


async def test_held_mail_is_signed_when_it_is_released(start_guard: Start, sink: Sink, tmp_path: Path,
                                                       dns_server: Any) -> None:
    key = make_key(tmp_path, "s1", "ed25519")
    server = publish(dns_server, key[0])
    guard = await start_guard(dkim=dkim_config(key), lists={"manual": {"action": "hold"}})
    await guard.backends.suppressions.add([SuppressionEntry("address", "held@example.com", "manual",
                                                            created_at=time.time())])
    await guard.enforcement.reloader.refresh()
    outcome = await send(guard.smtp_address, f"news@{DOMAIN}", ["held@example.com"], message(sender=f"news@{DOMAIN}"))
    assert outcome.data == str(replies.QUEUED_HELD)
    [held] = await guard.backends.holds.list()
    stored = await guard.backends.holds.get(held.id)
    assert stored is not None and signatures(stored.content) == []  # held unsigned, signed when it leaves
    await guard.backends.holds.release(held.id, time.time())
    await wait_until(lambda: sink.messages, what="the released message at the sink")
    assert verifies(sink.messages[-1].content, server) == [True]


async def test_mail_that_cannot_be_signed_is_deferred_never_relayed_unsigned(start_guard: Start, sink: Sink,
                                                                           tmp_path: Path, dns_server: Any) -> None:
    key = make_key(tmp_path, "s1")
    publish(dns_server, key[0])
    guard = await start_guard(dkim=dkim_config(key))
    broken = message(sender=f"news@{DOMAIN}").replace(b"Subject:", b"a header line without a colon\r\nSubject:")
    outcome = await send(guard.smtp_address, f"news@{DOMAIN}", ["you@example.com"], broken)
    assert outcome.data == str(replies.DKIM_SIGNING_FAILED)
    assert sink.messages == []
    assert guard.metrics.registry.get_sample_value("smtp_guard_dkim_messages_total", {"outcome": "failed"}) == 1
    # The upstream session was reset, not poisoned: the next message goes through, signed.
    outcome = await send(guard.smtp_address, f"news@{DOMAIN}", ["you@example.com"], message(sender=f"news@{DOMAIN}"))
    assert outcome.data is not None and outcome.data.startswith("250") and len(sink.messages) == 1


async def test_stripping_a_header_the_platform_signed_is_logged_and_counted(start_guard: Start, sink: Sink,
                                                                           tmp_path: Path, caplog: Any) -> None:
    platform_key = from_pem(generate("rsa"), "shop.test", "p1", "platform")
    content = message(extra_headers="X-Internal-Campaign: 42\r\n")
    signed = dkim.sign(content, b"p1", b"shop.test", platform_key.private,
                       include_headers=[b"from", b"subject", b"x-internal-campaign"]) + content
    guard = await start_guard(streams={"strip_headers": ["X-Internal-Campaign"]})
    await send(guard.smtp_address, "news@shop.test", ["you@example.com"], signed)
    assert b"X-Internal-Campaign" not in sink.messages[-1].content
    assert guard.metrics.registry.get_sample_value("smtp_guard_dkim_broken_signatures_total") == 1
    assert "break the platform's DKIM signature d=shop.test" in caplog.text
    # A signature that does not cover the stripped header is left alone, and not counted.
    signed = dkim.sign(content, b"p1", b"shop.test", platform_key.private, include_headers=[b"from"]) + content
    await send(guard.smtp_address, "news@shop.test", ["you@example.com"], signed)
    assert guard.metrics.registry.get_sample_value("smtp_guard_dkim_broken_signatures_total") == 1


async def test_an_unreadable_key_stops_the_start_naming_the_setting(start_guard: Start, tmp_path: Path) -> None:
    (tmp_path / "bad.key").write_text("not a key\n")
    with pytest.raises(StartupError, match=r"\[dkim\] key_file .*bad.key.*not an unencrypted PEM private key"):
        await start_guard(dkim={"keys": [{"domain": DOMAIN, "selector": "s1", "key_file": str(tmp_path / "bad.key")}]})
    with pytest.raises(StartupError, match=r"\[dkim\] key_file .*missing.key.*cannot read it"):
        await start_guard(dkim={"keys": [{"domain": DOMAIN, "selector": "s1",
                                          "key_file": str(tmp_path / "missing.key")}]})


async def test_keygen_writes_a_private_key_whose_printed_record_verifies_relayed_mail(
        start_guard: Start, sink: Sink, tmp_path: Path, dns_server: Any) -> None:
    out = tmp_path / "k.key"
    done = subprocess.run([sys.executable, "-m", "smtp_guard", "dkim", "keygen", DOMAIN, "s2026", "--out", str(out)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert out.stat().st_mode & 0o777 == 0o600
    record = re.search(r"s2026\._domainkey\.example\.test\. IN TXT \( (.*) \)", done.stdout)
    assert record, done.stdout
    text = "".join(re.findall(r'"([^"]*)"', record.group(1)))
    server = dns_server(Zone(txt={f"s2026._domainkey.{DOMAIN}": [text]}))
    assert f'key_file = "{out}"' in done.stdout
    guard = await start_guard(dkim={"keys": [{"domain": DOMAIN, "selector": "s2026", "key_file": str(out)}]})
    await send(guard.smtp_address, f"news@{DOMAIN}", ["you@example.com"], message(sender=f"news@{DOMAIN}"))
    assert verifies(sink.messages[-1].content, server) == [True]
    again = subprocess.run([sys.executable, "-m", "smtp_guard", "dkim", "keygen", DOMAIN, "s2026", "--out", str(out)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "never overwritten" in again.stderr


def test_openssl_signs_exactly_what_dkimpys_own_rsa_would() -> None:
    key = from_pem(generate("rsa"), DOMAIN, "s1", "test")
    content = message(sender=f"news@{DOMAIN}")
    with mock.patch("time.time", return_value=1_800_000_000):
        dkim.RSASSA_PKCS1_v1_5_sign = openssl_rsa._PUREPYTHON
        pure = dkim.sign(content, b"s1", DOMAIN.encode(), key.private, include_headers=[b"from", b"subject"])
        openssl_rsa.register(key.private)
        fast = dkim.sign(content, b"s1", DOMAIN.encode(), key.private, include_headers=[b"from", b"subject"])
    assert dkim.RSASSA_PKCS1_v1_5_sign is openssl_rsa._sign
    assert fast == pure

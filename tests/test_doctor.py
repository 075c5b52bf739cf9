"""``smtp-guard doctor``: the sending domains' DNS against dnsmasq on loopback, the upstream
against a real sink (STARTTLS with a throwaway CA, implicit TLS, none), and the real CLI.

One correct domain passes everything; each test then breaks one thing and checks that the
report names it, says what to fix, and (for a record) prints the exact record to publish.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from smtp_guard.config import Config
from smtp_guard.dkim import keys
from smtp_guard.doctor.report import Finding, Report, Status
from smtp_guard.doctor.runner import diagnose

from conftest import TLSFiles, make_config, store_toml
from dns_server import DNSServer, SilentDNSServer, Zone
from sink import Sink

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "shop.test"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "shop.test.s1.pem"
    keys.write_private(path, keys.generate("rsa"))
    return path


def signing_key(path: Path, selector: str = "s1", domain: str = DOMAIN) -> keys.SigningKey:
    return keys.load(path, domain, selector)


def good_zone(key: keys.SigningKey, **changes: Any) -> Zone:
    """shop.test as it should be: its DKIM key, SPF for 127.0.0.1 (the sink), DMARC p=reject, an MX."""
    txt = {
        f"s1._domainkey.{DOMAIN}": [key.txt_record()],
        DOMAIN: ["v=spf1 ip4:127.0.0.1 -all", "google-site-verification=abc"],
        f"_dmarc.{DOMAIN}": ["v=DMARC1; p=reject; rua=mailto:dmarc@shop.test"],
    }
    txt.update(changes.pop("txt", {}))
    zone = Zone(txt={name: records for name, records in txt.items() if records},
                mx=[(DOMAIN, f"mx.{DOMAIN}", 10)], a={f"mx.{DOMAIN}": "127.0.0.1"})
    return replace(zone, **changes)


@pytest.fixture
async def tls_sink(tls: TLSFiles) -> AsyncIterator[Sink]:
    """An upstream offering STARTTLS with a certificate for 127.0.0.1 from the test CA."""
    async with Sink(tls_context=tls.server_context()) as running:
        yield running


def doctor_config(tmp_path: Path, server: DNSServer | SilentDNSServer, upstream_port: int, key_file: Path,
                  tls: TLSFiles | None = None, dns_timeout: str = "2s", **overrides: Any) -> Config:
    upstream: dict[str, Any] = {"tls": "starttls", "ca_file": str(tls.ca_file)} if tls else {}
    upstream.update(overrides.pop("upstream", {}))
    return make_config(tmp_path, upstream_port, dns={"servers": [server.address], "timeout": dns_timeout},
                       dkim={"keys": [{"domain": DOMAIN, "selector": "s1", "key_file": str(key_file)}]},
                       upstream=upstream, **overrides)


def finding(report: Report, check: str, domain: str = DOMAIN) -> Finding:
    section = report.upstream.findings if check.startswith("upstream") else \
        next(d for d in report.domains if d.domain == domain).findings
    found = [f for f in section if f.check == check]
    assert len(found) == 1, (check, section)
    return found[0]


def problems(report: Report) -> list[tuple[str, str]]:
    return [(f.check, f.status.value) for f in report.findings if f.status in (Status.WARN, Status.FAIL)]


# --- a correct domain, then one thing broken at a time ------------------------------------------

async def test_a_correct_domain_and_upstream_pass(tmp_path, dns_server, tls, tls_sink, key_file):
    server = dns_server(good_zone(signing_key(key_file)))
    report = await diagnose(doctor_config(tmp_path, server, tls_sink.port, key_file, tls))
    assert problems(report) == []
    assert report.status is Status.OK
    assert [f.check for f in report.findings] == [
        "dkim", "spf", "spf.lookups", "spf.upstream", "dmarc", "dmarc.policy", "dmarc.alignment", "mx",
        "upstream.connect", "upstream.smtp", "upstream.starttls", "upstream.certificate"]
    assert finding(report, "dkim").message == "publishes the configured rsa key, 2048 bits"
    assert finding(report, "spf.upstream").message == "SPF passes for the upstream's address 127.0.0.1"
    assert finding(report, "spf.lookups").message == "0 DNS lookups (at most 10)"
    assert finding(report, "dmarc.alignment").message == (
        "adkim=r, aspf=r; the guard signs with d=shop.test, aligned with From: shop.test (relaxed)")
    assert finding(report, "upstream.certificate").data["days_left"] > 14


async def test_a_missing_dkim_record_is_reported_with_the_record_to_publish(tmp_path, dns_server, sink, key_file):
    key = signing_key(key_file)
    server = dns_server(good_zone(key, txt={f"s1._domainkey.{DOMAIN}": []}))
    report = await diagnose(doctor_config(tmp_path, server, sink.port, key_file))
    dkim = finding(report, "dkim")
    assert dkim.status is Status.FAIL
    assert dkim.subject == "s1._domainkey.shop.test"
    assert dkim.message == "no DKIM record at s1._domainkey.shop.test: receivers cannot verify the signatures"
    assert dkim.publish == keys.zone_lines(key)
    assert report.status is Status.FAIL


async def test_a_record_with_another_key_is_reported(tmp_path, dns_server, sink, key_file):
    other = keys.from_pem(keys.generate("rsa"), DOMAIN, "s1", "other")
    server = dns_server(good_zone(signing_key(key_file), txt={f"s1._domainkey.{DOMAIN}": [other.txt_record()]}))
    report = await diagnose(doctor_config(tmp_path, server, sink.port, key_file))
    dkim = finding(report, "dkim")
    assert (dkim.status, dkim.message) == (Status.FAIL, "the record publishes a different key than the configured key file")
    assert dkim.publish == keys.zone_lines(signing_key(key_file))


@pytest.mark.parametrize("record, message", [
    ("v=DKIM1; k=rsa; p=", "the key is revoked (empty p=): signatures with this selector fail"),
    ("v=DKIM1; k=ed25519; p=AAAA", "the record says k=ed25519, the configured key is rsa"),
    ("v=DKIM1; k=rsa", "the record has no p= tag (not a DKIM key record)"),
    ("k=rsa; v=DKIM1; p=AAAA", "the record's v= must be \"DKIM1\" and come first (RFC 6376 3.6.1)"),
])
async def test_broken_dkim_records_are_named(tmp_path, dns_server, sink, key_file, record, message):
    server = dns_server(good_zone(signing_key(key_file), txt={f"s1._domainkey.{DOMAIN}": [record]}))
    dkim = finding(await diagnose(doctor_config(tmp_path, server, sink.port, key_file)), "dkim")
    assert (dkim.status, dkim.message) == (Status.FAIL, message)


async def test_an_ed25519_key_and_a_testing_flag(tmp_path, dns_server, sink):
    path = tmp_path / "ed.pem"
    keys.write_private(path, keys.generate("ed25519"))
    key = signing_key(path)
    server = dns_server(good_zone(key, txt={f"s1._domainkey.{DOMAIN}": [key.txt_record() + "; t=y"]}))
    dkim = finding(await diagnose(doctor_config(tmp_path, server, sink.port, path)), "dkim")
    assert dkim.status is Status.WARN
    assert dkim.message.startswith("the record is in testing mode (t=y)")


async def test_a_missing_dmarc_record_is_reported_with_a_record_to_start_from(tmp_path, dns_server, sink, key_file):
    server = dns_server(good_zone(signing_key(key_file), txt={f"_dmarc.{DOMAIN}": []}))
    report = await diagnose(doctor_config(tmp_path, server, sink.port, key_file))
    dmarc = finding(report, "dmarc")
    assert dmarc.status is Status.FAIL
    assert dmarc.message.startswith("no DMARC record at _dmarc.shop.test: receivers apply no policy")
    assert dmarc.publish == '_dmarc.shop.test. IN TXT "v=DMARC1; p=none; rua=mailto:dmarc-reports@shop.test"'


async def test_dmarc_p_none_is_a_warning(tmp_path, dns_server, tls, tls_sink, key_file):
    server = dns_server(good_zone(signing_key(key_file), txt={f"_dmarc.{DOMAIN}": ["v=DMARC1; p=none"]}))
    report = await diagnose(doctor_config(tmp_path, server, tls_sink.port, key_file, tls))
    assert problems(report) == [("dmarc.policy", "warn")]
    assert finding(report, "dmarc.policy").message.startswith("p=none: nothing is enforced")
    assert report.status is Status.WARN


async def test_a_subdomain_inherits_dmarc_and_strict_alignment_fails(tmp_path, dns_server, sink, key_file):
    """news.shop.test has no _dmarc record of its own: the organizational domain's applies (its
    sp=). The guard signs news.shop.test's mail with shop.test's key: aligned when relaxed,
    not when strict."""
    key = signing_key(key_file)
    zone = good_zone(key, txt={f"_dmarc.{DOMAIN}": ["v=DMARC1; p=reject; sp=quarantine; adkim=s"],
                               "news.shop.test": ["v=spf1 ip4:127.0.0.1 -all"]})
    zone.mx.append(("news.shop.test", "mx.shop.test", 10))
    report = await diagnose(doctor_config(tmp_path, dns_server(zone), sink.port, key_file), ["news.shop.test"])
    assert finding(report, "dmarc", "news.shop.test").message == (
        "DMARC record inherited from shop.test: \"v=DMARC1; p=reject; sp=quarantine; adkim=s\"")
    assert finding(report, "dmarc.policy", "news.shop.test").message.startswith("sp=quarantine")
    alignment = finding(report, "dmarc.alignment", "news.shop.test")
    assert alignment.status is Status.FAIL
    assert "d=shop.test, which is not aligned with From: news.shop.test under strict alignment" in alignment.message
    # The DKIM record checked is the signing domain's.
    assert finding(report, "dkim", "news.shop.test").subject == "s1._domainkey.shop.test"


async def test_spf_that_does_not_cover_the_upstream_is_reported_with_the_fixed_record(tmp_path, dns_server, tls,
                                                                                    tls_sink, key_file):
    server = dns_server(good_zone(signing_key(key_file), txt={DOMAIN: ["v=spf1 ip4:192.0.2.0/24 -all"]}))
    report = await diagnose(doctor_config(tmp_path, server, tls_sink.port, key_file, tls))
    upstream = finding(report, "spf.upstream")
    assert upstream.status is Status.FAIL
    assert upstream.message == "SPF does not authorize the upstream: 127.0.0.1: fail (matched -all in shop.test)"
    assert upstream.publish == 'shop.test. IN TXT "v=spf1 ip4:127.0.0.1 ip4:192.0.2.0/24 -all"'
    assert problems(report) == [("spf.upstream", "fail")]


async def test_too_many_spf_lookups_fail(tmp_path, dns_server, sink, key_file):
    """Eleven includes (plus a nested one) pass for 127.0.0.1, which the first term matches, but
    a receiver checking any other address runs out of lookups: permerror."""
    includes = {f"i{n}.test": ["v=spf1 ip4:198.51.100.1 -all"] for n in range(11)}
    includes["i0.test"] = ["v=spf1 include:deep.test -all"]
    includes["deep.test"] = ["v=spf1 a -all"]
    record = "v=spf1 ip4:127.0.0.1 " + " ".join(f"include:i{n}.test" for n in range(11)) + " -all"
    server = dns_server(good_zone(signing_key(key_file), txt={DOMAIN: [record], **includes}))
    report = await diagnose(doctor_config(tmp_path, server, sink.port, key_file))
    lookups = finding(report, "spf.lookups")
    assert lookups.status is Status.FAIL
    assert lookups.message.startswith("the record needs 13 DNS lookups, more than 10: receivers stop with permerror")
    assert "include:i0.test 3, include:i1.test 1" in lookups.message
    assert lookups.data["lookups"] == 13
    assert finding(report, "spf.upstream").status is Status.OK


@pytest.mark.parametrize("records, message", [
    ([], "no SPF record (TXT \"v=spf1 …\") at shop.test: receivers cannot tell which servers may send its mail"),
    (["v=spf1 ip4:127.0.0.1 -all", "v=spf1 mx -all"],
     "2 SPF records at shop.test: receivers return permerror and SPF fails (RFC 7208 section 4.5)"),
    (["v=spf1 ip4:127.0.0.1 foo:bar -all"], "the SPF record does not parse: 'foo:bar': unknown mechanism 'foo'"),
])
async def test_missing_doubled_and_broken_spf_records_fail(tmp_path, dns_server, sink, key_file, records, message):
    server = dns_server(good_zone(signing_key(key_file), txt={DOMAIN: records or ["unrelated text"]}))
    report = await diagnose(doctor_config(tmp_path, server, sink.port, key_file))
    spf = finding(report, "spf")
    assert (spf.status, spf.message) == (Status.FAIL, message)
    if not records:
        assert spf.publish == 'shop.test. IN TXT "v=spf1 ip4:127.0.0.1 -all"'


async def test_mx_missing_or_null_is_a_warning(tmp_path, dns_server, sink, key_file):
    key = signing_key(key_file)
    report = await diagnose(doctor_config(tmp_path, dns_server(good_zone(key, mx=[])), sink.port, key_file))
    assert finding(report, "mx").status is Status.WARN
    assert finding(report, "mx").message.startswith("no MX record: mail to shop.test")
    report = await diagnose(doctor_config(tmp_path, dns_server(good_zone(key, mx=[(DOMAIN, ".", 0)])), sink.port,
                                          key_file))
    assert finding(report, "mx").message.startswith("shop.test publishes a null MX (RFC 7505)")


async def test_a_domain_without_a_key_and_a_sandbox_upstream(tmp_path, dns_server, key_file):
    """A domain named on the command line that the guard has no key for; no upstream to check."""
    server = dns_server(good_zone(signing_key(key_file)))
    config = make_config(tmp_path, 0, dns={"servers": [server.address]}, upstream={"mode": "sandbox"})
    report = await diagnose(config, [DOMAIN])
    assert finding(report, "dkim").status is Status.WARN
    assert finding(report, "dmarc.alignment").status is Status.WARN
    assert finding(report, "spf.upstream").status is Status.SKIP
    assert finding(report, "spf.upstream").message.startswith(
        "whether SPF authorizes the upstream is not checked: [upstream] mode = \"sandbox\"")
    assert [(f.check, f.status) for f in report.upstream.findings] == [("upstream", Status.SKIP)]


async def test_a_dns_timeout_is_a_failure_not_a_pass(tmp_path, sink, key_file):
    silent = SilentDNSServer()
    try:
        config = doctor_config(tmp_path, silent, sink.port, key_file, dns_timeout="0.3s")
        report = await diagnose(config)
    finally:
        silent.close()
    assert finding(report, "dkim").message.startswith("could not look up the DKIM record: TXT s1._domainkey.shop.test: timed out")
    assert {f.status for d in report.domains for f in d.findings} == {Status.FAIL}


# --- the upstream ----------------------------------------------------------------------------------

async def test_an_upstream_certificate_expiring_soon_is_a_warning(tmp_path, dns_server, tls, key_file):
    leaf = tls.ca.issue_cert("127.0.0.1", not_after=datetime.now(timezone.utc) + timedelta(days=5))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    async with Sink(tls_context=context) as upstream:
        server = dns_server(good_zone(signing_key(key_file)))
        report = await diagnose(doctor_config(tmp_path, server, upstream.port, key_file, tls))
    certificate = finding(report, "upstream.certificate")
    assert certificate.status is Status.WARN
    assert certificate.message.startswith("the certificate expires in 4.9 days") or \
        certificate.message.startswith("the certificate expires in 5.0 days")
    assert problems(report) == [("upstream.certificate", "warn")]


async def test_an_untrusted_upstream_certificate_fails_when_the_guard_verifies(tmp_path, dns_server, tls, tls_sink,
                                                                               key_file):
    server = dns_server(good_zone(signing_key(key_file)))
    # No ca_file: the system CAs do not know the test CA.
    report = await diagnose(doctor_config(tmp_path, server, tls_sink.port, key_file, upstream={"tls": "starttls"}))
    certificate = finding(report, "upstream.certificate")
    assert certificate.status is Status.FAIL
    assert "the certificate does not verify for 127.0.0.1: " in certificate.message
    assert "the guard cannot relay" in certificate.message
    assert certificate.fix.endswith("or set [upstream] ca_file to the CA that issued it")
    # Opportunistic TLS does not verify: the same certificate is a warning there.
    report = await diagnose(doctor_config(tmp_path, server, tls_sink.port, key_file, upstream={"tls": "opportunistic"}))
    assert finding(report, "upstream.certificate").status is Status.WARN


async def test_an_upstream_without_starttls(tmp_path, dns_server, sink, key_file):
    server = dns_server(good_zone(signing_key(key_file)))
    report = await diagnose(doctor_config(tmp_path, server, sink.port, key_file, upstream={"tls": "starttls"}))
    starttls = finding(report, "upstream.starttls")
    assert starttls.status is Status.FAIL
    assert starttls.message.startswith("does not offer STARTTLS, but [upstream] tls = \"starttls\" requires it")
    report = await diagnose(doctor_config(tmp_path, server, sink.port, key_file))  # tls = "none"
    assert finding(report, "upstream.starttls").status is Status.WARN


async def test_an_implicit_tls_upstream(tmp_path, dns_server, tls, key_file):
    async with Sink(tls_context=tls.server_context(), implicit_tls=True) as upstream:
        server = dns_server(good_zone(signing_key(key_file)))
        report = await diagnose(doctor_config(tmp_path, server, upstream.port, key_file, tls,
                                              upstream={"tls": "implicit"}))
    assert [(f.check, f.status) for f in report.upstream.findings] == [
        ("upstream.connect", Status.OK), ("upstream.smtp", Status.OK), ("upstream.tls", Status.OK),
        ("upstream.certificate", Status.OK)]


async def test_an_upstream_that_is_not_there(tmp_path, dns_server, key_file):
    from conftest import free_port

    server = dns_server(good_zone(signing_key(key_file)))
    report = await diagnose(doctor_config(tmp_path, server, free_port(), key_file))
    connect = finding(report, "upstream.connect")
    assert (connect.status, connect.message) == (Status.FAIL, "cannot connect: Connection refused")
    assert [f.check for f in report.upstream.findings] == ["upstream.connect"]


# --- the command ---------------------------------------------------------------------------------

def write_config(path: Path, server: DNSServer, upstream_port: int, key_file: Path, tls: TLSFiles) -> Path:
    path.write_text(f"""
[upstream]
mode = "smtp"
host = "127.0.0.1"
port = {upstream_port}
tls = "starttls"
ca_file = "{tls.ca_file}"

[dns]
servers = ["{server.address}"]

[store]
{store_toml(path.parent / 'data' / 'guard.sqlite3')}
[[dkim.keys]]
domain = "{DOMAIN}"
selector = "s1"
key_file = "{key_file.name}"
""")
    return path


async def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    import asyncio

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SMTP_GUARD_CONFIG", None)
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "smtp_guard", *args, env=env,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, stdout.decode(), stderr.decode())


async def test_the_command_passes_a_correct_domain(tmp_path, dns_server, tls, tls_sink, key_file):
    server = dns_server(good_zone(signing_key(key_file)))
    config_file = write_config(tmp_path / "guard.toml", server, tls_sink.port, key_file, tls)
    result = await run_cli("doctor", "--config", str(config_file))
    (tmp_path / "doctor-pass.txt").write_text(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "shop.test"
    assert lines[1] == "  OK    dkim                  publishes the configured rsa key, 2048 bits"
    assert f"upstream 127.0.0.1:{tls_sink.port} (tls starttls)" in lines
    assert lines[-1] == "12 OK."

    result = await run_cli("doctor", "--json", "--config", str(config_file))
    assert result.returncode == 0
    document = json.loads(result.stdout)
    assert (document["status"], document["counts"]) == ("ok", {"ok": 12, "warn": 0, "fail": 0, "skip": 0})
    assert [d["domain"] for d in document["domains"]] == ["shop.test"]
    check = document["domains"][0]["checks"][0]
    assert set(check) == {"check", "status", "subject", "message", "fix", "publish", "data"}
    assert (check["check"], check["status"], check["subject"]) == ("dkim", "ok", "s1._domainkey.shop.test")
    assert document["upstream"]["host"] == "127.0.0.1" and document["upstream"]["status"] == "ok"


async def test_the_command_fails_and_prints_what_to_publish(tmp_path, dns_server, tls, tls_sink, key_file):
    key = signing_key(key_file)
    server = dns_server(good_zone(key, txt={f"s1._domainkey.{DOMAIN}": [], DOMAIN: ["v=spf1 ip4:192.0.2.0/24 -all"],
                                            f"_dmarc.{DOMAIN}": []}))
    config_file = write_config(tmp_path / "guard.toml", server, tls_sink.port, key_file, tls)
    result = await run_cli("doctor", "--config", str(config_file))
    (tmp_path / "doctor-fail.txt").write_text(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr
    text = result.stdout
    assert "  FAIL  dkim                  no DKIM record at s1._domainkey.shop.test" in text
    assert f"          {keys.zone_lines(key)}" in text
    assert "          shop.test. IN TXT \"v=spf1 ip4:127.0.0.1 ip4:192.0.2.0/24 -all\"" in text
    assert "          _dmarc.shop.test. IN TXT \"v=DMARC1; p=none; rua=mailto:dmarc-reports@shop.test\"" in text
    assert text.splitlines()[-1] == "3 FAIL, 7 OK."

    result = await run_cli("doctor", "--json", "--config", str(config_file))
    assert result.returncode == 1
    document = json.loads(result.stdout)
    failed = [(c["check"], c["publish"]) for c in document["domains"][0]["checks"] if c["status"] == "fail"]
    assert [check for check, _ in failed] == ["dkim", "spf.upstream", "dmarc"]
    assert failed[0][1] == keys.zone_lines(key)


async def test_the_command_refuses_a_bad_domain_or_address(tmp_path):
    result = await run_cli("doctor", "not a domain")
    assert result.returncode == 2 and "'not a domain' is not a domain name" in result.stderr
    result = await run_cli("doctor", "--sending-ip", "300.1.1.1", "shop.test")
    assert result.returncode == 2 and "'300.1.1.1' is not an IP address" in result.stderr

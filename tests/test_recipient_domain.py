"""The recipient domain check ([recipient_domains] check = true), through a running guard with
real SMTP, against dnsmasq on loopback (and a silent UDP port for DNS timeouts).

A recipient whose domain does not exist, publishes a null MX or has no MX and no address is
refused at RCPT (550 5.1.2); DNS trouble defers it (451 4.4.3); a domain that receives mail
(by MX, or by its own address) is relayed. Answers are remembered, so a known domain costs no
DNS query; with the check off, the guard asks DNS nothing.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable

from click.testing import CliRunner

from smtp_guard import replies
from smtp_guard.app import Guard
from smtp_guard.audit_model import AuditFilter
from smtp_guard.cli.main import main
from smtp_guard.suppression_model import SuppressionEntry

from conftest import ManualClock, create_store, wait_until, store_toml
from dns_server import DNSServer, SilentDNSServer, Zone
from smtp_client import message, raw, read_reply, send

SENDER = "news@shop.test"
ZONE = Zone(
    mx=[("mx-domain.test", "mx.mx-domain.test", 10), ("nullmx.test", ".", 0)],
    a={"mx.mx-domain.test": "127.0.0.1", "a-only.test": "127.0.0.1"},
    txt={"txt-only.test": ["v=spf1 -all"]},
)


def lookups(guard: Guard, result: str) -> float:
    return guard.metrics.registry.get_sample_value("smtp_guard_recipient_domain_lookups_total",
                                                   {"result": result}) or 0.0


def cache_hits(guard: Guard) -> float:
    return guard.metrics.registry.get_sample_value("smtp_guard_recipient_domain_cache_hits_total") or 0.0


async def checking_guard(start_guard: Callable[..., Any], server: DNSServer | SilentDNSServer,
                         clock: Callable[[], float] = time.time, **settings: Any) -> Guard:
    guard: Guard = await start_guard(clock=clock, dns={"servers": [server.address], "timeout": settings.pop("timeout", "5s")},
                                     recipient_domains={"check": True, **settings})
    return guard


async def decisions(guard: Guard) -> list[tuple[str, str]]:
    await guard.enforcement.audit.flush()
    records = await guard.backends.audit.query(AuditFilter(rule_prefix="recipient_domain."))
    return sorted((record.verdict, record.rule) for record in records)


async def test_domains_that_cannot_receive_mail_are_refused_and_the_rest_relayed(start_guard, sink, dns_server):
    """Null MX, NXDOMAIN and "no MX, no address" get 550 5.1.2 at RCPT; a domain with an MX and
    one with only an A record (implicit MX) are relayed in the same message."""
    server = dns_server(ZONE)
    guard = await checking_guard(start_guard, server)
    recipients = ["a@nullmx.test", "b@does-not-exist.test", "c@txt-only.test", "d@mx-domain.test", "e@a-only.test"]

    outcome = await send(guard.smtp_address, SENDER, recipients, message())

    assert outcome.rcpt == {
        "a@nullmx.test": str(replies.DOMAIN_NULL_MX),
        "b@does-not-exist.test": str(replies.DOMAIN_NOT_FOUND),
        "c@txt-only.test": str(replies.DOMAIN_NO_MAIL_SERVER),
        "d@mx-domain.test": "250 2.1.5 OK",  # the sink's own reply: relayed at RCPT
        "e@a-only.test": "250 2.1.5 OK",
    }
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == ["d@mx-domain.test", "e@a-only.test"]
    # Audited and counted like every RCPT decision, under the rule that decided.
    assert await decisions(guard) == [("reject", "recipient_domain.no_mail_server"),
                                      ("reject", "recipient_domain.null_mx"),
                                      ("reject", "recipient_domain.nxdomain")]
    refused = guard.metrics.registry.get_sample_value("smtp_guard_recipients_total",
                                                      {"verdict": "reject", "rule": "recipient_domain.null_mx"})
    assert refused == 1
    assert [lookups(guard, r) for r in ("ok", "null_mx", "nxdomain", "no_mail_server")] == [2, 1, 1, 1]


async def test_a_dns_timeout_defers_and_is_not_remembered(start_guard, sink):
    silent = SilentDNSServer()
    try:
        guard = await checking_guard(start_guard, silent, timeout="0.3s")
        for attempt in (1, 2):
            outcome = await send(guard.smtp_address, SENDER, ["jane@mx-domain.test"], message())
            assert outcome.rcpt == {"jane@mx-domain.test": str(replies.DOMAIN_LOOKUP_FAILED)}
            assert outcome.data is None
            # Not remembered: the second attempt asked DNS again.
            assert lookups(guard, "dns_timeout") == attempt
        assert sink.messages == []
        assert await decisions(guard) == [("defer", "recipient_domain.dns_timeout")] * 2
    finally:
        silent.close()


async def test_a_refusing_name_server_defers(start_guard, sink, dns_server):
    """dnsmasq answers REFUSED outside its zone ("example" is not under .test): no server gave
    an answer, so nothing is known about the domain and the recipient is deferred."""
    guard = await checking_guard(start_guard, dns_server(ZONE))
    outcome = await send(guard.smtp_address, SENDER, ["jane@elsewhere.example"], message())
    assert outcome.rcpt == {"jane@elsewhere.example": str(replies.DOMAIN_LOOKUP_FAILED)}
    assert await decisions(guard) == [("defer", "recipient_domain.dns_error")]


async def test_a_known_domain_is_answered_from_memory(start_guard, sink, dns_server):
    server = dns_server(ZONE)
    guard = await checking_guard(start_guard, server)
    await send(guard.smtp_address, SENDER, ["one@mx-domain.test", "x@nullmx.test"], message())
    asked = server.queries()
    assert sorted(asked) == [("MX", "mx-domain.test"), ("MX", "nullmx.test")]

    # A second message to the same domains, and a second recipient there: no query at all.
    outcome = await send(guard.smtp_address, SENDER, ["two@mx-domain.test", "three@MX-Domain.test", "y@nullmx.test"],
                         message())
    assert outcome.rcpt["y@nullmx.test"] == str(replies.DOMAIN_NULL_MX)
    assert sink.delivered_to() == ["one@mx-domain.test", "two@mx-domain.test", "three@MX-Domain.test"]
    assert server.queries() == asked
    assert cache_hits(guard) == 3


async def test_concurrent_recipients_of_one_domain_share_one_query(start_guard, sink, dns_server):
    server = dns_server(ZONE)
    guard = await checking_guard(start_guard, server)
    outcomes = await asyncio.gather(*(send(guard.smtp_address, SENDER, [f"user{n}@mx-domain.test"], message())
                                      for n in range(8)))
    assert all(o.data is not None and o.data.startswith("250") for o in outcomes)
    assert server.queries() == [("MX", "mx-domain.test")]
    assert lookups(guard, "ok") == 1


async def test_an_answer_is_forgotten_after_its_ttl(start_guard, sink, dns_server):
    server = dns_server(ZONE)
    start = time.time()
    clock = ManualClock(start)
    guard = await checking_guard(start_guard, server, clock=clock, ttl="1h", negative_ttl="5m")
    asked = []
    for now in (0, 299, 301, 3601):  # seconds after the first message
        clock.now = start + now
        before = len(server.queries())
        await send(guard.smtp_address, SENDER, ["x@nullmx.test", "y@mx-domain.test"], message())
        asked.append([name for _, name in server.queries()[before:]])
    # The refused domain is asked again after 5 minutes, the one that receives mail after an hour.
    assert asked == [["nullmx.test", "mx-domain.test"], [], ["nullmx.test"], ["nullmx.test", "mx-domain.test"]]


async def test_the_cache_forgets_the_least_recently_used_domain(start_guard, sink, dns_server):
    server = dns_server(ZONE)
    guard = await checking_guard(start_guard, server, cache_size=1)
    for recipient in ("a@mx-domain.test", "b@a-only.test", "c@mx-domain.test"):
        await send(guard.smtp_address, SENDER, [recipient], message())
    assert [name for _, name in server.queries()] == ["mx-domain.test", "a-only.test", "a-only.test", "mx-domain.test"]


async def test_shadow_mode_records_but_relays(start_guard, sink, dns_server):
    guard = await checking_guard(start_guard, dns_server(ZONE), shadow=True)
    outcome = await send(guard.smtp_address, SENDER, ["x@nullmx.test"], message())
    assert outcome.rcpt == {"x@nullmx.test": "250 2.1.5 OK"}
    assert sink.delivered_to() == ["x@nullmx.test"]
    assert await decisions(guard) == [("shadow-reject", "recipient_domain.null_mx")]


async def test_suppressed_recipients_keep_their_reason_and_cost_no_lookup(start_guard, sink, dns_server):
    server = dns_server(ZONE)
    guard = await checking_guard(start_guard, server)
    entry = SuppressionEntry("address", guard.backends.normalizer.key("gone@nullmx.test"), "unsubscribed",
                             reason="test", source="test", created_at=time.time())
    await guard.backends.suppressions.add([entry])
    await guard.enforcement.reloader.refresh()
    outcome = await send(guard.smtp_address, SENDER, ["gone@nullmx.test"], message())
    assert outcome.rcpt == {"gone@nullmx.test": str(replies.SUPPRESSED)}
    assert server.queries() == []


async def test_with_the_check_off_dns_is_never_asked(start_guard, sink, dns_server):
    server = dns_server(ZONE)
    guard = await start_guard(dns={"servers": [server.address]})  # [recipient_domains] check defaults to false
    outcome = await send(guard.smtp_address, SENDER, ["x@nullmx.test", "y@does-not-exist.test"], message())
    assert outcome.accepted == ["x@nullmx.test", "y@does-not-exist.test"]
    assert sink.delivered_to() == ["x@nullmx.test", "y@does-not-exist.test"]
    assert server.queries() == []
    assert guard.front.recipient_domains is None
    assert lookups(guard, "ok") == 0 and cache_hits(guard) == 0


def test_suppress_check_never_asks_dns(tmp_path: Path, dns_server) -> None:
    """`suppress check` explains the pipeline; the domain check is the server's, and DNS-free."""
    server = dns_server(ZONE)
    config_file = tmp_path / "guard.toml"
    config_file.write_text(f'[store]\n{store_toml(tmp_path / "data" / "guard.sqlite3")}'
                           f'[dns]\nservers = ["{server.address}"]\n[recipient_domains]\ncheck = true\n')
    create_store(config_file)
    result = CliRunner().invoke(main, ["suppress", "check", "x@nullmx.test", "--config", str(config_file)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Verdict   pass" in result.output
    assert server.queries() == []


async def test_address_literals_are_not_looked_up(start_guard, sink, dns_server):
    server = dns_server(ZONE)
    guard = await checking_guard(start_guard, server)
    outcome = await send(guard.smtp_address, SENDER, ["postmaster@[127.0.0.1]"], message())
    assert outcome.accepted == ["postmaster@[127.0.0.1]"]
    assert server.queries() == []


async def test_a_client_that_leaves_mid_lookup_does_not_cancel_it_for_others(start_guard, sink):
    """The lookup is shared: the first asker's disconnect does not cancel it, and the next
    recipient of that domain waits for the same query instead of starting another."""
    silent = SilentDNSServer()
    try:
        guard = await checking_guard(start_guard, silent, timeout="3s")
        domains = guard.front.recipient_domains
        assert domains is not None
        async with raw(guard.smtp_address) as (reader, writer):
            await read_reply(reader)
            for command in (b"EHLO client.test", b"MAIL FROM:<news@shop.test>"):
                writer.write(command + b"\r\n")
                await read_reply(reader)
            writer.write(b"RCPT TO:<a@mx-domain.test>\r\n")
            await wait_until(lambda: "pending=1" in repr(domains), what="a lookup in flight")
        await wait_until(lambda: not guard.front.smtp.registry.sessions, what="the first session to end")
        assert "pending=1" in repr(domains)  # its session was cancelled, its lookup was not

        outcome = await send(guard.smtp_address, SENDER, ["b@mx-domain.test"], message())
        assert outcome.rcpt == {"b@mx-domain.test": str(replies.DOMAIN_LOOKUP_FAILED)}
        assert lookups(guard, "dns_timeout") == 1
    finally:
        silent.close()

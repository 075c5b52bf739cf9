"""The SPF evaluator of ``doctor`` (RFC 7208): the record grammar, check_host's mechanisms,
qualifiers, redirect, macros and processing limits, against records served by dnsmasq."""

from __future__ import annotations

import ipaddress

import pytest

from smtp_guard.config import DNSConfig
from smtp_guard.dns_resolver import resolver
from smtp_guard.doctor import spf
from smtp_guard.doctor.lookup import DNS

from dns_server import Zone

ZONE = Zone(
    txt={
        "shop.test": ["v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 a mx include:esp.test -all"],
        "esp.test": ["v=spf1 ip4:198.51.100.0/25 ~all"],
        "soft.test": ["v=spf1 ?ip4:203.0.113.1 ~all"],
        "redirected.test": ["v=spf1 redirect=shop.test"],
        "redirect-to-nothing.test": ["v=spf1 redirect=nothing.test"],
        "a-cidr.test": ["v=spf1 a:host.a-cidr.test/24 -all"],
        "exists.test": ["v=spf1 exists:%{ir}.allow.exists.test -all"],
        "neutral.test": ["v=spf1 ip4:192.0.2.1"],
        "include-nothing.test": ["v=spf1 include:nothing.test -all"],
        "voids.test": ["v=spf1 a:v1.test a:v2.test a:v3.test -all"],
        "two.test": ["v=spf1 -all", "v=spf1 +all"],
        "loop.test": ["v=spf1 include:loop.test -all"],
        **{f"n{n}.test": [f"v=spf1 include:n{n + 1}.test -all"] for n in range(12)},
        "n12.test": ["v=spf1 -all"],
    },
    mx=[("shop.test", "mx1.shop.test", 10), ("shop.test", "mx2.shop.test", 20)],
    a={"shop.test": "192.0.2.200", "mx1.shop.test": "203.0.113.10", "mx2.shop.test": "2001:db8:ffff::25",
       "host.a-cidr.test": "203.0.113.77", "1.2.0.192.allow.exists.test": "127.0.0.2"},
)
# v1.test, v2.test and v3.test have no address: three void lookups.


@pytest.fixture
def dns(dns_server) -> DNS:  # type: ignore[no-untyped-def]
    return DNS(resolver(DNSConfig(servers=(dns_server(ZONE).address,), timeout=2.0)))


@pytest.mark.parametrize("ip, domain, result, matched", [
    ("192.0.2.9", "shop.test", "pass", "ip4:192.0.2.0/24 in shop.test"),
    ("2001:db8::1", "shop.test", "pass", "ip6:2001:db8::/32 in shop.test"),
    ("::ffff:192.0.2.9", "shop.test", "pass", "ip4:192.0.2.0/24 in shop.test"),  # IPv4-mapped: as IPv4
    ("203.0.113.10", "shop.test", "pass", "mx in shop.test"),  # the first MX's address
    ("2001:db8:ffff::25", "shop.test", "pass", "ip6:2001:db8::/32 in shop.test"),
    ("198.51.100.7", "shop.test", "pass", "ip4:198.51.100.0/25 in esp.test"),  # through the include
    ("198.51.100.200", "shop.test", "fail", "-all in shop.test"),  # include softfails: no match there
    ("203.0.113.1", "soft.test", "neutral", "?ip4:203.0.113.1 in soft.test"),
    ("203.0.113.2", "soft.test", "softfail", "~all in soft.test"),
    ("192.0.2.9", "redirected.test", "pass", "ip4:192.0.2.0/24 in shop.test"),
    ("203.0.113.200", "a-cidr.test", "pass", "a:host.a-cidr.test/24 in a-cidr.test"),
    ("203.0.114.1", "a-cidr.test", "fail", "-all in a-cidr.test"),
    ("192.0.2.1", "exists.test", "pass", "exists:%{ir}.allow.exists.test in exists.test"),
    ("192.0.2.2", "exists.test", "fail", "-all in exists.test"),
    ("192.0.2.2", "neutral.test", "neutral", ""),  # nothing matched, no all
    ("192.0.2.2", "nothing.test", "none", ""),
])
async def test_check_host(dns, ip, domain, result, matched):
    evaluation = await spf.check_host(dns, ipaddress.ip_address(ip), domain)
    assert (evaluation.result, evaluation.matched) == (result, matched), evaluation.reason


@pytest.mark.parametrize("domain, reason", [
    ("redirect-to-nothing.test", "redirect=nothing.test: nothing.test has no SPF record"),
    ("include-nothing.test", "include:nothing.test: nothing.test has no SPF record"),
    ("voids.test", "more than 2 lookups found nothing (the last: v3.test; RFC 7208 section 4.6.4)"),
    ("two.test", "two.test has 2 SPF records (RFC 7208 section 4.5 allows one)"),
    ("n0.test", "more than 10 DNS lookups (at include:n11.test; RFC 7208 section 4.6.4)"),
    ("loop.test", "more than 10 DNS lookups (at include:loop.test; RFC 7208 section 4.6.4)"),
])
async def test_permanent_errors(dns, domain, reason):
    evaluation = await spf.check_host(dns, ipaddress.ip_address("192.0.2.99"), domain)
    assert (evaluation.result, evaluation.reason) == ("permerror", reason)


async def test_a_dns_failure_is_a_temporary_error(dns):
    # dnsmasq refuses names outside its .test zone: no answer, nothing known.
    evaluation = await spf.check_host(dns, ipaddress.ip_address("192.0.2.9"), "shop.example")
    assert evaluation.result == "temperror"


async def test_lookup_count_walks_every_include(dns):
    count = await spf.count_lookups(dns, "shop.test")
    assert (count.total, count.by_term, count.problems) == (3, [("a", 1), ("mx", 1), ("include:esp.test", 1)], [])
    count = await spf.count_lookups(dns, "n0.test")
    assert count.total == 12  # include:n1.test … include:n12.test
    count = await spf.count_lookups(dns, "loop.test")
    assert count.problems == ["loop.test: included in a loop"]


@pytest.mark.parametrize("record, error", [
    ("v=spf1 foo", "'foo': unknown mechanism 'foo'"),
    ("v=spf1 ip4:192.0.2.300", "'ip4:192.0.2.300': '192.0.2.300' is not an IPv4 network"),
    ("v=spf1 ip4:2001:db8::1", "'ip4:2001:db8::1': '2001:db8::1' is not an IPv4 network"),
    ("v=spf1 ip4:192.0.2.0/255.255.255.0", "'ip4:192.0.2.0/255.255.255.0': '192.0.2.0/255.255.255.0' is not an IPv4 network"),
    ("v=spf1 a/33", "'a/33': a prefix length out of range"),
    ("v=spf1 include", "'include': include needs a domain"),
    ("v=spf1 all:x", "'all:x': all takes no argument"),
    ("v=spf1 ptr/24", "'ptr/24': only a and mx take a prefix length without a domain"),
    ("v=spf1 redirect=a.test redirect=b.test", "redirect= appears twice"),
    ("v=spf1 -redirect=a.test", "'-redirect=a.test': a modifier takes no qualifier"),
    ("v=spf1 exists:%{x}.test", "'%{x}.test': '%' must start a macro (write %% for a percent sign)"),
    ("v=spf10 -all", "'v=spf10 -all' does not start with \"v=spf1\""),
])
def test_parse_errors(record, error):
    with pytest.raises(spf.PermError) as raised:
        spf.parse(record)
    assert str(raised.value) == error


def test_parse_keeps_terms_qualifiers_and_modifiers():
    record = spf.parse("v=spf1 mx/24//64 ~a:mail.shop.test +ip6:2001:db8::/32 exp=explain.shop.test "
                       "unknown=x redirect=_spf.shop.test")
    assert [(t.qualifier, t.mechanism, t.argument, t.cidr4, t.cidr6) for t in record.terms] == [
        ("+", "mx", "", 24, 64), ("~", "a", "mail.shop.test", None, None), ("+", "ip6", "2001:db8::/32", None, None)]
    assert record.redirect == "_spf.shop.test"
    assert record.all_term is None


def test_macros_expand_as_rfc_7208_section_7_shows():
    values = spf._MacroValues("strong-bad@email.example.com", "email.example.com", ipaddress.ip_address("192.0.2.3"))
    assert spf.expand("%{s}", values) == "strong-bad@email.example.com"
    assert spf.expand("%{o}", values) == "email.example.com"
    assert spf.expand("%{d4}", values) == "email.example.com"
    assert spf.expand("%{d2}", values) == "example.com"
    assert spf.expand("%{dr}", values) == "com.example.email"
    assert spf.expand("%{d2r}", values) == "example.email"
    assert spf.expand("%{l-}", values) == "strong.bad"
    assert spf.expand("%{lr-}", values) == "bad.strong"
    assert spf.expand("%{ir}.%{v}._spf.%{d2}", values) == "3.2.0.192.in-addr._spf.example.com"
    v6 = spf._MacroValues("a@b.c", "b.c", ipaddress.ip_address("2001:db8::cb01"))
    assert spf.expand("%{ir}.%{v}._spf.%{d2}", v6) == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.b.c")

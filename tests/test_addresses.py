"""addresses.py: what is a valid envelope mailbox, and which spellings are the same person."""

from __future__ import annotations

import pytest

from smtp_guard.addresses import (
    MAX_ADDRESS,
    MAX_LOCAL_PART,
    AddressNormalizer,
    InvalidAddress,
    Mailbox,
    key_hash,
    normalize_domain,
    parse_mailbox,
)
from smtp_guard.config import AddressConfig

DEFAULT = AddressNormalizer(AddressConfig())


# --- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "user@example.com",
    "first.last@sub.example.co.uk",
    "o'brien+tag@example.com",
    "!#$%&'*+/=?^_`{|}~-@example.com",  # every atext character
    '"john doe"@example.com',  # quoted local part with a space
    '"a\\"b"@example.com',  # quoted-pair
    '""@example.com',
    "user@bücher.example",  # U-label
    "user@xn--bcher-kva.example",  # A-label
    "jürgen@example.com",  # SMTPUTF8 local part
    "user@[192.0.2.1]",
    "user@[IPv6:2001:db8::1]",
    "a" * MAX_LOCAL_PART + "@example.com",
])
def test_valid_mailboxes_are_kept_exactly(text: str) -> None:
    mailbox = parse_mailbox(text)
    assert mailbox.text == text  # exactly what was validated is what gets relayed
    assert f"{mailbox.local}@{mailbox.domain}" == text


def test_mailbox_splits_at_the_last_at_sign() -> None:
    assert parse_mailbox('"a@b"@example.com') == Mailbox('"a@b"@example.com', '"a@b"', "example.com")


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("user", "local-part@domain"),
    ("@example.com", "local-part@domain"),
    ("user@", "local-part@domain"),
    ("a..b@example.com", "dot-atom"),
    (".a@example.com", "dot-atom"),
    ("a.@example.com", "dot-atom"),
    ("a b@example.com", "dot-atom"),
    ("a@b@example.com", "dot-atom"),
    ("a(comment)@example.com", "dot-atom"),
    ('"unterminated@example.com', "dot-atom"),
    ("a" * (MAX_LOCAL_PART + 1) + "@example.com", "64"),
    ("user@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + "." + "e" * 60 + ".com", "254"),
    ("user@-bad.example", "host name"),
    ("user@bad-.example", "host name"),
    ("user@under_score.example", "host name"),
    ("user@example..com", "host name"),
    ("user@.example.com", "host name"),
    ("user@" + "b" * 64 + ".com", "host name"),  # label longer than 63
    ("user@xn--zz.example", "host name"),  # A-label that does not decode
    ("user@[192.0.2.1", "host name"),
    ("user@[IPv6:zz]", "host name"),
])
def test_invalid_mailboxes_are_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidAddress, match=reason):
        parse_mailbox(text)


@pytest.mark.parametrize("text", [
    "us\x00er@example.com",
    "user\r\n@example.com",
    "user@exam\nple.com",
    '"a\x01b"@example.com',  # aiosmtpd accepts this in a quoted local part; we do not
    '"a\tb"@example.com',
    "user@example.com\x7f",
])
def test_control_characters_are_refused(text: str) -> None:
    with pytest.raises(InvalidAddress, match="control characters"):
        parse_mailbox(text)


def test_address_length_limit_is_254() -> None:
    domain = ".".join(["b" * 60] * 3) + ".example"  # 190 characters
    longest = "a" * 63 + "@" + domain
    assert len(longest) == MAX_ADDRESS == 254
    assert parse_mailbox(longest).text == longest
    with pytest.raises(InvalidAddress, match="254"):
        parse_mailbox("a" + longest)


def test_invalid_address_message_is_safe_to_show_a_client() -> None:
    with pytest.raises(InvalidAddress) as error:
        parse_mailbox("evil\r\n250 OK@example.com")
    assert "\r" not in str(error.value) and "\n" not in str(error.value) and "evil" not in str(error.value)


@pytest.mark.parametrize("text", ["user@example.com ", "user@ example.com", "user@example.com\u00a0"])
def test_whitespace_in_domain_is_refused(text: str) -> None:
    with pytest.raises(InvalidAddress):
        parse_mailbox(text)


@pytest.mark.parametrize("text", ["user@[999.1.1.1]", "user@[IPv6:1:2]"])
def test_impossible_address_literals_are_refused(text: str) -> None:
    with pytest.raises(InvalidAddress):
        parse_mailbox(text)


def test_trailing_dot_in_domain_is_refused() -> None:
    with pytest.raises(InvalidAddress):
        parse_mailbox("user@example.com.")


# --- domains -----------------------------------------------------------------------------------

@pytest.mark.parametrize("domain, expected", [
    ("Example.COM", "example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.example", "xn--bcher-kva.example"),  # UTS #46 maps case before encoding
    ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
    ("例え。テスト", "xn--r8jz45g.xn--zckzah"),  # ideographic full stop is a dot
    ("straße.de", "xn--strae-oqa.de"),  # IDNA 2008: ß is not folded to ss
    ("example.com.", "example.com"),  # the root dot is not part of the matching form
    ("[IPv6:2001:DB8::1]", "[ipv6:2001:db8::1]"),
])
def test_normalize_domain(domain: str, expected: str) -> None:
    assert normalize_domain(domain) == expected


@pytest.mark.parametrize("domain", ["", ".", "-a.example", "a..example", "ex ample.com", "\ufffd.com"])
def test_normalize_domain_refuses_non_host_names(domain: str) -> None:
    with pytest.raises(InvalidAddress):
        normalize_domain(domain)


def test_domain_chain_is_most_specific_first_without_the_tld() -> None:
    assert DEFAULT.domain_chain("a.b.Example.com") == ["a.b.example.com", "b.example.com", "example.com"]
    assert DEFAULT.domain_chain("localhost") == ["localhost"]
    assert DEFAULT.domain_chain("mail.GoogleMail.com") == ["mail.googlemail.com", "googlemail.com"]
    assert DEFAULT.domain("GoogleMail.com") == "gmail.com"


# --- normalization -----------------------------------------------------------------------------

@pytest.mark.parametrize("spelling, key", [
    ("Jane@Example.COM", "jane@example.com"),  # case, local and domain
    ("jane+news@example.com", "jane@example.com"),  # sub-address
    ("jane+a+b@example.com", "jane@example.com"),  # cut at the first separator
    ("jane+@example.com", "jane@example.com"),
    ("+tag@example.com", "+tag@example.com"),  # nothing before the separator: kept whole
    ("j.a.n.e@example.com", "j.a.n.e@example.com"),  # dots matter outside dotless domains
    ("Jo.Doe+news@GoogleMail.com", "jodoe@gmail.com"),  # dots, tag, alias, case
    ("jo.doe@gmail.com", "jodoe@gmail.com"),
    ("user@BÜCHER.example", "user@xn--bcher-kva.example"),  # U-label and A-label agree
    ("user@xn--bcher-kva.example", "user@xn--bcher-kva.example"),
    ("Jürgen@example.com", "jürgen@example.com"),
    ('"jane"@example.com', "jane@example.com"),  # needless quotes are the same mailbox
    ('"Jo.Doe+x"@gmail.com', "jodoe@gmail.com"),
    ('"j\\ane"@example.com', "jane@example.com"),  # quoted-pair of an ordinary character
    ('"John Doe+x"@example.com', '"john doe+x"@example.com'),  # needed quotes: kept, no tag cut
    ("user@[192.0.2.1]", "user@[192.0.2.1]"),
])
def test_default_normalization(spelling: str, key: str) -> None:
    assert DEFAULT.key(spelling) == key
    assert DEFAULT.key(parse_mailbox(spelling)) == key  # a Mailbox gives the same key


def test_normalization_rules_are_configurable() -> None:
    strict = AddressNormalizer(AddressConfig(subaddress_separators="", lowercase_local_part=False,
                                             dotless_domains=(), domain_aliases={}))
    assert strict.key("Jo.Doe+news@GoogleMail.com") == "Jo.Doe+news@googlemail.com"
    dashes = AddressNormalizer(AddressConfig(subaddress_separators="+-"))
    assert dashes.key("jane-list@example.com") == dashes.key("jane+x-y@example.com") == "jane@example.com"
    # A dotless alias domain makes its canonical domain dotless too.
    alias_only = AddressNormalizer(AddressConfig(dotless_domains=("googlemail.com",)))
    assert alias_only.key("j.d@gmail.com") == alias_only.key("j.d@googlemail.com") == "jd@gmail.com"
    custom = AddressNormalizer(AddressConfig(dotless_domains=("Bücher.example",),
                                             domain_aliases={"old.example": "BÜCHER.example"}))
    assert custom.key("a.b@old.example") == "ab@xn--bcher-kva.example"


def test_key_refuses_invalid_addresses() -> None:
    with pytest.raises(InvalidAddress):
        DEFAULT.key("not an address")


def test_key_hash_is_a_stable_signed_64_bit_value() -> None:
    value = key_hash("jane@example.com")
    assert value == key_hash("jane@example.com") != key_hash("jane@example.org")
    assert -(2**63) <= value < 2**63
    assert key_hash("jürgen@example.com") == key_hash("jürgen@example.com")

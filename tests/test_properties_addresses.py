"""Properties of addresses.py, the one parser and normalizer, over generated text (hypothesis).

Examples are bounded so the whole file runs in a few seconds; under ``CI=true`` the examples
are derandomized (the same on every run) and nothing is written to a local example database.
"""

from __future__ import annotations

import os
import unicodedata
from typing import Callable

import idna
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from smtp_guard.addresses import AddressNormalizer, InvalidAddress, Mailbox, key_hash, parse_mailbox
from smtp_guard.config import AddressConfig

PROPERTIES = settings(max_examples=150, deadline=None, derandomize=bool(os.environ.get("CI")), database=None,
                      suppress_health_check=[HealthCheck.too_slow])

DEFAULT = AddressNormalizer(AddressConfig())
STRICT = AddressNormalizer(AddressConfig(subaddress_separators="", lowercase_local_part=False,
                                         dotless_domains=(), domain_aliases={}))
DASHES = AddressNormalizer(AddressConfig(subaddress_separators="+-", dotless_domains=("example.com",)))
NORMALIZERS = [DEFAULT, STRICT, DASHES]

# Characters the relay must never write into an envelope: C0/C1 controls and DEL (Cc), lone
# surrogates (Cs, not encodable), and line or paragraph separators (Zl, Zp: line breaks to
# str.splitlines and to some terminals and log viewers).
FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})

ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
atoms = st.text(ATEXT, min_size=1, max_size=8)
dot_atoms = st.lists(atoms, min_size=1, max_size=3).map(".".join)
quoted = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=10).map(
    lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"')
utf8_atoms = st.text(st.characters(min_codepoint=0xA1, max_codepoint=0x2FFF, exclude_categories=("Cc", "Cs", "Z")),
                     min_size=1, max_size=6)
utf8_locals = st.lists(st.one_of(atoms, utf8_atoms), min_size=1, max_size=3).map(".".join)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
ascii_domains = st.lists(labels, min_size=1, max_size=3).map(lambda parts: ".".join(parts + ["example"]))
literals = st.sampled_from(["[192.0.2.1]", "[IPv6:2001:db8::1]", "[10.0.0.255]"])


def _u_label(text: str) -> str | None:
    """``text`` as a U-label of a registrable-looking domain, when IDNA 2008 accepts it."""
    try:
        idna.encode(text + ".example", uts46=True)
    except (idna.IDNAError, UnicodeError):
        return None
    return text + ".example"


u_domains = st.text(st.characters(min_codepoint=0xC0, max_codepoint=0x24F), min_size=1, max_size=8).map(
    _u_label).filter(lambda domain: domain is not None).map(str)
domains = st.one_of(ascii_domains, ascii_domains.map(str.upper), u_domains, literals)
mailboxes = st.builds(lambda local, domain: f"{local}@{domain}", st.one_of(dot_atoms, quoted, utf8_locals), domains)

# Arbitrary text, biased towards the characters that matter to the parser.
SPECIAL = '@."\\+-[]:() \t\r\n\x00\x7f\x85\u2028\u2029\ufffd\ud800éßİ'
hostile = st.one_of(
    st.text(max_size=40),
    st.text(st.sampled_from(SPECIAL + "aZ09"), max_size=30),
    st.builds(lambda m, i, c: m[:i] + c + m[i:], mailboxes, st.integers(0, 40), st.sampled_from(SPECIAL)),
)


def parse_or_none(text: str) -> Mailbox | None:
    try:
        return parse_mailbox(text)
    except InvalidAddress:
        return None


@PROPERTIES
@given(st.one_of(hostile, mailboxes))
@example("a\x85b@example.com")  # NEL, a C1 control character
@example("a\u2028b@example.com")
@example("\ud800@example.com")
def test_any_text_is_a_mailbox_or_invalid_and_never_carries_a_control_character(text: str) -> None:
    mailbox = parse_or_none(text)
    if mailbox is None:
        return
    assert not any(unicodedata.category(ch) in FORBIDDEN_CATEGORIES for ch in mailbox.text), ascii(mailbox.text)
    mailbox.text.encode("utf-8")  # what the relay writes to the upstream
    assert parse_mailbox(mailbox.text) == mailbox  # round trip: the relayed text is the same mailbox
    assert mailbox.text == f"{mailbox.local}@{mailbox.domain}"


@PROPERTIES
@given(mailboxes)
def test_generated_valid_mailboxes_are_accepted_exactly(text: str) -> None:
    assume(len(text) <= 254 and len(text.rpartition("@")[0]) <= 64)
    assert parse_mailbox(text).text == text


@PROPERTIES
@given(st.one_of(mailboxes, hostile), st.sampled_from(NORMALIZERS))
@example("a.+tag@example.com", DEFAULT)  # the cut leaves "a.", not a dot-atom on its own
@example("ü.+tag@example.org", DEFAULT)
@example("a" * 62 + ".+@example.org", DEFAULT)  # quoting "a...a." would make a 65-character local part
@example('"a.b."@gmail.com', DEFAULT)  # quoted, and a valid dot-atom once the dots are gone
def test_normalization_is_idempotent_and_keys_are_valid_mailboxes(text: str, normalizer: AddressNormalizer) -> None:
    try:
        key = normalizer.key(text)
    except InvalidAddress:
        return
    # A key is stored, exported and imported again: it must itself be a mailbox with the same key.
    assert normalizer.key(key) == key
    assert parse_mailbox(key).text == key
    key_hash(key)  # the in-memory index hashes every key


@PROPERTIES
@given(dot_atoms, atoms, st.one_of(ascii_domains, u_domains))
def test_case_and_subaddress_do_not_change_the_key(local: str, tag: str, domain: str) -> None:
    assume("+" not in local and not local.startswith("+"))
    base = f"{local}@{domain}"
    assume(parse_or_none(base) is not None and len(base) + len(tag) < 250)
    # Upper-casing must be a spelling of the same name: "ß".upper() is "SS", another domain.
    assume(domain.upper().lower() == domain.lower() and local.upper().lower() == local.lower())
    variant = f"{local.upper()}+{tag}@{domain.upper()}"
    assume(parse_or_none(variant) is not None)
    assert DEFAULT.key(variant) == DEFAULT.key(base)


@PROPERTIES
@given(st.one_of(dot_atoms, utf8_locals), u_domains)
def test_a_u_label_domain_and_its_a_label_share_a_key(local: str, domain: str) -> None:
    a_label = idna.encode(domain, uts46=True).decode("ascii")
    u_text, a_text = f"{local}@{domain}", f"{local}@{a_label}"
    assume(parse_or_none(u_text) is not None and parse_or_none(a_text) is not None)
    assert DEFAULT.key(u_text) == DEFAULT.key(a_text)
    assert DEFAULT.key(u_text).rpartition("@")[2] == a_label.lower()


@PROPERTIES
@given(st.lists(atoms, min_size=2, max_size=4), st.sampled_from(["gmail.com", "GoogleMail.com"]))
def test_dots_do_not_matter_at_dotless_domains(parts: list[str], domain: str) -> None:
    assume(all("+" not in part for part in parts))
    dotted, joined = f"{'.'.join(parts)}@{domain}", f"{''.join(parts)}@gmail.com"
    assume(parse_or_none(dotted) is not None and parse_or_none(joined) is not None)
    assert DEFAULT.key(dotted) == DEFAULT.key(joined)


@pytest.mark.parametrize("text", ["a\x85b@example.com", "a\u2028b@example.com", "a\u2029b@example.com",
                                  "j\u00e9\x9b@example.com", "\ud800@example.com"])
def test_unicode_controls_and_line_separators_are_refused(text: str) -> None:
    """Regression: the SMTPUTF8 local-part rule let C1 controls (NEL), U+2028/U+2029 and lone
    surrogates through, and a lone surrogate then crashed key_hash with UnicodeEncodeError."""
    with pytest.raises(InvalidAddress, match="control characters"):
        parse_mailbox(text)


def test_an_ipv6_literal_key_is_a_mailbox() -> None:
    """Regression: the key of ``x@[IPv6:2001:db8::1]`` has the tag in lower case, which the
    parser refused although RFC 5234 makes the tag case-insensitive."""
    key = DEFAULT.key("x@[IPv6:2001:DB8::1]")
    assert key == "x@[ipv6:2001:db8::1]"
    assert DEFAULT.key(key) == key


@pytest.mark.parametrize("text, key", [("a.+tag@example.com", '"a."@example.com'),
                                       ("ü.+tag@example.org", '"ü."@example.org')])
def test_a_cut_that_leaves_a_trailing_dot_gives_a_quoted_key(text: str, key: str) -> None:
    """Regression: cutting the tag off ``a.+tag`` left ``a.@example.com``, which is not a
    mailbox; exporting it and importing the export again reported the row as bad."""
    assert DEFAULT.key(text) == key
    assert DEFAULT.key(key) == key


# --- the SMTP front's fast split of a MAIL/RCPT path (smtp/server.py GuardSMTP._getaddr) ------

_PATH_CHARS = ATEXT + ".@<>\" ()[]:,;\\\t"


@PROPERTIES
@given(st.one_of(
    st.builds(lambda local, domain, rest: f"<{local}@{domain}>{rest}", dot_atoms, dot_atoms,
              st.text(" =ABCSIZE0129<>@", max_size=12)),
    st.text(_PATH_CHARS, max_size=30),
))
@example("<a@b> SIZE=100 BODY=8BITMIME")
@example("<a..b@c>")
@example("<a@b..c>")
@example("<a@[127.0.0.1]>")
@example('<"a b"@c>')
@example("<a@b>>")
@example("<@route:a@b>")
def test_fast_path_split_is_aiosmtpds(arg: str) -> None:
    """The guard's split of a path equals aiosmtpd's, whichever way it was found."""
    from aiosmtpd.smtp import SMTP

    from smtp_guard.smtp.server import GuardSMTP

    guard = GuardSMTP.__new__(GuardSMTP)
    reference = SMTP.__new__(SMTP)
    assert _split(guard._getaddr, arg) == _split(reference._getaddr, arg)


def _split(getaddr: Callable[[str], object], arg: str) -> object:
    """The split, or the kind of error: aiosmtpd's parser raises on some broken paths
    ("<", '"'), which its session turns into a 500 reply; the guard must do the same."""
    try:
        return getaddr(arg)
    except Exception as error:
        return type(error)


@PROPERTIES
@given(st.builds(lambda local, domain: f"{local}@{domain}", dot_atoms,
                 st.lists(st.text("abcXYZ019-", min_size=1, max_size=6), min_size=1, max_size=3).map(".".join)))
def test_a_plain_address_is_quoted_as_aiosmtplib_quotes_it(address: str) -> None:
    """The relay writes ``MAIL FROM:<address>`` and ``RCPT TO:<address>`` itself for a plain
    address (relay/pool.py)."""
    import re

    from aiosmtplib.email import quote_address

    from smtp_guard.addresses import PLAIN_ADDRESS

    assert re.fullmatch(PLAIN_ADDRESS, address)
    assert quote_address(address) == f"<{address}>"

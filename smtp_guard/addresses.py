"""The only parser and normalizer of e-mail addresses in smtp-guard.

Two different things happen to an address and they must never be confused:

* **validation** (``parse_mailbox``): is this a syntactically valid RFC 5321 mailbox we may
  relay? The envelope is validated once, here, and exactly the validated string is relayed
  (docs/design.md, "Known traps": aiosmtpd, smtplib and aiosmtplib each parse differently).
* **normalization** (``AddressNormalizer.key``): which spelling of the address is the same
  person? Used only for matching against suppression lists and tombstones — never relayed.

Every path that reads or writes a list entry (SMTP front, CLI, import, API) goes through one
``AddressNormalizer`` so that "add", "check" and "enforce" can never disagree.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import unicodedata
from dataclasses import dataclass

import idna

from .config import AddressConfig

# RFC 5321 4.1.2: atext for dot-atom local parts.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
# The common spelling of an envelope address, dot-atom@ldh-domain with nothing to parse or
# quote: the SMTP front splits such a path (and the relay quotes such an address) without the
# libraries' general parsers; any other spelling still goes through them.
PLAIN_ADDRESS = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
# Quoted local part: printable ASCII (RFC 5321 qtextSMTP / quoted-pairSMTP), widened by
# RFC 6531 section 3.3 to non-ASCII UTF-8. Control characters, which aiosmtpd lets through,
# are refused before this is tried (see _is_forbidden): they have no business in an envelope.
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"')
_LDH_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# The "IPv6:" tag is case-insensitive (RFC 5234 2.3), and keys carry it in lower case.
_ADDRESS_LITERAL = re.compile(r"\[(?:(?i:IPv6):[0-9A-Fa-f:.]+|\d{1,3}(?:\.\d{1,3}){3})\]")

MAX_LOCAL_PART = 64
MAX_ADDRESS = 254


class InvalidAddress(ValueError):
    """The text is not a mailbox we accept. ``str()`` is safe to show to an SMTP client."""


@dataclass(frozen=True)
class Mailbox:
    """A validated envelope address, split once. ``text`` is what gets relayed, unchanged."""

    text: str
    local: str
    domain: str  # as given (may be U-label or address literal)


def routes_elsewhere(mailbox: Mailbox) -> bool:
    """A local part that an MTA may read as another address: the percent hack
    (``jane%example.com@relay``), a UUCP bang path (``example.com!jane@relay``) or a quoted
    address (``"jane@example.com"@relay``). Postfix rewrites these for trusted clients by
    default (``allow_percent_hack``, ``swap_bangpath``, ``resolve_dequoted_address``), and a
    relay's smarthost trusts the relay: such a recipient could reach a suppressed or erased
    address its own key does not match."""
    local = mailbox.local
    return "%" in local or "!" in local or (local.startswith('"') and "@" in local)


def parse_mailbox(text: str) -> Mailbox:
    """Validate an envelope mailbox (no angle brackets). Raises InvalidAddress."""
    if not text or len(text) > MAX_ADDRESS:
        raise InvalidAddress("address is empty or longer than 254 characters")
    # Printable ASCII, as nearly every address is, holds no forbidden character: one C call
    # instead of a Python one per character.
    if not (text.isascii() and text.isprintable()) and any(_is_forbidden(ch) for ch in text):
        raise InvalidAddress("address contains control characters")
    at = text.rfind("@")
    if at <= 0 or at == len(text) - 1:
        raise InvalidAddress("address must be local-part@domain")
    local, domain = text[:at], text[at + 1:]
    if len(local) > MAX_LOCAL_PART:
        raise InvalidAddress("local part is longer than 64 characters")
    if not (_DOT_ATOM.fullmatch(local) or _QUOTED.fullmatch(local) or _is_utf8_local(local)):
        raise InvalidAddress("local part is not a valid dot-atom or quoted string")
    # RFC 5321 4.1.2: no whitespace and no trailing dot in an envelope domain; the lenient
    # normalize_domain (used for admin input) must not widen what the SMTP front accepts.
    printable_ascii = domain.isascii() and domain.isprintable()  # then its only whitespace is " "
    if (" " in domain if printable_ascii else any(ch.isspace() for ch in domain)) or domain.endswith("."):
        raise InvalidAddress("domain is not a valid host name")
    if domain.startswith("["):
        _check_address_literal(domain)
    else:
        normalize_domain(domain)  # raises InvalidAddress
    return Mailbox(text=text, local=local, domain=domain)


# Never in an envelope: C0 and C1 controls and DEL (Cc; NEL U+0085 is a line break to many
# readers), lone surrogates (Cs: not encodable, the relay could not write them), and the line
# and paragraph separators U+2028/U+2029 (Zl, Zp). The SMTPUTF8 rule below admits any other
# non-ASCII character, so this is the one place they are kept out.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def _is_forbidden(ch: str) -> bool:
    return ch < "\x20" or (ch >= "\x7f" and unicodedata.category(ch) in _FORBIDDEN_CATEGORIES)


def _check_address_literal(domain: str) -> None:
    if not _ADDRESS_LITERAL.fullmatch(domain):
        raise InvalidAddress("domain is not a valid host name or address literal")
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        raise InvalidAddress("domain is not a valid host name or address literal") from None


def _is_unquoted_local(local: str) -> bool:
    """The local part can be written without quotes (a dot-atom, ASCII or SMTPUTF8)."""
    return _DOT_ATOM.fullmatch(local) is not None or _is_utf8_local(local)


def _is_utf8_local(local: str) -> bool:
    # RFC 6531 (SMTPUTF8) widens atext to any non-ASCII UTF-8 character.
    return not local.isascii() and re.fullmatch(r"(?:[^\x00-\x7f]|" + _ATEXT + r")+(?:\.(?:[^\x00-\x7f]|" + _ATEXT + r")+)*", local) is not None


# The idna package is slow (tens of microseconds a call) and mail goes to few distinct domains.
@functools.lru_cache(maxsize=65536)
def normalize_domain(domain: str) -> str:
    """Lower-case A-label form of a domain (IDNA 2008 with UTS #46 mapping). Raises InvalidAddress."""
    domain = domain.strip().rstrip(".")
    if not domain:
        raise InvalidAddress("domain is empty")
    if _ADDRESS_LITERAL.fullmatch(domain):
        return domain.lower()
    try:
        ascii_domain = idna.encode(domain, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError):
        raise InvalidAddress("domain is not a valid host name") from None
    labels = ascii_domain.split(".")
    if len(ascii_domain) > 253 or not all(_LDH_LABEL.fullmatch(label) for label in labels):
        raise InvalidAddress("domain is not a valid host name")
    return ascii_domain


class AddressNormalizer:
    """Maps every spelling of a mailbox to one matching key, by the configured rules."""

    def __init__(self, config: AddressConfig) -> None:
        self._separators = config.subaddress_separators
        self._lowercase = config.lowercase_local_part
        self._aliases = {normalize_domain(k): normalize_domain(v) for k, v in config.domain_aliases.items()}
        self._dotless = frozenset(self._aliases.get(d, d) for d in map(normalize_domain, config.dotless_domains))

    def domain(self, domain: str) -> str:
        """The matching form of a domain: A-label, lower case, aliases resolved."""
        ascii_domain = normalize_domain(domain)
        return self._aliases.get(ascii_domain, ascii_domain)

    def key(self, address: str | Mailbox) -> str:
        """The matching key of an address, e.g. ``Jo.Doe+news@GoogleMail.com`` -> ``jodoe@gmail.com``."""
        mailbox = address if isinstance(address, Mailbox) else parse_mailbox(address)
        domain = self.domain(mailbox.domain)
        # Work on the local part's content: quotes are spelling (RFC 5321 4.1.2), not identity.
        local = mailbox.local
        if local.startswith('"'):
            local = re.sub(r"\\(.)", r"\1", local[1:-1])
        # A local part that needs quotes (a space, a second "@") keeps its tag: it is not an
        # ordinary user name with a sub-address.
        if self._separators and _is_unquoted_local(local):
            cut = min((i for i in (local.find(s) for s in self._separators) if i > 0), default=-1)
            # "a.+tag" is the mailbox "a.", quoted below; a tag is kept when those quotes would
            # not fit in the 64 characters of a local part.
            if cut > 0 and (_is_unquoted_local(local[:cut]) or cut + 2 <= MAX_LOCAL_PART):
                local = local[:cut]
        if self._lowercase:
            local = local.lower()
        if domain in self._dotless:
            local = local.replace(".", "")
        # A key is stored, exported and imported again, so it must be a mailbox whose key is
        # itself: quoted exactly when its content needs it ("a.+tag" is the mailbox "a.").
        if not _is_unquoted_local(local):
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{local}@{domain}"

    def domain_chain(self, domain: str) -> list[str]:
        """The domain and its parents, most specific first: a.b.example.com, b.example.com, example.com."""
        labels = self.domain(domain).split(".")
        return [".".join(labels[i:]) for i in range(len(labels) - 1)] or [".".join(labels)]


def key_hash(key: str) -> int:
    """A signed 64-bit hash of a matching key, the unit of the in-memory index.

    64 bits keep ten million entries at 80 MB; the chance that any of ten million keys
    collides with a given other address is about 5e-13 per lookup.
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)

"""Configuration: one TOML file plus environment overrides, validated once and frozen.

(Longer than our usual module: it is the single place that documents, in types, every
setting of every section, and keeping one loader beats scattering validation.)

Every setting has a safe default, so ``smtp-guard serve`` with no file at all listens on
loopback and captures mail into a local sandbox Maildir. Unknown keys are errors (a typo
must never silently fall back to a default), and every error names the file, the key and
what to write instead.

Environment overrides use ``SMTP_GUARD__SECTION__KEY=value`` (double underscores separate
levels, e.g. ``SMTP_GUARD__UPSTREAM__HOST=mx.internal``); the value is read as a TOML value
when it parses as one (``25``, ``true``, ``["10.0.0.0/8"]``) and as a plain string otherwise.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
import urllib.parse
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

ENV_PREFIX = "SMTP_GUARD__"

ListAction = Literal["reject", "drop", "hold"]
ListScope = Literal["all", "marketing"]
ProtectionAction = Literal["defer", "hold"]
RateKey = Literal["client", "auth_user", "sender", "sender_domain", "stream", "recipient_domain"]
UpstreamMode = Literal["smtp", "sandbox"]
UpstreamTLS = Literal["none", "opportunistic", "starttls", "implicit"]
BareLineEndings = Literal["reject", "normalize"]
LogFormat = Literal["text", "json"]
AdminRole = Literal["viewer", "admin"]
CountersOnError = Literal["defer", "allow"]
EventLoopChoice = Literal["auto", "uvloop", "asyncio"]


# Config.source of a config built from no file.
EMBEDDED_DEFAULTS = "<embedded defaults>"


class ConfigError(Exception):
    """A configuration problem, phrased for the operator: where it is and how to fix it."""


def _duration(default: float | None, *, never: bool = False) -> Any:
    """A duration setting: "90d", "12h", "30s" or seconds; with ``never``, also "never" (None)."""
    return field(default=default, metadata={"duration": "never" if never else "positive"})


def _path(default: str = "") -> Any:
    """A file path setting. Relative paths in a config file are relative to that file's
    directory, never to the directory a command happens to run in (where a CLI command would
    otherwise open, or create, a different store than the server's)."""
    return field(default=default, metadata={"path": True})


def _at_least(default: int, minimum: int) -> Any:
    """An integer setting whose smallest value is not 0 (e.g. -1 meaning "off": TOML has no null)."""
    return field(default=default, metadata={"minimum": minimum})


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TLSListenConfig:
    cert: str = _path()
    key: str = _path()
    # Refuse MAIL until the client has issued STARTTLS.
    require: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)


@dataclass(frozen=True)
class AuthConfig:
    # user name -> password hash made by ``smtp-guard hash-password`` (never plaintext).
    users: Mapping[str, str] = field(default_factory=dict)
    # AUTH is only offered after STARTTLS; this allows it without TLS for loopback clients only.
    allow_plaintext_on_loopback: bool = False
    # Password guessing: after this many failed AUTH attempts a session is closed (421 4.7.0) ...
    max_failures_per_session: int = 3
    # ... and a client address with this many failures within failure_window is refused AUTH
    # (454 4.7.0) until the window has passed.
    max_failures_per_client: int = 10
    failure_window: float = _duration(600.0)


@dataclass(frozen=True)
class SMTPConfig:
    listen: ListenAddress = ListenAddress("127.0.0.1", 2525)
    hostname: str = ""
    max_message_size: int = _at_least(25 * 1024 * 1024, minimum=1)
    max_recipients: int = _at_least(1000, minimum=1)
    # Longest wait for the client's next command (421 4.4.2 after it).
    idle_timeout: float = _duration(300.0)
    # Longest wait between two reads inside DATA: a slow but steady client finishes, a stalled
    # one is cut (421 4.4.2). Like Postfix's smtpd_timeout, per read, not per message.
    data_timeout: float = _duration(300.0)
    # Longest life of one session, however busy (421 4.4.2 and close, in the middle of DATA too).
    session_timeout: float = _duration(3600.0)
    max_sessions: int = _at_least(100, minimum=1)
    # What to do with a bare CR or LF inside DATA (SMTP smuggling). A bare CR or LF inside a
    # command line is always refused (500 5.5.2).
    bare_line_endings: BareLineEndings = "reject"
    # Text after "220 <hostname>" in the greeting; it names no software on purpose.
    banner: str = "ESMTP"
    # Add a Received: trace header to relayed and held mail (RFC 5321 section 4.4 asks a relay to).
    received_header: bool = True
    shutdown_grace: float = _duration(30.0)
    # SMTP front processes on the one listen port (roles/supervisor.py); 1 runs everything in
    # one process.
    workers: int = _at_least(1, minimum=1)
    # With workers > 1: rate-limit keys (buckets) the workers can track at once in their
    # shared table (64 bytes each in shared memory). A bucket that is full again is dropped;
    # past this many still refilling, a new key is deferred (451 4.3.5) and logged.
    rate_limit_keys: int = _at_least(131072, minimum=1024)
    # Load balancers whose connections start with a PROXY protocol header (v1 or v2) naming
    # the real client, as networks ("10.0.0.5/32"): access, rate limits, the Received header
    # and the audit see that client. A PROXY header from anywhere else closes the connection.
    proxy_protocol_from: tuple[str, ...] = ()
    # How long a listed load balancer may take to send its header after connecting.
    proxy_protocol_timeout: float = _duration(5.0)
    # The event loop `serve` runs on: "auto" is uvloop where it is installed (a quarter less CPU
    # per message), else asyncio's; "uvloop" refuses to start without it; "asyncio" never uses it.
    event_loop: EventLoopChoice = "auto"
    tls: TLSListenConfig = TLSListenConfig()
    auth: AuthConfig = AuthConfig()

    def proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """``proxy_protocol_from`` as networks; validated when the config loads."""
        return [_network(text, "[smtp] proxy_protocol_from") for text in self.proxy_protocol_from]


@dataclass(frozen=True)
class UpstreamConfig:
    # "sandbox" captures mail into <data dir>/sandbox (a Maildir); nothing leaves the machine.
    mode: UpstreamMode = "sandbox"
    host: str = ""
    port: int = 25
    tls: UpstreamTLS = "none"
    tls_verify: bool = True
    ca_file: str = _path()
    username: str = ""
    password: str = ""
    helo_name: str = ""
    max_connections: int = 10
    connect_timeout: float = _duration(10.0)
    command_timeout: float = _duration(60.0)
    # Upstream connections idle longer than this are closed instead of reused.
    idle_timeout: float = _duration(30.0)
    # How often /readyz checks that the upstream accepts a connection (connect, greeting, QUIT).
    probe_interval: float = _duration(10.0)


@dataclass(frozen=True)
class AccessConfig:
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    # Networks wider than /8 (IPv4) or /16 (IPv6) make the guard an open relay for much of
    # the internet and are refused unless this is true.
    allow_open_relay: bool = False

    def open_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The allowed networks wide enough to count as "the world"."""
        return [n for n in self.allow_networks if n.prefixlen < (8 if n.version == 4 else 16)]


def default_store_path(environ: Mapping[str, str]) -> str:
    """Where the store lives when no setting names it: the user's data directory (XDG), the
    same for the server and every admin command wherever they are started."""
    base = environ.get("XDG_DATA_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".local" / "share")
    return str(Path(base) / "smtp-guard" / "guard.sqlite3")


@dataclass(frozen=True)
class StoreConfig:
    # SQLite: the database file. "": default_store_path() (~/.local/share/smtp-guard/guard.sqlite3).
    path: str = _path()
    # PostgreSQL instead of SQLite (several guard instances on one store): a libpq URL such as
    # "postgresql://guard@db.internal/smtpguard". Exactly one of path and url. The password is
    # better kept out of the file: PGPASSWORD, ~/.pgpass, a service file (PGSERVICE) or the
    # environment override SMTP_GUARD__STORE__URL.
    url: str = ""
    # With url: where this guard keeps its local files (erasure key by default, sandbox
    # Maildir, import uploads). "": the user's data directory. With path: beside the store file.
    directory: str = _path()
    # With url: connections each guard process keeps to PostgreSQL at most.
    pool_size: int = _at_least(10, minimum=1)
    # How often the running server looks for changes made by the CLI or API.
    reload_interval: float = _duration(1.0)
    # How often each guard process reads the change generation: an admin change is in force on
    # a guard at most this long (plus its refresh) after the command committed it.
    change_poll_interval: float = _duration(0.1)
    # How long an admin command waits for every running guard to confirm its change.
    confirm_timeout: float = _duration(5.0)
    # How long a write waits for another writer (a CLI import, a second process) before the
    # mail that needed it gets 451 4.3.0; well below the clients' own timeouts.
    busy_timeout: float = _duration(5.0)

    @property
    def is_postgresql(self) -> bool:
        return bool(self.url)

    @property
    def setting(self) -> str:
        """The setting that names the store, with its value (the URL without its password),
        for messages: ``[store] path /var/lib/…`` or ``[store] url postgresql://…``."""
        return f"[store] url {self.location}" if self.url else f"[store] path {self.path}"

    @property
    def location(self) -> str:
        """Where the store is, safe to print: the file, or the URL without its password."""
        return redact_url(self.url) if self.url else self.path

    @property
    def data_dir(self) -> Path:
        return Path(self.directory) if self.url else Path(self.path).parent


def redact_url(url: str) -> str:
    """A database URL without its password (logs, errors and `config check` print it)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = urllib.parse.quote(parts.username or "", safe="")
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}" if user else f":***@{host}"))


@dataclass(frozen=True)
class CountersConfig:
    """Where the rate-limit counters and the breaker's stream counts live (docs/design.md,
    "Scale"). Without ``url``, in the guard itself (one process, or its workers' shared memory):
    each guard instance has limits of its own. With several instances behind a load balancer,
    one Redis server they share: a limit holds across all of them, a stream trips its breaker
    once, and both survive the restart of any of them."""

    # "redis://HOST:6379/0", "rediss://HOST:6380/0" (TLS) or "unix:///run/redis/redis.sock";
    # a password goes in the URL ("redis://:PASSWORD@HOST:6379/0").
    url: str = ""
    # When Redis cannot be reached or answer within timeout: "defer" every recipient a rate
    # limit applies to and every message the breaker counts (451 4.3.0; the platform retries),
    # or "allow" it uncounted (logged, audited and counted as "would have deferred"). Never
    # silently unlimited; a stream known to be tripped stays held.
    on_error: CountersOnError = "defer"
    # Longest wait for one answer from Redis, connecting included; an RCPT waits as long.
    timeout: float = _duration(1.0)
    # Connections each guard process opens to Redis at most; more requests at once wait
    # (within timeout) for one to be free.
    max_connections: int = _at_least(32, minimum=1)
    # Put before every key the guard writes: several guard deployments can share one database.
    key_prefix: str = "smtp-guard:"


@dataclass(frozen=True)
class MetricsConfig:
    listen: ListenAddress | None = ListenAddress("127.0.0.1", 9425)


@dataclass(frozen=True)
class AdminToken:
    """One ``[admin.tokens]`` entry: the token itself is never in the config, only its hash."""

    role: AdminRole
    hash: str  # "sha256:<64 hex digits>", printed by `smtp-guard admin token create`


@dataclass(frozen=True)
class AdminConfig:
    listen: ListenAddress | None = None
    # name -> AdminToken; the name is recorded as the actor of every change made with it.
    tokens: Mapping[str, AdminToken] = field(default_factory=dict)
    # Certificate and key (PEM) to serve the API and console over HTTPS; both or neither.
    tls_cert: str = _path()
    tls_key: str = _path()
    # A console login lasts this long, then asks for the token again.
    session_lifetime: float = _duration(8 * 3600.0)
    # Largest suppression import upload, in bytes.
    max_upload: int = _at_least(1024 ** 3, minimum=1)
    # Failed logins (bad or missing token) from one address within the window before it is
    # refused with 429 without the token being checked.
    auth_max_failures: int = _at_least(10, minimum=1)
    auth_failure_window: float = _duration(60.0)

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert and self.tls_key)


@dataclass(frozen=True)
class DKIMKeyConfig:
    """One ``[[dkim.keys]]`` entry. Mail whose From domain is ``domain`` or under it is signed
    with every key of the most specific such domain (RSA and Ed25519 together, when both)."""

    domain: str
    selector: str
    key_file: str = _path()  # PEM (PKCS#8 or PKCS#1), RSA or Ed25519: `smtp-guard dkim keygen` writes one


# Signed when present (RFC 6376 section 5.4.1's list, plus the unsubscribe and feedback headers).
DKIM_SIGNED_HEADERS = (
    "From", "Reply-To", "Subject", "Date", "To", "Cc", "Message-ID", "In-Reply-To", "References",
    "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "Content-ID", "Content-Description",
    "Resent-Date", "Resent-From", "Resent-Sender", "Resent-To", "Resent-Cc", "Resent-Message-ID",
    "List-Id", "List-Help", "List-Unsubscribe", "List-Unsubscribe-Post", "List-Subscribe", "List-Post",
    "List-Owner", "List-Archive", "Feedback-ID",
)


@dataclass(frozen=True)
class DKIMConfig:
    keys: tuple[DKIMKeyConfig, ...] = ()
    # Header fields signed when the message has them.
    headers: tuple[str, ...] = DKIM_SIGNED_HEADERS
    # Signed once more than present, so that nobody can add one after signing without breaking
    # the signature (a second From or List-Unsubscribe above the signed one).
    oversign: tuple[str, ...] = ("From", "Subject", "List-Unsubscribe", "List-Unsubscribe-Post")


@dataclass(frozen=True)
class UnsubscribeConfig:
    """One-click unsubscribe (RFC 8058) handled by the guard itself: it adds List-Unsubscribe to
    the mail it relays and takes the unsubscribes, whatever the platform does with them."""

    # The one-click HTTP listener ("" or "off": no one-click, no header added). It must be
    # reachable from the internet (mailbox providers POST to it), directly or through a proxy.
    listen: ListenAddress | None = None
    # The public https:// URL under which that listener is reached; tokens are appended to it.
    base_url: str = ""
    # Serve HTTPS on the listener itself (both or neither); without them put it behind a proxy.
    tls_cert: str = _path()
    tls_key: str = _path()
    # An address on the guard's own SMTP listener for the mailto: form ("" : no mailto). Mail to
    # it is accepted from any client (only to this address) and never relayed.
    mailto: str = ""
    # The suppression list an unsubscribe puts the recipient on.
    list: str = "unsubscribed"
    # How long a link keeps working (RFC 8058 asks for "some days"; providers may try later).
    token_lifetime: float = _duration(60 * 86400.0)
    # Which mail gets the headers (when it has no List-Unsubscribe of its own and one recipient):
    # message classes, stream ids, and sender patterns (regex search); any match counts.
    classes: tuple[str, ...] = ("marketing",)
    streams: tuple[str, ...] = ()
    senders: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.listen is not None

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert and self.tls_key)


@dataclass(frozen=True)
class DNSConfig:
    # Name servers as "IP" or "IP:PORT" ("[v6]:PORT"); empty: the system's (/etc/resolv.conf).
    servers: tuple[str, ...] = ()
    # How long one lookup may take before it counts as a timeout.
    timeout: float = _duration(5.0)

    def nameservers(self) -> list[tuple[str, int]]:
        """The servers as (IP, port); validated when the config loads."""
        return [_nameserver(text, "[dns] servers") for text in self.servers]


@dataclass(frozen=True)
class RecipientDomainsConfig:
    """The recipient domain check at RCPT: a domain that cannot receive mail is refused before
    the platform's mail to it reaches the upstream (which would only bounce it later)."""

    # Refuse (550 5.1.2) a recipient whose domain does not exist (NXDOMAIN), publishes a null MX
    # (RFC 7505) or has neither MX nor address records; defer (451 4.4.3) when DNS times out or
    # fails. Off by default: it adds a DNS lookup per new domain to the RCPT path.
    check: bool = False
    # How long a domain's answer is remembered: one that receives mail ...
    ttl: float = _duration(3600.0)
    # ... and one that was refused (short: a domain being set up starts working soon after).
    negative_ttl: float = _duration(300.0)
    # Most domains remembered at once (the least recently used is forgotten first).
    cache_size: int = _at_least(100_000, minimum=1)
    # Decide, log, audit and count, but let the mail pass ("would have refused").
    shadow: bool = False


def _network(text: str, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a network; write e.g. \"10.0.0.5/32\" "
                          "(the load balancer's address)") from None


def _nameserver(text: str, where: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?|([0-9.]+)(?::([0-9]{1,5}))?|([0-9A-Fa-f:]+)", text.strip())
    if not match:
        raise ConfigError(f"{where}: {text!r} is not \"IP\" or \"IP:PORT\" (IPv6: \"[::1]:53\")")
    host = match.group(1) or match.group(3) or match.group(5)
    port = int(match.group(2) or match.group(4) or 53)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{where}: {host!r} is not an IP address (name servers are given by address)") from None
    if not 0 < port <= 65535:
        raise ConfigError(f"{where}: port {port} is out of range 1-65535")
    return host, port


@dataclass(frozen=True)
class AddressConfig:
    """Rules that decide which spellings of an address are the same person."""

    # Drop "+tag" (or another separator's tag) from the local part before matching.
    subaddress_separators: str = "+"
    # Local parts are case-sensitive in RFC 5321 but not at any real mailbox provider.
    lowercase_local_part: bool = True
    # Domains whose mailboxes ignore dots in the local part.
    dotless_domains: tuple[str, ...] = ("gmail.com", "googlemail.com")
    # Domains that are aliases of one mailbox namespace, mapped to the canonical one.
    domain_aliases: Mapping[str, str] = field(
        default_factory=lambda: {"googlemail.com": "gmail.com"}
    )


@dataclass(frozen=True)
class ListConfig:
    action: ListAction = "reject"
    # Seconds an entry lives by default; None means forever.
    lifetime: float | None = _duration(None, never=True)
    description: str = ""
    # "marketing": the list only applies to marketing mail; receipts and password resets
    # still reach the person (docs/design.md, "Lists have meaning").
    scope: ListScope = "all"
    # Decide, log, audit and count, but let the mail pass ("would have rejected").
    shadow: bool = False


DEFAULT_LISTS: Mapping[str, ListConfig] = {
    # Order matters: when an address is on several lists the first one decides.
    "complained": ListConfig(description="recipient reported mail as spam; never expires"),
    "unsubscribed": ListConfig(description="recipient opted out; never expires"),
    "invalid": ListConfig(description="address does not exist (hard bounce); never expires"),
    "bounced": ListConfig(
        lifetime=90 * 86400.0,
        description="mail bounced; expires after 90 days so a fixed mailbox can receive again",
    ),
    "manual": ListConfig(description="added by an admin; never expires"),
}


ErasureAction = Literal["reject", "drop"]


@dataclass(frozen=True)
class ErasureConfig:
    # The secret that turns addresses into tombstones; "" means <data dir>/erasure.key.
    # Back it up: without it, tombstones cannot be matched and the guard refuses to start.
    key_file: str = _path()
    # "reject": 550 5.7.1 so the platform learns it still holds the address; "drop": accept silently.
    action: ErasureAction = "reject"


@dataclass(frozen=True)
class StreamsConfig:
    # Headers that name the campaign or notification type a message belongs to, first found wins.
    id_headers: tuple[str, ...] = ("X-Campaign-ID", "X-Mailgun-Campaign-Id", "X-SES-CONFIGURATION-SET", "List-Id")
    # Internal control headers removed before the message is relayed (or held for release).
    strip_headers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClassRule:
    """One classification rule; every pattern given must match (regex search, case-insensitive)."""

    message_class: str
    header: str = ""  # header name whose value must match ``pattern``
    pattern: str = ""
    sender: str = ""  # regex on the envelope sender
    subject: str = ""  # regex on the Subject header


@dataclass(frozen=True)
class ClassConfig:
    """What a message class means for the protections."""

    # Sensitive class: hold a stream after this many recipients until an admin approves
    # (0: hold from the first recipient). -1: no approval gate.
    approval_after: int = _at_least(-1, minimum=-1)
    # Personal/transactional class: the same body to more than this many distinct recipients
    # trips the breaker (the "same partner id to everyone" case). 0: no fan-out detector.
    fanout_limit: int = 0
    shadow: bool = False


@dataclass(frozen=True)
class ClassifyConfig:
    default: str = "marketing"
    rules: tuple[ClassRule, ...] = ()


DEFAULT_CLASSES: Mapping[str, ClassConfig] = {
    "marketing": ClassConfig(),
    "transactional": ClassConfig(),
}


@dataclass(frozen=True)
class RateLimitRule:
    name: str
    key: RateKey
    rate: float  # tokens per second
    burst: float
    action: ProtectionAction = "defer"
    # Only traffic matching every given condition counts against this rule.
    match_sender: str = ""
    match_class: str = ""
    match_header: str = ""
    match_pattern: str = ""
    shadow: bool = False

    @property
    def needs_message(self) -> bool:
        """Decidable only at the end of DATA (needs headers, class or stream)."""
        return self.key == "stream" or bool(self.match_class or self.match_header)


@dataclass(frozen=True)
class BreakerConfig:
    enabled: bool = True
    # Distinct recipients of one stream are counted over this sliding window.
    window: float = _duration(3600.0)
    # Trip when a stream exceeds max(floor, factor x the sender's baseline) ...
    factor: float = 5.0
    floor: int = 1000
    # ... or this absolute ceiling (0: none).
    ceiling: int = 0
    # What happens to a tripped stream's further recipients.
    action: ProtectionAction = "hold"
    # A stream with no new recipient for this long is finished; its size teaches the baseline.
    stream_idle: float = _duration(1800.0)
    # Weight of a finished stream in the sender's baseline (exponentially decayed average).
    learning_rate: float = 0.3
    shadow: bool = False


@dataclass(frozen=True)
class PolicyConfig:
    # Run every protection as "would have blocked": decide, log, audit, count, deliver.
    # Erasures are always enforced (a legal obligation, not a rollout risk).
    shadow: bool = False


@dataclass(frozen=True)
class HoldConfig:
    # Release worker retry schedule for held mail that the upstream deferred.
    retry_initial: float = _duration(60.0)
    retry_max: float = _duration(3600.0)
    # After this long in the release queue a recipient is marked failed.
    max_age: float = _duration(5 * 86400.0)
    poll_interval: float = _duration(1.0)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: LogFormat = "text"
    # Addresses in log lines appear as the audit trail's keyed pseudonyms (h:…, erased:<id>). true writes
    # them in plaintext, which BREAKS THE ERASURE GUARANTEE: an erased address then survives in
    # journald or wherever the logs go, out of the guard's reach.
    plaintext_addresses: bool = False


@dataclass(frozen=True)
class AuditConfig:
    flush_interval: float = _duration(1.0)
    batch_size: int = 500


@dataclass(frozen=True)
class Config:
    smtp: SMTPConfig = SMTPConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    access: AccessConfig = AccessConfig()
    store: StoreConfig = StoreConfig()
    counters: CountersConfig = CountersConfig()
    metrics: MetricsConfig = MetricsConfig()
    admin: AdminConfig = AdminConfig()
    dns: DNSConfig = DNSConfig()
    recipient_domains: RecipientDomainsConfig = RecipientDomainsConfig()
    dkim: DKIMConfig = DKIMConfig()
    unsubscribe: UnsubscribeConfig = UnsubscribeConfig()
    addresses: AddressConfig = AddressConfig()
    lists: Mapping[str, ListConfig] = field(default_factory=lambda: dict(DEFAULT_LISTS))
    hold: HoldConfig = HoldConfig()
    erasure: ErasureConfig = ErasureConfig()
    streams: StreamsConfig = StreamsConfig()
    classify: ClassifyConfig = ClassifyConfig()
    classes: Mapping[str, ClassConfig] = field(default_factory=lambda: dict(DEFAULT_CLASSES))
    rate_limits: tuple[RateLimitRule, ...] = ()
    breaker: BreakerConfig = BreakerConfig()
    policy: PolicyConfig = PolicyConfig()
    logging: LoggingConfig = LoggingConfig()
    audit: AuditConfig = AuditConfig()
    source: str = EMBEDDED_DEFAULTS

    @property
    def list_priority(self) -> list[str]:
        """Lists in decision order: lists for all mail before marketing-only lists (so that an
        address on both is refused at RCPT), then the configured order."""
        return sorted(self.lists, key=lambda name: self.lists[name].scope != "all")

    @property
    def erasure_key_file(self) -> Path:
        # Empty: beside the store, so that one directory holds (and backs up) the guard's state.
        return Path(self.erasure.key_file) if self.erasure.key_file else self.store.data_dir / "erasure.key"


# ---------------------------------------------------------------------------------------------
# Parsing helpers


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any, where: str, *, allow_never: bool = True) -> float | None:
    """Read "90d", "12h", "30m", "45s", a positive number of seconds, or "never" (None)."""
    if value == "never" and allow_never:
        return None
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds is None or not math.isfinite(seconds):
        never = " or \"never\"" if allow_never else ""
        raise ConfigError(f"{where}: {value!r} is not a duration; write e.g. \"90d\", \"12h\", \"30s\"{never}")
    if seconds <= 0:
        never = "; write \"never\" for no expiry" if allow_never else ""
        raise ConfigError(f"{where}: a duration must be positive, got {value!r}{never}")
    return seconds


def parse_listen(value: Any, where: str) -> ListenAddress:
    """Read "host:port" or "[v6]:port"."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected \"host:port\", got {value!r}")
    match = re.fullmatch(r"\[([^\]]+)\]:([0-9]{1,6})|([^:\[\]]+):([0-9]{1,6})", value.strip())
    if not match:
        raise ConfigError(f"{where}: {value!r} is not \"host:port\" (IPv6: \"[::1]:2525\")")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ConfigError(f"{where}: port {port} is out of range 0-65535")
    return ListenAddress(host, port)


def _coerce(value: Any, default: Any, annotation: str, where: str, minimum: int = 0) -> Any:
    """Check one scalar against the type of its default value."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if value < 0:
            raise ConfigError(f"{where}: must not be negative, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{where}: must be at least {minimum}, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        literal = re.match(r"Literal\[(.*)\]", annotation)
        if literal:
            choices = [c.strip().strip("'\"") for c in literal.group(1).split(",")]
            if value not in choices:
                raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}"
                                  f"{_did_you_mean(value, choices, quoted=True)}")
        return value
    raise ConfigError(f"{where}: unsupported value {value!r}")


def _did_you_mean(word: str, choices: Iterable[str], quoted: bool = False) -> str:
    """`` (did you mean port?)`` for a near miss of one of ``choices``, else nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    if not close:
        return ""
    return f" (did you mean {close[0]!r}?)" if quoted else f" (did you mean {close[0]}?)"


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    named = ", ".join(f"{key}{_did_you_mean(key, allowed)}" for key in unknown)
    variables = [name for key in unknown for name in _env_names(table[key])]
    if variables:
        raise ConfigError(f"environment {', '.join(variables)}: unknown key(s) {named} in {where}; "
                          f"known keys are {', '.join(sorted(allowed))}")
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {named}; known keys are {', '.join(sorted(allowed))}")


_ALIASES = {
    "BareLineEndings": "Literal['reject', 'normalize']",
    "UpstreamMode": "Literal['smtp', 'sandbox']",
    "UpstreamTLS": "Literal['none', 'opportunistic', 'starttls', 'implicit']",
    "LogFormat": "Literal['text', 'json']",
    "ListAction": "Literal['reject', 'drop', 'hold']",
    "ErasureAction": "Literal['reject', 'drop']",
    "ListScope": "Literal['all', 'marketing']",
    "ProtectionAction": "Literal['defer', 'hold']",
    "AdminRole": "Literal['viewer', 'admin']",
    "RateKey": "Literal['client', 'auth_user', 'sender', 'sender_domain', 'stream', 'recipient_domain']",
    "CountersOnError": "Literal['defer', 'allow']",
    "EventLoopChoice": "Literal['auto', 'uvloop', 'asyncio']",
}


def _build_section(cls: type, table: Mapping[str, Any], where: str) -> Any:
    """Build a frozen section dataclass from a TOML table, field by field."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    default = cls()
    _check_keys(table, {f.name for f in fields(cls)}, where)
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in table:
            continue
        key = _key_of(table, f.name, where)
        current = getattr(default, f.name)
        raw = _resolve_env(table[f.name], current)
        annotation = _ALIASES.get(str(f.type), str(f.type))
        if isinstance(current, ListenAddress) or "ListenAddress" in annotation:
            # Only an optional listener (metrics, admin) can be turned off; SMTP cannot.
            off = "None" in annotation and raw in ("", "off", False)
            values[f.name] = None if off else parse_listen(raw, key)
        elif "duration" in f.metadata:
            values[f.name] = parse_duration(raw, key, allow_never=f.metadata["duration"] == "never")
        elif isinstance(current, (TLSListenConfig, AuthConfig)):
            values[f.name] = _build_section(type(current), raw, key)
        elif isinstance(current, Mapping):
            if not isinstance(raw, Mapping) or not all(isinstance(v, str) for v in raw.values()):
                raise ConfigError(f"{key}: expected a table of strings, got {raw!r}")
            values[f.name] = dict(raw)
        elif isinstance(current, tuple):
            if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
                raise ConfigError(f"{key}: expected a list of strings, got {raw!r}")
            values[f.name] = tuple(raw)
        else:
            values[f.name] = _coerce(raw, current, annotation, key, minimum=f.metadata.get("minimum", 0))
    return cls(**values)


def _build_access(table: Mapping[str, Any], where: str) -> AccessConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    _check_keys(table, {"allow_networks", "allow_open_relay"}, where)
    allow_open_relay = _coerce(_resolve_env(table.get("allow_open_relay", False), False), False, "bool",
                               _key_of(table, "allow_open_relay", where))
    if "allow_networks" not in table:
        return AccessConfig(allow_open_relay=allow_open_relay)
    key = _key_of(table, "allow_networks", where)
    raw = _resolve_env(table["allow_networks"], [])
    if not isinstance(raw, list):
        raise ConfigError(f"{key}: expected a list like [\"127.0.0.0/8\"], got {raw!r}")
    networks = []
    for item in raw:
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise ConfigError(
                f"{key}: {item!r} is not a network; write e.g. \"10.0.0.0/8\" or \"192.0.2.7/32\""
            ) from None
    return AccessConfig(allow_networks=tuple(networks), allow_open_relay=allow_open_relay)


def _build_lists(table: Mapping[str, Any], where: str) -> dict[str, ListConfig]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table of lists like [lists.bounced], got {table!r}")
    lists = dict(DEFAULT_LISTS)
    for name, raw in table.items():
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", name):
            raise ConfigError(f"{where}.{name}: list names are lower-case letters, digits, '-' and '_'")
        base = lists.get(name, ListConfig(description=""))
        overridden = _build_section(ListConfig, raw, f"{where}.{name}")
        merged = {f.name: getattr(base, f.name) for f in fields(ListConfig)}
        merged.update({k: getattr(overridden, k) for k in raw})
        lists[name] = ListConfig(**merged)
    return lists


_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TOKEN_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def _build_admin(table: Mapping[str, Any], where: str) -> AdminConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    admin: AdminConfig = _build_section(AdminConfig, {k: v for k, v in table.items() if k != "tokens"}, where)
    raw_tokens = table.get("tokens", {})
    if not isinstance(raw_tokens, Mapping):
        raise ConfigError(f"{where}.tokens: expected a table like [admin.tokens], got {raw_tokens!r}")
    tokens = {}
    for name, raw in raw_tokens.items():
        key = f"{where}.tokens.{name}"
        if not _TOKEN_NAME.fullmatch(name):
            raise ConfigError(f"{key}: a token name is letters, digits, '.', '_' and '-' (at most 64)")
        raw = _resolve_env(raw, {})
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{key}: tokens are stored hashed, never in clear; run `smtp-guard admin token "
                              f"create {name} --role viewer|admin` and paste the line it prints")
        _check_keys(raw, {"role", "hash"}, key)
        role = _coerce(_resolve_env(raw.get("role", ""), ""), "", "Literal['viewer', 'admin']", f"{key}.role")
        digest = _resolve_env(raw.get("hash", ""), "")
        if not isinstance(digest, str) or not _TOKEN_HASH.fullmatch(digest):
            raise ConfigError(f"{key}.hash: expected \"sha256:\" and 64 hex digits, as printed by "
                              f"`smtp-guard admin token create {name}`")
        tokens[name] = AdminToken(role=role, hash=digest)
    if bool(admin.tls_cert) != bool(admin.tls_key):
        raise ConfigError(f"{where}: tls_cert and tls_key go together (HTTPS needs both, plain HTTP neither)")
    return replace(admin, tokens=tokens)


_SECTIONS: dict[str, type] = {
    "smtp": SMTPConfig,
    "upstream": UpstreamConfig,
    "store": StoreConfig,
    "counters": CountersConfig,
    "metrics": MetricsConfig,
    "addresses": AddressConfig,
    "dns": DNSConfig,
    "unsubscribe": UnsubscribeConfig,
    "recipient_domains": RecipientDomainsConfig,
    "hold": HoldConfig,
    "erasure": ErasureConfig,
    "streams": StreamsConfig,
    "breaker": BreakerConfig,
    "policy": PolicyConfig,
    "logging": LoggingConfig,
    "audit": AuditConfig,
}


@dataclass(frozen=True)
class _EnvValue:
    """An environment override: its raw text and its TOML reading. Which one is meant depends
    on the setting (a password of digits stays a string), so the choice is made per field."""

    raw: str
    parsed: Any
    name: str  # the variable, named in errors


def _key_of(table: Mapping[str, Any], name: str, where: str) -> str:
    """Where a setting came from, for an error: a value from the environment is reported under
    its variable (the thing to fix), one from the file under its section and key."""
    value = table.get(name)
    return f"environment {value.name}" if isinstance(value, _EnvValue) else f"{where}.{name}"


def _env_names(value: Any) -> list[str]:
    """The environment variables that put ``value`` (a setting or a whole table) there."""
    if isinstance(value, _EnvValue):
        return [value.name]
    return [name for item in value.values() for name in _env_names(item)] if isinstance(value, dict) else []


def _resolve_env(value: Any, default: Any) -> Any:
    if isinstance(value, _EnvValue):
        return value.raw if isinstance(default, str) else value.parsed
    return value


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX):].split("__") if part]
        if len(path) < 2:
            raise ConfigError(f"environment {name}: write SMTP_GUARD__SECTION__KEY, e.g. SMTP_GUARD__UPSTREAM__HOST")
        try:
            parsed: Any = tomllib.loads(f"v = {raw}")["v"]
        except (tomllib.TOMLDecodeError, RecursionError):  # RecursionError: "[[[[…" nested too deep
            parsed = raw
        value = _EnvValue(raw, parsed, name)
        table = data
        for part in path[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"environment {name}: {part} is not a table")
        table[path[-1]] = value


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([smhd])\s*$")


def parse_rate(value: Any, where: str) -> float:
    """Read "100/s", "600/m", "10000/h", "50000/d" as tokens per second."""
    match = _RATE.match(value) if isinstance(value, str) else None
    if not match or not 0 < float(match.group(1)) < math.inf:
        raise ConfigError(f"{where}: {value!r} is not a rate; write e.g. \"600/m\" or \"10000/h\"")
    return float(match.group(1)) / _DURATION_UNITS[match.group(2)]


def _compile_check(pattern: str, where: str) -> None:
    if pattern:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"{where}: {pattern!r} is not a valid regular expression: {error}") from None


def _build_classify(table: Any, where: str) -> ClassifyConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    _check_keys(table, {"default", "rules"}, where)
    default = table.get("default", "marketing")
    if not isinstance(default, str) or not default:
        raise ConfigError(f"{where}.default: expected a class name")
    rules = []
    raw_rules = table.get("rules", [])
    if not isinstance(raw_rules, list):
        raise ConfigError(f"{where}.rules: expected a list of rules ([[classify.rules]])")
    for number, raw in enumerate(raw_rules, start=1):
        here = f"{where}.rules[{number}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{here}: expected a table")
        _check_keys(raw, {"class", "header", "pattern", "sender", "subject"}, here)
        if not all(isinstance(v, str) for v in raw.values()) or not raw.get("class"):
            raise ConfigError(f"{here}: needs class = \"NAME\" and string conditions")
        if not (raw.get("header") or raw.get("sender") or raw.get("subject")):
            raise ConfigError(f"{here}: give at least one of header (+ pattern), sender, subject")
        if raw.get("pattern") and not raw.get("header"):
            raise ConfigError(f"{here}: pattern needs header = \"Header-Name\"")
        for key in ("pattern", "sender", "subject"):
            _compile_check(raw.get(key, ""), f"{here}.{key}")
        rules.append(ClassRule(raw["class"], raw.get("header", ""), raw.get("pattern", ""),
                               raw.get("sender", ""), raw.get("subject", "")))
    return ClassifyConfig(default=default, rules=tuple(rules))


def _build_classes(table: Any, where: str) -> dict[str, ClassConfig]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected tables like [classes.sanction], got {table!r}")
    classes = dict(DEFAULT_CLASSES)
    for name, raw in table.items():
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", name):
            raise ConfigError(f"{where}.{name}: class names are lower-case letters, digits, '-' and '_'")
        classes[name] = _build_section(ClassConfig, raw, f"{where}.{name}")
    return classes


def _validate_unsubscribe(config: Config, where: str) -> None:
    unsub = config.unsubscribe
    if unsub.list not in config.lists:
        raise ConfigError(f"{where}: [unsubscribe] list: no list named {unsub.list!r}; configured lists are "
                          f"{', '.join(config.lists)}")
    if bool(unsub.tls_cert) != bool(unsub.tls_key):
        raise ConfigError(f"{where}: [unsubscribe] tls_cert and tls_key go together")
    for pattern in unsub.senders:
        _compile_check(pattern, f"{where}: [unsubscribe] senders")
    if not unsub.enabled:
        if unsub.mailto or unsub.base_url:
            raise ConfigError(f"{where}: [unsubscribe] mailto and base_url need listen = \"HOST:PORT\" (the "
                              "one-click listener, which RFC 8058 requires beside the mailto)")
        return
    if not re.fullmatch(r"https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?", unsub.base_url):
        raise ConfigError(f"{where}: [unsubscribe] base_url: {unsub.base_url!r} is not an https:// URL; RFC 8058 "
                          "requires HTTPS, e.g. \"https://unsubscribe.example.com\"")
    if unsub.mailto and not re.fullmatch(r"[A-Za-z0-9._+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}", unsub.mailto):
        raise ConfigError(f"{where}: [unsubscribe] mailto: {unsub.mailto!r} is not a plain address, "
                          "e.g. \"unsubscribe@unsubscribe.example.com\"")


_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,61}[a-z0-9]")
_SELECTOR = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 field name: printable ASCII but ':'


def _build_dkim(table: Any, where: str) -> DKIMConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    _check_keys(table, {"keys", "headers", "oversign"}, where)
    dkim: DKIMConfig = _build_section(DKIMConfig, {k: v for k, v in table.items() if k != "keys"}, where)
    for name in ("headers", "oversign"):
        for header in getattr(dkim, name):
            if not _HEADER_NAME.fullmatch(header):
                raise ConfigError(f"{where}.{name}: {header!r} is not a header field name")
    signed = {h.lower() for h in dkim.headers}
    if "from" not in signed:
        raise ConfigError(f"{where}.headers: must include \"From\" (RFC 6376 requires signing it)")
    if missing := [h for h in dkim.oversign if h.lower() not in signed]:
        raise ConfigError(f"{where}.oversign: {', '.join(missing)} must also be in headers")
    raw_keys = table.get("keys", [])
    if not isinstance(raw_keys, list):
        raise ConfigError(f"{where}.keys: expected [[dkim.keys]] tables")
    keys, seen = [], set()
    for number, raw in enumerate(raw_keys, start=1):
        here = f"{where}.keys[{number}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{here}: expected a table with domain, selector and key_file")
        _check_keys(raw, {"domain", "selector", "key_file"}, here)
        values = {}
        for name in ("domain", "selector", "key_file"):
            value = _resolve_env(raw.get(name), "")
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{here}.{name}: required (a string)")
            values[name] = value
        domain = values["domain"].lower().rstrip(".")
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise ConfigError(f"{here}.domain: {values['domain']!r} is not a domain name") from None
        if not _DOMAIN.fullmatch(domain):
            raise ConfigError(f"{here}.domain: {values['domain']!r} is not a domain name, e.g. \"example.com\"")
        selector = values["selector"].lower()
        if not _SELECTOR.fullmatch(selector):
            raise ConfigError(f"{here}.selector: {values['selector']!r} is not a DNS label, e.g. \"s2026\"")
        if (domain, selector) in seen:
            raise ConfigError(f"{here}: selector {selector!r} of {domain} is configured twice")
        seen.add((domain, selector))
        keys.append(DKIMKeyConfig(domain, selector, values["key_file"]))
    return replace(dkim, keys=tuple(keys))


def _build_rate_limits(raw_rules: Any, where: str) -> tuple[RateLimitRule, ...]:
    if not isinstance(raw_rules, list):
        raise ConfigError(f"{where}: expected a list of rules ([[rate_limits]])")
    rules, names = [], set()
    keys = {"name", "key", "rate", "burst", "action", "match", "shadow"}
    for number, raw in enumerate(raw_rules, start=1):
        here = f"{where}[{number}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{here}: expected a table")
        _check_keys(raw, keys, here)
        name = raw.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", name) or name in names:
            raise ConfigError(f"{here}.name: a unique lower-case name is required (it appears in metrics)")
        names.add(name)
        key = raw.get("key")
        allowed = ("client", "auth_user", "sender", "sender_domain", "stream", "recipient_domain")
        if key not in allowed:
            raise ConfigError(f"{here}.key: {key!r} is not one of {', '.join(allowed)}")
        rate = parse_rate(raw.get("rate"), f"{here}.rate")
        burst = raw.get("burst", 1)
        if isinstance(burst, bool) or not isinstance(burst, (int, float)) or not 1 <= burst < math.inf:
            raise ConfigError(f"{here}.burst: a number of at least 1")
        action = raw.get("action", "defer")
        if action not in ("defer", "hold"):
            raise ConfigError(f"{here}.action: \"defer\" (451, the platform retries) or \"hold\" (paced release)")
        match = raw.get("match", {})
        if not isinstance(match, Mapping):
            raise ConfigError(f"{here}.match: expected a table like {{ sender = \"@shop\\\\.test$\" }}")
        _check_keys(match, {"sender", "class", "header", "pattern"}, f"{here}.match")
        if not all(isinstance(v, str) for v in match.values()):
            raise ConfigError(f"{here}.match: expected strings, got {dict(match)!r}")
        for k in ("sender", "pattern"):
            _compile_check(match.get(k, ""), f"{here}.match.{k}")
        shadow = raw.get("shadow", False)
        if not isinstance(shadow, bool):
            raise ConfigError(f"{here}.shadow: expected true or false")
        rules.append(RateLimitRule(name, key, rate, float(burst), action, match.get("sender", ""),
                                   match.get("class", ""), match.get("header", ""), match.get("pattern", ""), shadow))
    return tuple(rules)


def build_config(data: Mapping[str, Any], source: str, *, base_dir: Path | None = None,
                 environ: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed TOML document (plus env overrides already merged) into a Config.

    Relative paths are resolved against ``base_dir`` (the config file's directory); an empty
    ``[store] path`` becomes the user's data directory."""
    where = source
    _check_keys(data, set(_SECTIONS) | {"admin", "dkim", "access", "lists", "classify", "classes", "rate_limits"}, where)
    kwargs: dict[str, Any] = {"source": source}
    for name, cls in _SECTIONS.items():
        if name in data:
            kwargs[name] = _build_section(cls, data[name], f"{where}: [{name}]")
    if "admin" in data:
        kwargs["admin"] = _build_admin(data["admin"], f"{where}: [admin]")
    if "dkim" in data:
        kwargs["dkim"] = _build_dkim(data["dkim"], f"{where}: [dkim]")
    if "access" in data:
        kwargs["access"] = _build_access(data["access"], f"{where}: [access]")
    if "lists" in data:
        kwargs["lists"] = _build_lists(data["lists"], f"{where}: [lists]")
    if "classify" in data:
        kwargs["classify"] = _build_classify(data["classify"], f"{where}: [classify]")
    if "classes" in data:
        kwargs["classes"] = _build_classes(data["classes"], f"{where}: [classes]")
    if "rate_limits" in data:
        kwargs["rate_limits"] = _build_rate_limits(data["rate_limits"], f"{where}: [[rate_limits]]")
    config: Config = _resolve_paths(Config(**kwargs), base_dir)
    config = replace(config, store=_locate_store(config.store, os.environ if environ is None else environ, where))
    from_environment = _env_names(dict(data))
    try:
        _validate(config, where)
    except ConfigError as error:
        if not from_environment:
            raise
        # A check across settings cannot tell which one is wrong: name the variables in play.
        raise ConfigError(f"{error} (settings from the environment: {', '.join(from_environment)})") from None
    return config


def _locate_store(store: StoreConfig, environ: Mapping[str, str], where: str) -> StoreConfig:
    """Exactly one store: a PostgreSQL URL, or a SQLite file (by default in the user's data
    directory). With a URL the local files go to ``directory``, by default that same place."""
    if store.url:
        if store.path:
            raise ConfigError(f"{where}: [store] path and url are both set; a guard uses one store: keep url "
                              "for PostgreSQL (several instances) or path for SQLite, and remove the other")
        parts = urllib.parse.urlsplit(store.url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ConfigError(f"{where}: [store] url {redact_url(store.url)!r} is not a PostgreSQL URL; write "
                              "\"postgresql://USER@HOST[:PORT]/DATABASE\" (the password from PGPASSWORD or ~/.pgpass)")
        directory = store.directory or str(Path(default_store_path(environ)).parent)
        return replace(store, directory=directory)
    if store.directory:
        raise ConfigError(f"{where}: [store] directory is only for a PostgreSQL store ([store] url); a SQLite "
                          "store keeps the guard's files beside its database file ([store] path)")
    return store if store.path else replace(store, path=default_store_path(environ))


def _resolve_paths(section: Any, base_dir: Path | None) -> Any:
    """Every path setting (declared with ``_path``) made absolute against ``base_dir``."""
    if base_dir is None or not is_dataclass(section) or isinstance(section, type):
        return section
    changes: dict[str, Any] = {}
    for f in fields(section):
        value = getattr(section, f.name)
        if f.metadata.get("path") and value and not Path(value).is_absolute():
            changes[f.name] = str(base_dir / value)
        elif is_dataclass(value):
            resolved = _resolve_paths(value, base_dir)
            if resolved is not value:
                changes[f.name] = resolved
        elif isinstance(value, tuple) and value and all(is_dataclass(item) for item in value):
            items = tuple(_resolve_paths(item, base_dir) for item in value)
            if any(new is not old for new, old in zip(items, value)):
                changes[f.name] = items
    return replace(section, **changes) if changes else section


def _validate(config: Config, where: str) -> None:
    for server in config.dns.servers:
        _nameserver(server, f"{where}: [dns] servers")
    _validate_unsubscribe(config, where)
    up = config.upstream
    if up.mode == "smtp" and not up.host:
        raise ConfigError(
            f"{where}: [upstream] mode = \"smtp\" needs host = \"mx.example.net\" "
            "(or set mode = \"sandbox\" to capture mail locally)"
        )
    if up.mode == "sandbox" and up.host:
        # An operator who names an upstream means to relay to it: answering 250 while
        # capturing everything locally would be a silent outage.
        raise ConfigError(
            f"{where}: [upstream] host = {up.host!r} is set but mode is \"sandbox\", so mail would be "
            "captured locally and never delivered; add mode = \"smtp\" to relay to it, or remove host"
        )
    if not 0 < up.port <= 65535:
        # The socket layer would take it modulo 65536: port 99999 relayed to 34463.
        raise ConfigError(f"{where}: [upstream] port {up.port} is out of range 1-65535")
    _validate_listeners(config, where)
    wide = config.access.open_networks()
    if wide and not config.access.allow_open_relay:
        raise ConfigError(
            f"{where}: [access] allow_networks {', '.join(map(str, wide))} opens the relay to much of the "
            "internet; list the sending platform's networks instead (e.g. \"10.1.2.0/24\"), or set "
            "allow_open_relay = true if that is really meant"
        )
    proxies = [n for n in config.smtp.proxy_networks() if n.prefixlen < (8 if n.version == 4 else 16)]
    if proxies and not config.access.allow_open_relay:
        # Whoever may send a PROXY header chooses the client address the guard believes,
        # allow_networks included: as dangerous as a wide allow-list.
        raise ConfigError(
            f"{where}: [smtp] proxy_protocol_from {', '.join(map(str, proxies))} lets much of the internet "
            "claim any client address (an allowed network included); list the load balancers' own "
            "addresses (e.g. \"10.0.0.5/32\"), or set [access] allow_open_relay = true if that is really meant")
    if config.smtp.workers > 1 and config.smtp.listen.port == 0:
        raise ConfigError(f"{where}: [smtp] workers = {config.smtp.workers} needs a fixed listen port: with port 0 "
                          "each worker would get its own port; set listen = \"host:PORT\"")
    if bool(up.username) != bool(up.password):
        raise ConfigError(f"{where}: [upstream] username and password must be set together")
    tls = config.smtp.tls
    if bool(tls.cert) != bool(tls.key):
        raise ConfigError(f"{where}: [smtp.tls] cert and key must be set together")
    for path in (tls.cert, tls.key):
        if path and ("\x00" in path or not Path(path).is_file()):  # is_file() raises on a NUL
            raise ConfigError(f"{where}: [smtp.tls] file {path!r} does not exist")
    if tls.require and not tls.enabled:
        raise ConfigError(f"{where}: [smtp.tls] require = true needs cert and key")
    for user, hashed in config.smtp.auth.users.items():
        if not hashed.startswith("scrypt$"):
            raise ConfigError(
                f"{where}: [smtp.auth.users] {user!r} must be a hash; run `smtp-guard hash-password` and paste its output"
            )
    if config.logging.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"{where}: [logging] level {config.logging.level!r} is not one of debug, info, warning, error")
    known_classes = set(config.classes) | {config.classify.default}
    for rule in config.classify.rules:
        if rule.message_class not in config.classes:
            raise ConfigError(f"{where}: [classify] rule names class {rule.message_class!r}; "
                              f"define it with [classes.{rule.message_class}]")
    for limit in config.rate_limits:
        if limit.match_class and limit.match_class not in known_classes:
            raise ConfigError(f"{where}: [[rate_limits]] {limit.name}: unknown class {limit.match_class!r}")
    if not 0 < config.breaker.learning_rate <= 1 or config.breaker.factor <= 0:
        raise ConfigError(f"{where}: [breaker] learning_rate must be in (0, 1] and factor positive")
    if config.upstream.max_connections < 1:
        raise ConfigError(f"{where}: [upstream] max_connections must be at least 1")
    _validate_counters(config.counters, where)


_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def _validate_listeners(config: Config, where: str) -> None:
    """Two of the guard's own listeners on one port would make the second fail at start with
    "address already in use", blaming another process."""
    listeners = [(name, address) for name, address in (
        ("[smtp] listen", config.smtp.listen), ("[metrics] listen", config.metrics.listen),
        ("[admin] listen", config.admin.listen), ("[unsubscribe] listen", config.unsubscribe.listen))
        if address is not None and address.port != 0]  # port 0: the kernel picks a free one
    for number, (name, address) in enumerate(listeners):
        for other_name, other in listeners[:number]:
            if address.port == other.port and (address.host == other.host or address.host in _WILDCARD_HOSTS
                                               or other.host in _WILDCARD_HOSTS):
                raise ConfigError(f"{where}: {name} {address} and {other_name} {other} are the same port; "
                                  "give each listener a port of its own")


_COUNTERS_SCHEMES = ("redis", "rediss", "unix")


def _validate_counters(counters: CountersConfig, where: str) -> None:
    if not counters.url:
        return
    scheme, sep, rest = counters.url.partition("://")
    if not sep or scheme.lower() not in _COUNTERS_SCHEMES or not rest.strip("/"):
        raise ConfigError(f"{where}: [counters] url must be a Redis URL such as \"redis://10.0.0.7:6379/0\", "
                          "\"rediss://HOST:6380/0\" (TLS) or \"unix:///run/redis/redis.sock\"")


def load_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load FILE (or the embedded defaults when None), apply env overrides, validate, freeze."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    source = EMBEDDED_DEFAULTS
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such file; `smtp-guard config example > {source}` writes a "
                              "commented one to start from") from None
        except IsADirectoryError:
            raise ConfigError(f"{source}: is a directory; --config takes the TOML file") from None
        except PermissionError:
            raise ConfigError(f"{source}: permission denied; run as the guard's user or fix the file's "
                              "permissions") from None
        except OSError as error:
            raise ConfigError(f"{source}: cannot read: {error.strerror or error}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{source}: not valid TOML: {error}") from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"{source}: not UTF-8 text (byte {error.start}); save the file as UTF-8") from None
    _apply_env(data, environ)
    base_dir = None if path is None else Path(path).absolute().parent
    return build_config(data, source, base_dir=base_dir, environ=environ)

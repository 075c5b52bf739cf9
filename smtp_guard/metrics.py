"""Every Prometheus metric smtp-guard exports, declared once on an injected registry.

Naming follows the Prometheus guide: ``smtp_guard_`` prefix, base units, ``_total`` for
counters. Label values come only from closed sets (verdicts, rule ids built from configured
list names, reply classes) — never an address, a campaign id or other unbounded text.

With ``[smtp] workers = N`` every process of the guard records into prometheus-client's
multiprocess files and the supervisor's ``/metrics`` reads them all (``use_multiprocess_files``,
``multiprocess_registry``): counters and histograms add up over the processes (a worker that
died keeps its counts), ``sessions_active`` adds up over the live ones, and the gauges only the
supervisor sets (hold queue, list sizes, breakers) take the most recent value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import prometheus_client.values
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MESSAGE_OUTCOMES = ("relayed", "held", "dropped", "refused", "deferred")
UPSTREAM_ERROR_CLASSES = ("4xx", "5xx", "connection", "timeout")
AUTH_FAILURE_OUTCOMES = ("invalid", "throttled")
# What a recipient domain's DNS said (recipient_domains.DomainStatus).
DOMAIN_LOOKUP_RESULTS = ("ok", "null_mx", "nxdomain", "no_mail_server", "dns_timeout", "dns_error")
# Shared counters in Redis ([counters] url): what was asked, and how it failed.
REDIS_OPERATIONS = ("settle", "count", "sizes", "finish", "ping")
REDIS_ERRORS = ("connection", "timeout", "response")
# PROXY protocol headers on the SMTP listener ([smtp] proxy_protocol_from), by result.
PROXY_HEADER_RESULTS = ("accepted", "local", "invalid", "untrusted")
# Gauges only the background role sets: with several processes the value it set last.
SET_BY_SUPERVISOR: Final = "mostrecent"
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def use_multiprocess_files(directory: Path) -> None:
    """From now on, metrics this process creates record into ``directory`` (an empty one),
    and so do those of processes it starts (the environment variable they inherit)."""
    os.environ[MULTIPROCESS_ENV] = str(directory)
    # prometheus-client picks the value class when first imported; this process imported it
    # before the directory was known.
    prometheus_client.values.ValueClass = prometheus_client.values.get_value_class()  # type: ignore[no-untyped-call]


def multiprocess_registry(directory: Path) -> CollectorRegistry:
    """The registry ``/metrics`` serves: every process's metrics, read from ``directory``."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return registry


def forget_process(pid: int, directory: Path) -> None:
    """A worker is gone: its live gauges (sessions_active) no longer count."""
    mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "smtp_guard_messages_total",
            "Messages that reached the end of DATA, by outcome (relayed: upstream accepted; held: "
            "stored in the hold queue; dropped: every recipient dropped; refused: 5xx; deferred: 4xx).",
            ["outcome"], registry=r)
        self.recipients = Counter(
            "smtp_guard_recipients_total",
            "Recipient decisions at RCPT time, by verdict and the rule that decided.",
            ["verdict", "rule"], registry=r)
        self.upstream_duration = Histogram(
            "smtp_guard_upstream_duration_seconds",
            "Time the upstream took to answer, by SMTP command.",
            ["command"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.upstream_errors = Counter(
            "smtp_guard_upstream_errors_total",
            "Upstream failures by class: 4xx and 5xx replies, lost connections, timeouts.",
            ["class"], registry=r)
        self.sessions_active = Gauge(
            "smtp_guard_sessions_active", "SMTP client sessions currently open.", registry=r,
            multiprocess_mode="livesum")
        self.sessions_refused = Counter(
            "smtp_guard_sessions_refused_total",
            "SMTP client connections refused at connect, by reason.", ["reason"], registry=r)
        self.dkim_messages = Counter(
            "smtp_guard_dkim_messages_total",
            "Messages leaving for the upstream by DKIM outcome (signed; not_configured: no [[dkim.keys]] for "
            "the From domain; failed: deferred with 451, never relayed unsigned).",
            ["outcome"], registry=r)
        self.dkim_broken_signatures = Counter(
            "smtp_guard_dkim_broken_signatures_total",
            "The platform's own DKIM signatures that a change made by the guard (a stripped or added "
            "header, normalized line endings) invalidated.", registry=r)
        self.unsubscribes = Counter(
            "smtp_guard_unsubscribes_total",
            "Unsubscribe requests through the guard's own List-Unsubscribe, by way (one_click: RFC 8058 POST, "
            "mailto) and result (unsubscribed; malformed, forged or expired: refused; unavailable: store error).",
            ["via", "result"], registry=r)
        self.list_unsubscribe = Counter(
            "smtp_guard_list_unsubscribe_total",
            "Selected mail by what the guard did about List-Unsubscribe (added; platform_header: the platform "
            "added its own; several_recipients: not added, the link names one person).",
            ["outcome"], registry=r)
        self.admin_requests = Counter(
            "smtp_guard_admin_requests_total",
            "Admin API and console requests, by method, route template and HTTP status.",
            ["method", "route", "status"], registry=r)
        self.admin_auth_failures = Counter(
            "smtp_guard_admin_auth_failures_total",
            "Admin requests refused for authentication, by reason (missing or invalid token or session, "
            "forbidden: role too low, throttled: too many failures from one address).",
            ["reason"], registry=r)
        self.relay_denied = Counter(
            "smtp_guard_relay_denied_total",
            "MAIL commands refused because the client may not relay (network or AUTH).", registry=r)
        self.auth_failures = Counter(
            "smtp_guard_auth_failures_total",
            "Failed SMTP AUTH attempts, by outcome (invalid: credentials checked and wrong; throttled: "
            "refused without a check because the client address failed too often recently).",
            ["outcome"], registry=r)
        self.hold_messages = Gauge(
            "smtp_guard_hold_messages", "Messages in the hold queue with a recipient held or released.",
            registry=r, multiprocess_mode=SET_BY_SUPERVISOR)
        self.hold_recipients = Gauge(
            "smtp_guard_hold_recipients", "Recipients held or released but not yet delivered.",
            registry=r, multiprocess_mode=SET_BY_SUPERVISOR)
        self.hold_oldest_age = Gauge(
            "smtp_guard_hold_oldest_age_seconds", "Age of the oldest message in the hold queue (0 when empty).",
            registry=r, multiprocess_mode=SET_BY_SUPERVISOR)
        self.hold_deliveries = Counter(
            "smtp_guard_hold_deliveries_total",
            "Released held recipients by relay outcome (delivered, deferred, failed).", ["outcome"], registry=r)
        self.suppression_entries = Gauge(
            "smtp_guard_suppression_entries", "Live suppression list entries, by list.", ["list"],
            registry=r, multiprocess_mode=SET_BY_SUPERVISOR)
        self.index_reloads = Counter(
            "smtp_guard_suppression_index_updates_total",
            "Times the in-memory suppression index took changes from the store.", registry=r)
        self.shadow_decisions = Counter(
            "smtp_guard_shadow_decisions_total",
            "Decisions of policies in shadow mode: what would have been deferred, held or rejected.",
            ["verdict", "rule"], registry=r)
        self.erasure_attempts = Counter(
            "smtp_guard_erasure_attempts_total",
            "Attempts to mail an erased address: evidence that an upstream system still holds it.", registry=r)
        self.tombstones = Gauge(
            "smtp_guard_erasure_tombstones", "Erasure tombstones enforced by this instance.",
            registry=r, multiprocess_mode=SET_BY_SUPERVISOR)
        self.audit_dropped = Counter(
            "smtp_guard_audit_records_dropped_total",
            "Audit records dropped because the store stayed unavailable and the buffer was full.", registry=r)
        # Bulk-send protection: rule is breaker.volume, breaker.fanout or gate.<configured class>.
        self.breaker_trips = Counter(
            "smtp_guard_breaker_trips_total",
            "Streams tripped by the volume breaker, fan-out detector or an approval gate (again past an "
            "approved ceiling included), by rule and message class.", ["rule", "class"], registry=r)
        self.breaker_recipients = Counter(
            "smtp_guard_breaker_recipients_total",
            "Recipients of tripped or cancelled streams, by what happened to them (hold, defer, reject), "
            "rule and message class.", ["verdict", "rule", "class"], registry=r)
        self.breaker_admin_actions = Counter(
            "smtp_guard_breaker_admin_actions_total",
            "Admin decisions on tripped streams taken up by this server (approve, cancel), by rule and "
            "message class.", ["action", "rule", "class"], registry=r)
        self.breakers_tripped = Gauge(
            "smtp_guard_breakers_tripped", "Streams tripped and waiting for an admin's approval or cancellation.",
            registry=r, multiprocess_mode=SET_BY_SUPERVISOR)
        # The recipient domain check ([recipient_domains]).
        self.domain_lookups = Counter(
            "smtp_guard_recipient_domain_lookups_total",
            "DNS lookups of recipient domains (cache misses), by result: ok, null_mx, nxdomain, "
            "no_mail_server (refused at RCPT), dns_timeout, dns_error (deferred).", ["result"], registry=r)
        self.domain_cache_hits = Counter(
            "smtp_guard_recipient_domain_cache_hits_total",
            "Recipient domain checks answered from memory, without a DNS lookup.", registry=r)
        self.domain_lookup_duration = Histogram(
            "smtp_guard_recipient_domain_lookup_duration_seconds",
            "Time a recipient domain's DNS lookup took (the RCPT that needed it waited as long).",
            registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        # The shared counters in Redis ([counters] url): rate limits and the breaker's streams.
        self.redis_duration = Histogram(
            "smtp_guard_redis_request_duration_seconds",
            "Round trips to Redis by operation (settle: one recipient's or message's rate-limit buckets, "
            "waited for by its RCPT or end of DATA; count: a message's recipients counted into its stream "
            "for the breaker, waited for by its end of DATA; sizes and finish: the breaker sync reading "
            "tripped streams' audiences and ending idle streams; ping: the readiness probe), failures included.",
            ["operation"], registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.redis_errors = Counter(
            "smtp_guard_redis_errors_total",
            "Redis requests that failed, by operation and error (connection: refused or lost; timeout: no "
            "answer within [counters] timeout; response: Redis refused the command, e.g. out of memory). "
            "Each failed settle or count deferred its mail (451 4.3.0) or let it through uncounted "
            "([counters] on_error); a stream known to be tripped stays held.",
            ["operation", "error"], registry=r)
        self.proxy_headers = Counter(
            "smtp_guard_proxy_headers_total",
            "PROXY protocol headers at the start of SMTP connections, by result (accepted: a listed load "
            "balancer named the client; local: its own connection, e.g. a health check; invalid: a listed "
            "balancer's connection without a valid header, closed; untrusted: a header from an address not "
            "in [smtp] proxy_protocol_from, refused and closed).", ["result"], registry=r)
        # PostgreSQL store ([store] url) only: a SQLite store has no pool and no network.
        self.store_query_seconds = Histogram(
            "smtp_guard_store_query_duration_seconds",
            "Time a PostgreSQL store call took, waiting for a pooled connection included, by kind "
            "(statement: one statement; transaction: several, committed together).", ["kind"], registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.store_pool_connections = Gauge(
            "smtp_guard_store_pool_connections",
            "Connections of this guard's PostgreSQL pools, by state (in_use, idle); in_use at [store] pool_size "
            "means calls wait for a connection.", ["state"], registry=r, multiprocess_mode="livesum")
        for outcome in MESSAGE_OUTCOMES:
            self.messages.labels(outcome)
        for error_class in UPSTREAM_ERROR_CLASSES:
            self.upstream_errors.labels(error_class)
        for auth_outcome in AUTH_FAILURE_OUTCOMES:
            self.auth_failures.labels(auth_outcome)
        for result in DOMAIN_LOOKUP_RESULTS:
            self.domain_lookups.labels(result)
        for result in PROXY_HEADER_RESULTS:
            self.proxy_headers.labels(result)
        for operation in REDIS_OPERATIONS:
            for error in REDIS_ERRORS:
                self.redis_errors.labels(operation, error)

    def set_store_pool(self, in_use: int, idle: int) -> None:
        self.store_pool_connections.labels("in_use").set(in_use)
        self.store_pool_connections.labels("idle").set(idle)

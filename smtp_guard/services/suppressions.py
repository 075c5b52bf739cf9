"""Admin operations on suppression lists, shared by the CLI and the HTTP API.

A *target* is either an address (``jane@example.com``) or a whole domain written with a
leading ``@`` (``@example.com``). A bare ``example.com`` is refused rather than read as a
domain: one typo (``janeexample.com``) must not suppress a whole domain.

``check`` explains a recipient by running the server's own ``SuppressionPolicy`` through a
``Pipeline`` over an index built from just the matching entries, so "explain" can never
disagree with "enforce". Every change is recorded in the audit trail (who, what, which list).
"""

from __future__ import annotations

import csv
import io
import json
import math
from array import array
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Iterable, Literal, Sequence, TextIO

from ..address_table import AddressTable
from ..addresses import InvalidAddress, key_hash, parse_mailbox
from ..audit_model import AuditRecord
from ..index import SuppressionIndex
from ..erasure.index import TombstoneIndex
from ..erasure.keys import erasure_token
from ..policy.base import Decision, RecipientContext
from ..policy.default import default_pipeline
from ..suppression_model import (
    DomainRule,
    EntryKind,
    list_order,
    SuppressionEntry,
    SuppressionFilter,
    SuppressionSnapshot,
)
from .context import AdminContext

ExportFormat = Literal["csv", "jsonl"]
EXPORT_COLUMNS = ("kind", "value", "list", "reason", "source", "created_at", "expires_at", "include_subdomains")
# ``lifetime=FOREVER`` overrides a list's default lifetime with "never expires".
FOREVER = math.inf
_CURSOR_PREFIX = "r"


class InvalidTarget(ValueError):
    """A target that is neither an address nor ``@domain``, or one that may not be stored; the
    message names it and says why. ``misspelled``: the text itself is wrong (an example of a
    right one helps), not what it names (an erased address)."""

    def __init__(self, value: str, why: str, misspelled: bool = True) -> None:
        super().__init__(f"{value!r} {why}")
        self.value = value
        self.misspelled = misspelled


class InvalidCursor(ValueError):
    """A paging cursor that no listing handed out (mistyped, or cut short)."""

    def __init__(self, text: str) -> None:
        super().__init__("not a cursor from a previous page; start again without one")
        self.text = text


class UnknownList(ValueError):
    """A list name that is not configured; carries the configured names for the message."""

    def __init__(self, name: str, configured: Sequence[str]) -> None:
        super().__init__(f"no list named {name!r}; configured lists are {', '.join(configured)}")
        self.name = name
        self.configured = tuple(configured)


@dataclass(frozen=True)
class Target:
    """A normalized target: an address matching key or an A-label domain."""

    kind: EntryKind
    value: str


@dataclass(frozen=True)
class AddResult:
    entries: tuple[SuppressionEntry, ...]
    new: int  # how many were not on the list before (the rest were updated or unchanged)


@dataclass(frozen=True)
class RemoveResult:
    removed: tuple[tuple[Target, int], ...]  # each target with how many list entries went

    @property
    def total(self) -> int:
        return sum(count for _, count in self.removed)


@dataclass(frozen=True)
class EntryPage:
    entries: tuple[SuppressionEntry, ...]
    next_cursor: str | None  # pass it back for the next page; None after the last


@dataclass(frozen=True)
class CheckResult:
    """What would happen to one recipient right now, and the entries that make it so."""

    address: str
    key: str  # the normalized matching key
    decision: Decision
    entries: tuple[SuppressionEntry, ...]


def parse_target(ctx: AdminContext, text: str) -> Target:
    """An address or ``@domain`` in its normalized matching form. Raises InvalidTarget."""
    text = text.strip()
    try:
        if text.startswith("@"):
            return Target("domain", ctx.normalizer.domain(text[1:]))
        if "@" not in text:
            # Suggest the domain form only for something that could be a domain.
            hint = f"; to suppress a whole domain write @{text}" if " " not in text and "." in text else ""
            raise InvalidTarget(text, f"is not an address{hint}")
        return Target("address", ctx.normalizer.key(text))
    except InvalidAddress as error:
        raise InvalidTarget(text, f"is not a valid {'domain' if text.startswith('@') else 'address'}: {error}") from None


def require_list(ctx: AdminContext, list_name: str) -> None:
    """Refuse a list name that is not configured (UnknownList names the configured ones)."""
    if list_name not in ctx.config.lists:
        raise UnknownList(list_name, list(ctx.config.lists))


def expiry(ctx: AdminContext, list_name: str, created_at: float, lifetime: float | None = None) -> float | None:
    """When an entry made at ``created_at`` expires: ``lifetime`` seconds later, or the list's
    configured lifetime when None; never (None) for FOREVER or a list without a lifetime."""
    if lifetime is None:
        lifetime = ctx.config.lists[list_name].lifetime
    if lifetime is None or math.isinf(lifetime):
        return None
    return created_at + lifetime


async def add(ctx: AdminContext, targets: Sequence[str], list_name: str, reason: str = "", source: str = "",
              lifetime: float | None = None, include_subdomains: bool = False) -> AddResult:
    """Put targets on a list (an existing entry gets the new reason, source and expiry).

    ``lifetime`` is seconds until expiry; None uses the list's configured lifetime, FOREVER
    means never. ``include_subdomains`` makes a domain entry match its subdomains too.
    """
    require_list(ctx, list_name)
    parsed = [parse_target(ctx, text) for text in targets]
    if include_subdomains and any(t.kind == "address" for t in parsed):
        raise InvalidTarget(next(t for t in targets if not t.strip().startswith("@")),
                            "is an address; include_subdomains applies to @domain targets only", misspelled=False)
    for text, target in zip(targets, parsed):
        if target.kind == "address" and ctx.tombstones.lookup(target.value) is not None:
            raise InvalidTarget(text, "was erased; it is refused already and must not be stored again "
                                      "(smtp-guard erase verify ADDRESS shows the erasure)", misspelled=False)
    now = ctx.clock()
    expires_at = expiry(ctx, list_name, now, lifetime)
    entries = tuple(SuppressionEntry(t.kind, t.value, list_name, reason, source, now, expires_at,
                                     include_subdomains and t.kind == "domain") for t in dict.fromkeys(parsed))
    new = await ctx.suppressions.add(entries)
    await record(ctx, "suppress.add", list_name, [e.value for e in entries], reason or "added", now)
    return AddResult(entries, new)


async def remove(ctx: AdminContext, targets: Sequence[str], list_name: str | None = None) -> RemoveResult:
    """Take targets off one list, or off every list when ``list_name`` is None."""
    if list_name is not None:
        require_list(ctx, list_name)
    parsed = list(dict.fromkeys(parse_target(ctx, text) for text in targets))
    removed = []
    for target in parsed:
        removed.append((target, await ctx.suppressions.remove(target.kind, target.value, list_name)))
    gone = [target.value for target, count in removed if count]
    if gone:
        reason = f"removed from {list_name}" if list_name else "removed from every list"
        await record(ctx, "suppress.remove", list_name or "*", gone, reason, ctx.clock())
    return RemoveResult(tuple(removed))


async def check(ctx: AdminContext, address: str) -> CheckResult:
    """Run the server's decision (erasure, then suppression lists) for one recipient, as of now."""
    try:
        mailbox = parse_mailbox(address.strip())
        key = ctx.normalizer.key(mailbox)
        chain = tuple(ctx.normalizer.domain_chain(mailbox.domain))
    except InvalidAddress as error:
        raise InvalidTarget(address, f"is not a valid address: {error}") from None
    now = ctx.clock()
    entries = tuple(await ctx.suppressions.find(key, chain, now))
    index = SuppressionIndex(_snapshot(entries, ctx.config.list_priority))
    token = erasure_token(key)
    tombstone = await ctx.erasure.find_tombstone([(k.tombstone(token), k.id) for k in ctx.key_ring.keys])
    tombstones = TombstoneIndex(ctx.key_ring, [tombstone] if tombstone else [])
    pipeline = default_pipeline(ctx.config, tombstones, index)
    # The same RecipientContext the SMTP front builds at RCPT time (smtp/transaction.py).
    recipient = RecipientContext(mailbox=mailbox, key=key, key_hash=key_hash(key), domain_chain=chain,
                                 sender="", client_ip="")
    return CheckResult(mailbox.text, key, await pipeline.decide(recipient), entries)


def _snapshot(entries: Iterable[SuppressionEntry], priority: Sequence[str]) -> SuppressionSnapshot:
    """A tiny index snapshot of the given entries, built by the store's rule: the first list
    in the configured priority wins, unconfigured lists come after, by name."""
    entries = list(entries)
    order = list_order(priority, (e.list_name for e in entries))
    rank = {name: i for i, name in enumerate(order)}
    best: dict[int, int] = {}
    domains: dict[str, DomainRule] = {}
    for entry in sorted(entries, key=lambda e: rank[e.list_name], reverse=True):
        if entry.kind == "address":
            best[key_hash(entry.value)] = rank[entry.list_name]
        else:
            domains[entry.value] = DomainRule(entry.list_name, entry.include_subdomains)
    hashes = sorted(best)
    return SuppressionSnapshot(AddressTable.build(array("q", hashes), array("B", (best[h] for h in hashes))),
                               order, domains, seq=0, next_expiry=None)


async def list_entries(ctx: AdminContext, filters: SuppressionFilter, limit: int | None = 100) -> list[SuppressionEntry]:
    """Entries matching the filters, oldest first."""
    if filters.list_name is not None:
        require_list(ctx, filters.list_name)
    return [entry async for entry in ctx.suppressions.query(filters, ctx.clock(), limit)]


async def list_page(ctx: AdminContext, filters: SuppressionFilter, limit: int = 100,
                    cursor: str | None = None) -> EntryPage:
    """One page of matching entries in storage order. Raises InvalidCursor for a cursor that
    no page handed out."""
    if filters.list_name is not None:
        require_list(ctx, filters.list_name)
    page = await ctx.suppressions.page(filters, ctx.clock(), limit, None if cursor is None else parse_cursor(cursor))
    return EntryPage(page.entries, None if page.next is None else _CURSOR_PREFIX + str(page.next))


def parse_cursor(text: str) -> int:
    """The store position in a cursor. Cursors are opaque to clients: the prefix lets the
    format change without an old cursor being misread."""
    number = text.removeprefix(_CURSOR_PREFIX)
    # A row id is a signed 64-bit integer; a larger one would overflow on its way to SQLite.
    if number == text or not number.isascii() or not number.isdigit() or len(number) > 19 or int(number) >= 1 << 63:
        raise InvalidCursor(text)
    return int(number)


async def export(ctx: AdminContext, filters: SuppressionFilter, file: TextIO, fmt: ExportFormat = "csv") -> int:
    """Write matching entries to ``file`` as CSV (with a header) or JSON lines; returns how many.

    Times are ISO 8601 UTC; the CSV reads back with ``smtp-guard suppress import``.
    """
    count = -1 if fmt == "csv" else 0  # the CSV's header line is not an entry
    async for line in export_lines(ctx, filters, fmt):
        file.write(line)
        count += 1
    return count


async def export_lines(ctx: AdminContext, filters: SuppressionFilter, fmt: ExportFormat = "csv") -> AsyncIterator[str]:
    """The export as text lines, read from the store as they are wanted (an HTTP export sends
    each on its way instead of holding millions in memory). CSV starts with its header."""
    buffer = io.StringIO()
    writer = csv.writer(buffer) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(EXPORT_COLUMNS)
        yield _taken(buffer)
    async for entry in ctx.suppressions.query(filters, ctx.clock()):
        row = export_row(entry)
        if writer is not None:
            writer.writerow(["" if v is None else str(v).lower() if isinstance(v, bool) else v for v in row.values()])
            yield _taken(buffer)
        else:
            yield json.dumps(row, ensure_ascii=False) + "\n"


def _taken(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


def export_row(entry: SuppressionEntry) -> dict[str, Any]:
    return {
        "kind": entry.kind,
        "value": entry.value,
        "list": entry.list_name,
        "reason": entry.reason,
        "source": entry.source,
        "created_at": iso_time(entry.created_at),
        "expires_at": None if entry.expires_at is None else iso_time(entry.expires_at),
        "include_subdomains": entry.include_subdomains,
    }


def iso_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def record(ctx: AdminContext, verb: str, list_name: str, values: Sequence[str], reason: str,
                 now: float) -> None:
    """Audit an admin change: one record per changed value ("" for a change without one)."""
    records = [AuditRecord(time=now, kind="admin", verdict=verb, rule=f"suppression.{list_name}", reason=reason,
                           recipient=value, actor=ctx.actor) for value in values]
    await ctx.audit.append(records)

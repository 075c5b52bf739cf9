"""Admin operations for erasure (GDPR Art. 17), shared by the CLI and the HTTP API.

``erase`` turns each address (or erasure token) into a tombstone, purges every plaintext copy
the guard has, makes the deleted bytes unrecoverable, and returns a receipt that names no
address. ``verify`` proves both halves for one address: a tombstone enforces it (checked with
the server's own ErasurePolicy), and no file in the data directory — nor, for PostgreSQL, any
table of the store — holds any spelling of it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..addresses import AddressNormalizer, InvalidAddress, key_hash, parse_mailbox
from ..audit_model import AuditRecord
from ..erasure.index import TombstoneIndex
from ..erasure.keys import address_token, erasure_token, is_token, rotate
from ..erasure.model import ErasureAttempt, ErasureReceipt, PurgeCount, Tombstone
from ..erasure.scan import Finding, address_pattern, scan_directory
from ..policy.base import Decision, RecipientContext
from ..policy.erasure import ErasurePolicy
from .context import AdminContext

SANDBOX_ENVELOPE_HEADER = b"x-sandbox-recipients:"


class ErasureInputError(ValueError):
    """An address or token that cannot be erased as given; the message says which and why."""


@dataclass(frozen=True)
class ErasureTarget:
    token: str
    # Known only when the operator gave the address; used to purge and then forgotten.
    address: str | None = None
    normalized: str | None = None


def target_from_text(ctx: AdminContext, text: str) -> ErasureTarget:
    return target_of(ctx.normalizer, text)


def target_of(normalizer: AddressNormalizer, text: str) -> ErasureTarget:
    """An address or a 64-hex token, as the erasure target it names."""
    value = text.strip()
    if is_token(value):
        return ErasureTarget(token=value.lower())
    try:
        normalized = normalizer.key(value)
    except InvalidAddress as error:
        raise ErasureInputError(f"{value!r} is neither an address nor a 64-hex erasure token: {error}") from None
    return ErasureTarget(token=erasure_token(normalized), address=value, normalized=normalized)


def targets_from_file(ctx: AdminContext, path: Path) -> tuple[list[ErasureTarget], list[str]]:
    """One address or token per line (``#`` comments, blank lines ignored). Bad lines are
    returned as ``FILE:LINE: reason`` and do not stop the good ones."""
    targets, problems = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            value = line.split("#", 1)[0].strip()
            if not value:
                continue
            try:
                targets.append(target_from_text(ctx, value))
            except ErasureInputError as error:
                problems.append(f"{path}:{number}: {error}")
    return targets, problems


async def erase(ctx: AdminContext, targets: Sequence[ErasureTarget], reference: str) -> list[ErasureReceipt]:
    if not reference.strip():
        raise ErasureInputError("an erasure needs a reference (--ref), e.g. the ticket number of the request")
    receipts = []
    for target in targets:
        tombstone = await _tombstone(ctx, target.token, reference)
        purged = await _purge(ctx, target, tombstone)
        await ctx.audit.append([AuditRecord(
            time=ctx.clock(), kind="admin", verdict="erase", rule="erasure.erased",
            reason=f"erased under reference {reference} (tombstone {tombstone.id})", actor=ctx.actor,
        )])
        storage = await ctx.erasure.make_unrecoverable()
        receipt = ErasureReceipt(
            id=secrets.token_hex(8), reference=reference, created_at=ctx.clock(), tombstone_id=tombstone.id,
            key_id=tombstone.key_id, purged=tuple(purged), storage=storage)
        await ctx.erasure.add_receipt(receipt)
        receipts.append(receipt)
    return receipts


async def _tombstone(ctx: AdminContext, token: str, reference: str) -> Tombstone:
    ring = ctx.key_ring
    existing = await ctx.erasure.find_tombstone([(key.tombstone(token), key.id) for key in ring.keys])
    if existing is not None:
        return existing
    primary = ring.primary
    await ctx.erasure.remember_key(primary.id, primary.check_value, ctx.clock())
    tombstone, _ = await ctx.erasure.add_tombstone(primary.tombstone(token), primary.id, reference, ctx.clock())
    return tombstone


async def _purge(ctx: AdminContext, target: ErasureTarget, tombstone: Tombstone) -> list[PurgeCount]:
    def matches(text: str) -> bool:
        return address_token(ctx.normalizer, text) == target.token

    key_hashes = [key_hash(target.normalized)] if target.normalized else None
    counts = await ctx.erasure.purge_address(key_hashes, matches, ctx.key_ring.pseudonyms(target.token),
                                             tombstone.id)
    # File work in a thread: the admin API runs this inside the guard's event loop.
    counts.append(PurgeCount("sandbox", "files", await asyncio.to_thread(_purge_sandbox, ctx, target, matches)))
    return counts


def _purge_sandbox(ctx: AdminContext, target: ErasureTarget, matches: Callable[[str], bool]) -> int:
    """Captured sandbox messages to (or, when the address is known, mentioning) the erased
    address are overwritten with zeros and deleted."""
    root = ctx.config.store.data_dir / "sandbox"
    if not root.is_dir():
        return 0
    pattern = None
    if target.address is not None:
        pattern = address_pattern(parse_mailbox(target.address), ctx.normalizer, ctx.config.addresses)
    removed = 0
    for folder in ("tmp", "new", "cur"):
        for path in sorted((root / folder).glob("*")):
            data = path.read_bytes()
            if _sandbox_recipients_match(data, matches) or (pattern is not None and pattern.search(data)):
                _shred(path, len(data))
                removed += 1
    return removed


def _sandbox_recipients_match(data: bytes, matches: Callable[[str], bool]) -> bool:
    for line in data.split(b"\r\n", 3)[:3]:
        if line.lower().startswith(SANDBOX_ENVELOPE_HEADER):
            recipients = line[len(SANDBOX_ENVELOPE_HEADER):].decode("utf-8", "replace").split(",")
            return any(matches(r.strip()) for r in recipients if r.strip())
    return False


def _shred(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.write(b"\0" * size)
        handle.flush()
        os.fsync(handle.fileno())
    path.unlink()


@dataclass(frozen=True)
class Verification:
    normalized: str
    tombstone: Tombstone | None
    decision: Decision | None  # what the server's ErasurePolicy decides for this address
    findings: tuple[Finding, ...]

    @property
    def is_enforced(self) -> bool:
        return self.decision is not None

    @property
    def is_clean(self) -> bool:
        return not self.findings

    @property
    def ok(self) -> bool:
        return self.is_enforced and self.is_clean


async def verify(ctx: AdminContext, address: str) -> Verification:
    try:
        mailbox = parse_mailbox(address)
        normalized = ctx.normalizer.key(mailbox)
    except InvalidAddress as error:
        raise ErasureInputError(f"{address!r} is not an address: {error}") from None
    token = erasure_token(normalized)
    tombstone = await ctx.erasure.find_tombstone([(key.tombstone(token), key.id) for key in ctx.key_ring.keys])
    decision = None
    if tombstone is not None:
        policy = ErasurePolicy(TombstoneIndex(ctx.key_ring, [tombstone]), ctx.config.erasure.action)
        decision = policy.check(RecipientContext(
            mailbox=mailbox, key=normalized, key_hash=key_hash(normalized),
            domain_chain=tuple(ctx.normalizer.domain_chain(mailbox.domain)), sender="", client_ip=""))
    pattern = address_pattern(mailbox, ctx.normalizer, ctx.config.addresses)
    packed = address_pattern(mailbox, ctx.normalizer, ctx.config.addresses, packed=True)
    # Reading the data directory in a thread: the admin API runs this inside the guard's event loop.
    findings = await asyncio.to_thread(scan_directory, ctx.config.store.data_dir, pattern, packed)
    # A database whose files are elsewhere (PostgreSQL) is searched table by table.
    findings += await ctx.erasure.copies(pattern)
    return Verification(normalized, tombstone, decision, tuple(findings))


async def receipts(ctx: AdminContext, limit: int = 100) -> list[ErasureReceipt]:
    return await ctx.erasure.receipts(limit)


async def receipt(ctx: AdminContext, receipt_id: str) -> ErasureReceipt | None:
    return await ctx.erasure.receipt(receipt_id)


async def attempts(ctx: AdminContext, since: float | None = None, reference: str | None = None,
                   limit: int = 100) -> list[ErasureAttempt]:
    return await ctx.erasure.attempts(since, reference, limit)


async def rotate_key(ctx: AdminContext) -> str:
    ring = rotate(ctx.key_ring)
    await ctx.audit.append([AuditRecord(
        time=ctx.clock(), kind="admin", verdict="erase.rotate-key", rule="erasure.key",
        reason=f"new primary erasure key {ring.primary.id}", actor=ctx.actor)])
    return ring.primary.id


def tokens(normalizer: AddressNormalizer, addresses: Iterable[str]) -> list[tuple[str, str]]:
    """(address, token) pairs, for a privacy team that wants to send tokens instead. Needs no
    store and no key: the token is the same everywhere."""
    return [(address, target_of(normalizer, address).token) for address in addresses]

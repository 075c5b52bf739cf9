"""Admin operations on the hold queue, shared by the CLI and the HTTP API.

Release and discard are recorded in the audit trail (who, when, which hold). Release only
changes recipients' state; the running server's release worker does the delivery.
"""

from __future__ import annotations

from dataclasses import dataclass
from email import policy
from email.parser import BytesHeaderParser
from typing import Sequence

from ..audit_model import AuditRecord
from ..hold.model import HeldMessage, RecipientState
from ..hold.preview import Preview, text_preview
from .context import AdminContext


class HoldNotFound(LookupError):
    """No held message has this id."""

    def __init__(self, hold_id: str) -> None:
        super().__init__(f"no held message {hold_id}")
        self.hold_id = hold_id


class NotARecipient(ValueError):
    """An address given for release or discard is not a recipient of the held message."""

    def __init__(self, hold_id: str, addresses: Sequence[str], recipients: Sequence[str]) -> None:
        super().__init__(f"{', '.join(addresses)} not a recipient of hold {hold_id}")
        self.hold_id = hold_id
        self.addresses = tuple(addresses)
        self.recipients = tuple(recipients)


@dataclass(frozen=True)
class HoldDetails:
    message: HeldMessage
    headers: tuple[tuple[str, str], ...]  # empty once the content is deleted
    preview: Preview | None = None  # the body as plain text (None: deleted, or no text part)


@dataclass(frozen=True)
class HoldAction:
    """The result of a release or discard: how many recipients changed, and the message as
    it was before (for the operator's summary)."""

    changed: int
    message: HeldMessage


async def list_holds(ctx: AdminContext, state: RecipientState | None = "held", limit: int = 100) -> list[HeldMessage]:
    """Messages with a recipient in ``state`` (all messages when None), newest first."""
    return await ctx.holds.list(state, limit)


async def show_hold(ctx: AdminContext, hold_id: str) -> HoldDetails:
    message = await _get(ctx, hold_id)
    if message.content is None:
        return HoldDetails(message, ())
    return HoldDetails(message, parse_headers(message.content), text_preview(message.content))


async def release_hold(ctx: AdminContext, hold_id: str, recipients: Sequence[str] | None = None) -> HoldAction:
    """Release held recipients (all, or the given ones) for delivery by the release worker."""
    message = await _get(ctx, hold_id)
    chosen = resolve_recipients(message, recipients)
    now = ctx.clock()
    changed = await ctx.holds.release(hold_id, now, chosen)
    await _audit(ctx, message, "hold.release", "released", changed, chosen, now)
    return HoldAction(changed, message)


async def discard_hold(ctx: AdminContext, hold_id: str, recipients: Sequence[str] | None = None) -> HoldAction:
    """Discard held or not yet delivered recipients (all, or the given ones): they never get
    the message, and its content is deleted once no recipient waits for it."""
    message = await _get(ctx, hold_id)
    chosen = resolve_recipients(message, recipients)
    changed = await ctx.holds.discard(hold_id, chosen)
    await _audit(ctx, message, "hold.discard", "discarded", changed, chosen, ctx.clock())
    return HoldAction(changed, message)


def resolve_recipients(message: HeldMessage, addresses: Sequence[str] | None) -> list[str] | None:
    """Map addresses as an operator typed them to the stored ones (case-insensitively);
    None or empty means every recipient."""
    if not addresses:
        return None
    stored = {r.address.casefold(): r.address for r in message.recipients}
    unknown = [a for a in addresses if a.casefold() not in stored]
    if unknown:
        raise NotARecipient(message.id, unknown, [r.address for r in message.recipients])
    return list(dict.fromkeys(stored[a.casefold()] for a in addresses))


def parse_headers(content: bytes) -> tuple[tuple[str, str], ...]:
    """The message's header fields, decoded for display (RFC 2047 words, folded lines)."""
    parsed = BytesHeaderParser(policy=policy.default).parsebytes(content)
    headers = []
    for name, raw in parsed.raw_items():
        try:
            value = str(policy.default.header_fetch_parse(name, raw))
        except Exception:
            # A malformed header is shown as sent rather than hiding the rest of the message.
            value = raw
        headers.append((name, " ".join(value.split())))
    return tuple(headers)


async def _get(ctx: AdminContext, hold_id: str) -> HeldMessage:
    message = await ctx.holds.get(hold_id)
    if message is None:
        raise HoldNotFound(hold_id)
    return message


async def _audit(ctx: AdminContext, message: HeldMessage, verb: str, done: str, changed: int,
                 chosen: list[str] | None, now: float) -> None:
    # One record per named recipient, so the recipient column (which an erasure purges and
    # `audit list --recipient` finds) holds the address, and never the free-text reason.
    rules = {r.address: r.rule for r in message.recipients}
    reason = f"{done} {changed} recipient(s) of hold {message.id}"
    if chosen:
        reason += f" ({len(chosen)} named)"
    await ctx.audit.append([
        AuditRecord(
            time=now, kind="admin", verdict=verb, rule=rules.get(target) or ",".join(sorted(set(rules.values()))),
            reason=reason, txn_id=message.id, client=message.client, sender=message.sender, recipient=target,
            actor=ctx.actor,
        )
        for target in chosen or [""]
    ])

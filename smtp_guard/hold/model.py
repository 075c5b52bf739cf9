"""The hold queue: held messages and their recipients, and the store interface.

Plain data (frozen dataclasses) and a Protocol; ``store/sqlite/holds.py`` implements it.
"""

from __future__ import annotations

import builtins
import secrets
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

RecipientState = Literal["held", "released", "delivered", "failed", "discarded"]


def new_hold_id() -> str:
    """A new hold id. Hex, not base64: an id starting with "-" would read as an option on the
    command line."""
    return secrets.token_hex(8)


@dataclass(frozen=True)
class HeldRecipient:
    address: str  # exactly as validated and as it will be relayed
    state: RecipientState
    rule: str
    reason: str
    attempts: int = 0
    next_attempt_at: float | None = None
    last_reply: str = ""


@dataclass(frozen=True)
class NewHold:
    """A message to hold durably before the client gets its 250."""

    txn_id: str
    client: str
    sender: str
    mail_options: tuple[str, ...]
    content: bytes
    recipients: Sequence[HeldRecipient]
    stream: str = ""
    message_class: str = ""


@dataclass(frozen=True)
class HeldMessage:
    id: str
    txn_id: str
    created_at: float
    client: str
    sender: str
    mail_options: tuple[str, ...]
    size: int
    recipients: tuple[HeldRecipient, ...]
    content: bytes | None = None  # filled by get(), not by listing
    stream: str = ""
    message_class: str = ""


@dataclass(frozen=True)
class HoldStats:
    held_messages: int
    held_recipients: int
    oldest_held_at: float | None


class HoldStore(Protocol):
    async def hold(self, message: NewHold) -> str:
        """Store durably (committed and fsync'd when this returns). Returns the hold id."""

    async def list(self, state: RecipientState | None = "held", limit: int = 100) -> builtins.list[HeldMessage]: ...

    async def get(self, hold_id: str) -> HeldMessage | None: ...

    async def release(self, hold_id: str, now: float, recipients: Sequence[str] | None = None) -> int:
        """Move held recipients to 'released' (due now). Returns how many moved."""

    async def discard(self, hold_id: str, recipients: Sequence[str] | None = None) -> int:
        """Move held recipients to 'discarded'; content is deleted when nobody needs it."""

    async def due(self, now: float, limit: int = 50) -> builtins.list[HeldMessage]:
        """Messages (with content) that have released recipients due for an attempt; only
        those recipients are included."""

    async def claim(self, hold_id: str, addresses: Sequence[str], now: float, lease: float) -> builtins.list[str]:
        """Take the recipients that are still released and due for one attempt, hiding them
        from other workers for ``lease`` seconds (a crashed attempt is retried after it).
        Returns the addresses claimed."""

    async def record_attempt(self, hold_id: str, address: str, state: RecipientState, reply: str,
                             next_attempt_at: float | None) -> None:
        """Outcome of one relay attempt for one recipient."""

    async def stats(self) -> HoldStats: ...

    async def release_stream(self, stream: str, rules: Sequence[str], now: float) -> int:
        """Release every held recipient of the stream's messages that one of ``rules`` held
        (an admin approved the stream). Returns how many moved."""

    async def discard_stream(self, stream: str, rules: Sequence[str]) -> int:
        """Discard every held or released recipient of the stream's messages that one of
        ``rules`` held (an admin cancelled the stream). Returns how many moved."""

    async def stream_messages(self, stream: str, limit: int = 3) -> builtins.list[HeldMessage]:
        """Messages of the stream with a held recipient, oldest first, without content."""

    async def stream_counts(self, stream: str) -> dict[RecipientState, int]:
        """Recipients of the stream's held messages, by state."""

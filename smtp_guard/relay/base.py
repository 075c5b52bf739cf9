"""The upstream interface: what the SMTP front and the hold release worker relay through.

An upstream transaction is lock-step, like Postfix's before-queue proxy: each accepted
recipient is offered to the upstream while the client waits for its RCPT reply, so the client
sees the upstream's own per-recipient answer (4xx stays 4xx, 5xx stays 5xx).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from ..replies import Reply


class UpstreamError(Exception):
    """The upstream could not be used; ``reply`` is what the client should get (a 4xx for
    connection problems, the upstream's own reply when it refused MAIL)."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        super().__init__(detail or str(reply))
        self.reply = reply


class UpstreamTransaction(Protocol):
    async def rcpt(self, address: str) -> Reply:
        """Offer one recipient; returns the upstream's reply (never raises for 4xx/5xx)."""

    async def data(self, content: bytes) -> Reply:
        """Send the message to the recipients accepted so far; returns the final reply."""

    async def finish(self) -> None:
        """Return the session for reuse (after RSET) or close it; never raises."""


class Upstream(Protocol):
    async def begin(self, sender: str, mail_options: Sequence[str] = ()) -> UpstreamTransaction:
        """Open (or reuse) a session and send MAIL FROM. Raises UpstreamError."""

    async def close(self) -> None:
        """Close every pooled session."""

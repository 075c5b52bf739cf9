"""The release worker: relays recipients an admin released from the hold queue.

Every ``[hold] poll_interval`` it asks the store for released recipients that are due and
relays each message once to its due recipients through the upstream. Per recipient:

- delivered — only after the upstream accepted DATA for it, so a recipient is never marked
  delivered for mail the upstream did not take;
- upstream 4xx, or the connection failed — stays released, next attempt after an exponential
  backoff from ``retry_initial`` up to ``retry_max``;
- upstream 5xx — failed, with the upstream's reply;
- still undelivered ``max_age`` after the message was held — failed. A released recipient
  always gets one attempt first, so releasing old held mail does not fail it unseen.

A connection lost after the final "." of DATA but before the reply is retried: the upstream
may have taken the message, and a rare duplicate is what every MTA accepts there rather than
losing mail (RFC 5321 section 6.1, RFC 1047).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

from ..audit_model import AuditRecord
from ..config import HoldConfig
from ..relay.base import Upstream, UpstreamError
from ..replies import UPSTREAM_UNAVAILABLE, Reply
from .model import HeldMessage, HeldRecipient, HoldStore, RecipientState

log = logging.getLogger(__name__)

# How long a claimed recipient is hidden from other workers; longer than any one attempt can
# take, so that only a crashed attempt is ever retried by someone else.
CLAIM_LEASE = 900.0

AUDIT_RULE = "hold.release"


@dataclass(frozen=True)
class Outcome:
    """What one attempt did for one recipient, as it is written to the store."""

    state: RecipientState
    reply: str
    next_attempt_at: float | None = None


class ReleaseWorker:
    """Relays released held mail; ``start()`` it, ``await stop()`` it, or drive ``run_once()``."""

    def __init__(self, store: HoldStore, upstream: Upstream, config: HoldConfig,
                 record: Callable[[AuditRecord], None], clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._upstream = upstream
        self._config = config
        self._record = record
        self._clock = clock
        # Outcomes the upstream produced but the store has not accepted yet (it failed just
        # then). run_once() writes them before it attempts anything, and attempts nothing
        # while it cannot: a delivery the store missed must not be repeated.
        self._unrecorded: dict[tuple[str, str], Outcome] = {}
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        running = self._task is not None and not self._task.done()
        return f"<ReleaseWorker running={running} unrecorded={len(self._unrecorded)}>"

    def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name="hold-release")

    async def stop(self) -> None:
        """Finish the message in flight, then stop."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def run_once(self) -> int:
        """Attempt every due recipient once; returns how many recipients were attempted."""
        await self._write_unrecorded()
        attempted = 0
        due = await self._store.due(self._clock())
        for message in due:
            if self._stopping.is_set():
                break
            # Claim just before relaying: an admin's discard, a breaker cancel or an erasure purge
            # may have happened since ``due`` was read, and another worker may be on it too.
            claimed = set(await self._store.claim(
                message.id, [r.address for r in message.recipients], self._clock(), CLAIM_LEASE))
            recipients = [r for r in message.recipients if r.address in claimed]
            if message.content is None or not recipients:
                continue
            outcomes = await self._relay(message, message.content, recipients)
            for recipient, outcome in zip(recipients, outcomes):
                self._unrecorded[(message.id, recipient.address)] = outcome
                self._audit(message, recipient, outcome)
            attempted += len(recipients)
            await self._write_unrecorded()
        return attempted

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except Exception:
                # The store is unavailable or something unexpected broke: log it and poll
                # again; nothing is marked delivered that was not.
                log.exception("hold release: attempt failed, retrying in %.1fs", self._config.poll_interval)
            try:
                async with asyncio.timeout(self._config.poll_interval):
                    await self._stopping.wait()
            except TimeoutError:
                pass

    async def _relay(self, message: HeldMessage, content: bytes, recipients: list[HeldRecipient]) -> list[Outcome]:
        """One upstream transaction for the message's due recipients; one outcome each."""
        now = self._clock()
        try:
            transaction = await self._upstream.begin(message.sender, message.mail_options)
        except Exception as error:
            return [self._refused(message, r, self._failure_reply(message, error), now) for r in recipients]
        try:
            replies = [await transaction.rcpt(r.address) for r in recipients]
            accepted = [i for i, reply in enumerate(replies) if _is_accepted(reply)]
            if accepted:
                data_reply = await transaction.data(content)
                for i in accepted:
                    replies[i] = data_reply
        except Exception as error:
            # The transaction broke before the upstream accepted DATA: nobody is delivered.
            return [self._refused(message, r, self._failure_reply(message, error), now) for r in recipients]
        finally:
            await transaction.finish()
        return [
            Outcome("delivered", str(reply)) if _is_accepted(reply) else self._refused(message, r, reply, now)
            for r, reply in zip(recipients, replies)
        ]

    def _failure_reply(self, message: HeldMessage, error: Exception) -> Reply:
        if isinstance(error, UpstreamError):
            return error.reply
        log.error("hold release: upstream failed for hold %s", message.id, exc_info=error)
        return UPSTREAM_UNAVAILABLE

    def _refused(self, message: HeldMessage, recipient: HeldRecipient, reply: Reply, now: float) -> Outcome:
        if reply.is_permanent:
            return Outcome("failed", str(reply))
        age = now - message.created_at
        if age >= self._config.max_age:
            return Outcome("failed", f"gave up after {_duration(age)} in the hold queue; last reply: {reply}")
        delay = min(self._config.retry_initial * 2 ** recipient.attempts, self._config.retry_max)
        return Outcome("released", str(reply), now + delay)

    def _audit(self, message: HeldMessage, recipient: HeldRecipient, outcome: Outcome) -> None:
        verdict = {"delivered": "delivered", "failed": "failed"}.get(outcome.state, "deferred")
        self._record(AuditRecord(
            time=self._clock(), kind="delivery", verdict=verdict, rule=AUDIT_RULE,
            reason=f"hold {message.id}: {outcome.reply}", txn_id=message.txn_id, client=message.client,
            sender=message.sender, recipient=recipient.address,
        ))

    async def _write_unrecorded(self) -> None:
        for (hold_id, address), outcome in list(self._unrecorded.items()):
            await self._store.record_attempt(hold_id, address, outcome.state, outcome.reply, outcome.next_attempt_at)
            del self._unrecorded[(hold_id, address)]


def _is_accepted(reply: Reply) -> bool:
    return 200 <= reply.code < 300


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f}d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds:.0f}s"

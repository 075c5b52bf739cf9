"""Taking an unsubscribe: a token opened, its recipient put on the unsubscribe list at once
(audited with who asked and how, counted), whichever way it came (one-click POST or mailto)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal

from ..metrics import Metrics
from ..services import propagation
from ..services import suppressions
from ..services.context import AdminContext
from ..store.base import StoreError
from .tokens import InvalidToken, UnsubscribeTokens

log = logging.getLogger(__name__)

Via = Literal["one_click", "mailto"]
Result = Literal["unsubscribed", "malformed", "forged", "expired", "unavailable"]


@dataclass(frozen=True)
class Outcome:
    result: Result
    stream: str = ""

    @property
    def done(self) -> bool:
        return self.result == "unsubscribed"


class Unsubscriber:
    def __init__(self, tokens: UnsubscribeTokens, contexts: Callable[[str], AdminContext], list_name: str,
                 metrics: Metrics) -> None:
        self._tokens = tokens
        self._contexts = contexts
        self._list = list_name
        self._metrics = metrics

    def token_for(self, address: str, stream: str) -> str:
        return self._tokens.issue(address, stream)

    def count_missing(self, via: Via) -> None:
        """A request that carried no token at all (a mail without one in its subject or body)."""
        self._metrics.unsubscribes.labels(via, "malformed").inc()

    async def apply(self, token: str, via: Via) -> Outcome:
        outcome = await self._apply(token, via)
        self._metrics.unsubscribes.labels(via, outcome.result).inc()
        return outcome

    async def _apply(self, token: str, via: Via) -> Outcome:
        try:
            request = self._tokens.open(token)
        except InvalidToken as refused:
            log.info("unsubscribe (%s) refused: %s token", via, refused.reason)
            return Outcome(refused.reason)
        ctx = self._contexts(f"unsubscribe:{via}")
        reason = f"{via.replace('_', '-')} unsubscribe" + (f" from stream {request.stream}" if request.stream else "")
        try:
            await suppressions.add(ctx, [request.address], self._list, reason=reason, source=via.replace("_", "-"))
        except suppressions.InvalidTarget as erased:
            # Erased since the link was sent: mail to it is refused already, and it is not stored again.
            log.info("unsubscribe (%s) for an address the guard no longer keeps: %s", via, erased)
            return Outcome("unsubscribed", request.stream)
        except StoreError as error:
            log.error("unsubscribe (%s) could not be stored (%s); the requester is told to retry", via, error)
            return Outcome("unavailable", request.stream)
        # In force here and on every other guard on this store before the requester hears "done".
        await propagation.in_force(ctx.changes, ctx.config.store.confirm_timeout, ctx.clock)
        return Outcome("unsubscribed", request.stream)

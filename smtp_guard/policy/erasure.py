"""Erasure policy: a recipient matching an erasure tombstone is refused (or dropped) first,
before any list, and the match is evidence that someone upstream still holds the address."""

from __future__ import annotations

from .. import replies
from ..config import ErasureAction
from ..erasure.index import TombstoneIndex
from .base import Decision, RecipientContext, Verdict


class ErasureEnforcementBroken(RuntimeError):
    """The key ring cannot match every tombstone; the pipeline turns this into a 451."""


class ErasurePolicy:
    name = "erasure"
    # Never in shadow mode: an erasure is a legal obligation, not a rollout risk.
    shadow = False

    def __init__(self, index: TombstoneIndex, action: ErasureAction) -> None:
        self._index = index
        self._verdict = Verdict.REJECT if action == "reject" else Verdict.DROP
        self._reply = replies.ERASED if action == "reject" else replies.RECIPIENT_OK

    def check(self, recipient: RecipientContext) -> Decision | None:
        if self._index.broken:
            raise ErasureEnforcementBroken(self._index.broken)
        tombstone = self._index.lookup(recipient.key)
        if tombstone is None:
            return None
        return Decision(self._verdict, "erasure.erased",
                        f"address was erased (reference {tombstone.reference})", self._reply, tombstone=tombstone)

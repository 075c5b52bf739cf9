"""Suppression policy: a recipient on a list is rejected, dropped or held per the list's action."""

from __future__ import annotations

from typing import Mapping

from .. import replies
from ..config import ListConfig
from ..index import SuppressionIndex
from .base import Decision, RecipientContext, Verdict

_VERDICTS = {"reject": Verdict.REJECT, "drop": Verdict.DROP, "hold": Verdict.HOLD}


class SuppressionPolicy:
    name = "suppression"

    def __init__(self, index: SuppressionIndex, lists: Mapping[str, ListConfig]) -> None:
        self._index = index
        # Compile one Decision per list and match kind up front; the hot path only looks up.
        self._decisions: dict[tuple[str, str], Decision] = {}
        for list_name, config in lists.items():
            for kind in ("address", "domain"):
                self._decisions[(list_name, kind)] = self._compile(list_name, kind, config)

    @staticmethod
    def _compile(list_name: str, kind: str, config: ListConfig) -> Decision:
        verdict = _VERDICTS[config.action]
        what = "recipient" if kind == "address" else "recipient's domain"
        reply = {
            Verdict.REJECT: replies.SUPPRESSED,
            Verdict.DROP: replies.RECIPIENT_OK,
            Verdict.HOLD: replies.RECIPIENT_OK,
        }[verdict]
        return Decision(verdict, f"suppression.{list_name}", f"{what} is on the {list_name} list", reply)

    def check(self, recipient: RecipientContext) -> Decision | None:
        list_name = self._index.lookup_address(recipient.key_hash)
        if list_name is not None:
            return self._decision(list_name, "address")
        list_name = self._index.lookup_domain(recipient.domain_chain)
        if list_name is not None:
            return self._decision(list_name, "domain")
        return None

    def _decision(self, list_name: str, kind: str) -> Decision:
        decision = self._decisions.get((list_name, kind))
        if decision is None:
            # An entry on a list that is no longer configured still blocks: fail closed.
            decision = self._compile(list_name, kind, ListConfig())
        return decision

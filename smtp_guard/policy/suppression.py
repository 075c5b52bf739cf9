"""Suppression policy: a recipient on a list is rejected, dropped or held per the list's action."""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from .. import replies
from ..config import ListConfig
from ..index import SuppressionIndex
from .base import Decision, MessageContext, MessageVerdict, RecipientContext, Verdict

_ALL_MAIL = ListConfig()

_VERDICTS = {"reject": Verdict.REJECT, "drop": Verdict.DROP, "hold": Verdict.HOLD}


class SuppressionPolicy:
    name = "suppression"
    # Shadow mode is per list (ListConfig.shadow): a shadowed list's decisions are marked.
    shadow = False

    def __init__(self, index: SuppressionIndex, lists: Mapping[str, ListConfig], shadow_all: bool = False) -> None:
        self._index = index
        self._lists = lists
        self._shadow_lists = frozenset(name for name, config in lists.items() if config.shadow or shadow_all)
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
        found = self.lookup(recipient)
        if found is None:
            return None
        list_name, kind = found
        if self._lists.get(list_name, _ALL_MAIL).scope != "all":
            return None  # a marketing-only list: decided at the end of DATA, when the class is known
        return self.decision(list_name, kind)

    def lookup(self, recipient: RecipientContext) -> tuple[str, str] | None:
        """(list, "address" | "domain") the recipient is on, or None."""
        list_name = self._index.lookup_address(recipient.key_hash)
        if list_name is not None:
            return list_name, "address"
        list_name = self._index.lookup_domain(recipient.domain_chain)
        if list_name is not None:
            return list_name, "domain"
        return None

    def decision(self, list_name: str, kind: str) -> Decision:
        decision = self._decisions.get((list_name, kind))
        if decision is None:
            # An entry on a list that is no longer configured still blocks: fail closed.
            decision = self._compile(list_name, kind, ListConfig())
        if list_name in self._shadow_lists:
            return Decision(Verdict.PASS, "pass", "no policy objected", replies.RECIPIENT_OK, shadowed=(decision,))
        return decision


class MarketingSuppressionPolicy:
    """Lists scoped to marketing mail, applied at the end of DATA once the class is known: an
    unsubscribed person still gets receipts and password resets (docs/design.md)."""

    name = "suppression.marketing"
    shadow = False

    def __init__(self, recipients: SuppressionPolicy, lists: Mapping[str, ListConfig], marketing_class: str) -> None:
        self._recipients = recipients
        self._lists = lists
        self._marketing = marketing_class

    def check_message(self, message: MessageContext) -> MessageVerdict | None:
        if message.message_class != self._marketing:
            return None
        decided: dict[str, Decision] = {}
        for recipient in message.recipients:
            found = self._recipients.lookup(recipient)
            if found is None or self._lists.get(found[0], _ALL_MAIL).scope == "all":
                continue
            decision = self._recipients.decision(*found)
            if decision.verdict is Verdict.REJECT:
                # The recipient already got 250 at RCPT (the class was not known yet): it can
                # only be left out now, and the whole message refused if nobody is left.
                decision = replace(decision, verdict=Verdict.DROP, reply=replies.SUPPRESSED,
                                   reason=decision.reason + " (marketing mail; left out after DATA)")
            decided[recipient.mailbox.text] = decision
        if decided and len(decided) == len(message.recipients) and all(
                d.verdict is Verdict.DROP and d.reply == replies.SUPPRESSED for d in decided.values()):
            first = next(iter(decided.values()))
            return MessageVerdict(message=replace(first, verdict=Verdict.REJECT))
        return MessageVerdict(recipients=decided) if decided else None

"""The List-Unsubscribe headers the guard adds (RFC 2369 and RFC 8058 one-click).

Added only where the platform did not add its own, to mail the operator selected (message
class, stream or sender), and only to a message with one recipient: the link names one person,
and a message to several would hand each of them the others' link. Bulk platforms send one
message per recipient anyway; `smtp_guard_list_unsubscribe_total{outcome="several_recipients"}`
counts what was left without.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import quote

from ..config import UnsubscribeConfig
from ..policy.base import MessageContext
from .service import Unsubscriber

Outcome = Literal["added", "platform_header", "several_recipients", "not_selected"]


class ListUnsubscribe:
    def __init__(self, config: UnsubscribeConfig, unsubscriber: Unsubscriber) -> None:
        self._url = config.base_url.rstrip("/") + "/u/"
        self._mailto = config.mailto
        self._classes = frozenset(config.classes)
        self._streams = frozenset(config.streams)
        self._senders = [re.compile(pattern, re.I) for pattern in config.senders]
        self._unsubscriber = unsubscriber

    def selects(self, message: MessageContext) -> bool:
        return (message.message_class in self._classes or message.stream in self._streams
                or any(pattern.search(message.sender) for pattern in self._senders))

    def decorate(self, content: bytes, message: MessageContext, recipients: list[str]) -> tuple[bytes, Outcome]:
        """``content`` with the headers for its one recipient (a normalized key), and what was done."""
        if not self.selects(message):
            return content, "not_selected"
        if "list-unsubscribe" in message.headers:
            return content, "platform_header"
        if len(recipients) != 1:
            return content, "several_recipients"
        token = self._unsubscriber.token_for(recipients[0], message.stream)
        links = f"<{self._url}{token}>"
        if self._mailto:
            links += f",\r\n <mailto:{self._mailto}?subject={quote('unsubscribe ' + token)}>"
        headers = f"List-Unsubscribe: {links}\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        return headers.encode("ascii") + content, "added"

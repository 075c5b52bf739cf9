"""The mailto: form of List-Unsubscribe: mail to ``[unsubscribe] mailto`` on the guard's own
SMTP listener is read here, never relayed. Mailbox providers send it with the subject the
link named ("unsubscribe TOKEN"); the token is looked for there first, then in the body."""

from __future__ import annotations

import re

from .. import replies
from ..replies import Reply
from .service import Unsubscriber

_TOKEN = re.compile(rb"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{60,400}(?![A-Za-z0-9_-])")
_BODY_SCAN = 16 * 1024  # a token in a reply's quoted text is near the top


class UnsubscribeInbox:
    def __init__(self, mailbox: str, unsubscriber: Unsubscriber) -> None:
        self._mailbox = mailbox.lower()
        self._unsubscriber = unsubscriber

    def is_inbox(self, address: str) -> bool:
        return address.lower() == self._mailbox

    async def receive(self, content: bytes) -> Reply:
        token = find_token(content)
        if token is None:
            self._unsubscriber.count_missing("mailto")
            return replies.UNSUBSCRIBE_INVALID
        outcome = await self._unsubscriber.apply(token, "mailto")
        if outcome.done:
            return replies.UNSUBSCRIBED
        return replies.UNSUBSCRIBE_UNAVAILABLE if outcome.result == "unavailable" else replies.UNSUBSCRIBE_INVALID


def find_token(content: bytes) -> str | None:
    head, _, body = content.partition(b"\r\n\r\n")
    subject = re.search(rb"(?im)^subject:[ \t]*(.*(?:\r\n[ \t].*)*)", head)
    for text in ((subject.group(1) if subject else b""), body[:_BODY_SCAN]):
        found = _TOKEN.search(text)
        if found:
            return found.group(0).decode("ascii")
    return None

"""An upstream that DKIM-signs what it relays (``[[dkim.keys]]``), in front of the real one.

Signing at the upstream boundary covers both ways mail leaves: relayed by the SMTP front and
released from the hold queue (which stores it unsigned and is signed, with a fresh timestamp,
when it goes). Everything the guard adds or strips is in the content by then.
"""

from __future__ import annotations

import logging
from typing import Sequence

from .. import replies
from ..dkim.signer import DKIMSigner, SigningFailed
from ..metrics import Metrics
from ..replies import Reply
from .base import Upstream, UpstreamTransaction

log = logging.getLogger(__name__)


class SigningUpstream:
    def __init__(self, inner: Upstream, signer: DKIMSigner, metrics: Metrics) -> None:
        self._inner = inner
        self._signer = signer
        self._metrics = metrics

    def __repr__(self) -> str:
        return f"{self._inner!r} signing for {', '.join(self._signer.domains)}"

    async def begin(self, sender: str, mail_options: Sequence[str] = ()) -> UpstreamTransaction:
        return _SigningTransaction(await self._inner.begin(sender, mail_options), self._signer, self._metrics)

    async def close(self) -> None:
        await self._inner.close()


class _SigningTransaction:
    def __init__(self, inner: UpstreamTransaction, signer: DKIMSigner, metrics: Metrics) -> None:
        self._inner = inner
        self._signer = signer
        self._metrics = metrics

    async def rcpt(self, address: str) -> Reply:
        return await self._inner.rcpt(address)

    async def data(self, content: bytes) -> Reply:
        try:
            signed = self._signer.sign(content)
        except SigningFailed as error:
            # The upstream has MAIL and RCPT but gets no DATA; finish() resets the session.
            self._metrics.dkim_messages.labels("failed").inc()
            log.error("DKIM signing failed, message deferred (not relayed unsigned): %s", error)
            return replies.DKIM_SIGNING_FAILED
        self._metrics.dkim_messages.labels(signed.outcome).inc()
        return await self._inner.data(signed.content)

    async def finish(self) -> None:
        await self._inner.finish()

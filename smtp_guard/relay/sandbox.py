"""Sandbox upstream: captures mail into a local Maildir instead of relaying it anywhere.

Staging runs real campaigns through the guard with nothing leaving the machine (docs/design.md,
second incident: test and production separated). Each message is written to ``tmp/``,
fsync'd, renamed into ``new/`` and the directory fsync'd before the client gets its 250,
with the envelope recorded in two prepended headers (the only bytes added). A full disk is
answered 452 4.3.1 and any other write failure 451 4.3.0; a partly written file is removed.

The captured mail holds addresses: the Maildir's directories are 0700 and its files 0600,
whatever the umask.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from itertools import count
from pathlib import Path
from typing import Sequence

from .. import replies
from ..replies import Reply

_sequence = count()


class SandboxUpstream:
    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir
        for directory in (maildir, *(maildir / sub for sub in ("tmp", "new", "cur"))):
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o700)

    def __repr__(self) -> str:
        return f"<SandboxUpstream {self.maildir}>"

    async def begin(self, sender: str, mail_options: Sequence[str] = ()) -> "SandboxTransaction":
        return SandboxTransaction(self, sender)

    async def close(self) -> None:
        return None

    def deliver(self, sender: str, recipients: Sequence[str], content: bytes) -> Path:
        envelope = (f"Return-Path: <{sender}>\r\n"
                    f"X-Sandbox-Recipients: {', '.join(recipients)}\r\n").encode("utf-8")
        name = f"{time.time():.6f}.{os.getpid()}_{next(_sequence)}.{socket.gethostname()}"
        temporary = self.maildir / "tmp" / name
        final = self.maildir / "new" / name
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(envelope + content)
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        directory = os.open(self.maildir / "new", os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return final


class SandboxTransaction:
    def __init__(self, upstream: SandboxUpstream, sender: str) -> None:
        self._upstream = upstream
        self._sender = sender
        self._recipients: list[str] = []

    async def rcpt(self, address: str) -> Reply:
        self._recipients.append(address)
        return replies.RECIPIENT_OK

    async def data(self, content: bytes) -> Reply:
        try:
            await asyncio.to_thread(self._upstream.deliver, self._sender, self._recipients, content)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                return replies.STORE_FULL
            return replies.STORE_UNAVAILABLE
        return replies.SANDBOX_CAPTURED

    async def finish(self) -> None:
        return None

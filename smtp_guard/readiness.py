"""Readiness: is this guard able to do its job right now? (``GET /readyz``)

A load balancer or orchestrator sends mail only to a guard that is ready, so "ready" must not
be a flag set once at start: it is the conjunction of checks that are each kept fresh —
the suppression index is loaded, the SMTP listener is accepting, the store answers, the
counters answer (Redis, with ``[counters] url``), and the upstream accepted a connection
at its last probe. Each check says in words what is wrong, so
``curl /readyz`` tells the operator what to fix.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import aiosmtplib

from .config import UpstreamConfig
from .relay.pool import quietly_close, tls_context

log = logging.getLogger(__name__)

STORE_PROBE_TIMEOUT = 2.0


@dataclass(frozen=True)
class Check:
    name: str
    problem: str | None  # None: fine

    def __str__(self) -> str:
        return f"{self.name}: {self.problem or 'ok'}"


class Readiness:
    """The latest result of every check; the guard's loops and probes update it."""

    NAMES = ("index", "listener", "store", "counters", "upstream")

    def __init__(self) -> None:
        self._problems: dict[str, str | None] = {name: "not checked yet" for name in self.NAMES}

    def set(self, name: str, problem: str | None) -> None:
        if name not in self._problems:
            raise ValueError(f"unknown readiness check {name!r}")
        before = self._problems[name]
        self._problems[name] = problem
        if problem != before and before != "not checked yet":
            if problem is None:
                log.info("ready again: %s ok", name)
            else:
                log.warning("not ready: %s: %s", name, problem)

    @property
    def is_ready(self) -> bool:
        return all(problem is None for problem in self._problems.values())

    def checks(self) -> list[Check]:
        return [Check(name, problem) for name, problem in self._problems.items()]


async def probe_store(query: Callable[[], Awaitable[object]]) -> str | None:
    """The store answers a small read within a bounded time."""
    try:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow the cancellation
        # that stops this probe's loop when the query finishes at the same moment.
        async with asyncio.timeout(STORE_PROBE_TIMEOUT):
            await query()
    except TimeoutError:
        return f"the store did not answer within {STORE_PROBE_TIMEOUT:.0f}s"
    except Exception as error:  # any store failure is "not ready", with its text
        return f"the store failed: {error}"
    return None


async def probe_upstream(config: UpstreamConfig, sandbox_dir: Path) -> str | None:
    """The upstream accepts a connection and greets (then QUIT); for the sandbox, its Maildir
    is writable."""
    if config.mode == "sandbox":
        if os.access(sandbox_dir / "tmp", os.W_OK) and os.access(sandbox_dir / "new", os.W_OK):
            return None
        return f"the sandbox Maildir {sandbox_dir} is not writable"
    client = aiosmtplib.SMTP(hostname=config.host, port=config.port, timeout=config.connect_timeout,
                             use_tls=config.tls == "implicit", start_tls=False,
                             tls_context=tls_context(config) if config.tls == "implicit" else None)
    try:
        await client.connect()
    except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as error:
        return f"cannot connect to [upstream] {config.host}:{config.port}: {_reason(error)}"
    await quietly_close(client)
    return None


def _reason(error: BaseException) -> str:
    """The operating system's words for a failed connection ("Connection refused"), not the
    library's wrapping of them."""
    cause = error.__cause__ or error
    if isinstance(cause, (asyncio.TimeoutError, aiosmtplib.SMTPTimeoutError)):
        return "no answer in time ([upstream] connect_timeout)"
    if isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno)
    return " ".join(str(error).split())

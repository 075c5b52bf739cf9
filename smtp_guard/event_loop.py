"""The event loop `smtp-guard serve` runs on: uvloop where it is installed (``[smtp] event_loop``).

uvloop (libuv, in C) runs the guard's socket reads and writes, timers and callbacks for about a
quarter less CPU per message than the stdlib loop (bench/README.md, "Hot path"). aiosmtpd and
aiosmtplib run unchanged on it: the SMTP sessions still use asyncio's pure-Python streams and
TLS protocol, which only talk to the loop through its public transport API. The admin
commands (``smtp-guard suppress …``) keep the stdlib loop: they are not on the hot path.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from typing import Callable, Coroutine

from .config import EventLoopChoice
from .startup import StartupError

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

log = logging.getLogger(__name__)


def loop_factory(choice: EventLoopChoice) -> tuple[LoopFactory | None, str]:
    """The factory for ``choice`` (None: asyncio's own) and the loop's name for the log."""
    if choice == "asyncio":
        return None, "asyncio"
    try:
        import uvloop
    except ImportError as error:
        if choice == "uvloop":
            raise StartupError(
                f'[smtp] event_loop = "uvloop", but uvloop cannot be imported ({error}); install it '
                f'(pip install uvloop) or set event_loop = "auto" to fall back to asyncio\'s loop') from None
        return None, "asyncio (uvloop is not installed)"
    return uvloop.new_event_loop, f"uvloop {importlib.metadata.version('uvloop')}"


def run(main: Coroutine[object, object, None], choice: EventLoopChoice) -> None:
    """``asyncio.run(main)`` on the loop ``choice`` names."""
    try:
        factory, name = loop_factory(choice)
    except StartupError:
        main.close()  # never awaited: no "coroutine was never awaited" warning on the way out
        raise
    log.info("event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)

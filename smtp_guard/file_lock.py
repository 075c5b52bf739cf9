"""An exclusive ``flock`` taken from the event loop: tried, and polled while another process
holds it, never waited for inside ``flock``. A loop blocked there stops serving for as long as
the holder keeps it (for ever, if the holder is stopped), and a thread blocked there would
take the lock after its caller was cancelled and keep it."""

from __future__ import annotations

import asyncio
import fcntl
import time


def try_lock(descriptor: int) -> bool:
    """Take the lock if it is free, at once; False if another open file holds it."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


async def lock_polled(descriptor: int, first_delay: float, longest_delay: float,
                      give_up_after: float | None = None) -> bool:
    """Take the lock, polling it with delays that double from ``first_delay`` up to
    ``longest_delay``; False if it was still held ``give_up_after`` seconds on (None: never
    give up)."""
    deadline = None if give_up_after is None else time.monotonic() + give_up_after
    delay = first_delay
    while not try_lock(descriptor):
        if deadline is not None and time.monotonic() >= deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, longest_delay)
    return True

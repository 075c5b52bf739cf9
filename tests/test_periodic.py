"""Periodic: a background loop that a shutdown can always stop."""

from __future__ import annotations

import asyncio

from smtp_guard.periodic import Periodic


async def test_stop_ends_a_loop_whose_step_swallowed_the_cancellation() -> None:
    """Python 3.11's wait_for (and other libraries) can swallow a cancellation that lands as
    their own wait finishes; the loop then goes on. stop() must still end it."""
    steps = 0
    entered = asyncio.Event()

    async def step() -> None:
        nonlocal steps
        steps += 1
        entered.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if steps == 1:
                return  # swallowed, as the buggy library would
            raise

    loop = Periodic("swallower", 0.01, step, "step failed", run_first=True)
    loop.start()
    await entered.wait()
    async with asyncio.timeout(5):
        await loop.stop()
    assert not loop.is_running and steps >= 1

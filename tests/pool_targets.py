"""Worker mains for test_worker_pool.py: tiny stand-ins for ``app.run_worker`` that start in
a fraction of a second and misbehave when the test asks them to.

A file in the control directory chooses what the next start of worker N does:
``hang-N`` (removed by the start that reads it): never say "ready" and ignore SIGTERM, like a
worker stuck on a locked store; ``delay-N`` (kept): wait that many seconds before "ready".
"""

from __future__ import annotations

import os
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path

from smtp_guard.workers import heartbeat, ready_to_beat


def serve(number: int, ready: Connection, control: Path) -> None:
    """Say ("ready", "w<N>-<pid>"), then sleep until SIGTERM (default action: exit) or until
    its parent, the fork server, is gone (as ``app.run_worker`` does)."""
    parent = os.getppid()
    hang = control / f"hang-{number}"
    if hang.exists():
        hang.unlink()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _sleep_while_parent_is(parent)
    delay = control / f"delay-{number}"
    if delay.exists():
        time.sleep(float(delay.read_text()))
    ready.send(("ready", f"w{number}-{os.getpid()}"))
    ready_to_beat(ready)
    _sleep_while_parent_is(parent, ready)


def _sleep_while_parent_is(parent: int, ready: Connection | None = None) -> None:
    """With ``ready``: heartbeats meanwhile, as a ready worker's event loop sends them."""
    while os.getppid() == parent and (ready is None or heartbeat(ready)):
        time.sleep(0.05)


# --- for test_fork_server.py: run as function(fd, *args) ----------------------------------------

def introduce(fd: int, text: str) -> None:
    """Write ``text``, this process's pid and its parent's pid to ``fd``; then sleep until a
    signal ends it."""
    os.write(fd, f"{text} {os.getpid()} {os.getppid()}".encode())
    os.close(fd)
    time.sleep(60)


def exit_with(fd: int, how: str) -> None:
    """End as ``how`` says: a number (sys.exit), "raise" (an exception) or "return"."""
    os.close(fd)
    if how == "raise":
        raise RuntimeError("a worker's bug")
    if how != "return":
        raise SystemExit(int(how))


def payload_size(status_offset: str) -> int:
    """For test_child_process.py: exits with the size of what follows the module search path
    on standard input, plus ``status_offset`` (an argument, as the command line gives it)."""
    import sys

    return len(sys.stdin.buffer.read()) + int(status_offset)


def refuse_to_load() -> None:
    """Raises when unpickled: a payload the fork server cannot load."""
    raise RuntimeError("cannot be loaded here")


class Unloadable:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return refuse_to_load, ()

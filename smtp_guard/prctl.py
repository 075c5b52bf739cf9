"""What Linux lets a process set about itself (prctl(2)) that the guard uses: its name and a
signal when its parent dies. Nothing happens where the system has no prctl.

Names: with ``[smtp] workers`` above 1, ``smtp-guard serve`` is N + 2 processes with one
command line (the supervisor, the fork server, the workers). A process's own name (15 bytes,
``/proc/PID/comm``) is what ``ps -e``, ``top``, ``pgrep`` and ``pstree`` show: ``smtp-guard``,
``smtp-guard-fork``, ``smtp-guard-w1``, … ``ps aux`` still shows the command line.
"""

from __future__ import annotations

import ctypes
import signal
from typing import Any

from .libc import libc_function

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PR_SET_NAME = 15
MAX_NAME = 15  # bytes, the terminating NUL aside


def name_process(name: str) -> None:
    """Name this process (its calling thread, and the threads it starts later)."""
    _prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:MAX_NAME]))


def signal_when_parent_dies(signum: signal.Signals) -> None:
    """Have the kernel send ``signum`` to this process when its parent exits."""
    _prctl(PR_SET_PDEATHSIG, int(signum))


def _prctl(option: int, argument: Any) -> None:
    prctl = libc_function("prctl")
    if prctl is not None:
        prctl(option, argument, 0, 0, 0)

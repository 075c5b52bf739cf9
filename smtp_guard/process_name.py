"""The name ``ps -e``, ``top``, ``pgrep`` and ``pstree`` show for each of the guard's processes.

With ``[smtp] workers`` above 1, ``smtp-guard serve`` is N + 2 processes with one command line
(the supervisor, the fork server, the workers). Linux lets a process name itself (15 bytes,
``/proc/PID/comm``): ``smtp-guard``, ``smtp-guard-fork``, ``smtp-guard-w1``, … ``ps aux`` still
shows the command line.
"""

from __future__ import annotations

import ctypes

PR_SET_NAME = 15  # linux/prctl.h
MAX_NAME = 15  # bytes, the terminating NUL aside


def name_process(name: str) -> None:
    """Name this process (its calling thread, and the threads it starts later). Nothing
    happens where the system has no prctl."""
    try:
        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return
    prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:MAX_NAME]), 0, 0, 0)

"""glibc's malloc, told to give every large block back to the system when it is freed.

Loading the suppression snapshot allocates arrays of tens of megabytes and frees them once the
address table is built (``address_table.py``). glibc serves a block above its "mmap threshold"
from a mapping of its own, which ``free()`` returns to the system; but it raises that threshold
to the size of the largest such block freed so far (up to 32 MiB), so after the first big
array, every later one below 32 MiB comes from the heap, and what is freed there mostly stays
with the process for its whole life. With the threshold fixed, glibc stops adjusting it.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
LARGE_BLOCK = 1 << 20  # from 1 MiB on: a mapping's cost (two system calls) is nothing next to the copy


def return_large_blocks() -> bool:
    """Fix glibc's mmap threshold at ``LARGE_BLOCK`` for this process and the processes it
    forks. False where the C library is not glibc (nothing is changed)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK))

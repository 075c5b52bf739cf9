"""glibc's malloc, told to give freed memory back to the system.

Loading the suppression snapshot allocates arrays of tens of megabytes and frees them once the
address table is built (``address_table.py``). Two things keep such memory with the process:

* glibc serves a block above its "mmap threshold" from a mapping of its own, which ``free()``
  returns to the system; but it raises that threshold to the size of the largest such block
  freed so far (up to 32 MiB), so after the first big array, every later one below 32 MiB
  comes from the heap, and what is freed there mostly stays. ``return_large_blocks`` fixes the
  threshold, so glibc stops adjusting it.
* what the build freed in smaller pieces (SQLite's page cache, the rows of the loader's thread)
  stays in the heap and in the loader thread's own arena until something reuses it.
  ``give_back_free_memory`` (``malloc_trim``) hands every whole free page back: 1.8 MiB of the
  supervisor's at ten million addresses (bench/README.md).

Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

from .libc import libc_function

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
LARGE_BLOCK = 1 << 20  # from 1 MiB on: a mapping's cost (two system calls) is nothing next to the copy


def return_large_blocks() -> bool:
    """Fix glibc's mmap threshold at ``LARGE_BLOCK`` for this process and the processes it
    forks. False where the C library is not glibc (nothing is changed)."""
    mallopt = libc_function("mallopt")
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK))


def give_back_free_memory() -> bool:
    """Return the free pages of every malloc arena to the system (after a large load).

    A walk over the arenas: milliseconds, for the rare moments after a full index load. True
    when glibc released something."""
    malloc_trim = libc_function("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))

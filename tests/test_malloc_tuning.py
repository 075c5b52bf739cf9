"""glibc's malloc, giving freed memory back (smtp_guard/malloc_tuning.py), on this process."""

from __future__ import annotations

import os

import pytest

from smtp_guard.libc import libc_function
from smtp_guard.malloc_tuning import give_back_free_memory

pytestmark = pytest.mark.skipif(libc_function("malloc_trim") is None, reason="the C library is not glibc")

MIB = 1 << 20


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_freed_below_a_block_still_in_use_goes_back_to_the_system() -> None:
    # Blocks below the mmap threshold come from the heap; the last one, kept, pins the top of
    # the heap, so free() alone cannot shrink it: what a snapshot load leaves behind.
    blocks = [bytes(100_000) for _ in range(300)]
    kept = blocks[-1]
    del blocks
    before = resident_bytes()
    assert give_back_free_memory()
    assert before - resident_bytes() > 10 * MIB  # of the ~29 MiB freed
    assert len(kept) == 100_000

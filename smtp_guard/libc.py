"""The C library's own functions that Python does not wrap (prctl, mallopt, malloc_trim)."""

from __future__ import annotations

import ctypes
from typing import Any


def libc_function(name: str) -> Any:
    """The C library's function ``name``, or None where this system's C library has none
    (not Linux, not glibc): callers then skip what it would have done."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None

"""Start-up failures in one line that names the setting to fix.

A guard that cannot start must say so at once and exit, not linger half-alive: every step of
a start that can fail for a configuration reason runs inside ``naming_setting``, which turns
the library's error into ``StartupError("[section] key VALUE: what is wrong; what to do")``.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager
from typing import Iterator


class StartupError(Exception):
    """The guard cannot start; the message names the setting to fix (one line)."""


@contextmanager
def naming_setting(name: str, enabled: bool, *errors: type[BaseException]) -> Iterator[None]:
    """Turn a failure into a StartupError naming the setting ``name`` ("[section] key VALUE")
    when ``enabled`` (the server starting); otherwise let the error through as it is (admin
    commands translate store and key errors themselves)."""
    if not enabled:
        yield
        return
    try:
        yield
    except StartupError:
        raise
    except errors as error:
        text = _one_line(error)
        value = name.split(" ", 2)[-1]  # the path or address itself, which the error may repeat
        raise StartupError(f"{name}: {text.removeprefix(f'{value}: ')}") from error


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
        return "address already in use; stop the other process or choose another port"
    if isinstance(error, OSError) and error.errno == errno.EADDRNOTAVAIL:
        return "no such address on this machine; listen on one of its own addresses"
    if isinstance(error, OSError) and error.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges; files need the guard's user)"
    return " ".join(str(error).split()) or type(error).__name__

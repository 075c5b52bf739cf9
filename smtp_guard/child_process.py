"""Child processes that run one function of this package in a fresh interpreter.

Used for a fork server started afresh (``fork_server.py``) and the snapshot's parallel load
(``store/sqlite/snapshot_addresses.py``) instead of multiprocessing: its "spawn" children
come with a resource tracker, a process of its own that stays for the parent's whole life
(8 MiB) to clean up semaphores and shared memory the guard never asks it for.

The child is this interpreter (``sys.executable``) with this process's module search path,
as multiprocessing hands it to its children, so it runs this very copy of the package. The
path is the first line of the child's standard input; whatever the caller adds after it
(``payload``) is the function's to read. ``ps`` shows the function's name and arguments.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from typing import Any, Sequence

_BOOT = ("import importlib, json, sys; sys.path[:] = json.loads(sys.stdin.buffer.readline()); "
         "module, name = sys.argv[1].split(':'); sys.exit(getattr(importlib.import_module(module), name)(*sys.argv[2:]))")


def start(function: str, args: Sequence[str], payload: bytes = b"", **popen: Any) -> subprocess.Popen[bytes]:
    """Run ``function`` ("package.module:name", returning an exit status or None) with
    ``args`` in a new process; ``payload`` follows the module search path on its standard
    input, which is then closed. ``popen``: further ``subprocess.Popen`` arguments."""
    child: subprocess.Popen[bytes] = subprocess.Popen([sys.executable, "-c", _BOOT, function, *args],
                                                      stdin=subprocess.PIPE, **popen)
    assert child.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # it died at once: the caller sees it exit
        with child.stdin:
            child.stdin.write(json.dumps(sys.path).encode() + b"\n" + payload)
    child.stdin = None  # written and closed: communicate() must not flush it again
    return child

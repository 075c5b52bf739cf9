"""What the test helpers that start real programs share: a free loopback port, the path of an
installed program (a test that needs a missing one fails under CI=true and skips elsewhere),
and stopping one."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from typing import Any, Sequence

import pytest


def free_port() -> int:
    """A loopback port that was free a moment ago, for programs that cannot be told port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def installed(paths: Sequence[str], name: str, package: str) -> str:
    """The first executable of ``paths``, else ``name`` on PATH; ``package`` is the Debian
    package that provides it, named in the failure (or skip) when there is none."""
    found = next((path for path in paths if os.access(path, os.X_OK)), None) or shutil.which(name)
    if found is None:
        message = f"{name} is not installed (Debian package {package}; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, and SIGKILL if it has not exited within ``timeout`` seconds; reaped either way."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

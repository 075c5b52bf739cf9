"""A real HAProxy for tests: Debian's haproxy in the foreground, on a loopback high port, with
the reference configuration's shape (config/haproxy.cfg): TCP mode, ``send-proxy-v2`` to the
guards, health checks on their ``/readyz`` — never the system's service.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence

import pytest

HAPROXY_PATHS = ("/usr/sbin/haproxy", "/usr/bin/haproxy")


def haproxy_path() -> str:
    found = next((path for path in HAPROXY_PATHS if os.access(path, os.X_OK)), None) or shutil.which("haproxy")
    if found is None:
        message = "haproxy is not installed (Debian package haproxy; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class HAProxy:
    """``guards``: (SMTP address, metrics address) of each guard behind it."""

    def __init__(self, directory: Path, guards: Sequence[tuple[tuple[str, int], tuple[str, int]]],
                 proxy_protocol: str = "send-proxy-v2") -> None:
        self.directory = directory
        self.guards = list(guards)
        self.proxy_protocol = proxy_protocol
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def config(self) -> str:
        servers = "\n".join(
            f"    server guard{i} {smtp[0]}:{smtp[1]} {self.proxy_protocol} source 127.0.0.1 "
            f"check port {metrics[1]} inter 1s fall 2 rise 1"
            for i, (smtp, metrics) in enumerate(self.guards, 1))
        return (
            "global\n    maxconn 200\n\n"
            "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 330s\n    timeout server 330s\n\n"
            f"frontend smtp\n    bind 127.0.0.1:{self.port}\n    default_backend guards\n\n"
            "backend guards\n    balance roundrobin\n    option httpchk GET /readyz\n"
            "    http-check expect status 200\n"
            f"{servers}\n")

    def start(self) -> HAProxy:
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a free port can be taken between the probe and haproxy's bind
            self.port = _free_port()
            config_file = self.directory / "haproxy.cfg"
            config_file.write_text(self.config())
            log = (self.directory / "haproxy.log").open("wb")
            self._process = subprocess.Popen([haproxy_path(), "-db", "-f", str(config_file)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            if self._listening():
                return self
            self.stop()
        raise AssertionError(f"haproxy did not start: {(self.directory / 'haproxy.log').read_text()}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _listening(self) -> bool:
        # Read from the kernel's socket table: a test connection would go through to a guard.
        wanted = f"0100007F:{self.port:04X} 00000000:0000 0A"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                return False
            if wanted in Path("/proc/net/tcp").read_text():
                return True
            time.sleep(0.02)
        return False

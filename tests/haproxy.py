"""A real HAProxy for tests: Debian's haproxy in the foreground on a loopback high port, running
the shipped reference configuration (config/haproxy.cfg) with only its addresses replaced by
the test's — never the system's service.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Sequence


from local_tools import free_port, installed, stop_process

HAPROXY_PATHS = ("/usr/sbin/haproxy", "/usr/bin/haproxy")
REFERENCE = Path(__file__).resolve().parent.parent / "config" / "haproxy.cfg"


def haproxy_path() -> str:
    return installed(HAPROXY_PATHS, "haproxy", "haproxy")


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
        """config/haproxy.cfg on loopback: its listener on this port, its servers the test's
        guards (checked on their own metrics ports), its log to nowhere (no syslog here)."""
        lines = []
        for line in REFERENCE.read_text().splitlines():
            words = line.split()
            if words[:1] == ["log"] and len(words) > 1 and words[1].startswith("/"):
                continue
            if words[:1] == ["bind"]:
                line = f"    bind 127.0.0.1:{self.port}"
            elif words[:1] == ["server"]:
                continue
            lines.append(line)
        lines += [f"    server guard{i} {smtp[0]}:{smtp[1]} port {metrics[1]} source 127.0.0.1"
                  for i, (smtp, metrics) in enumerate(self.guards, 1)]
        if self.proxy_protocol != "send-proxy-v2":
            lines = [line.replace("send-proxy-v2", self.proxy_protocol) for line in lines]
        return "\n".join(lines) + "\n"

    def start(self) -> HAProxy:
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a free port can be taken between the probe and haproxy's bind
            self.port = free_port()
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
        stop_process(process)

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

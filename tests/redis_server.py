"""A real Redis server for tests: Debian's redis-server on a loopback high port, in a directory
of its own, with nothing saved to disk — never the system's service.

``server.url`` goes into ``[counters] url``; ``stop()`` and ``start()`` again (same port) make
Redis go away and come back in the middle of a test.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


from local_tools import free_port, installed, stop_process

REDIS_SERVER_PATHS = ("/usr/bin/redis-server", "/usr/local/bin/redis-server")


def redis_server_path() -> str:
    return installed(REDIS_SERVER_PATHS, "redis-server", "redis-server")


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    def start(self) -> RedisServer:
        """Start it (again, on the same port, after ``stop``); returns once it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a free port can be taken between the probe and redis-server's bind
            self.port = self.port or free_port()
            self._process = subprocess.Popen(
                [redis_server_path(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                 "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
                 "--logfile", str(self.log)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._answers():
                return self
            self.stop()
            self.port = 0
        raise AssertionError(f"redis-server did not start: {self.log.read_text() if self.log.exists() else ''}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        stop_process(process)

    def command(self, *args: str) -> bytes:
        """One command over a raw socket (RESP), its raw reply: for tests that look inside."""
        request = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(arg.encode())}\r\n".encode() + arg.encode() + b"\r\n" for arg in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as connection:
            connection.sendall(request)
            return connection.recv(65536)

    def _answers(self) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                return False
            try:
                if self.command("PING").startswith(b"+PONG"):
                    return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

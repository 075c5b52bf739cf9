"""A broken start is loud: ``smtp-guard serve`` exits non-zero within a second with one line
that names the setting to fix, and leaves nothing running. A guard that is up says, through
``/readyz``, whether it can do its job right now."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from smtp_guard.app import Guard

from conftest import free_port, wait_until, store_toml, sqlite_only

STARTUP_LIMIT = 1.0  # seconds from exec to exit, start-up failure included (Python start-up is ~0.3 s)


def serve(config_file: Path, timeout: float = 10.0) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "smtp_guard", "serve", "--config", str(config_file)],
                            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                            env={**os.environ, "SMTP_GUARD_CONFIG": ""})
    return result, time.monotonic() - started


def write_config(tmp_path: Path, smtp_port: int, metrics_port: int, extra: str = "") -> Path:
    path = tmp_path / "guard.toml"
    path.write_text(f'[smtp]\nlisten = "127.0.0.1:{smtp_port}"\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
                    f'[store]\n{store_toml(tmp_path / "data" / "guard.sqlite3")}{extra}')
    return path


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, result
    return lines[-1]


@pytest.fixture
def busy_port():
    """A loopback port some other process is listening on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def test_smtp_port_in_use_exits_non_zero_naming_the_setting(tmp_path: Path, busy_port: int) -> None:
    result, elapsed = serve(write_config(tmp_path, busy_port, free_port()))
    assert result.returncode == 1
    assert last_line(result) == (f"Error: cannot start: [smtp] listen 127.0.0.1:{busy_port}: address already in use; "
                                 "stop the other process or choose another port")
    assert "Traceback" not in result.stderr
    assert elapsed < STARTUP_LIMIT + 1.5, elapsed  # generous for a loaded CI machine; typically ~0.6 s


def test_metrics_port_in_use_exits_non_zero_naming_the_setting(tmp_path: Path, busy_port: int) -> None:
    result, _ = serve(write_config(tmp_path, free_port(), busy_port))
    assert result.returncode == 1
    assert last_line(result).startswith(f"Error: cannot start: [metrics] listen 127.0.0.1:{busy_port}: address "
                                        "already in use")
    assert "Traceback" not in result.stderr


def test_too_open_erasure_key_exits_non_zero_naming_the_setting(tmp_path: Path) -> None:
    key = tmp_path / "erasure.key"
    key.write_text("{}")
    key.chmod(0o644)
    result, _ = serve(write_config(tmp_path, free_port(), free_port(), f'[erasure]\nkey_file = "{key}"\n'))
    assert result.returncode == 1
    assert last_line(result).startswith(f"Error: cannot start: [erasure] key_file {key}: ")
    assert "Traceback" not in result.stderr


@sqlite_only
def test_unopenable_store_exits_non_zero_naming_the_setting(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("a file where the data directory should be")
    result, _ = serve(write_config(tmp_path, free_port(), free_port()))
    assert result.returncode == 1
    assert last_line(result).startswith(f"Error: cannot start: [store] path {tmp_path / 'data' / 'guard.sqlite3'}")


def test_config_error_exits_non_zero_naming_file_and_key(tmp_path: Path) -> None:
    config_file = write_config(tmp_path, free_port(), free_port(), '[upstream]\nhost = "mx.internal.example"\n')
    result, _ = serve(config_file)
    assert result.returncode == 1
    assert last_line(result).startswith(f"Error: {config_file}: [upstream] host = 'mx.internal.example' is set")


async def test_a_failed_start_leaves_nothing_running(start_guard, tmp_path: Path, busy_port: int) -> None:
    """The store, the loops and the metrics listener opened before the failure are closed again."""
    from conftest import make_config
    config = make_config(tmp_path, free_port(), smtp={"listen": f"127.0.0.1:{busy_port}"})
    guard = Guard(config)
    tasks_before = asyncio.all_tasks()
    with pytest.raises(Exception, match=r"\[smtp\] listen"):
        await guard.start()
    assert asyncio.all_tasks() - tasks_before == set()
    assert guard.http.address is None  # the metrics listener was closed again
    assert not guard.ready


async def readyz(guard: Guard) -> tuple[int, str]:
    assert guard.metrics_address is not None
    host, port = guard.metrics_address
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{host}:{port}/readyz") as response:
            return response.status, await response.text()


async def test_readyz_is_not_ready_while_the_upstream_refuses_connections(start_guard, sink) -> None:
    guard = await start_guard(upstream={"probe_interval": 0.1})
    assert (await readyz(guard))[0] == 200
    await sink.stop()  # the upstream goes away: connections are refused

    async def upstream_down() -> bool:
        status, text = await readyz(guard)
        return status == 503 and f"upstream: cannot connect to [upstream] 127.0.0.1:{sink.port}" in text

    await wait_until(upstream_down, what="/readyz to report the refused upstream")
    status, text = await readyz(guard)
    assert text.splitlines()[:4] == ["not ready", "index: ok", "listener: ok", "store: ok"]

    await sink.start_on(sink.port)

    async def upstream_back() -> bool:
        return (await readyz(guard))[0] == 200

    await wait_until(upstream_back, what="/readyz to be ready again once the upstream accepts")


def test_workers_that_cannot_be_forked_exit_non_zero_naming_the_setting(tmp_path: Path) -> None:
    """No process left (a full process table, RLIMIT_NPROC): the fork server cannot be forked."""
    config_file = write_config(tmp_path, free_port(), free_port(), "")
    config_file.write_text(config_file.read_text().replace("[smtp]\n", "[smtp]\nworkers = 2\n", 1))
    refuse_fork = ("import errno, os\n"
                   "def fork(): raise OSError(errno.EAGAIN, 'Resource temporarily unavailable')\n"
                   "os.fork = fork\n"
                   "from smtp_guard.cli.main import main\n"
                   f"main(['serve', '--config', {str(config_file)!r}], prog_name='smtp-guard')\n")
    result = subprocess.run([sys.executable, "-c", refuse_fork], capture_output=True, text=True, timeout=10,
                            stdin=subprocess.DEVNULL, env={**os.environ, "SMTP_GUARD_CONFIG": ""})
    assert result.returncode == 1
    assert last_line(result) == ("Error: cannot start: [smtp] workers 2 (fork server): [Errno 11] Resource "
                                 "temporarily unavailable")
    assert "Traceback" not in result.stderr

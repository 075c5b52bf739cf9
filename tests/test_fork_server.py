"""The fork server (``fork_server.py``): processes forked on request, their exits reported,
signals passed on only while the pid is still theirs, and what happens when either end dies."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator

import pytest

import pool_targets
from conftest import process_running, wait_until
from smtp_guard.fork_server import ForkedProcess, ForkServer, ForkServerGone


@pytest.fixture
async def server() -> AsyncIterator[ForkServer]:
    started = ForkServer.start_fresh(preload=("pool_targets",))
    yield started
    await started.close()


async def fork(server: ForkServer, function, *args) -> tuple[ForkedProcess, int]:  # type: ignore[no-untyped-def]
    """Fork ``function``; return the process and the read end of the pipe it got."""
    receive, send = os.pipe()
    try:
        return await server.fork(function, args, send), receive
    finally:
        os.close(send)


def read_all(fd: int) -> str:
    with os.fdopen(fd, "rb") as reader:
        return reader.read().decode()


async def test_a_forked_process_runs_the_function_with_its_fd_as_the_servers_child(server: ForkServer) -> None:
    process, receive = await fork(server, pool_targets.introduce, "hello")
    text, pid, parent = read_all(receive).split()
    assert (text, int(pid), int(parent)) == ("hello", process.pid, server.pid)
    assert process.is_alive()
    process.terminate()
    await process.wait(10)
    assert not process.is_alive() and process.exitcode == -signal.SIGTERM


@pytest.mark.parametrize("how, status", [("return", 0), ("0", 0), ("3", 3), ("raise", 1)])
async def test_the_exit_status_is_what_a_fresh_interpreter_would_give(server: ForkServer, how: str,
                                                                      status: int) -> None:
    process, receive = await fork(server, pool_targets.exit_with, how)
    os.close(receive)
    await process.wait(10)
    assert process.exitcode == status


async def test_a_signal_after_the_exit_is_not_sent(server: ForkServer) -> None:
    """Once reaped, the pid may belong to another process: the server must not signal it."""
    process, receive = await fork(server, pool_targets.exit_with, "return")
    os.close(receive)
    await process.wait(10)
    process.kill()  # a no-op; and the server, still serving, forks again:
    again, receive = await fork(server, pool_targets.introduce, "again")
    assert read_all(receive).split()[0] == "again"
    again.kill()
    await again.wait(10)
    assert again.exitcode == -signal.SIGKILL


async def test_when_the_supervisor_is_gone_the_forked_processes_get_sigterm(server: ForkServer) -> None:
    process, receive = await fork(server, pool_targets.introduce, "orphan")
    read_all(receive)
    await server.close()  # what the supervisor's death looks like to the server: its socket ends
    assert not process_running(server.pid)
    await wait_until(lambda: not process_running(process.pid), timeout=10, what="the process to get SIGTERM")


async def test_a_killed_server_ends_its_processes_here_and_refuses_further_forks(server: ForkServer) -> None:
    process, receive = await fork(server, pool_targets.introduce, "left")
    read_all(receive)
    os.kill(server.pid, signal.SIGKILL)
    await wait_until(lambda: not server.alive, timeout=10, what="the socket's end to be noticed")
    assert not process.is_alive() and process.exitcode is None  # its status went with the server
    with pytest.raises(ForkServerGone):
        await fork(server, pool_targets.introduce, "too late")
    # The stand-in does not watch its parent: the kernel's SIGTERM (PR_SET_PDEATHSIG) ends it.
    await wait_until(lambda: not process_running(process.pid), timeout=10, what="the orphan to get SIGTERM")


async def test_a_process_forked_for_a_cancelled_request_is_stopped(server: ForkServer) -> None:
    """SIGTERM during the supervisor's start cancels a fork already asked for: the process
    the server forks anyway must not run on unknown to the supervisor."""
    import asyncio

    receive, send = os.pipe()
    request = asyncio.create_task(server.fork(pool_targets.introduce, ("unwanted",), send))
    await asyncio.sleep(0)  # the request is sent; its answer not read yet
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    os.close(send)
    _, pid, parent = read_all(receive).split()
    assert int(parent) == server.pid
    await wait_until(lambda: not process_running(int(pid)), timeout=10, what="the unwanted process to stop")


async def test_sigterm_to_the_whole_group_leaves_the_server_to_the_supervisor(server: ForkServer) -> None:
    """``systemctl stop`` sends SIGTERM to every process of the service: the server stays, so
    the supervisor can still signal and wait for its workers; what it forks has SIGTERM back."""
    before, receive = await fork(server, pool_targets.introduce, "before")  # the server is serving
    read_all(receive)
    os.kill(server.pid, signal.SIGTERM)
    process, receive = await fork(server, pool_targets.introduce, "after")
    assert read_all(receive).split()[0] == "after" and process_running(server.pid)
    process.terminate()
    await process.wait(10)
    assert process.exitcode == -signal.SIGTERM
    before.kill()


async def test_a_payload_the_server_cannot_load_fails_that_fork_only(server: ForkServer) -> None:
    with pytest.raises(OSError, match="could not fork: RuntimeError: cannot be loaded here"):
        await fork(server, pool_targets.introduce, pool_targets.Unloadable())
    process, receive = await fork(server, pool_targets.introduce, "serving")
    assert read_all(receive).split()[0] == "serving"
    process.kill()
    await process.wait(10)


async def test_a_stopped_server_never_blocks_the_supervisor(server: ForkServer) -> None:
    """SIGSTOP: it reads nothing more. Signals for its processes fill its socket; the next one
    finds it full and gives the server up (killed) instead of blocking the event loop. Its
    processes get SIGTERM from the kernel."""
    import time

    process, receive = await fork(server, pool_targets.introduce, "before")
    read_all(receive)
    os.kill(server.pid, signal.SIGSTOP)
    started = time.monotonic()
    while server.alive and time.monotonic() - started < 5:
        process.kill()  # each a packet the stopped server does not read
    assert not server.alive and time.monotonic() - started < 5
    assert not process.is_alive()
    await wait_until(lambda: not process_running(server.pid), timeout=10, what="the stopped server to be killed")
    await wait_until(lambda: not process_running(process.pid), timeout=10, what="its process to get SIGTERM")
    with pytest.raises(ForkServerGone):
        await fork(server, pool_targets.introduce, "too late")


async def test_a_server_that_does_not_answer_a_fork_is_given_up(server: ForkServer,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from smtp_guard import fork_server

    monkeypatch.setattr(fork_server, "REPLY_TIMEOUT", 0.5)
    _, receive = await fork(server, pool_targets.introduce, "before")
    read_all(receive)
    os.kill(server.pid, signal.SIGSTOP)
    with pytest.raises(ForkServerGone, match="did not answer a fork within 0.5s; killed"):
        await fork(server, pool_targets.introduce, "unanswered")
    assert not server.alive
    await wait_until(lambda: not process_running(server.pid), timeout=10, what="the server to be killed")

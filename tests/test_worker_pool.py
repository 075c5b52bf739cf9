"""WorkerPool on its own, with stand-in workers (``pool_targets.py``) that start fast and
hang, die or start slowly on purpose: restarts, backoff, readiness counts and clean-up."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from conftest import process_running, wait_until
from pool_targets import serve
from smtp_guard import workers
from smtp_guard.workers import WorkerPool


class Recorder:
    """What the pool told its callbacks."""

    def __init__(self) -> None:
        self.accepting: list[int] = []
        self.exits: list[tuple[int, str | None]] = []

    async def on_exit(self, pid: int, instance_id: str | None) -> None:
        self.exits.append((pid, instance_id))

    def on_change(self, accepting: int) -> None:
        self.accepting.append(accepting)


@pytest.fixture
async def make_pool(tmp_path: Path) -> AsyncIterator[Callable[..., WorkerPool]]:
    pools: list[WorkerPool] = []

    def make(count: int, recorder: Recorder, start_timeout: float = 10.0) -> WorkerPool:
        pool = WorkerPool(count, serve, (tmp_path,), grace=0.5, on_exit=recorder.on_exit,
                          on_change=recorder.on_change, start_timeout=start_timeout)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.stop()



async def test_a_dead_worker_is_forgotten_with_its_instance_id_and_readiness_follows(make_pool) -> None:
    recorder = Recorder()
    pool = make_pool(2, recorder)
    await pool.start()
    assert recorder.accepting == [2]
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGKILL)
    await wait_until(lambda: recorder.accepting[-1:] == [2] and len(recorder.accepting) == 3, timeout=10,
                     what="the worker to be started again")
    assert recorder.accepting == [2, 1, 2]
    assert recorder.exits == [(victim, f"w1-{victim}")]  # the id it sent with "ready"
    assert victim not in pool.pids()


async def test_a_replacement_that_hangs_at_start_is_killed_and_started_again(
        make_pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(workers, "STABLE_AFTER", 0.0)  # the first death: no pause
    monkeypatch.setattr(workers, "KILL_MARGIN", 0.5)
    caplog.set_level(logging.INFO, logger="smtp_guard.workers")
    recorder = Recorder()
    pool = make_pool(1, recorder, start_timeout=1.0)
    await pool.start()
    (tmp_path / "hang-1").touch()
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGKILL)
    # the replacement removes the file as it starts, which can be before the pool has its pid
    await wait_until(lambda: not (tmp_path / "hang-1").exists() and pool.pids() not in ([], [victim]),
                     timeout=10, what="the replacement to hang")
    hung = pool.pids()[0]
    await wait_until(lambda: recorder.accepting[-1:] == [1] and len(recorder.accepting) == 3, timeout=10,
                     what="a second replacement to start")
    assert not process_running(hung)  # SIGTERM ignored: killed
    assert hung not in pool.pids()
    assert "worker 1 did not start again: worker 1 did not start within 1s" in caplog.text
    assert "still running 0s after SIGTERM; killing it" in caplog.text
    # the hung start counts as a death in a row: the next start waits (backoff)
    assert f"worker 1 (pid {hung}) exited with status -9 before it was ready; starting it again in 1s" in caplog.text


async def test_restarts_of_two_workers_run_side_by_side_and_stop_cancels_them(
        make_pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "STABLE_AFTER", 0.0)
    monkeypatch.setattr(workers, "KILL_MARGIN", 0.5)
    recorder = Recorder()
    pool = make_pool(2, recorder, start_timeout=30.0)
    await pool.start()
    (tmp_path / "hang-1").touch()  # worker 1's replacement will hang for the whole start timeout
    killed_at = time.monotonic()
    killed = pool.pids()
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: recorder.accepting[-1:] == [1], timeout=10, what="worker 2 to be ready again")
    assert time.monotonic() - killed_at < 10  # not behind worker 1's 30 s start
    await wait_until(lambda: not (tmp_path / "hang-1").exists() and len(pool.pids()) == 2
                     and pool.pids()[0] not in killed, timeout=10, what="worker 1's replacement to hang")
    hung = pool.pids()[0]
    assert process_running(hung)
    started = time.monotonic()
    await pool.stop()  # cancels worker 1's restart; the hung process ignores SIGTERM: killed
    assert time.monotonic() - started < 0.5 + workers.KILL_MARGIN + 2
    assert not process_running(hung) and pool.pids() == []


async def test_backoff_counts_a_life_from_ready_not_from_spawn(
        make_pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A worker that takes longer to start than STABLE_AFTER, then dies at once, still backs off."""
    monkeypatch.setattr(workers, "STABLE_AFTER", 0.5)
    caplog.set_level(logging.INFO, logger="smtp_guard.workers")
    (tmp_path / "delay-1").write_text("0.8")
    recorder = Recorder()
    pool = make_pool(1, recorder)
    await pool.start()
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGKILL)
    await wait_until(lambda: f"(pid {victim}) exited" in caplog.text, timeout=10, what="the death to be noticed")
    assert f"worker 1 (pid {victim}) exited with status -9 after 0s; starting it again in 1s" in caplog.text


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


async def two_workers(make_pool) -> tuple[WorkerPool, Recorder, list[int], int]:  # type: ignore[no-untyped-def]
    """A started pool of two workers, their pids and their fork server's."""
    recorder = Recorder()
    pool = make_pool(2, recorder)
    await pool.start()
    pids = pool.pids()
    server = parent_of(pids[0])
    assert parent_of(pids[1]) == server
    return pool, recorder, pids, server


async def test_a_killed_fork_server_is_replaced_and_its_workers_started_again(
        make_pool, caplog: pytest.LogCaptureFixture) -> None:
    """Its workers see their parent go and stop (as app.run_worker drains); the pool counts them
    as dead, with no exit status to give, and forks new ones from a new server."""
    caplog.set_level(logging.INFO, logger="smtp_guard")
    pool, recorder, old_workers, old_server = await two_workers(make_pool)
    os.kill(old_server, signal.SIGKILL)
    await wait_until(lambda: len(recorder.accepting) >= 3 and recorder.accepting[-1] == 2, timeout=20,
                     what="both workers to be started again")
    new_workers = pool.pids()
    assert not set(new_workers) & set(old_workers)
    new_server = parent_of(new_workers[0])
    assert new_server != old_server and parent_of(new_workers[1]) == new_server
    await wait_until(lambda: not any(process_running(pid) for pid in old_workers), timeout=10,
                     what="the orphaned workers to stop")
    assert "exited with status unknown (its fork server is gone)" in caplog.text
    assert sorted(pid for pid, _ in recorder.exits) == sorted(old_workers)


async def test_a_restart_that_cannot_fork_backs_off_and_forgets_the_dead_worker_once(
        make_pool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from smtp_guard.fork_server import ForkServer

    monkeypatch.setattr(workers, "STABLE_AFTER", 0.0)  # the death itself: no pause
    caplog.set_level(logging.INFO, logger="smtp_guard.workers")
    recorder = Recorder()
    pool = make_pool(1, recorder)
    await pool.start()
    real_fork, refusals = ForkServer.fork, []

    async def fork(self, *args):  # type: ignore[no-untyped-def]
        if len(refusals) < 2:  # no process left, twice
            refusals.append(args)
            raise OSError("the fork server could not fork: [Errno 11] Resource temporarily unavailable")
        return await real_fork(self, *args)

    monkeypatch.setattr(ForkServer, "fork", fork)
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGKILL)
    await wait_until(lambda: recorder.accepting[-1:] == [1] and len(recorder.accepting) == 3, timeout=20,
                     what="the worker to be started again after two failed forks")
    assert recorder.exits == [(victim, f"w1-{victim}")]  # forgotten once, not once per attempt
    assert "could not start worker 1: the fork server could not fork" in caplog.text
    assert "trying again in 1s" in caplog.text and "trying again in 2s" in caplog.text


async def test_a_stopped_fork_server_is_killed_and_its_workers_started_again(
        make_pool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Stopped, the server reports no exit: a worker that died meanwhile would stay dead, and
    /readyz would count it. Its silence to a ping is what gives it away."""
    from smtp_guard import fork_server

    monkeypatch.setattr(workers, "PING_INTERVAL", 0.2)
    monkeypatch.setattr(fork_server, "REPLY_TIMEOUT", 1.0)
    caplog.set_level(logging.INFO, logger="smtp_guard")
    pool, recorder, old_workers, old_server = await two_workers(make_pool)
    os.kill(old_server, signal.SIGSTOP)
    os.kill(old_workers[0], signal.SIGKILL)  # a zombie its stopped parent does not report
    await wait_until(lambda: len(pool.pids()) == 2 and not set(pool.pids()) & set(old_workers)
                     and recorder.accepting[-1] == 2, timeout=20, what="both workers started again")
    assert parent_of(pool.pids()[0]) != old_server
    assert "it did not answer a ping within 1s; killed" in caplog.text
    await wait_until(lambda: not process_running(old_workers[1]), timeout=10,
                     what="the stopped server's other worker to stop")


async def test_a_stopped_worker_is_killed_and_started_again(
        make_pool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A worker that stops sending heartbeats (SIGSTOP here; an event loop stuck in a lock
    another stopped worker holds, in production) keeps its share of new connections and
    answers none of them: it is killed and replaced."""
    monkeypatch.setattr(workers, "HUNG_AFTER", 1.0)
    caplog.set_level(logging.INFO, logger="smtp_guard.workers")
    recorder = Recorder()
    pool = make_pool(2, recorder)
    await pool.start()
    stopped, other = pool.pids()
    os.kill(stopped, signal.SIGSTOP)
    await wait_until(lambda: stopped not in pool.pids() and len(recorder.accepting) >= 3
                     and recorder.accepting[-1] == 2, timeout=20, what="the stopped worker to be replaced")
    assert other in pool.pids(), "the one sending heartbeats is left alone"
    assert not process_running(stopped)
    assert "worker 1 (pid %d) has sent no heartbeat for 1s" % stopped in caplog.text


async def test_a_worker_ended_by_sigbus_is_logged_with_what_to_check(
        make_pool, caplog: pytest.LogCaptureFixture) -> None:
    """What a full /dev/shm does to a worker writing a new page of a mapped file."""
    caplog.set_level(logging.INFO, logger="smtp_guard.workers")
    recorder = Recorder()
    pool = make_pool(1, recorder)
    await pool.start()
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGBUS)
    await wait_until(lambda: recorder.exits, timeout=10, what="the worker's death to be noticed")
    assert f"worker 1 (pid {victim}) exited with status -7" in caplog.text
    assert "SIGBUS: a file it maps could not grow; is the file system of its run directory" in caplog.text

"""``[smtp] workers = 2``: two SMTP front processes on one port under a supervisor, run as
``smtp-guard serve`` (a real process tree), with every limit global.

The kernel spreads connections over the two listening sockets (SO_REUSEPORT, by a hash of
the client's address and port), so each test opens many connections: the chance that 20 all
reach one worker is 2^-19.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import aiosmtplib
import pytest
from click.testing import CliRunner

from admin_client import ADMIN_TOKEN
from conftest import free_port, process_running, wait_until, store_toml
from sink import Sink
from smtp_client import message, send
from smtp_guard.api_tokens import hash_token
from smtp_guard.cli.main import main

SENDER = "news@shop.test"
CONNECTIONS = 20


class Supervised:
    """``smtp-guard serve`` with workers = 2, its config file and ports."""

    def __init__(self, tmp_path: Path, sink: Sink, extra: str, reload_interval: str,
                 own_session: bool = False) -> None:
        self.own_session = own_session  # its own process group, as a terminal gives it
        self.smtp_port = free_port()
        self.metrics_port = free_port()
        self.config_file = tmp_path / "smtp-guard.toml"
        self.config_file.write_text(
            f'[smtp]\nlisten = "127.0.0.1:{self.smtp_port}"\nhostname = "guard.test"\nworkers = 2\n'
            'shutdown_grace = "10s"\nmax_recipients = 1000\n\n'
            f'[metrics]\nlisten = "127.0.0.1:{self.metrics_port}"\n\n'
            f'[store]\n{store_toml(tmp_path / "data" / "guard.sqlite3")}reload_interval = "{reload_interval}"\n\n'
            '[hold]\npoll_interval = "0.1s"\n\n[audit]\nflush_interval = "0.1s"\n\n'
            f'[upstream]\nmode = "smtp"\nhost = "127.0.0.1"\nport = {sink.port}\n\n{extra}')
        self.log = (tmp_path / "serve.log").open("w+")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.smtp_port

    def launch(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smtp_guard", "serve", "--config", str(self.config_file)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=self.own_session)

    async def start(self) -> None:
        self.launch()
        await wait_until(self.ready, timeout=60, interval=0.1, what="the supervisor and both workers to be ready")

    async def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"smtp-guard serve exited with {self.process.returncode}:\n{self.output()}")
        try:
            status, _ = await self.get("/readyz")
        except aiohttp.ClientError:
            return False
        return status == 200

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{self.metrics_port}{path}") as response:
                return response.status, await response.text()

    async def metric(self, name: str, **labels: str) -> float:
        _, text = await self.get("/metrics")
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            series, value = line.rsplit(" ", 1)
            metric_name, _, label_text = series.partition("{")
            if metric_name != name:
                continue
            present = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if part)
            if all(present.get(k) == f'"{v}"' for k, v in labels.items()) or (not labels and not wanted):
                total += float(value)
        return total

    def fork_server_pid(self) -> int:
        """The supervisor's one child: the fork server its workers are forked from."""
        assert self.process is not None
        (pid,) = map(int, _children(self.process.pid))
        return pid

    def worker_pids(self) -> list[int]:
        assert self.process is not None
        return sorted(pid for server in _children(self.process.pid) for pid in _children(int(server)))

    def cli(self, *args: str) -> str:
        result = CliRunner().invoke(main, [*args, "--config", str(self.config_file)], env={"SMTP_GUARD_CONFIG": None})
        assert result.exit_code == 0, result.output
        return result.output

    async def readyz(self) -> tuple[int, str] | None:
        try:
            return await self.get("/readyz")
        except aiohttp.ClientError:
            return None

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    async def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, 30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
async def supervised(tmp_path: Path, sink: Sink) -> AsyncIterator[object]:
    started: list[Supervised] = []

    async def start(extra: str = "", reload_interval: str = "60s", own_session: bool = False,
                    wait: bool = True) -> Supervised:
        """``reload_interval``: long by default, so only the change generation brings news.
        ``wait=False``: launched, not waited for."""
        guard = Supervised(tmp_path, sink, extra, reload_interval, own_session)
        started.append(guard)
        if wait:
            await guard.start()
        else:
            guard.launch()
        return guard

    yield start
    for guard in started:
        await guard.stop()
        guard.log.close()


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def shared_anonymous_kib(pid: int) -> int:
    """A process's anonymous memory (Python's heap) that it shares with another process."""
    shared, anonymous = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not line[:1].isupper() or not fields[0].endswith(":"):  # a mapping's header line
            anonymous = len(fields) < 6 or fields[5] == "[heap]"
        elif anonymous and fields[0] in ("Shared_Clean:", "Shared_Dirty:"):
            shared += int(fields[1])
    return shared


async def send_each(guard: Supervised, recipients: list[str], content: bytes | None = None):  # type: ignore[no-untyped-def]
    """One connection per recipient, all at once: spread over both workers."""
    return await asyncio.gather(*(send(guard.address, SENDER, [r], content or message()) for r in recipients))


async def test_two_workers_serve_one_port_and_one_scrape_counts_both(supervised, sink: Sink) -> None:
    guard = await supervised()
    assert len(guard.worker_pids()) == 2
    # The supervisor's one child is the fork server (no multiprocessing resource tracker, 8 MiB),
    # and the workers forked from it share the package it imported: ~15 MiB each, measured.
    assert _children(guard.fork_server_pid()) == guard.worker_pids()
    for pid in guard.worker_pids():
        assert shared_anonymous_kib(pid) > 8 * 1024
    # Even the event loop each worker runs was imported before the fork (1.4 MiB a worker).
    assert "uvloop" in Path(f"/proc/{guard.fork_server_pid()}/maps").read_text()
    # ps -e, top and pgrep tell them apart (ps aux shows one command line for all)
    names = [Path(f"/proc/{pid}/comm").read_text().strip()
             for pid in [guard.process.pid, guard.fork_server_pid(), *guard.worker_pids()]]  # type: ignore[union-attr]
    assert sorted(names) == ["smtp-guard", "smtp-guard-fork", "smtp-guard-w1", "smtp-guard-w2"]
    assert guard.process is not None  # the supervisor serves /metrics: aiohttp is mapped there ...
    assert "aiohttp" in Path(f"/proc/{guard.process.pid}/maps").read_text()
    for pid in guard.worker_pids():  # ... and not in the workers, which serve no HTTP (~10 MiB each)
        assert "aiohttp" not in Path(f"/proc/{pid}/maps").read_text()
    for pid in [guard.process.pid, *guard.worker_pids()]:  # no DKIM keys: no cryptography (~8 MiB each)
        assert "cryptography" not in Path(f"/proc/{pid}/maps").read_text()
    outcomes = await send_each(guard, [f"r{i}@example.com" for i in range(CONNECTIONS)])
    assert all(o.data is not None and o.data.startswith("250") for o in outcomes)
    assert len(sink.messages) == CONNECTIONS
    await wait_until(lambda: metric_is(guard, CONNECTIONS, "smtp_guard_messages_total", outcome="relayed"),
                     timeout=10, what="one /metrics scrape to count the messages of both workers")
    _, text = await guard.get("/readyz")
    assert text.startswith("ready")


async def metric_is(guard: Supervised, expected: float, name: str, **labels: str) -> bool:
    return await guard.metric(name, **labels) == expected


async def test_a_suppression_added_by_the_cli_is_enforced_by_both_workers(supervised, sink: Sink) -> None:
    guard = await supervised()
    output = await asyncio.to_thread(guard.cli, "suppress", "add", "gone@example.com", "--list", "unsubscribed")
    # The supervisor and both workers confirmed the change before the command returned.
    assert "In force on 3 running guards." in output
    outcomes = await send_each(guard, ["gone@example.com"] * CONNECTIONS)
    assert all(o.rcpt["gone@example.com"].startswith("550") for o in outcomes)
    assert sink.messages == []


async def test_tombstones_are_shared_by_the_workers_and_later_erasures_reach_both(supervised, tmp_path: Path,
                                                                                    sink: Sink) -> None:
    """Erasures made before the start are in one file every process maps (not a copy per
    process); one made while running is enforced by both workers as well."""
    before = Supervised(tmp_path, sink, "", "60s")  # its config, the store the guard will use
    before.log.close()
    await asyncio.to_thread(before.cli, "init")
    await asyncio.to_thread(before.cli, "erase", "jane@example.com", "--ref", "DSR-1")
    guard = await supervised()
    shared = [line for line in Path(f"/proc/{guard.worker_pids()[0]}/maps").read_text().splitlines()
              if line.endswith("/tombstones")]
    assert shared, "the worker does not map the shared tombstone file"
    for pid in [*guard.worker_pids(), guard.process.pid]:  # type: ignore[union-attr]
        assert shared[0].split()[-1] in Path(f"/proc/{pid}/maps").read_text()
    output = await asyncio.to_thread(guard.cli, "erase", "joe@example.com", "--ref", "DSR-2", "--wait")
    assert "In force on 3 running guards." in output
    outcomes = await send_each(guard, ["jane@example.com", "joe@example.com"] * (CONNECTIONS // 2))
    assert all(o.rcpt.get("jane@example.com", o.rcpt.get("joe@example.com", "")).startswith("550") for o in outcomes)
    assert sink.messages == []


async def test_a_rate_limit_holds_across_workers(supervised, sink: Sink) -> None:
    guard = await supervised('[[rate_limits]]\nname = "per-sender"\nkey = "sender"\nrate = "5/h"\nburst = 5\n')
    outcomes = await send_each(guard, [f"r{i}@example.com" for i in range(CONNECTIONS)])
    accepted = [o for o in outcomes if o.accepted]
    deferred = [o for o in outcomes if not o.accepted]
    assert len(accepted) == 5 and len(sink.messages) == 5
    assert all(o.rcpt[next(iter(o.rcpt))].startswith("451 4.7.1") for o in deferred)


async def test_with_redis_the_workers_count_there_and_share_no_table(supervised, sink: Sink, redis_server) -> None:
    from smtp_guard.config import ListenAddress
    from smtp_guard.run_directory import RunDirectory

    guard = await supervised(f'[counters]\nurl = "{redis_server.url}"\n\n'
                             '[[rate_limits]]\nname = "per-sender"\nkey = "sender"\nrate = "5/h"\nburst = 5\n')
    outcomes = await send_each(guard, [f"r{i}@example.com" for i in range(CONNECTIONS)])
    assert len([o for o in outcomes if o.accepted]) == 5 and len(sink.messages) == 5
    assert redis_server.command("KEYS", "smtp-guard:rl:*").startswith(b"*1\r\n"), "one bucket, in Redis"
    run_directory = RunDirectory(ListenAddress(*guard.address)).paths.root
    assert run_directory.is_dir() and not (run_directory / "counters").exists()


async def test_a_breaker_trips_once_for_a_stream_spread_over_both_workers(supervised, sink: Sink) -> None:
    guard = await supervised('[classify]\nrules = [{ class = "sanction", subject = "policy violation" }]\n\n'
                             '[classes.sanction]\napproval_after = 5\n',
                             reload_interval="0.2s")  # the breaker sync writes trips at this pace
    notice = message(subject="Policy violation", extra_headers="X-Campaign-ID: sanction-1\r\n")
    outcomes = await send_each(guard, [f"member{i}@users.example" for i in range(CONNECTIONS)], notice)
    assert all(o.data is not None and o.data.startswith("250") for o in outcomes)  # relayed or held
    assert len(sink.messages) == 5  # the gate's count is global: 5, not 5 per worker

    async def listed() -> str | None:
        text = await asyncio.to_thread(guard.cli, "breaker", "list")
        return text if "sanction-1" in text else None

    text = await wait_until(listed, timeout=10, what="the trip to reach the store")
    assert text.count("sanction-1") == 1 and "gate.sanction" in text
    await wait_until(lambda: metric_is(guard, 1, "smtp_guard_breaker_trips_total"), timeout=10,
                     what="one trip in the scrape")
    await asyncio.to_thread(guard.cli, "breaker", "approve", "sanction-1", "--ceiling", "100")
    await wait_until(lambda: len(sink.messages) == CONNECTIONS, timeout=20,
                     what="the held recipients to be released once, by the supervisor")
    await asyncio.sleep(0.5)
    assert sorted(sink.delivered_to()) == sorted(f"member{i}@users.example" for i in range(CONNECTIONS))


async def test_a_killed_worker_is_restarted_and_no_acknowledged_mail_is_lost(supervised, sink: Sink) -> None:
    guard = await supervised()
    acknowledged: list[str] = []

    async def keep_sending(start: int) -> None:
        for i in range(start, start + 40):
            try:
                outcome = await send(guard.address, SENDER, [f"k{i}@example.com"], message())
            except Exception:
                continue  # a connection the killed worker had: never acknowledged
            if outcome.data is not None and outcome.data.startswith("250"):
                acknowledged.append(f"k{i}@example.com")

    senders = [asyncio.create_task(keep_sending(n * 100)) for n in range(4)]
    await asyncio.sleep(0.3)
    victim = guard.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    await asyncio.gather(*senders)
    await wait_until(lambda: len(guard.worker_pids()) == 2 and victim not in guard.worker_pids(), timeout=30,
                     what="the supervisor to start the killed worker again")
    assert "starting it again" in guard.output()
    assert acknowledged and set(acknowledged) <= set(sink.delivered_to())
    await wait_until(guard.ready, timeout=30, what="ready again")
    outcomes = await send_each(guard, [f"after{i}@example.com" for i in range(CONNECTIONS)])
    assert all(o.data is not None and o.data.startswith("250") for o in outcomes)


async def test_sigterm_drains_both_workers(supervised, sink: Sink) -> None:
    guard = await supervised()
    pids = guard.worker_pids()
    sink.hang_on, sink.hang_seconds = "data", 1.5  # sessions still in a transaction at SIGTERM
    sending = asyncio.gather(*(send(guard.address, SENDER, [f"d{i}@example.com"], message()) for i in range(8)))
    await wait_until(lambda: sink.transactions_started >= 8, timeout=10, what="every session in DATA")
    started = time.monotonic()
    assert guard.process is not None
    guard.process.send_signal(signal.SIGTERM)
    outcomes = await sending
    assert all(o.data is not None and o.data.startswith("250") for o in outcomes)  # drained, not cut
    assert await asyncio.to_thread(guard.process.wait, 30) == 0
    assert time.monotonic() - started < 10
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    assert len(sink.messages) == 8


async def test_workers_of_a_killed_supervisor_stop_and_free_the_port(supervised, sink: Sink) -> None:
    """A supervisor killed with SIGKILL cannot stop its workers; without it they would keep the
    port and defer every message. They notice and exit: the port is free again."""
    guard = await supervised()
    pids = guard.worker_pids()
    assert guard.process is not None
    guard.process.kill()
    guard.process.wait()
    await wait_until(lambda: all(not process_running(pid) for pid in pids), timeout=20,
                     what="the orphaned workers to exit")
    with socket.socket() as probe:  # the port is free again (no SO_REUSEPORT: nobody may hold it)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(guard.address)
    shutil.rmtree(f"/dev/shm/smtp-guard.127.0.0.1-{guard.smtp_port}", ignore_errors=True)  # what it left



async def test_workers_of_a_killed_supervisor_stop_even_while_their_fork_server_is_stopped(
        supervised, sink: Sink) -> None:
    """The fork server, stopped, cannot pass on the supervisor's end; the workers find it out
    themselves (their heartbeat pipe has no reader any more) instead of serving on, deferring
    every message, and sharing the port with the next supervisor."""
    guard = await supervised()
    pids, fork_server = guard.worker_pids(), guard.fork_server_pid()
    assert guard.process is not None
    os.kill(fork_server, signal.SIGSTOP)
    try:
        guard.process.kill()
        guard.process.wait()
        await wait_until(lambda: all(not process_running(pid) for pid in pids), timeout=20,
                         what="the workers to exit on their own")
    finally:
        os.kill(fork_server, signal.SIGKILL)
    shutil.rmtree(f"/dev/shm/smtp-guard.127.0.0.1-{guard.smtp_port}", ignore_errors=True)  # what it left


async def test_a_second_supervisor_on_the_same_address_is_refused(supervised, tmp_path: Path) -> None:
    """SO_REUSEPORT would let it share the port, with rate limits and a breaker of its own."""
    guard = await supervised()
    assert guard.process is not None
    second = subprocess.run([sys.executable, "-m", "smtp_guard", "serve", "--config", str(guard.config_file)],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert second.returncode == 1
    assert (f"[smtp] listen 127.0.0.1:{guard.smtp_port}: another smtp-guard (pid {guard.process.pid}) already "
            "serves this address with workers") in second.stderr
    assert await guard.ready()  # the first one is untouched


@pytest.mark.parametrize("spelling", ["localhost", "0.0.0.0"])
async def test_a_second_supervisor_on_the_same_port_written_otherwise_is_refused(
        supervised, tmp_path: Path, spelling: str) -> None:
    """Its run directory has another name, so the lock does not see it; the port does."""
    guard = await supervised()
    second_config = tmp_path / "second.toml"
    second_config.write_text(guard.config_file.read_text()
                             .replace(f'"127.0.0.1:{guard.smtp_port}"', f'"{spelling}:{guard.smtp_port}"')
                             .replace(f'"127.0.0.1:{guard.metrics_port}"', '"127.0.0.1:0"'))
    second = subprocess.run([sys.executable, "-m", "smtp_guard", "serve", "--config", str(second_config)],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert second.returncode == 1, second.stderr
    assert f"[smtp] listen {spelling}:{guard.smtp_port}: port {guard.smtp_port} is in use on" in second.stderr
    assert not Path(f"/dev/shm/smtp-guard.{spelling}-{guard.smtp_port}").exists()  # its own, removed
    assert await guard.ready()  # the first one is untouched


async def test_a_killed_supervisor_leaves_its_run_directory_to_the_next_start(supervised) -> None:
    guard = await supervised()
    assert guard.process is not None
    run_directory = next(Path("/dev/shm").glob(f"smtp-guard.127.0.0.1-{guard.smtp_port}"))
    assert (run_directory / "counters").exists()
    guard.process.kill()
    guard.process.wait()
    await wait_until(lambda: not any(process_running(pid) for pid in _pids_using(run_directory)), timeout=20,
                     what="the orphaned workers to exit")
    assert (run_directory / "counters").exists()  # left behind ...
    await guard.start()  # ... and taken over by the next start on the same address
    assert guard.process.pid and (run_directory / "counters").exists()
    await guard.stop()
    assert not run_directory.exists()  # a clean stop removes it


def _pids_using(directory: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(directory) in (proc / "maps").read_text():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


async def test_readyz_says_not_ready_while_no_worker_accepts(supervised, sink: Sink) -> None:
    guard = await supervised()
    for pid in guard.worker_pids():
        os.kill(pid, signal.SIGKILL)

    async def not_ready() -> str | None:
        answer = await guard.readyz()
        return answer[1] if answer is not None and answer[0] == 503 else None

    text = await wait_until(not_ready, timeout=10, interval=0.02, what="/readyz to say no worker accepts")
    assert "listener: no worker is accepting connections (0 of 2); restarting" in text
    await wait_until(guard.ready, timeout=30, what="ready again once the workers are back")
    outcomes = await send_each(guard, [f"back{i}@example.com" for i in range(CONNECTIONS)])
    assert all(o.data is not None and o.data.startswith("250") for o in outcomes)


async def test_a_change_right_after_a_worker_crash_does_not_wait_for_the_dead_worker(supervised, sink: Sink) -> None:
    """The supervisor removes the dead worker's row from the running guards at once; without
    that, the row stays fresh for STALE_AFTER and ``--wait`` gives up after confirm_timeout."""
    guard = await supervised()
    victim = guard.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    output = await asyncio.to_thread(guard.cli, "suppress", "add", "gone@example.com", "--list", "unsubscribed",
                                     "--wait")  # exit status 0: every running guard confirmed
    assert time.monotonic() - started < 4  # confirm_timeout is 5s
    assert re.search(r"In force on [23] running guards\.", output), output
    assert f":{victim} " not in output  # not named as unconfirmed or silent
    await wait_until(lambda: len(guard.worker_pids()) == 2 and victim not in guard.worker_pids(), timeout=30,
                     what="the replacement worker")
    await wait_until(guard.ready, timeout=30, what="ready again")
    outcomes = await send_each(guard, ["gone@example.com"] * CONNECTIONS)
    assert all(o.rcpt["gone@example.com"].startswith("550") for o in outcomes)  # the replacement too


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT, signal.SIGTERM])
async def test_a_terminal_signal_to_the_process_group_drains_like_sigterm(supervised, sink: Sink, signum) -> None:
    """Ctrl-C and a closed terminal reach every process of the group: the workers ignore them
    and the supervisor stops them gracefully, so sessions in flight finish. SIGTERM to the
    whole group is what ``systemctl stop`` sends (KillMode=control-group, the default): the
    workers drain at once, the fork server stays for the supervisor to end, and the supervisor
    waits for the workers."""
    guard = await supervised(own_session=True)
    pids = guard.worker_pids()
    sink.hang_on, sink.hang_seconds = "data", 1.5
    sending = asyncio.gather(*(send(guard.address, SENDER, [f"h{i}@example.com"], message()) for i in range(8)))
    await wait_until(lambda: sink.transactions_started >= 8, timeout=10, what="every session in DATA")
    assert guard.process is not None
    os.killpg(guard.process.pid, signum)
    outcomes = await sending
    assert all(o.data is not None and o.data.startswith("250") for o in outcomes)  # drained, not cut
    assert await asyncio.to_thread(guard.process.wait, 30) == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    assert "starting it again" not in guard.output()
    assert "fork server" not in guard.output()  # it neither died nor was replaced
    assert len(sink.messages) == 8


async def test_sigterm_during_start_up_stops_at_once(supervised, sink: Sink) -> None:
    """A start that would take long (a worker that never says ready: stopped here) is cancelled
    by SIGTERM, not waited for: exit 0 within seconds, no worker left behind."""
    guard = await supervised(wait=False)
    pids = await wait_until(lambda: guard.worker_pids(), timeout=30, interval=0.01, what="a worker process")
    os.kill(pids[0], signal.SIGSTOP)  # the supervisor would wait START_TIMEOUT (60s) for it
    assert guard.process is not None
    pids = await wait_until(lambda: len(guard.worker_pids()) == 2 and guard.worker_pids(), timeout=30,
                            what="both workers spawned (the start waits for them)")
    started = time.monotonic()
    guard.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(guard.process.wait, 20) == 0, guard.output()
    assert time.monotonic() - started < 8
    await wait_until(lambda: all(not process_running(pid) for pid in pids), timeout=5, what="no worker left")
    assert "Traceback" not in guard.output()


async def test_the_admin_api_and_one_click_unsubscribe_serve_from_the_supervisor(supervised, sink: Sink) -> None:
    """The supervisor serves the admin API and the unsubscribe listener; what they change is in
    force on both workers when they answer, and a link a worker sealed opens there."""
    admin_port, unsubscribe_port = free_port(), free_port()
    guard = await supervised(
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n[admin.tokens]\n'
        f'ops = {{ role = "admin", hash = "{hash_token(ADMIN_TOKEN)}" }}\n\n'
        f'[unsubscribe]\nlisten = "127.0.0.1:{unsubscribe_port}"\nbase_url = "https://unsub.test"\n')
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{admin_port}/api/v1/suppressions", headers=headers,
                             json={"values": ["gone@example.com"], "list": "manual"}) as response:
            body = await response.json()
        assert response.status == 201 and body["in_force"]["confirmed"] == 3 and body["in_force"]["all_confirmed"]
        outcomes = await send_each(guard, ["gone@example.com"] * CONNECTIONS)
        assert all(o.rcpt["gone@example.com"].startswith("550") for o in outcomes)

        await send(guard.address, SENDER, ["jane@example.com"], message())
        link = re.search(rb"<https://unsub\.test(/u/[A-Za-z0-9_-]+)>", sink.messages[-1].content)
        assert link, sink.messages[-1].content[:400]
        async with http.post(f"http://127.0.0.1:{unsubscribe_port}{link.group(1).decode()}",
                             data="List-Unsubscribe=One-Click") as response:
            assert response.status == 200
    outcomes = await send_each(guard, ["jane@example.com"] * CONNECTIONS)
    assert all(o.rcpt["jane@example.com"].startswith("550") for o in outcomes)


async def test_a_start_while_a_killed_supervisors_workers_still_drain_is_refused(supervised, sink: Sink) -> None:
    """They still use the run directory (rate-limit table, metrics); emptying it under them
    would split every count between two tables. The next start is refused until they exit."""
    guard = await supervised()
    assert guard.process is not None
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=guard.smtp_port, start_tls=False, timeout=30)
    await client.connect()
    await client.mail(SENDER)  # a session in a transaction: its worker drains until it ends
    await client.rcpt("d@example.com")
    guard.process.kill()
    guard.process.wait()
    second = subprocess.run([sys.executable, "-m", "smtp_guard", "serve", "--config", str(guard.config_file)],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert second.returncode == 1, second.stderr
    assert (f"[smtp] listen 127.0.0.1:{guard.smtp_port}: workers of an earlier smtp-guard on this address "
            "(stopped without stopping them") in second.stderr
    assert Path(f"/dev/shm/smtp-guard.127.0.0.1-{guard.smtp_port}/counters").exists()  # not emptied
    # The draining worker still answers the message: 451, as the end-of-DATA decisions were
    # the dead supervisor's to make (never a 250 it cannot stand behind).
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await client.data(message())
    assert refused.value.code == 451
    await client.quit()
    run_directory = Path(f"/dev/shm/smtp-guard.127.0.0.1-{guard.smtp_port}")
    await wait_until(lambda: not _pids_using(run_directory), timeout=20, what="the drained workers to exit")
    await guard.start()  # now it starts

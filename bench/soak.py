#!/usr/bin/env python3
"""Soak test: a real guard under mixed traffic and upstream faults for N minutes, watched for leaks.

Not a unit test and not run in CI (see bench/README.md). On loopback only, everything on
kernel-chosen ports, in one temp dir, it starts:

* a fault-injecting upstream (tests/sink.py, aiosmtpd) in this process, whose fault changes
  every few seconds: none, RCPT tempfail (450), RCPT permfail (550), DATA 451, a hang past the
  guard's upstream command timeout, a disconnect in the middle of DATA;
* ``smtp-guard serve --config TMP/guard.toml`` in a subprocess (the package of this checkout:
  its root goes first on PYTHONPATH), relaying to that upstream;
* ``--clients`` concurrent aiosmtplib clients sending 1-3 messages per connection to 1-4
  recipients each from a pool of 200 (some suppressed), sometimes dropping the connection
  without QUIT;
* a CLI loop running ``smtp-guard suppress add`` / ``remove`` against the same store.

Every ``--interval`` seconds it samples the guard's RSS (VmRSS in /proc/PID/status) and open
file descriptors (entries of /proc/PID/fd). At the end it stops the clients, the guard
(SIGTERM, then SIGKILL after 30 s) and the upstream, prints the samples and the outcomes,
and exits 1 if RSS or the fd count grew steadily: the last quarter's median more than
``--max-growth`` (20 %) above the first quarter's (for fds also at least 5 more, so that
a handful of connections in flight is not read as a leak). The first ``--warmup`` seconds
are not sampled (imports, first connections, SQLite page cache).

    python3 bench/soak.py [--minutes 5] [--clients 8] [--interval 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import aiosmtplib  # noqa: E402

from sink import Sink  # noqa: E402  (tests/sink.py: the fault-injecting upstream of the test suite)

DOMAIN = "soak.example"
POOL = [f"r{i}@{DOMAIN}" for i in range(200)]
SUPPRESSED = POOL[:20]  # put on a list at start, never removed
TOGGLED = POOL[20:40]  # added and removed by the CLI loop while traffic runs
FAULTS = ("none", "none", "tempfail", "permfail", "data451", "hang", "disconnect")
FAULT_PERIOD = 4.0  # seconds between fault changes
HANG_SECONDS = 4.0  # longer than the guard's upstream command_timeout below
CLI_PERIOD = 3.0


@dataclass
class Samples:
    times: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)


@dataclass
class Outcomes:
    recipients: Counter[str] = field(default_factory=Counter)  # "2xx", "4xx", "5xx" per recipient
    transactions: Counter[str] = field(default_factory=Counter)  # sent / refused / error kinds
    cli: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    log: Counter[str] = field(default_factory=Counter)  # tracebacks and ERROR lines in the guard's log


def read_proc(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, number of open file descriptors) of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    rss = int(match.group(1)) if match else 0
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("smtp-guard")
    if script.exists():
        return [str(script)]
    found = shutil.which("smtp-guard")
    return [found] if found else [sys.executable, "-c", "from smtp_guard.cli.main import main; main()"]


def write_config(directory: Path, upstream_port: int) -> Path:
    path = directory / "guard.toml"
    path.write_text(f"""\
[smtp]
listen = "127.0.0.1:0"
hostname = "guard.soak"
max_sessions = 200
shutdown_grace = "5s"

[upstream]
mode = "smtp"
host = "127.0.0.1"
port = {upstream_port}
connect_timeout = "3s"
command_timeout = "2s"

[store]
path = "{directory / 'data' / 'guard.sqlite3'}"

[metrics]
listen = "127.0.0.1:0"

[logging]
level = "info"
""")
    return path


async def wait_for_port(log: Path, process: asyncio.subprocess.Process, timeout: float = 30.0) -> int:
    """The SMTP port from the guard's start-up line (``smtp-guard listening on HOST:PORT``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if match:
            return int(match.group(1))
        if process.returncode is not None:
            break
        await asyncio.sleep(0.1)
    raise SystemExit(f"the guard did not start; its log:\n{log.read_text(errors='replace')[-3000:]}")


def message(sender: str, recipients: list[str], rng: random.Random) -> bytes:
    body = "soak line of text, nothing to see here\r\n" * rng.choice([3, 30, 1200])
    stream = rng.choice(["spring-sale", "receipts", "newsletter"])
    return (f"From: {sender}\r\nTo: {', '.join(recipients)}\r\nSubject: soak {rng.random():.6f}\r\n"
            f"X-Campaign-ID: {stream}\r\nMessage-ID: <{rng.getrandbits(64):x}@client.soak>\r\n\r\n{body}").encode()


async def client_loop(number: int, port: int, deadline: float, outcomes: Outcomes) -> None:
    rng = random.Random(number)
    sender = f"news{number}@shop.soak"
    while time.monotonic() < deadline:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=15, local_hostname="client.soak")
        try:
            await client.connect()
            for _ in range(rng.randint(1, 3)):
                recipients = rng.sample(POOL, rng.randint(1, 4))
                try:
                    errors, _ = await client.sendmail(sender, recipients, message(sender, recipients, rng))
                except aiosmtplib.SMTPRecipientsRefused as refused:
                    for error in refused.recipients:
                        outcomes.recipients[f"{str(error.code)[0]}xx"] += 1
                    outcomes.transactions["all recipients refused"] += 1
                    await client.rset()
                    continue
                except aiosmtplib.SMTPResponseException as error:
                    outcomes.recipients[f"{str(error.code)[0]}xx"] += len(recipients)
                    outcomes.transactions[f"DATA {str(error.code)[0]}xx"] += 1
                    if error.code == 421:
                        break
                    await client.rset()
                    continue
                refused_codes = [f"{str(reply.code)[0]}xx" for reply in errors.values()]
                outcomes.recipients.update(refused_codes)
                outcomes.recipients["2xx"] += len(recipients) - len(refused_codes)
                outcomes.transactions["accepted"] += 1
            if rng.random() < 0.2:
                client.close()  # vanish without QUIT
                outcomes.transactions["dropped without QUIT"] += 1
            else:
                await client.quit()
        except (aiosmtplib.SMTPException, OSError) as error:
            outcomes.transactions[f"client error {type(error).__name__}"] += 1
            client.close()
            await asyncio.sleep(0.2)


async def fault_loop(sink: Sink, deadline: float, outcomes: Outcomes) -> None:
    rng = random.Random(1234)
    while time.monotonic() < deadline:
        fault = rng.choice(FAULTS)
        outcomes.faults[fault] += 1
        sink.tempfail_rcpt = set(rng.sample(POOL[40:], 40)) if fault == "tempfail" else set()
        sink.permfail_rcpt = set(rng.sample(POOL[40:], 40)) if fault == "permfail" else set()
        sink.data_reply = "451 4.3.0 try again later" if fault == "data451" else None
        sink.hang_on, sink.hang_seconds = ("data", HANG_SECONDS) if fault == "hang" else (None, None)
        sink.disconnect_on = "data" if fault == "disconnect" else None
        # The sink keeps every message and session it saw; the soak watches the guard, not it.
        sink.messages.clear()
        sink.sessions[:] = [session for session in sink.sessions if not session.closed.done()]
        await asyncio.sleep(min(FAULT_PERIOD, max(0.0, deadline - time.monotonic())))
    sink.tempfail_rcpt, sink.permfail_rcpt, sink.data_reply = set(), set(), None
    sink.hang_on = sink.disconnect_on = None


async def run_cli(config: Path, *args: str) -> int:
    process = await asyncio.create_subprocess_exec(
        *cli_command(), *args, "--config", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=child_env())
    return await process.wait()


async def cli_loop(config: Path, deadline: float, outcomes: Outcomes) -> None:
    rng = random.Random(99)
    while time.monotonic() < deadline:
        targets = rng.sample(TOGGLED, 3)
        verb = rng.choice(["add", "remove"])
        args = ["suppress", "add", *targets, "--list", "manual"] if verb == "add" else ["suppress", "remove", *targets]
        code = await run_cli(config, *args)
        outcomes.cli[f"{verb} exit {code}"] += 1
        await asyncio.sleep(min(CLI_PERIOD, max(0.0, deadline - time.monotonic())))


async def sample_loop(pid: int, start: float, warmup: float, interval: float, deadline: float,
                      samples: Samples) -> None:
    await asyncio.sleep(warmup)
    while time.monotonic() < deadline:
        rss, fds = read_proc(pid)
        samples.times.append(time.monotonic() - start)
        samples.rss_kib.append(rss)
        samples.fds.append(fds)
        await asyncio.sleep(interval)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("SMTP_GUARD_CONFIG", None)
    return env


def quarter_medians(values: list[float]) -> tuple[float, float]:
    quarter = max(1, len(values) // 4)
    return statistics.median(values[:quarter]), statistics.median(values[-quarter:])


def commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "smtp_guard"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (smtp_guard/ has uncommitted changes)" if dirty else "")


async def soak(args: argparse.Namespace) -> int:
    samples, outcomes = Samples(), Outcomes()
    with tempfile.TemporaryDirectory(prefix="smtp-guard-soak-") as temp:
        directory = Path(temp)
        async with Sink() as sink:
            config = write_config(directory, sink.port)
            log = directory / "guard.log"
            (directory / "data").mkdir()
            for chunk in range(0, len(SUPPRESSED), 10):
                if await run_cli(config, "suppress", "add", *SUPPRESSED[chunk:chunk + 10], "--list", "unsubscribed"):
                    raise SystemExit("smtp-guard suppress add failed before the soak started")
            with log.open("wb") as log_file:
                guard = await asyncio.create_subprocess_exec(*cli_command(), "serve", "--config", str(config),
                                                             stdout=log_file, stderr=log_file, env=child_env())
            try:
                port = await wait_for_port(log, guard)
                start = time.monotonic()
                deadline = start + args.minutes * 60
                print(f"soak: guard pid {guard.pid} on 127.0.0.1:{port}, upstream 127.0.0.1:{sink.port}, "
                      f"{args.clients} clients, {args.minutes} min, commit {commit()}", flush=True)
                await asyncio.gather(
                    *(client_loop(n, port, deadline, outcomes) for n in range(args.clients)),
                    fault_loop(sink, deadline, outcomes),
                    cli_loop(config, deadline, outcomes),
                    sample_loop(guard.pid, start, args.warmup, args.interval, deadline, samples),
                )
                if guard.returncode is not None:
                    print(f"soak: the guard exited early with {guard.returncode}")
                    return 1
            finally:
                if guard.returncode is None:
                    guard.send_signal(signal.SIGTERM)
                    try:
                        await asyncio.wait_for(guard.wait(), 30)
                    except asyncio.TimeoutError:
                        guard.kill()
                        await guard.wait()
            stopped_with = guard.returncode
            text = log.read_text(errors="replace")
            outcomes.log["Traceback"] = text.count("Traceback (most recent call last)")
            outcomes.log["ERROR lines"] = len(re.findall(r"\bERROR\b", text))
    return report(args, samples, outcomes, stopped_with)


def report(args: argparse.Namespace, samples: Samples, outcomes: Outcomes, stopped_with: int | None) -> int:
    print("\n  t (s)   RSS (MiB)   fds")
    step = max(1, len(samples.times) // 30)
    for t, rss, fds in list(zip(samples.times, samples.rss_kib, samples.fds))[::step]:
        print(f"  {t:6.0f}   {rss / 1024:9.1f}   {fds:3d}")
    verdicts = []
    failed = False
    for name, values, floor in (("RSS (MiB)", [v / 1024 for v in samples.rss_kib], 0.0),
                                ("open fds", [float(v) for v in samples.fds], 5.0)):
        if len(values) < 4:
            verdicts.append(f"{name}: too few samples ({len(values)}) to judge")
            failed = True
            continue
        first, last = quarter_medians(values)
        growth = (last - first) / first if first else 0.0
        leak = growth > args.max_growth and last - first > floor
        failed |= leak
        verdicts.append(f"{name}: first-quarter median {first:.1f}, last-quarter median {last:.1f}, "
                        f"max {max(values):.1f} ({growth:+.1%}){'  <-- GROWS' if leak else ''}")
    print("\n" + "\n".join(verdicts))
    print(f"\nrecipients: {dict(outcomes.recipients)}")
    print(f"transactions: {dict(outcomes.transactions)}")
    print(f"CLI: {dict(outcomes.cli)}")
    print(f"upstream faults (periods of {FAULT_PERIOD:.0f}s): {dict(outcomes.faults)}")
    print(f"guard log: {dict(outcomes.log)}")
    print(f"guard stopped with exit code {stopped_with}")
    if stopped_with != 0:
        failed = True
    if args.json:
        Path(args.json).write_text(json.dumps({
            "minutes": args.minutes, "clients": args.clients, "commit": commit(),
            "samples": {"t": samples.times, "rss_kib": samples.rss_kib, "fds": samples.fds},
            "recipients": outcomes.recipients, "transactions": outcomes.transactions, "cli": outcomes.cli,
            "faults": outcomes.faults, "log": outcomes.log, "verdicts": verdicts, "guard_exit": stopped_with,
        }, indent=1))
    print("soak: FAIL" if failed else "soak: OK")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to send traffic")
    parser.add_argument("--clients", type=int, default=8, help="concurrent SMTP clients")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between RSS/fd samples")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before the first sample")
    parser.add_argument("--max-growth", type=float, default=0.20,
                        help="fail when a last-quarter median exceeds the first quarter's by this fraction")
    parser.add_argument("--json", metavar="FILE", help="also write samples and outcomes as JSON")
    args = parser.parse_args(argv)
    if args.minutes * 60 <= args.warmup + 4 * args.interval:
        parser.error("--minutes too short for --warmup and four samples")
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())

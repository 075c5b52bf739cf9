#!/usr/bin/env python3
"""smtp-guard vs. Postfix, side by side, same load, same upstream, one run.

    python3 bench/relay_vs_postfix.py [--messages N] [--recipients R] [--concurrency C]

On loopback ports it picks itself, this starts:

* Postfix's ``smtp-sink`` — the common upstream of both servers (it dumps every transaction
  to a file, so the bench can check that every recipient really arrived);
* a throwaway **Postfix** instance from a private config directory in a temp dir
  (``postfix -c DIR start``; its own queue and data directories, no local delivery,
  ``relayhost = [127.0.0.1]:SINKPORT``);
* **smtp-guard** (``smtp-guard serve --config TMP.toml``, upstream mode smtp -> the same
  smtp-sink, a suppression list of --suppressions addresses loaded so every RCPT does a real
  index lookup, logging at warning);

then drives each with Postfix's ``smtp-source`` — identical command line, only the port
differs — for a warm-up and --rounds measured rounds (alternating), and prints messages/s,
recipients/s and server-side CPU per message for both, with the ratio guard/postfix.

What is compared (printed with the results): Postfix answers 250 once the message is in its
durable queue and relays it afterwards; smtp-guard relays in-line and answers 250 only after
the upstream accepted. So Postfix is reported twice: "accept" (what the client sees, the
smtp-source wall time) and "accept+relay" (until the sink has every recipient); smtp-guard's
single figure is already accept+relay. Every process started here is stopped in ``finally``.

This is a benchmark, not a test: it is not part of the pytest suite (project rule).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
POSTFIX = "/usr/sbin/postfix"
SENDER = "from@bench.test"
RECIPIENT = "to@bench.test"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
from checkout import REPO, code_version, cpu_model  # also puts this checkout first on sys.path


# --- small helpers -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def require(path: str, package: str) -> str:
    if not os.access(path, os.X_OK):
        found = shutil.which(os.path.basename(path))
        if not found:
            sys.exit(f"{path} not found: install {package} (apt-get install {package})")
        return found
    return path




def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; everything after its ")" is fixed.
    return text[text.rindex(")") + 2:].split()


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user+system) used so far by ``root``, its live descendants, and every
    descendant that already exited and was reaped (the kernel adds those to the parent's
    cutime/cstime). A Postfix daemon that exits mid-run is therefore still counted once its
    parent, master(8), has reaped it."""
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                stats[int(entry)] = fields
                parents[int(entry)] = int(fields[1])  # ppid
    total = 0

    def in_tree(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = parents.get(pid, 0)
        return False

    for pid, fields in stats.items():
        if in_tree(pid):
            # utime stime cutime cstime are fields 14-17 (1-based) -> 11..14 after the name
            total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / CLOCK_TICKS


# --- the common upstream -------------------------------------------------------------------------

class SinkDump:
    """Postfix smtp-sink dumping every transaction (-D) to a file; counts recipients that
    arrived (``X-Rcpt-Args`` lines) incrementally."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sink-", dir=workdir))
        self.dump = self.dir / "dump"
        self._offset = 0
        self._tail = b""
        self.recipients = 0
        self.messages = 0
        command = [binary]
        if os.geteuid() == 0:  # smtp-sink refuses to keep root privileges
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
            command += ["-u", "nobody"]
        command += ["-D", str(self.dump), "-S", r"\001\n", "-h", "sink.bench.test", f"127.0.0.1:{self.port}", "256"]
        self._stderr = open(workdir / "smtp-sink.stderr", "wb")
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=self._stderr)
        wait_for(lambda: self._alive() and port_open(self.port), 10, f"smtp-sink on 127.0.0.1:{self.port}")

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"smtp-sink exited with {self.process.returncode}")
        return True

    def poll(self) -> int:
        """Read what was appended since the last call; returns the recipient count so far."""
        try:
            with open(self.dump, "rb") as dump:
                dump.seek(self._offset)
                data = dump.read()
        except FileNotFoundError:
            return self.recipients
        self._offset += len(data)
        data = self._tail + data
        cut = data.rfind(b"\n") + 1
        complete, self._tail = data[:cut], data[cut:]
        self.recipients += complete.count(b"\nX-Rcpt-Args:") + complete.startswith(b"X-Rcpt-Args:")
        self.messages += complete.count(b"\x01\n")
        return self.recipients

    def stop(self) -> None:
        stop_process(self.process)
        self._stderr.close()


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- Postfix, from a private config directory ----------------------------------------------------

class PostfixInstance:
    QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

    def __init__(self, binary: str, workdir: Path, sink_port: int, concurrency: int) -> None:
        self.binary = binary
        self.port = free_port()
        self.root = workdir / "postfix"
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.maillog = self.root / "maillog"
        for directory in (self.config_dir, self.queue_dir, self.data_dir):
            directory.mkdir(parents=True)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        # Postfix daemons run as mail_owner and must traverse to their queue and data dirs.
        for directory in (workdir, self.root):
            directory.chmod(0o755)
        (self.config_dir / "main.cf").write_text(textwrap.dedent(f"""\
            # Throwaway Postfix for bench/relay_vs_postfix.py: loopback only, relays everything
            # to the benchmark's smtp-sink, never delivers locally.
            compatibility_level = 3.6
            queue_directory = {self.queue_dir}
            data_directory = {self.data_dir}
            mail_owner = postfix
            setgid_group = postdrop
            myhostname = postfix.bench.test
            mydomain = bench.test
            myorigin = $myhostname
            inet_interfaces = 127.0.0.1
            inet_protocols = ipv4
            mydestination =
            local_recipient_maps =
            local_transport = error:local delivery is disabled in this benchmark
            alias_maps =
            alias_database =
            mynetworks = 127.0.0.0/8
            smtpd_relay_restrictions = permit_mynetworks, reject
            relayhost = [127.0.0.1]:{sink_port}
            # No DNS anywhere (the guard does none either): no reverse lookup of the client,
            # the relay host is an address literal.
            smtpd_peername_lookup = no
            smtp_host_lookup = native
            # Allow as many parallel deliveries to the sink as client sessions (guard: same).
            default_destination_concurrency_limit = {max(20, concurrency)}
            default_process_limit = {max(100, 2 * concurrency + 10)}
            smtpd_client_connection_count_limit = 0
            maillog_file = {self.maillog}
            maillog_file_prefixes = {self.root}
            biff = no
            """))
        # chroot off (column 5 "n"): nothing in the temp dir is set up as a chroot jail.
        (self.config_dir / "master.cf").write_text(textwrap.dedent(f"""\
            127.0.0.1:{self.port} inet n - n - - smtpd
            cleanup   unix  n - n - 0 cleanup
            qmgr      unix  n - n 300 1 qmgr
            rewrite   unix  - - n - - trivial-rewrite
            bounce    unix  - - n - 0 bounce
            defer     unix  - - n - 0 bounce
            trace     unix  - - n - 0 bounce
            verify    unix  - - n - 1 verify
            flush     unix  n - n 1000? 0 flush
            proxymap  unix  - - n - - proxymap
            smtp      unix  - - n - - smtp
            relay     unix  - - n - - smtp
            showq     unix  n - n - - showq
            error     unix  - - n - - error
            retry     unix  - - n - - error
            discard   unix  - - n - - discard
            anvil     unix  - - n - 1 anvil
            scache    unix  - - n - 1 scache
            postlog   unix-dgram n - n - 1 postlogd
            """))
        self.started = False

    def _postfix(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, "-c", str(self.config_dir), *args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)

    def _fail(self, what: str, result: subprocess.CompletedProcess) -> None:
        log = self.maillog.read_text()[-2000:] if self.maillog.exists() else ""
        raise RuntimeError(f"postfix -c {self.config_dir} {what} failed ({result.returncode}): "
                           f"{result.stdout}{result.stderr}\n{log}")

    def start(self) -> None:
        for step in (("set-permissions",), ("check",)):
            result = self._postfix(*step)
            if result.returncode != 0:
                self._fail(" ".join(step), result)
        result = self._postfix("start")
        self.started = True  # stop() is harmless if start failed half-way
        if result.returncode != 0:
            self._fail("start", result)
        wait_for(lambda: port_open(self.port), 20, f"Postfix smtpd on 127.0.0.1:{self.port}")

    @property
    def master_pid(self) -> int:
        return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])

    def queued(self) -> int:
        """Messages still in the queue (any state), cheap enough to poll."""
        count = 0
        for name in self.QUEUES:
            for _, _, files in os.walk(self.queue_dir / name):
                count += len(files)
        return count

    def deferred(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.queue_dir / "deferred"))

    def stop(self) -> None:
        if not self.started:
            return
        result = self._postfix("stop")
        if result.returncode != 0:
            # Last resort: the master of *this* instance only, by its pid file.
            try:
                os.kill(self.master_pid, signal.SIGTERM)
            except (OSError, ValueError):
                pass
        self.started = False


# --- smtp-guard ----------------------------------------------------------------------------------

async def _preload_suppressions(store_path: Path, count: int) -> None:
    from smtp_guard.store.base import SuppressionEntry
    from smtp_guard.store.sqlite.db import Database
    from smtp_guard.store.sqlite.suppressions import SQLiteSuppressionStore

    async with Database(store_path) as db:
        store = SQLiteSuppressionStore(db)
        batch = 50_000
        for start in range(0, count, batch):
            entries = [SuppressionEntry("address", f"user{i:08d}@suppressed.bench.test", "unsubscribed",
                                        source="bench") for i in range(start, min(count, start + batch))]
            await store.add(entries, bulk=True)


class GuardProcess:
    def __init__(self, workdir: Path, sink_port: int, concurrency: int, recipients: int,
                 suppressions: int) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.dir = workdir / "guard"
        self.dir.mkdir()
        self.store = self.dir / "guard.sqlite3"
        self.config = self.dir / "smtp-guard.toml"
        self.suppressions = suppressions
        self.config.write_text(textwrap.dedent(f"""\
            # Written by bench/relay_vs_postfix.py
            [smtp]
            listen = "127.0.0.1:{self.port}"
            hostname = "guard.bench.test"
            max_sessions = {max(100, 2 * concurrency + 10)}
            max_recipients = {max(1000, recipients)}

            [upstream]
            mode = "smtp"
            host = "127.0.0.1"
            port = {sink_port}
            # One upstream session per client session at most, like Postfix's
            # default_destination_concurrency_limit above.
            max_connections = {max(10, concurrency)}

            [store]
            path = "{self.store}"

            [metrics]
            listen = "127.0.0.1:{self.metrics_port}"

            [logging]
            level = "warning"
            """))
        self.process: subprocess.Popen | None = None
        self.load_seconds = 0.0

    def start(self) -> None:
        started = time.monotonic()
        asyncio.run(_preload_suppressions(self.store, self.suppressions))
        self.load_seconds = time.monotonic() - started
        # ``smtp-guard serve --config FILE``, run as the console script does, from this checkout.
        command = [sys.executable, "-c", "import sys; sys.argv[0] = 'smtp-guard'; "
                   "from smtp_guard.cli.main import main; sys.exit(main())"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self._stderr = open(self.dir / "stderr.log", "wb")
        self.process = subprocess.Popen([*command, "serve", "--config", str(self.config)], stdin=subprocess.DEVNULL,
                                        stdout=self._stderr, stderr=subprocess.STDOUT, cwd=self.dir, env=env)

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"smtp-guard exited with {self.process.returncode}: "
                                   f"{(self.dir / 'stderr.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1) as reply:
                    return reply.status == 200
            except (OSError, urllib.error.URLError):
                return False

        wait_for(ready, 60, f"smtp-guard /readyz on 127.0.0.1:{self.metrics_port}")

    def metric_lines(self, prefix: str) -> list[str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        return [line for line in text.splitlines() if line.startswith(prefix)]

    def stderr_tail(self) -> str:
        return (self.dir / "stderr.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=40)  # shutdown_grace is 30 s by default
            self._stderr.close()


# --- one measured run ----------------------------------------------------------------------------

@dataclass
class Run:
    server: str
    messages: int
    recipients: int
    accept_seconds: float
    relay_seconds: float  # until the sink had every recipient
    cpu_seconds: float  # server side only (guard process; Postfix master + all its daemons)
    errors: list[str] = field(default_factory=list)


def drive(args, port: int) -> tuple[float, subprocess.CompletedProcess]:
    command = [args.smtp_source, "-l", str(args.size), "-m", str(args.messages), "-r", str(args.recipients),
               "-s", str(args.concurrency), "-M", "client.bench.test", "-f", SENDER, "-t", RECIPIENT,
               f"127.0.0.1:{port}"]
    started = time.monotonic()
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=args.timeout)
    return time.monotonic() - started, result


def measure(args, name: str, port: int, sink: SinkDump, cpu_root: int, messages: int,
            queue_empty=None) -> Run:
    expected = messages * args.recipients
    before = sink.poll()
    cpu_before = tree_cpu_seconds(cpu_root)
    sub = argparse.Namespace(**{**vars(args), "messages": messages})
    started = time.monotonic()
    accept_seconds, result = drive(sub, port)
    errors = []
    if result.returncode != 0 or result.stderr.strip():
        errors.append(f"smtp-source exit {result.returncode}: {result.stderr.strip()[-500:]}")
    deadline = started + args.timeout
    while sink.poll() - before < expected or (queue_empty is not None and not queue_empty()):
        if time.monotonic() > deadline:
            errors.append(f"sink got {sink.recipients - before} of {expected} recipients before the time limit")
            break
        time.sleep(0.01)
    relay_seconds = time.monotonic() - started
    cpu = tree_cpu_seconds(cpu_root) - cpu_before
    if sink.recipients - before != expected and not errors:
        errors.append(f"sink got {sink.recipients - before} recipients, expected {expected}")
    return Run(name, messages, expected, accept_seconds, relay_seconds, cpu, errors)


# --- report --------------------------------------------------------------------------------------

def summarize(runs: list[Run]) -> dict[str, float]:
    return {
        "accept_msgs_per_s": statistics.median(r.messages / r.accept_seconds for r in runs),
        "relay_msgs_per_s": statistics.median(r.messages / r.relay_seconds for r in runs),
        "accept_rcpts_per_s": statistics.median(r.recipients / r.accept_seconds for r in runs),
        "relay_rcpts_per_s": statistics.median(r.recipients / r.relay_seconds for r in runs),
        "cpu_ms_per_msg": statistics.median(1000 * r.cpu_seconds / r.messages for r in runs),
    }


def report(args, guard: dict[str, float], postfix: dict[str, float], runs: list[Run], extra: dict) -> str:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    lines = [
        f"smtp-guard vs Postfix {extra['postfix_version']} — {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"host: {extra['cpu']}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"smtp-guard code: {extra['smtp_guard_code']}",
        f"load: smtp-source -l {args.size} -m {args.messages} -r {args.recipients} -s {args.concurrency} "
        f"(same command for both; medians of {args.rounds} rounds after a warm-up)",
        f"guard: {args.suppressions:,} suppressed addresses in its index (loaded in {extra['preload_s']:.1f}s); "
        "all benchmark recipients pass the policy pipeline",
        "",
        f"{'':34}{'smtp-guard':>14}{'postfix':>14}{'guard/postfix':>15}",
        f"{'messages/s, client-visible (250)':34}{guard['accept_msgs_per_s']:>14.1f}"
        f"{postfix['accept_msgs_per_s']:>14.1f}{ratio(guard['accept_msgs_per_s'], postfix['accept_msgs_per_s']):>15}",
        f"{'recipients/s, client-visible':34}{guard['accept_rcpts_per_s']:>14.1f}"
        f"{postfix['accept_rcpts_per_s']:>14.1f}{ratio(guard['accept_rcpts_per_s'], postfix['accept_rcpts_per_s']):>15}",
        f"{'messages/s, until at the upstream':34}{guard['relay_msgs_per_s']:>14.1f}"
        f"{postfix['relay_msgs_per_s']:>14.1f}{ratio(guard['relay_msgs_per_s'], postfix['relay_msgs_per_s']):>15}",
        f"{'recipients/s, until at the upstream':34}{guard['relay_rcpts_per_s']:>14.1f}"
        f"{postfix['relay_rcpts_per_s']:>14.1f}{ratio(guard['relay_rcpts_per_s'], postfix['relay_rcpts_per_s']):>15}",
        f"{'server CPU ms/message':34}{guard['cpu_ms_per_msg']:>14.2f}"
        f"{postfix['cpu_ms_per_msg']:>14.2f}{ratio(guard['cpu_ms_per_msg'], postfix['cpu_ms_per_msg']):>15}",
        "",
        "What is compared: Postfix answers 250 once the message is fsync'd into its durable queue and",
        "relays it to the upstream afterwards (\"client-visible\" = smtp-source wall time; \"until at the",
        "upstream\" = until smtp-sink had every recipient). smtp-guard relays in-line and answers 250 only",
        "after the upstream accepted, so for the guard both rows are the same transaction; it keeps no",
        "queue (nothing to fsync unless a message is held). Server CPU: the guard process vs. Postfix's",
        "master and all its daemons (smtpd, cleanup, qmgr, trivial-rewrite, smtp, ...). smtp-source,",
        "smtp-sink and both servers share the same cores.",
        "",
        "rounds (server: seconds to 250 / seconds to upstream / CPU s):",
    ]
    for run in runs:
        flag = f"  ERRORS: {'; '.join(run.errors)}" if run.errors else ""
        lines.append(f"  {run.server:10} {run.accept_seconds:7.2f} / {run.relay_seconds:7.2f} / "
                     f"{run.cpu_seconds:6.2f}{flag}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000, help="messages per measured round (default 2000)")
    parser.add_argument("--recipients", type=int, default=1, help="recipients per message (default 1)")
    parser.add_argument("--concurrency", type=int, default=10, help="parallel SMTP sessions (default 10)")
    parser.add_argument("--size", type=int, default=2048, help="message body bytes, smtp-source -l (default 2048)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per server (default 3)")
    parser.add_argument("--suppressions", type=int, default=100_000,
                        help="addresses on the guard's suppression list (default 100000)")
    parser.add_argument("--timeout", type=float, default=300, help="time limit per round, seconds (default 300)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs) for inspection")
    args = parser.parse_args()
    if not (1 <= args.messages <= 1_000_000 and 1 <= args.recipients <= 1000 and 1 <= args.concurrency <= 200
            and 1 <= args.rounds <= 20):
        parser.error("bounded on purpose: messages 1..1e6, recipients 1..1000, concurrency 1..200, rounds 1..20")
    if os.geteuid() != 0:
        parser.error("must run as root: a private Postfix instance starts as root and drops to mail_owner")
    sink_binary = require(SMTP_SINK, "postfix")
    args.smtp_source = require(SMTP_SOURCE, "postfix")
    postfix_binary = require(POSTFIX, "postfix")
    postfix_version = subprocess.run(["postconf", "-h", "-d", "mail_version"], capture_output=True,
                                     text=True).stdout.strip()

    workdir = Path(tempfile.mkdtemp(prefix="smtp-guard-bench-"))
    workdir.chmod(0o755)  # smtp-sink (nobody) and Postfix (mail_owner) must reach their dirs
    sink = postfix = guard = None
    runs: list[Run] = []
    try:
        sink = SinkDump(sink_binary, workdir)
        postfix = PostfixInstance(postfix_binary, workdir, sink.port, args.concurrency)
        postfix.start()
        guard = GuardProcess(workdir, sink.port, args.concurrency, args.recipients, args.suppressions)
        guard.start()
        print(f"temp dir {workdir}; smtp-sink :{sink.port}, postfix :{postfix.port}, smtp-guard :{guard.port}",
              file=sys.stderr)

        warmup = max(20, min(200, args.messages // 10))
        targets = {
            "smtp-guard": (guard.port, lambda: guard.process.pid, None),
            "postfix": (postfix.port, lambda: postfix.master_pid, lambda: postfix.queued() == 0),
        }
        for name, (port, pid, empty) in targets.items():
            run = measure(args, name, port, sink, pid(), warmup, empty)
            if run.errors:
                raise RuntimeError(f"warm-up against {name} failed: {run.errors}")
        for round_no in range(args.rounds):
            order = list(targets) if round_no % 2 == 0 else list(reversed(targets))
            for name in order:
                port, pid, empty = targets[name]
                run = measure(args, name, port, sink, pid(), args.messages, empty)
                runs.append(run)
                print(f"  round {round_no + 1} {name}: {run.messages / run.accept_seconds:.0f} msg/s to 250, "
                      f"{run.messages / run.relay_seconds:.0f} msg/s to upstream{' ERRORS' if run.errors else ''}",
                      file=sys.stderr)

        guard_summary = summarize([r for r in runs if r.server == "smtp-guard"])
        postfix_summary = summarize([r for r in runs if r.server == "postfix"])
        decisions = [line for line in guard.metric_lines("smtp_guard_recipients_total") if not line.endswith(" 0.0")]
        extra = {"cpu": cpu_model(), "postfix_version": postfix_version, "preload_s": guard.load_seconds,
                 "smtp_guard_code": code_version()}
        print(report(args, guard_summary, postfix_summary, runs, extra))
        print("guard decisions: " + "; ".join(decisions))
        deferred = postfix.deferred()
        if deferred:
            print(f"WARNING: {deferred} message(s) deferred in Postfix's queue")
        warnings = [line for line in guard.stderr_tail().splitlines() if line.strip()]
        if warnings:
            print(f"guard log ({len(warnings)} lines at warning or above), last: {warnings[-1][:300]}")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "args": {k: v for k, v in vars(args).items() if k not in ("smtp_source", "json", "keep")},
                "smtp_guard": guard_summary, "postfix": postfix_summary,
                "runs": [vars(r) for r in runs], **extra}, indent=2))
        return 1 if any(r.errors for r in runs) else 0
    finally:
        for part in (guard, postfix, sink):
            if part is not None:
                try:
                    part.stop()
                except Exception as error:  # keep stopping the others
                    print(f"could not stop {part}: {error}", file=sys.stderr)
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

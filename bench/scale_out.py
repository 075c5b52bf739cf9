#!/usr/bin/env python3
"""Two guard instances sharing PostgreSQL and Redis against one on SQLite: what shared state
costs per message.

    python3 bench/scale_out.py [--messages 6000] [--rounds 3] [--suppressions 100000] [--json FILE]

On loopback ports it picks itself, all in one temp dir, this starts one ``smtp-sink`` (the
common upstream) and three systems in front of it, each ``smtp-guard serve`` with the shipped
defaults plus ``[upstream] mode = "smtp"`` to the sink, ``[breaker] enabled = false`` and one
rate-limit rule per sender far above the load (so every recipient takes a bucket, and never
waits), on the same suppression list:

* **sqlite-1** — one instance on its SQLite store, counters in the process;
* **sqlite-2** — two independent instances, each on its own copy of that store: two machines'
  worth of nothing shared (limits per instance, not global) — the baseline for the cost;
* **shared-2** — two instances on one PostgreSQL database (``[store] url``; Debian's server,
  fsync and synchronous commit on) and one Redis (``[counters] url``): limits and lists global.

Load: smtp-source, one recipient per message, a new connection per message, 20 sessions in
all (10 per instance where there are two, both at once). Every round runs every system, the
order rotating; medians are reported. CPU per message is the guard processes', PostgreSQL's
(the postmaster and its backends) and Redis's, from /proc. Everything started here is stopped
in a ``finally``. A benchmark, not a test: pytest never collects it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from checkout import REPO, code_version, cpu_model  # also puts this checkout first on sys.path
from peers import GUARD_COMMAND, RECIPIENT, SENDER, SMTP_SINK, SMTP_SOURCE, SinkDump, free_port, guard_env, \
    port_open, preload_suppressions, require, stop_process, toml_sections, tree_cpu_seconds, wait_for

sys.path.insert(0, str(REPO / "tests"))
from postgres_server import PostgresServer, binaries  # noqa: E402  (the tests' own server helpers)
from redis_server import RedisServer  # noqa: E402

SESSIONS = 20
RATE_RULE = {"name": "per-sender", "key": "sender", "rate": "1000000/s", "burst": 1000000}


class DurablePostgres(PostgresServer):
    """The tests' cluster, but durable like a production one: fsync and full-page writes on."""

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200 "
                   "-c shared_buffers=128MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w",
                  "-t", "60", "start")

    @property
    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])


class Instance:
    """One ``smtp-guard serve`` with the benchmark's settings and the given ``[store]``/``[counters]``."""

    def __init__(self, workdir: Path, name: str, sink_port: int, store: dict[str, object],
                 counters: dict[str, object] | None = None) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.dir = workdir / name
        self.dir.mkdir()
        sections: dict[str, dict[str, object]] = {
            "smtp": {"listen": f"127.0.0.1:{self.port}", "hostname": f"{name}.bench.test"},
            "upstream": {"mode": "smtp", "host": "127.0.0.1", "port": sink_port},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
            "breaker": {"enabled": False},
            "store": store,
        }
        if counters:
            sections["counters"] = counters
        rule = "[[rate_limits]]\n" + "".join(
            f"{key} = {json.dumps(value)}\n" for key, value in RATE_RULE.items())
        self.config = self.dir / "smtp-guard.toml"
        self.config.write_text(toml_sections(sections) + "\n" + rule)
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self._log = open(self.dir / "serve.log", "wb")
        self.process = subprocess.Popen([*GUARD_COMMAND, "serve", "--config", str(self.config)], cwd=self.dir,
                                        stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=guard_env())

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.dir.name} exited: {(self.dir / 'serve.log').read_text()[-1500:]}")
            return port_open(self.port)

        wait_for(ready, 120, f"{self.dir.name} to listen")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self._log.close()


@dataclass
class System:
    name: str
    instances: list[Instance]
    cpu_roots: dict[str, int] = field(default_factory=dict)  # part -> process whose tree is counted

    def start(self) -> None:
        for instance in self.instances:
            instance.start()
            assert instance.process is not None
            self.cpu_roots[f"guard {instance.dir.name}"] = instance.process.pid


@dataclass
class Measurement:
    system: str
    round: int
    messages: int
    seconds: float
    cpu_seconds: dict[str, float]
    errors: list[str]

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def drive(args, system: System, sink: SinkDump, round_no: int) -> Measurement:
    """One load against the system: the sessions split over its instances, all at once."""
    per_instance = SESSIONS // len(system.instances)
    messages = args.messages // len(system.instances) * len(system.instances)
    before = sink.poll()
    cpu_before = {part: tree_cpu_seconds(pid) for part, pid in system.cpu_roots.items()}
    started = time.monotonic()
    clients = [subprocess.Popen(
        [args.smtp_source, "-l", str(args.size), "-m", str(messages // len(system.instances)), "-r", "1",
         "-s", str(per_instance), "-M", "client.bench.test", "-f", SENDER, "-t", RECIPIENT,
         f"127.0.0.1:{instance.port}"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True) for instance in system.instances]
    errors = []
    for client in clients:
        _, stderr = client.communicate(timeout=args.timeout)
        if client.returncode != 0 or stderr.strip():
            errors.append(f"smtp-source exit {client.returncode}: {stderr.strip()[-300:]}")
    deadline = started + args.timeout
    while sink.poll() - before < messages:
        if time.monotonic() > deadline:
            errors.append(f"sink got {sink.recipients - before} of {messages} in time")
            break
        time.sleep(0.01)
    seconds = time.monotonic() - started
    cpu = {part: tree_cpu_seconds(pid) - cpu_before[part] for part, pid in system.cpu_roots.items()}
    sink.reset()
    return Measurement(system.name, round_no, messages, seconds, cpu, errors)


def summarize(runs: list[Measurement]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(run.system for run in runs):
        mine = [run for run in runs if run.system == name and not run.errors]
        if not mine:
            continue

        def per_message(prefix: str) -> float:
            return statistics.median(sum(v for k, v in run.cpu_seconds.items() if k.startswith(prefix))
                                     / run.messages * 1000 for run in mine)

        table[name] = {"msg_per_s": statistics.median(run.rate for run in mine),
                       "cpu_ms_guards": per_message("guard"), "cpu_ms_postgresql": per_message("postgresql"),
                       "cpu_ms_redis": per_message("redis"), "cpu_ms_total": per_message("")}
    return table


def report(args, table: dict[str, dict[str, float]], runs: list[Measurement]) -> str:
    base = table.get("sqlite-1")
    lines = [f"# scale_out.py — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_model()}, "
             f"{platform.python_version()}, {args.messages} msgs x {args.rounds} rounds, "
             f"{args.suppressions} suppressed, code {code_version()}",
             "| system | msg/s | vs sqlite-1 | CPU ms/msg guards | PostgreSQL | Redis | total |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in table.items():
        ratio = f"{row['msg_per_s'] / base['msg_per_s']:.2f}x" if base else "?"
        lines.append(f"| {name} | {row['msg_per_s']:.0f} | {ratio} | {row['cpu_ms_guards']:.2f} | "
                     f"{row['cpu_ms_postgresql']:.2f} | {row['cpu_ms_redis']:.2f} | {row['cpu_ms_total']:.2f} |")
    if "sqlite-2" in table and "shared-2" in table:
        cost = table["shared-2"]["cpu_ms_total"] - table["sqlite-2"]["cpu_ms_total"]
        lines.append(f"\nShared state (PostgreSQL + Redis) costs {cost:+.2f} ms of CPU per message against two "
                     "instances sharing nothing.")
    failed = [f"{run.system} round {run.round}: {'; '.join(run.errors)}" for run in runs if run.errors]
    lines += [f"failed: {line}" for line in failed]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--suppressions", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=5120, help="message size in bytes")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop what was started (the finally below)
    args.smtp_source = require(SMTP_SOURCE, "postfix")
    require(SMTP_SINK, "postfix")
    bin_dir = binaries()
    if bin_dir is None:
        sys.exit("PostgreSQL server binaries not found: apt-get install postgresql")
    workdir = Path(tempfile.mkdtemp(prefix="smtp-guard-scale-"))
    workdir.chmod(0o755)  # smtp-sink runs as nobody and must reach its directory
    parts: list[object] = []
    systems: list[System] = []
    try:
        sink = SinkDump(SMTP_SINK, workdir)
        parts.append(sink)
        stores = workdir / "stores"  # the guards' data directory rules: 0700
        stores.mkdir(mode=0o700)
        template = stores / "template.sqlite3"
        asyncio.run(preload_suppressions(template, args.suppressions))
        postgres = DurablePostgres(bin_dir)
        postgres.start()
        parts.append(postgres)
        redis = RedisServer(workdir / "redis").start()
        parts.append(redis)
        url = postgres.create_database("bench")
        subprocess.run([*GUARD_COMMAND, "store", "copy", "--from", f"sqlite:///{template}", "--to", url],
                       check=True, capture_output=True, env=guard_env(), timeout=600)

        def sqlite_store(name: str) -> dict[str, object]:
            path = stores / f"{name}.sqlite3"
            shutil.copyfile(template, path)
            return {"path": str(path)}

        shared_dir = workdir / "shared"  # the erasure key both shared instances use
        shared = {"url": url, "directory": str(shared_dir)}
        systems = [
            System("sqlite-1", [Instance(workdir, "one", sink.port, sqlite_store("one"))]),
            System("sqlite-2", [Instance(workdir, "a", sink.port, sqlite_store("a")),
                                Instance(workdir, "b", sink.port, sqlite_store("b"))]),
            System("shared-2", [Instance(workdir, "pa", sink.port, shared, {"url": redis.url}),
                                Instance(workdir, "pb", sink.port, shared, {"url": redis.url})],
                   {"postgresql": postgres.postmaster_pid, "redis": redis._process.pid}),
        ]
        for system in systems:
            system.start()
        runs = []
        for round_no in range(args.rounds):
            order = systems[round_no % len(systems):] + systems[:round_no % len(systems)]
            for system in order:
                runs.append(drive(args, system, sink, round_no))
                print(f"round {round_no} {system.name}: {runs[-1].rate:.0f} msg/s {runs[-1].errors or ''}",
                      file=sys.stderr)
        table = summarize(runs)
        print(report(args, table, runs))
        if args.json:
            args.json.write_text(json.dumps({"table": table, "runs": [asdict(run) for run in runs],
                                             "code": code_version(), "cpu": cpu_model()}, indent=2))
        return 1 if any(run.errors for run in runs) else 0
    finally:
        for system in systems:
            for instance in system.instances:
                instance.stop()
        for part in reversed(parts):
            if isinstance(part, DurablePostgres):
                part.remove()
            else:
                part.stop()  # type: ignore[attr-defined]
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

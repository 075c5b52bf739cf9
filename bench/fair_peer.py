#!/usr/bin/env python3
"""smtp-guard against its fair peer, Postfix before-queue, in one interleaved run.

    python3 bench/fair_peer.py [--messages 20000] [--rounds 3] [--suppressions 1000000] [--json FILE]

On loopback ports it picks itself, all in one temp dir, this starts one ``smtp-sink`` (the
common upstream) and, in front of it:

* **direct** — nothing: the load goes straight to the sink (the limit);
* **postfix-bq** — Postfix before-queue: smtpd with ``smtpd_proxy_filter`` = the sink, so the
  client gets 250 only after the sink accepted (smtp-guard's semantics), and
  ``check_recipient_access hash:`` of the suppression list (built with ``postmap``);
* **postfix-aq** — Postfix after-queue, as ``relay_vs_postfix.py`` runs it (250 after its own
  queue fsync, relayed afterwards), with the same ``check_recipient_access`` map;
* **guard-w1** — ``smtp-guard serve`` with the shipped defaults plus ``[upstream] mode = "smtp"``
  to the sink and ``[breaker] enabled = false``, the same list bulk-loaded into its store;
* **guard-w2** — the same with ``[smtp] workers = 2`` (a supervisor and two workers);
* **lib-floor** — ``library_floor.py``: aiosmtpd and aiosmtplib alone, relaying lock-step on
  uvloop with no policy (and no suppression list): what the guard's libraries cost before the
  guard does anything (``--no-floor`` to skip it).

Loads, each 20 sessions and --messages messages of --size bytes: ``1rcpt-new`` (smtp-source,
one connection per message), ``10rcpt`` (smtp-source -r 10), ``1rcpt-kept`` (smtp-source -d:
every session keeps its connection), ``pipelining`` (bench/smtp_load.py: kept connections,
MAIL/RCPT/DATA in one write when PIPELINING is advertised). Every round runs every load
against every system, the order of systems rotating per round; medians are reported.

Transaction latency: the pipelining client times all its transactions; under smtp-source
loads a probe session (bench/smtp_load.py probe: lock-step, one recipient, one message every
--probe-interval s on a kept connection) samples it. Then, below saturation (``--half-load-seconds``,
0 to skip): every system gets the same open-loop load of half guard-w1's 1rcpt-kept msg/s
(bench/smtp_load.py paced: lock-step, 20 kept connections), ``--half-load-rounds`` times
interleaved, and the guard's median p99 is compared with the direct path's, as issue 8's
latency target asks. msg/s counts only the load's messages;
CPU per message divides by load plus probe messages. Everything started here is stopped in a
``finally``. This is a benchmark, not a test: pytest never collects it (project rule).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from checkout import code_version, cpu_model  # also puts this checkout first on sys.path
from peers import POSTFIX, RECIPIENT, SENDER, SMTP_SINK, SMTP_SOURCE, GuardProcess, PostfixInstance, SinkDump, \
    free_port, preload_suppressions, require, stop_all, stop_process, tree_cpu_seconds, tree_memory_kib, wait_for

LOAD_CLIENT = Path(__file__).resolve().parent / "smtp_load.py"
FLOOR_RELAY = Path(__file__).resolve().parent / "library_floor.py"
SESSIONS = 20
SUPPRESSED_DOMAIN = "suppressed.bench.test"  # the addresses preload_suppressions writes
UNFILTERED = ("direct", "lib-floor")  # the systems without the suppression list
LOADS = {  # name: (recipients per message, smtp-source extra flags or None for the pipelining client)
    "1rcpt-new": (1, []),
    "10rcpt": (10, []),
    "1rcpt-kept": (1, ["-d"]),
    "pipelining": (1, None),
}


@dataclass
class System:
    name: str
    port: int
    cpu_root: int | None  # process tree charged for CPU and memory; None for direct
    drained: object = None  # callable: True when nothing is left to relay (after-queue only)


@dataclass
class Measurement:
    system: str
    load: str
    round: int
    messages: int
    recipients: int
    probe_messages: int
    client_seconds: float  # until the load's client exited (every 250 received)
    upstream_seconds: float  # until the sink had every recipient
    cpu_seconds: float | None
    peak_rss_kib: int | None
    peak_pss_kib: int | None
    p50_ms: float | None
    p99_ms: float | None
    latency_samples: int
    latency_source: str
    errors: list[str] = field(default_factory=list)


class MemorySampler:
    """Peak of summed RSS and PSS over a process tree, sampled every ``interval`` seconds in a thread."""

    def __init__(self, root: int | None, interval: float = 0.25) -> None:
        self.root, self.interval = root, interval
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rss, pss = tree_memory_kib(self.root)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "MemorySampler":
        if self.root is not None:
            self._sample()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.root is not None:
            self._stop.set()
            self._thread.join()
            self._sample()


def python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


class Probe:
    """bench/smtp_load.py probe against one port for the duration of a ``with`` block."""

    def __init__(self, port: int, args) -> None:
        self.command = [sys.executable, str(LOAD_CLIENT), "probe", "--port", str(port), "--size", str(args.size),
                        "--interval", str(args.probe_interval), "--max-seconds", str(args.timeout + 60)]
        self.result: dict = {}

    def __enter__(self) -> "Probe":
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=python_env())
        ready = self.process.stderr.readline()  # one line once its session is open (or a traceback)
        if ready.strip() != "ready":
            stop_process(self.process, grace=5)
            raise RuntimeError(f"latency probe did not start: {ready}{self.process.stderr.read()[-1000:]}")
        return self

    def __exit__(self, *exc) -> None:
        stop_process(self.process, grace=30)  # SIGTERM: it finishes its transaction and prints JSON
        out = self.process.stdout.read()
        self.process.stdout.close()
        self.process.stderr.close()
        try:
            self.result = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.result = {"messages": 0, "error_count": 1, "errors": [f"probe printed no result: {out[-300:]!r}"]}


def run_load(args, load: str, port: int, messages: int) -> tuple[float, float, dict, list[str]]:
    """Drive one load; returns (monotonic start, client seconds, the pipelining client's JSON or {}, errors)."""
    recipients, flags = LOADS[load]
    if flags is None:
        command = [sys.executable, str(LOAD_CLIENT), "pipeline", "--port", str(port), "--messages", str(messages),
                   "--sessions", str(SESSIONS), "--recipients", str(recipients), "--size", str(args.size)]
    else:
        command = [args.smtp_source, *flags, "-l", str(args.size), "-m", str(messages), "-r", str(recipients),
                   "-s", str(SESSIONS), "-M", "client.bench.test", "-f", SENDER, "-t", RECIPIENT,
                   f"127.0.0.1:{port}"]
    started = time.monotonic()
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=args.timeout,
                            env=python_env())
    seconds = time.monotonic() - started
    errors = []
    if result.returncode != 0 or (flags is not None and result.stderr.strip()):
        errors.append(f"{Path(command[0 if flags is not None else 1]).name} exit {result.returncode}: "
                      f"{result.stderr.strip()[-500:]}")
    client: dict = {}
    if flags is None and result.returncode == 0:
        client = json.loads(result.stdout.strip().splitlines()[-1])
        seconds = client["elapsed_s"]  # its own clock, without the interpreter's start-up
        if client["error_count"]:
            errors.append(f"pipelining client: {client['error_count']} failed transactions, e.g. {client['errors'][:2]}")
        if not client["pipelined"]:
            errors.append("server did not advertise PIPELINING: the client ran lock-step")
    return started, seconds, client, errors


def measure(args, system: System, load: str, sink: SinkDump, messages: int, round_no: int,
            probe: bool = True) -> Measurement:
    recipients_per_message = LOADS[load][0]
    expected = messages * recipients_per_message
    before = sink.poll()
    cpu_before = tree_cpu_seconds(system.cpu_root) if system.cpu_root else None
    probe_result: dict = {}
    with MemorySampler(system.cpu_root) as memory:
        if probe and LOADS[load][1] is not None:
            with Probe(system.port, args) as running_probe:
                started, client_seconds, client, errors = run_load(args, load, system.port, messages)
            probe_result = running_probe.result
        else:
            started, client_seconds, client, errors = run_load(args, load, system.port, messages)
        probe_messages = probe_result.get("messages", 0)
        if probe_result.get("error_count"):
            errors.append(f"probe: {probe_result['error_count']} failed, e.g. {probe_result['errors'][:2]}")
        expected_total = expected + probe_messages
        deadline = started + args.timeout
        while sink.poll() - before < expected_total or (system.drained is not None and not system.drained()):
            if time.monotonic() > deadline:
                errors.append(f"sink got {sink.recipients - before} of {expected_total} recipients in time")
                break
            time.sleep(0.01)
        upstream_seconds = time.monotonic() - started
    cpu = tree_cpu_seconds(system.cpu_root) - cpu_before if system.cpu_root else None
    if sink.recipients - before != expected_total and not errors:
        errors.append(f"sink got {sink.recipients - before} recipients, expected {expected_total}")
    sink.reset()
    latency = client if client else probe_result
    source = ("pipelining client, every transaction" if client else
              f"probe, 1 msg / {args.probe_interval:g} s lock-step" if probe_result else "none")
    return Measurement(system.name, load, round_no, messages, expected, probe_messages, client_seconds,
                       upstream_seconds, cpu, memory.peak_rss if system.cpu_root else None,
                       memory.peak_pss if system.cpu_root else None, latency.get("p50_ms"), latency.get("p99_ms"),
                       latency.get("samples", 0), source, errors)


def half_load(args, systems: list[System], sink: SinkDump, rate: float) -> dict[str, dict]:
    """Every system under the same paced load (``rate`` msg/s, open loop) for --half-load-seconds,
    --half-load-rounds times, the order of systems rotating per round. Per system: the round
    with the median p99 (its p50, late sends and errors with it), and every round's result
    under "rounds" — one disturbed 10-second window on a shared machine moves a p99 by tens
    of milliseconds, so one round per system says more about the minute than the system."""
    rounds: dict[str, list[dict]] = {system.name: [] for system in systems}
    for round_no in range(args.half_load_rounds):
        shift = round_no % len(systems)
        for system in systems[shift:] + systems[:shift]:
            result = half_load_once(args, system, sink, rate)
            rounds[system.name].append(result)
            print(f"  half load round {round_no + 1} {rate:.0f} msg/s {system.name:10} "
                  f"p50 {result.get('p50_ms') or 0:6.2f} ms  p99 {result.get('p99_ms') or 0:6.2f} ms  "
                  f"late {result.get('late', '-')}  errors {result.get('error_count')}", file=sys.stderr)
    results: dict[str, dict] = {}
    for system in systems:
        runs = rounds[system.name]
        measured = sorted((r for r in runs if r.get("p99_ms") is not None), key=lambda r: r["p99_ms"])
        middle = measured[(len(measured) - 1) // 2] if measured else runs[0]
        results[system.name] = {**middle, "rounds": runs}
    return results


def half_load_once(args, system: System, sink: SinkDump, rate: float) -> dict:
    before = sink.poll()
    command = [sys.executable, str(LOAD_CLIENT), "paced", "--port", str(system.port), "--rate", f"{rate:.1f}",
               "--seconds", str(args.half_load_seconds), "--sessions", str(SESSIONS), "--size", str(args.size)]
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=args.timeout, env=python_env())
    result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {
        "error_count": 1, "errors": [done.stderr.strip()[-300:]]}
    deadline = time.monotonic() + args.timeout
    while sink.poll() - before < result.get("messages", 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    sink.reset()
    return result


def half_load_report(rate: float, results: dict[str, dict], given: bool = False) -> list[str]:
    direct = results.get("direct", {}).get("p99_ms")
    origin = "--half-load-rate" if given else "half guard-w1's 1rcpt-kept msg/s"
    rounds = max((len(row.get("rounds", [])) for row in results.values()), default=1)
    lines = ["", f"half load: {rate:.0f} msg/s for every system ({origin}), 1 recipient, "
                 f"{SESSIONS} lock-step kept connections, open loop; the round with the median p99 of {rounds}",
             f"{'system':11} {'p50 ms':>7} {'p99 ms':>7} {'p99 - direct':>12} {'late':>5} {'errors':>6}  p99 per round"]
    for name, row in results.items():
        added = f"{row['p99_ms'] - direct:+.2f}" if row.get("p99_ms") is not None and direct is not None else "-"
        each = " ".join(f"{r['p99_ms']:.2f}" if r.get("p99_ms") is not None else "-" for r in row.get("rounds", []))
        lines.append(f"{name:11} {row.get('p50_ms') or 0:>7.2f} {row.get('p99_ms') or 0:>7.2f} {added:>12} "
                     f"{row.get('late', '-'):>5} {row.get('error_count', '-'):>6}  {each}")
    return lines


# --- the systems ---------------------------------------------------------------------------------

def write_postfix_map(path: Path, count: int, config_dir: Path) -> float:
    """The guard's suppression list as a Postfix access table (``postmap`` hash:); returns build seconds."""
    started = time.monotonic()
    with open(path, "w") as table:
        for i in range(count):
            table.write(f"user{i:08d}@{SUPPRESSED_DOMAIN} REJECT\n")
    result = subprocess.run(["postmap", "-c", str(config_dir), f"hash:{path}"], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"postmap hash:{path} failed: {result.stderr}")
    return time.monotonic() - started


def postfix_instances(binary: str, workdir: Path, sink_port: int, table: Path) -> dict[str, PostfixInstance]:
    access = f"smtpd_recipient_restrictions = check_recipient_access hash:{table}, permit_mynetworks, reject\n"
    return {
        # 250 only once the sink accepted: smtpd forwards every command to the "filter" (the sink)
        # and relays its answer; no cleanup, no queue.
        "postfix-bq": PostfixInstance(binary, workdir, sink_port, SESSIONS, name="postfix-bq", main_cf=access,
                                      smtpd_options=(f"smtpd_proxy_filter=127.0.0.1:{sink_port}",)),
        "postfix-aq": PostfixInstance(binary, workdir, sink_port, SESSIONS, name="postfix-aq", main_cf=access),
    }


class FloorRelay:
    """``library_floor.py`` on a loopback port, relaying to the sink."""

    def __init__(self, sink_port: int) -> None:
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, str(FLOOR_RELAY), "--port", str(self.port),
                                         "--upstream-port", str(sink_port)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=python_env())
        if self.process.stdout is None or self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{FLOOR_RELAY.name} did not start (exit status {self.process.poll()})")

    def stop(self) -> None:
        stop_process(self.process)


def guard_settings(workers: int | None) -> dict[str, dict[str, object]]:
    settings: dict[str, dict[str, object]] = {"breaker": {"enabled": False}}
    if workers is not None:
        settings["smtp"] = {"workers": workers}
    return settings


def check_semantics(system: System, sink: SinkDump, suppressions: int) -> None:
    """Before measuring, prove what the rows claim: a listed address is refused with 5xx (the
    list is in force), and -- except after-queue -- a message is at the sink when its 250 comes
    (allowing the sink 0.2 s to write its dump)."""
    with smtplib.SMTP("127.0.0.1", system.port, local_hostname="check.bench.test", timeout=30) as client:
        client.ehlo()
        if suppressions and system.name not in UNFILTERED:
            client.mail(SENDER)
            code, reply = client.rcpt(f"user00000000@{SUPPRESSED_DOMAIN}")
            if code // 100 != 5:
                raise RuntimeError(f"{system.name} accepted a suppressed address: {code} {reply!r}")
            client.rset()
        before = sink.poll()
        client.sendmail(SENDER, [f"check{RECIPIENT}"], "Subject: check\r\n\r\nsemantics check\r\n")
        if system.drained is None and sink.poll() == before:
            time.sleep(0.2)  # the sink writes its dump after its own 250: allow it to land
            if sink.poll() == before:
                raise RuntimeError(f"{system.name}: the sink did not have the message 0.2 s after the 250")
    wait_for(lambda: sink.poll() > before and (system.drained is None or system.drained()), 30,
             f"the check message through {system.name}")
    sink.reset()


# --- report --------------------------------------------------------------------------------------

def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[Measurement]) -> dict[str, dict[str, dict]]:
    """{load: {system: medians}}; memory is the peak over all rounds."""
    table: dict[str, dict[str, dict]] = {}
    for load in LOADS:
        for system in dict.fromkeys(r.system for r in runs):
            mine = [r for r in runs if r.load == load and r.system == system and not r.errors]
            if not mine:
                continue
            table.setdefault(load, {})[system] = {
                "msgs_per_s": _median(r.messages / r.client_seconds for r in mine),
                "upstream_msgs_per_s": _median(r.messages / r.upstream_seconds for r in mine),
                "cpu_ms_per_msg": _median(1000 * r.cpu_seconds / (r.messages + r.probe_messages)
                                         if r.cpu_seconds is not None else None for r in mine),
                "peak_rss_mib": max((r.peak_rss_kib / 1024 for r in mine if r.peak_rss_kib), default=None),
                "peak_pss_mib": max((r.peak_pss_kib / 1024 for r in mine if r.peak_pss_kib), default=None),
                "p50_ms": _median(r.p50_ms for r in mine),
                "p99_ms": _median(r.p99_ms for r in mine),
                "latency_source": mine[0].latency_source,
                "rounds": len(mine),
            }
    return table


def report(args, table: dict, extra: dict, runs: list[Measurement]) -> str:
    def num(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def ratio(value, base) -> str:
        return f"{value / base:.2f}x" if value and base else "-"

    lines = [
        f"smtp-guard vs. Postfix {extra['postfix_version']} before-queue (the fair peer) — {extra['date']}",
        f"host: {extra['cpu']}, {os.cpu_count()} CPUs, load average {extra['loadavg_before']} before / "
        f"{extra['loadavg_after']} after; Python {platform.python_version()}",
        f"smtp-guard code: {extra['smtp_guard_code']}",
        f"loads: {SESSIONS} sessions, {args.messages} messages of {args.size} bytes per load and round, "
        f"{args.rounds} round(s) (medians), systems interleaved; {args.suppressions:,} suppressed addresses "
        f"(guard store filled in {extra['guard_fill_s']:.1f}s, postmap in {extra['postmap_s']:.1f}s)",
    ]
    lines += ["", f"{'load':11} {'system':11} {'msg/s':>8} {'/direct':>8} {'/pf-bq':>7} {'CPU ms/msg':>10} "
              f"{'RSS MiB':>8} {'PSS MiB':>8} {'p50 ms':>7} {'p99 ms':>7}"]
    for load, systems in table.items():
        direct = systems.get("direct", {}).get("msgs_per_s")
        peer = systems.get("postfix-bq", {}).get("msgs_per_s")
        for system, row in systems.items():
            lines.append(f"{load:11} {system:11} {row['msgs_per_s']:>8.0f} {ratio(row['msgs_per_s'], direct):>8} "
                         f"{ratio(row['msgs_per_s'], peer):>7} {num(row['cpu_ms_per_msg'], '.2f'):>10} "
                         f"{num(row['peak_rss_mib'], '.1f'):>8} {num(row['peak_pss_mib'], '.1f'):>8} "
                         f"{num(row['p50_ms'], '.2f'):>7} {num(row['p99_ms'], '.2f'):>7}")
    aq = [f"{load} {systems['postfix-aq']['upstream_msgs_per_s']:.0f}" for load, systems in table.items()
          if "postfix-aq" in systems]
    lines += [
        "",
        "msg/s: messages / client wall time (every 250 received). postfix-aq answers after its queue",
        f"fsync and relays later; its msg/s until the sink had everything: {', '.join(aq) or '-'}.",
        "CPU: the server's process tree incl. reaped children (guard process; Postfix master + all",
        "daemons), per message incl. probe messages. RSS/PSS: peak of the tree's summed smaps_rollup,",
        "sampled every 0.25 s. Latency: MAIL written -> reply to the final '.' read; pipelining load:",
        f"every transaction; smtp-source loads: a lock-step probe session, 1 message / {args.probe_interval:g} s.",
        "lib-floor: aiosmtpd and aiosmtplib alone (bench/library_floor.py), no policy and no list: the",
        "guard's CPU minus lib-floor's is what the guard's own work costs per message.",
    ]
    failed = [r for r in runs if r.errors]
    if failed:
        lines += ["", f"{len(failed)} measurement(s) with errors (left out of the medians):"]
        lines += [f"  round {r.round} {r.load} {r.system}: {'; '.join(r.errors)[:400]}" for r in failed]
    return "\n".join(lines)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- main ----------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000, help="messages per load, system and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    parser.add_argument("--suppressions", type=int, default=1_000_000,
                        help="addresses on the suppression list (guard store and Postfix hash: map)")
    parser.add_argument("--size", type=int, default=5120, help="message body bytes")
    parser.add_argument("--loads", default=",".join(LOADS), help="comma-separated subset of the loads")
    parser.add_argument("--probe-interval", type=float, default=0.1,
                        help="seconds between the latency probe's messages under smtp-source loads")
    parser.add_argument("--timeout", type=float, default=600, help="time limit per measurement, seconds")
    parser.add_argument("--half-load-seconds", type=float, default=10.0,
                        help="seconds of the paced half-load latency run per system (0: skip it)")
    parser.add_argument("--half-load-rounds", type=int, default=3,
                        help="half-load runs per system, interleaved; the median p99's run is reported")
    parser.add_argument("--half-load-rate", type=float, metavar="MSG_PER_S",
                        help="the half-load run's rate instead of half guard-w1's 1rcpt-kept msg/s (to compare "
                             "latency across runs and code versions at one rate)")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="do not run lib-floor (aiosmtpd and aiosmtplib alone, bench/library_floor.py)")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement and the medians as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = parser.parse_args()
    loads = [load for load in args.loads.split(",") if load]
    if not (1 <= args.messages <= 1_000_000 and 1 <= args.rounds <= 20 and 0 <= args.suppressions <= 20_000_000
            and 0 <= args.size <= 10_000_000 and 0.01 <= args.probe_interval <= 10 and loads
            and set(loads) <= set(LOADS)):
        parser.error(f"bounded on purpose: messages 1..1e6, rounds 1..20, suppressions <= 2e7, size <= 10 MB, "
                     f"probe interval 0.01..10 s; loads from {', '.join(LOADS)}")
    if os.geteuid() != 0:
        parser.error("must run as root: a private Postfix instance starts as root and drops to mail_owner")
    sink_binary = require(SMTP_SINK, "postfix")
    args.smtp_source = require(SMTP_SOURCE, "postfix")
    postfix_binary = require(POSTFIX, "postfix")
    extra = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu_model(), "loadavg_before": loadavg(),
             "smtp_guard_code": code_version(),
             "postfix_version": subprocess.run(["postconf", "-h", "-d", "mail_version"], capture_output=True,
                                               text=True).stdout.strip()}

    workdir = Path(tempfile.mkdtemp(prefix="smtp-guard-fair-peer-"))
    workdir.chmod(0o755)  # smtp-sink (nobody) and Postfix (mail_owner) must reach their dirs
    started: list = []
    runs: list[Measurement] = []
    try:
        sink = SinkDump(sink_binary, workdir)
        started.append(sink)
        table_path = workdir / "suppressed"
        postfixes = postfix_instances(postfix_binary, workdir, sink.port, table_path)
        extra["postmap_s"] = write_postfix_map(table_path, args.suppressions, postfixes["postfix-bq"].config_dir)
        # A directory of its own, 0700, as the store wants (it warns otherwise); copied per guard.
        (workdir / "store-template").mkdir(mode=0o700)
        template = workdir / "store-template" / "guard.sqlite3"
        fill_started = time.monotonic()
        asyncio.run(preload_suppressions(template, args.suppressions))
        extra["guard_fill_s"] = time.monotonic() - fill_started

        systems = [System("direct", sink.port, None)]
        for name, postfix in postfixes.items():
            started.append(postfix)
            postfix.start()
            systems.append(System(name, postfix.port, postfix.master_pid,
                                  (lambda p=postfix: p.queued() == 0) if name == "postfix-aq" else None))
        for workers, name in ((None, "guard-w1"), (2, "guard-w2")):
            guard = GuardProcess(workdir, sink.port, args.suppressions, guard_settings(workers), name=name,
                                 store_template=template)
            problem = guard.config_error()
            if problem:
                raise RuntimeError(f"{guard.config}: {problem}")
            started.append(guard)
            guard.start()
            systems.append(System(name, guard.port, guard.process.pid))
        if args.floor:
            floor = FloorRelay(sink.port)
            started.append(floor)
            systems.append(System("lib-floor", floor.port, floor.process.pid))
        print(f"temp dir {workdir}; " + ", ".join(f"{s.name} :{s.port}" for s in systems), file=sys.stderr)

        for system in systems:
            check_semantics(system, sink, args.suppressions)
        warmup = max(20, min(200, args.messages // 10))
        for load in loads:
            for system in systems:
                run = measure(args, system, load, sink, warmup, 0, probe=False)
                if run.errors:
                    raise RuntimeError(f"warm-up {load} against {system.name} failed: {run.errors}")
        for round_no in range(1, args.rounds + 1):
            for load in loads:
                shift = (round_no - 1) % len(systems)
                for system in systems[shift:] + systems[:shift]:
                    run = measure(args, system, load, sink, args.messages, round_no)
                    runs.append(run)
                    print(f"  round {round_no} {load:10} {system.name:10} {run.messages / run.client_seconds:7.0f} msg/s"
                          f"{'  ERRORS: ' + '; '.join(run.errors)[:300] if run.errors else ''}", file=sys.stderr)

        table = summarize(runs)
        peak = table.get("1rcpt-kept", {}).get("guard-w1", {}).get("msgs_per_s")
        rate = args.half_load_rate or (peak / 2 if peak else None)
        if args.half_load_seconds > 0 and rate:
            extra["half_load_rate"] = rate
            extra["half_load"] = half_load(args, systems, sink, rate)
        extra["loadavg_after"] = loadavg()
        print(report(args, table, extra, runs))
        if extra.get("half_load"):
            print("\n".join(half_load_report(extra["half_load_rate"], extra["half_load"], bool(args.half_load_rate))))
        for part in started:
            if isinstance(part, GuardProcess):
                # The guard logs at its default level (info): count what went wrong, not every line.
                bad = [line for line in part.stderr_tail().splitlines()
                       if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]
                print(f"{part.dir.name} log: {len(bad)} ERROR/CRITICAL/Traceback line(s)"
                      + (f", last: {bad[-1][:300]}" if bad else ""))
            elif isinstance(part, PostfixInstance) and part.deferred():
                print(f"WARNING: {part.deferred()} message(s) deferred in {part.root.name}'s queue")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "args": {k: v for k, v in vars(args).items() if k not in ("smtp_source", "json", "keep")},
                **extra, "sessions": SESSIONS, "summary": table, "runs": [asdict(r) for r in runs]}, indent=2))
        return 1 if any(r.errors for r in runs) else 0
    finally:
        stop_all(reversed(started), workdir, args.keep)


if __name__ == "__main__":
    sys.exit(main())

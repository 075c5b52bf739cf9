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
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from checkout import code_version, cpu_model  # also puts this checkout first on sys.path
from peers import POSTFIX, RECIPIENT, SENDER, SMTP_SINK, SMTP_SOURCE, GuardProcess, PostfixInstance, SinkDump, \
    require, stop_all, tree_cpu_seconds


def guard_settings(concurrency: int, recipients: int) -> dict[str, dict[str, object]]:
    return {
        "smtp": {"max_sessions": max(100, 2 * concurrency + 10), "max_recipients": max(1000, recipients)},
        # One upstream session per client session at most, like Postfix's
        # default_destination_concurrency_limit.
        "upstream": {"max_connections": max(10, concurrency)},
        "logging": {"level": "warning"},
    }


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
        guard = GuardProcess(workdir, sink.port, args.suppressions,
                             guard_settings(args.concurrency, args.recipients))
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
        stop_all((guard, postfix, sink), workdir, args.keep)


if __name__ == "__main__":
    sys.exit(main())

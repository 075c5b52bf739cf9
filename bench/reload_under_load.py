#!/usr/bin/env python3
"""A bulk import into a large list while the guard relays at full speed: throughput before,
during and after the full index reload it causes.

    python3 bench/reload_under_load.py --store FILE [--workers 2] [--import-size 60000] [--json FILE]

Issue 8 asks for ten million addresses "reloaded with no pause in service". Lookups never
pause (the new index is swapped in whole), but a full reload reads the whole list again, on
every core, while the workers serve. This measures what that costs them. On loopback, in one
temp dir, it starts ``smtp-sink``, then ``smtp-guard serve`` (``[smtp] workers``, breaker off,
relaying to the sink) on a copy of ``--store`` (a store filled before, e.g. by
``guard_memory.py``: ten million addresses take minutes to fill). Then:

* ``smtp-source -d -s 20`` (kept connections, 1 recipient, 5 kB) sends ``--messages`` messages;
* after ``--import-after`` seconds, ``smtp-guard suppress import`` adds ``--import-size`` new
  addresses to the list ``bounced``: a bulk change, which every guard process takes by a full
  reload (the command waits for their confirmation, up to its own limit);
* every 0.5 s the guard's ``smtp_guard_messages_total{outcome="relayed"}`` is read from
  ``/metrics``.

It prints msg/s per half second, the import's duration and its output, the guard's
"suppression index built … in N s" lines, and the medians before the import, from the import
until the last reload was in, and after. Not a unit test (project rule); run as root or as
the user that owns ``smtp-sink``'s dump directory, like ``fair_peer.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from checkout import code_version, cpu_model  # also puts this checkout first on sys.path
from peers import GUARD_COMMAND, RECIPIENT, SENDER, SMTP_SINK, SMTP_SOURCE, GuardProcess, SinkDump, guard_env

SAMPLE_EVERY = 0.5
IMPORT_LIST = "bounced"  # one of the shipped configuration's lists


def sample_relayed(guard: GuardProcess, samples: list[tuple[float, float]], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            lines = guard.metric_lines('smtp_guard_messages_total{outcome="relayed"}')
            samples.append((time.monotonic(), float(lines[0].split()[-1]) if lines else 0.0))
        except OSError:
            pass  # a scrape that timed out under load: the next one counts the same messages
        stop.wait(SAMPLE_EVERY)


def reload_finished_at(log: str, started: float) -> tuple[list[str], float | None]:
    """The "index built" lines after the import began, and the monotonic time of the last one
    (from its wall-clock timestamp)."""
    lines, last = [], None
    offset = time.time() - time.monotonic()
    for line in log.splitlines():
        if "suppression index built" not in line:
            continue
        at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() - offset
        if at >= started:
            lines.append(line)
            last = at
    return lines, last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", metavar="FILE", required=True, help="an already-filled SQLite store (copied)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--messages", type=int, default=70_000)
    parser.add_argument("--import-size", type=int, default=60_000, help="new addresses imported (default 60,000)")
    parser.add_argument("--import-after", type=float, default=10.0, help="seconds into the load (default 10)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    if not 1 <= args.import_size <= 10_000_000 or not 1 <= args.messages <= 1_000_000:
        parser.error("--import-size at most 10,000,000 and --messages at most 1,000,000")

    with tempfile.TemporaryDirectory(prefix="smtp-guard-reload-") as temp:
        work = Path(temp)
        work.chmod(0o755)  # smtp-sink runs as nobody
        sink = SinkDump(SMTP_SINK, work)
        guard = GuardProcess(work, sink.port, 0, {"breaker": {"enabled": False}, "smtp": {"workers": args.workers}},
                             store_template=Path(args.store))
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        try:
            guard.start()
            addresses = work / "import.txt"
            addresses.write_text("".join(f"reload{i:07d}@bulk{i % 50}.bench.test\n" for i in range(args.import_size)))
            sampler = threading.Thread(target=sample_relayed, args=(guard, samples, stop))
            sampler.start()
            began = time.monotonic()
            load = subprocess.Popen([SMTP_SOURCE, "-d", "-l", "5120", "-m", str(args.messages), "-r", "1", "-s", "20",
                                     "-M", "client.bench.test", "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{guard.port}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(args.import_after)
            import_began = time.monotonic()
            imported = subprocess.run([*GUARD_COMMAND, "suppress", "import", str(addresses), "--list", IMPORT_LIST,
                                       "--config", str(guard.config)],
                                      capture_output=True, text=True, env=guard_env(), cwd=guard.dir, timeout=3600)
            import_ended = time.monotonic()
            load.wait()
            stop.set()
            sampler.join()
            built, reloaded_at = reload_finished_at(guard.stderr_tail(), import_began)
        finally:
            stop.set()
            guard.stop()
            sink.stop()

    rates = [((t0 - began, t1 - began), (c1 - c0) / (t1 - t0)) for (t0, c0), (t1, c1) in zip(samples, samples[1:])]
    until = (reloaded_at or import_ended) - began
    phases = {"before": [r for (a, b), r in rates if b <= import_began - began],
              "import_and_reload": [r for (a, b), r in rates if a >= import_began - began and b <= until],
              "after": [r for (a, b), r in rates if a >= until]}
    medians = {name: statistics.median(values) if values else None for name, values in phases.items()}
    print(f"smtp-guard {code_version()} on {cpu_model()}; workers = {args.workers}; store {args.store} (copied)")
    print(f"import of {args.import_size:,} addresses at {import_began - began:.1f} s, took {import_ended - import_began:.1f} s "
          f"(exit {imported.returncode}); last reload in at {until:.1f} s")
    print("\n".join(line.strip() for line in (imported.stdout + imported.stderr).strip().splitlines()[-6:]))
    print("\n".join(line[:200] for line in built) or "no reload finished before the load ended")
    for (a, b), rate in rates:
        print(f"  {a:6.1f}-{b:6.1f} s {rate:7.0f} msg/s")
    print("median msg/s: " + ", ".join(f"{name.replace('_', ' ')} {value:.0f}" if value is not None else f"{name} -"
                                        for name, value in medians.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "code": code_version(), "cpu": cpu_model(), "workers": args.workers, "store": args.store,
            "import_size": args.import_size, "import_at": import_began - began,
            "import_seconds": import_ended - import_began, "import_exit": imported.returncode,
            "last_reload_at": until, "built": built, "rates": rates, "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

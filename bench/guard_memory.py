#!/usr/bin/env python3
"""The whole guard's memory with a large suppression list, for ``[smtp] workers`` = 1, 2, 4.

    python3 bench/guard_memory.py --addresses 10000000     # issue 8's target: <= 150 MB, <= 10 s

Fills a store with N addresses (``index_scale.fill``: the path ``suppress import`` takes), then
for each worker count starts the real ``smtp-guard serve`` on it and reports:

* **ready after**: seconds from exec to ``/readyz`` answering 200 (interpreter start, store
  open, index snapshot loaded — built once and mapped by every worker — workers started);
* **RSS / PSS**: summed over the supervisor's process tree (``/proc/PID/smaps_rollup``) once
  ready and idle. PSS divides shared pages (the mapped snapshot, shared libraries) among the
  processes that map them, so the PSS sum is what the guard really occupies.

This is a benchmark, not a test: it is not part of the pytest suite (project rule).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from checkout import code_version, cpu_model  # also puts this checkout first on sys.path
from index_scale import fill
from peers import guard_env, tree_memory_kib

SETTLE = 3.0  # seconds idle after ready before memory is read (lazy imports, first probes)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def measure(store: Path, workers: int, directory: Path, timeout: float) -> dict[str, float]:
    smtp, metrics = free_port(), free_port()
    config = directory / f"w{workers}.toml"
    # The upstream is the sandbox: /readyz needs no SMTP peer, and nothing is sent.
    config.write_text(f'[smtp]\nlisten = "127.0.0.1:{smtp}"\nworkers = {workers}\n\n'
                      f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n\n[store]\npath = "{store}"\n')
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "smtp_guard", "serve", "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=(directory / f"w{workers}.log").open("w"),
                               env=guard_env())  # this checkout's code
    try:
        while not ready(metrics):
            if process.poll() is not None or time.monotonic() - started > timeout:
                raise RuntimeError(f"workers = {workers}: not ready (see {directory / f'w{workers}.log'})")
            time.sleep(0.05)
        ready_after = time.monotonic() - started
        time.sleep(SETTLE)
        rss, pss = tree_memory_kib(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {"workers": workers, "ready_seconds": ready_after, "rss_mib": rss / 1024, "pss_mib": pss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--addresses", type=int, default=1_000_000, help="address entries (default 1,000,000)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts (default 1,2,4)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for ready (default 300)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--store", metavar="FILE",
                        help="measure on this already-filled SQLite store (kept) instead of filling a new one; "
                             "--addresses then only labels the report")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="smtp-guard-memory-") as temp:
        directory = Path(temp)
        if args.store:
            store, filled = Path(args.store).resolve(), {"fill_seconds": None, "store": str(Path(args.store).resolve())}
        else:
            store = directory / "data" / "guard.sqlite3"
            store.parent.mkdir(mode=0o700)
            print(f"filling {args.addresses:,} addresses ...", file=sys.stderr)
            filled = asyncio.run(fill(store, args.addresses, 100_000, None))
        rows = [measure(store, int(n), directory, args.timeout) for n in args.workers.split(",")]
    fill = "an existing store" if filled["fill_seconds"] is None else f"filled in {filled['fill_seconds']:.0f} s"
    print(f"smtp-guard {code_version()} on {cpu_model()}; {args.addresses:,} suppressed addresses ({fill})")
    print(f"{'workers':>7}  {'ready after':>11}  {'RSS MiB':>8}  {'PSS MiB':>8}")
    for row in rows:
        print(f"{row['workers']:>7}  {row['ready_seconds']:>9.1f} s  {row['rss_mib']:>8.0f}  {row['pss_mib']:>8.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"addresses": args.addresses, "filled": filled, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

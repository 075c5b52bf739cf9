#!/usr/bin/env python3
"""One suppression snapshot file shared by 1, 2 and 4 worker processes, next to today's arrays.

    python3 bench/index_shared.py [--addresses N]             # default 1,000,000
    python3 bench/index_shared.py --addresses 10000000 --keep # ten million (fill ~3 min here)
    python3 bench/index_shared.py --store DIR/guard.sqlite3   # reuse a store a --keep run filled

1. **fill** — as ``index_scale.py``: N address entries through ``store.add(bulk=True)``
   (skipped with ``--store``).
2. **arrays** (fresh process) — today's path: ``IndexReloader.load()`` without a snapshot
   source, the arrays in the process's own memory. Seconds, VmRSS growth, transient peak,
   the longest event-loop stall while it ran (a 1 ms ticker), lookups/s.
3. **build** (fresh process) — ``SharedSnapshots.get`` on an empty directory: store load,
   file write, map and CRC check. Seconds, file size, peak, loop stall; then, separately,
   one more ``write_snapshot`` and ``map_snapshot`` of the same data (warm) to split the cost.
4. **share** — for K in ``--processes``: K fresh processes at once, each runs the real
   ``IndexReloader(snapshots=SharedSnapshots(...)).load()`` (maps the file phase 3 wrote),
   then hit and miss lookups, and — all K still running — reads ``/proc/self/smaps_rollup``
   (Rss, Pss) and the snapshot mapping's own block in ``/proc/self/smaps``.

This is a benchmark, not a test: it is not part of the pytest suite (project rule).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from checkout import code_version, cpu_model  # also puts this checkout first on sys.path
from index_scale import fill, human, reset_peak, sample_addresses, status_kb

PRIORITY = ("complained", "unsubscribed", "invalid")


def smaps_rollup() -> dict[str, int]:
    """Rss, Pss, Pss_Anon, Pss_File ... of this process in KiB."""
    values = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0])
    return values


def mapping_kb(path: Path) -> dict[str, int]:
    """Rss and Pss (KiB) of this process's mappings of ``path`` (from /proc/self/smaps)."""
    totals = {"Rss": 0, "Pss": 0, "Size": 0}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if fields and "-" in fields[0] and len(fields) >= 5 and fields[0][0] in "0123456789abcdef" \
                and ":" not in fields[0]:
            inside = len(fields) == 6 and fields[5].removesuffix(" (deleted)") == str(path)
        elif inside and fields and fields[0].rstrip(":") in totals:
            totals[fields[0].rstrip(":")] += int(fields[1])
    return totals


async def loop_stall(during: "asyncio.Future[Any]") -> float:
    """The longest a 1 ms ticker on this event loop waited beyond its 1 ms while ``during`` ran."""
    worst = 0.0
    while not during.done():
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        worst = max(worst, time.perf_counter() - started - 0.001)
    return worst


def lookup_rates(index: Any, count: int, lookups: int) -> dict[str, float]:
    from smtp_guard.addresses import key_hash

    hits, misses = sample_addresses(count, lookups)
    result = {}
    for name, texts, want in (("hits", hits, len(hits)), ("misses", misses, 0)):
        hashes = [key_hash(text) for text in texts]
        lookup = index.lookup_address
        started = time.perf_counter()
        found = sum(lookup(h) is not None for h in hashes)
        result[f"{name}_per_s"] = len(hashes) / (time.perf_counter() - started)
        if found != want:
            raise RuntimeError(f"{name}: {found} of {len(hashes)} found, expected {want}")
    return result


# --- phases in fresh processes -----------------------------------------------------------------------

async def phase_arrays(store_path: Path, count: int, lookups: int) -> dict[str, Any]:
    from smtp_guard.index import IndexReloader, SuppressionIndex
    from smtp_guard.store.sqlite.db import Database
    from smtp_guard.store.sqlite.suppressions import SQLiteSuppressionStore

    async with Database(store_path) as db:
        index = SuppressionIndex()
        reloader = IndexReloader(index, SQLiteSuppressionStore(db), PRIORITY, 60)
        gc.collect()
        before, peak_reset = status_kb("VmRSS"), reset_peak()
        started = time.monotonic()
        load = asyncio.ensure_future(reloader.load())
        stall = await loop_stall(load)
        await load
        seconds = time.monotonic() - started
        peak = status_kb("VmHWM")
        gc.collect()
        after = status_kb("VmRSS")
        if len(index) != count:
            raise RuntimeError(f"index holds {len(index):,} addresses, expected {count:,}")
        return {"load_seconds": seconds, "loop_stall_seconds": stall, "rss_growth_kb": after - before,
                "peak_growth_kb": peak - before if peak_reset else None, **lookup_rates(index, count, lookups)}


async def phase_build(store_path: Path, directory: Path, count: int) -> dict[str, Any]:
    from smtp_guard.index_file import map_snapshot, write_snapshot
    from smtp_guard.index_share import SharedSnapshots
    from smtp_guard.store.sqlite.db import Database
    from smtp_guard.store.sqlite.suppressions import SQLiteSuppressionStore

    async with Database(store_path) as db:
        shared = SharedSnapshots(directory, SQLiteSuppressionStore(db))
        gc.collect()
        before, peak_reset = status_kb("VmRSS"), reset_peak()
        started = time.monotonic()
        get = asyncio.ensure_future(shared.get(PRIORITY, time.time()))
        stall = await loop_stall(get)
        snapshot = await get
        seconds = time.monotonic() - started
        peak = status_kb("VmHWM")
        if shared.builds != 1 or len(snapshot.addresses) != count:
            raise RuntimeError(f"expected one build of {count:,} addresses: {shared!r}, {len(snapshot.addresses):,}")
        gc.collect()
        result = {"build_seconds": seconds, "loop_stall_seconds": stall, "file_bytes": shared.path.stat().st_size,
                  "rss_growth_kb": status_kb("VmRSS") - before,
                  "peak_growth_kb": peak - before if peak_reset else None}
        # The same steps alone, warm, to split the build: write from the map, map and check.
        copy = directory / "bench-copy.snapshot"
        started = time.monotonic()
        write_snapshot(snapshot, copy, list_priority=PRIORITY)
        result["write_seconds"] = time.monotonic() - started
        started = time.monotonic()
        again = map_snapshot(shared.path)
        result["map_seconds"] = time.monotonic() - started
        del again
        copy.unlink()
        return result


def phase_map(store_path: str, directory: str, count: int, lookups: int, barrier: Any, results: Any) -> None:
    """One worker of the share phase (a spawned process)."""
    async def run() -> dict[str, Any]:
        from smtp_guard.index import IndexReloader, SuppressionIndex
        from smtp_guard.index_share import SharedSnapshots
        from smtp_guard.store.sqlite.db import Database
        from smtp_guard.store.sqlite.suppressions import SQLiteSuppressionStore

        async with Database(store_path) as db:
            store = SQLiteSuppressionStore(db)
            shared = SharedSnapshots(directory, store)
            index = SuppressionIndex()
            reloader = IndexReloader(index, store, PRIORITY, 60, snapshots=shared)
            gc.collect()
            await asyncio.to_thread(barrier.wait)
            baseline = smaps_rollup()
            started = time.monotonic()
            load = asyncio.ensure_future(reloader.load())
            stall = await loop_stall(load)
            await load
            seconds = time.monotonic() - started
            rates = lookup_rates(index, count, lookups)
            gc.collect()
            await asyncio.to_thread(barrier.wait)  # every worker has mapped and looked up
            rollup, mapped = smaps_rollup(), mapping_kb(shared.path)
            await asyncio.to_thread(barrier.wait)  # nobody unmaps before every worker has read
            if shared.builds != 0 or len(index) != count:
                raise RuntimeError(f"expected a map of {count:,} addresses: {shared!r}, {len(index):,}")
            return {"load_seconds": seconds, "loop_stall_seconds": stall, **rates, "baseline": baseline, "rollup": rollup, "mapping": mapped}
    try:
        results.put(asyncio.run(run()))
    except BaseException as error:
        results.put({"error": repr(error)})
        raise


def share(store_path: Path, directory: Path, count: int, lookups: int, processes: int) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=phase_map, args=(str(store_path), str(directory), count, lookups, barrier,
                                                       results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    reports = [results.get(timeout=1800) for _ in workers]
    for worker in workers:
        worker.join(60)
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        raise RuntimeError(f"share phase with {processes} processes: {errors}")
    return reports


def run_phase(*arguments: str) -> dict[str, Any]:
    output = subprocess.run([sys.executable, __file__, *arguments], stdout=subprocess.PIPE, text=True, check=True,
                            timeout=3600)
    return json.loads(output.stdout)


# --- main ----------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--addresses", type=int, default=1_000_000, help="address entries (default 1,000,000)")
    parser.add_argument("--store", type=Path, help="a store a --keep run filled with --addresses entries (no fill)")
    parser.add_argument("--processes", default="1,2,4", help="worker counts for the share phase (default 1,2,4)")
    parser.add_argument("--lookups", type=int, default=200_000, help="hit and miss lookups each (default 200,000)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (store, snapshot file)")
    parser.add_argument("--_phase", choices=("arrays", "build"), help=argparse.SUPPRESS)
    parser.add_argument("--_directory", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._phase == "arrays":
        print(json.dumps(asyncio.run(phase_arrays(args.store, args.addresses, args.lookups))))
        return 0
    if args._phase == "build":
        print(json.dumps(asyncio.run(phase_build(args.store, args._directory, args.addresses))))
        return 0
    counts = [int(k) for k in args.processes.split(",")]
    if not (1000 <= args.addresses <= 50_000_000 and 1 <= args.lookups <= 5_000_000 and all(1 <= k <= 16 for k in counts)):
        parser.error("bounded on purpose: --addresses 1000..50,000,000, --lookups 1..5,000,000, --processes 1..16 each")
    args.lookups = min(args.lookups, args.addresses)

    workdir = Path(tempfile.mkdtemp(prefix="smtp-guard-shared-"))
    store_path = args.store or workdir / "guard.sqlite3"
    directory = workdir / "index"
    common = ["--store", str(store_path), "--addresses", str(args.addresses), "--lookups", str(args.lookups)]
    try:
        print(f"temp dir {workdir}", file=sys.stderr)
        filled = None
        if args.store is None:
            filled = asyncio.run(fill(store_path, args.addresses, 100_000, None))
        print("  arrays: IndexReloader.load() in a fresh process ...", file=sys.stderr, flush=True)
        arrays = run_phase("--_phase", "arrays", *common)
        print("  build: SharedSnapshots.get on an empty directory ...", file=sys.stderr, flush=True)
        build = run_phase("--_phase", "build", "--_directory", str(directory), *common)
        shared = {}
        for k in counts:
            print(f"  share: {k} process(es) mapping the file ...", file=sys.stderr, flush=True)
            shared[k] = share(store_path, directory, args.addresses, args.lookups, k)
        print(report(args, filled, arrays, build, shared))
        if args.json:
            Path(args.json).write_text(json.dumps({
                "addresses": args.addresses, "cpu": cpu_model(), "code": code_version(), "fill": filled,
                "arrays": arrays, "build": build, "share": shared}, indent=2))
        return 0
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def report(args: argparse.Namespace, filled: dict | None, arrays: dict, build: dict, shared: dict) -> str:
    n = args.addresses
    kib = 1024
    lines = [
        f"shared suppression index at {n:,} addresses — {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"host: {cpu_model()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
        f"Python {platform.python_version()}",
        f"smtp-guard code: {code_version()}",
        "",
    ]
    if filled:
        lines.append(f"fill    store.add(bulk=True): {filled['fill_seconds']:.1f}s, SQLite files {human(filled['db_bytes'])}")
    lines += [
        f"arrays  IndexReloader.load (one process, today): {arrays['load_seconds']:.2f}s, VmRSS +"
        f"{human(arrays['rss_growth_kb'] * kib)} (peak +{human((arrays['peak_growth_kb'] or 0) * kib)}), "
        f"loop stall max {arrays['loop_stall_seconds'] * 1000:.0f} ms, lookups/s hits {arrays['hits_per_s']:,.0f} "
        f"misses {arrays['misses_per_s']:,.0f}",
        f"build   SharedSnapshots.get, empty dir: {build['build_seconds']:.2f}s, file {human(build['file_bytes'])} "
        f"({build['file_bytes'] / n:.2f} B/address), VmRSS after +{human(build['rss_growth_kb'] * kib)} "
        f"(peak +{human((build['peak_growth_kb'] or 0) * kib)}), loop stall max "
        f"{build['loop_stall_seconds'] * 1000:.0f} ms",
        f"        of which, warm and alone: write_snapshot {build['write_seconds']:.2f}s, "
        f"map_snapshot (map + CRC) {build['map_seconds']:.2f}s",
        "",
        f"{'K':>2} {'map s':>6} {'stall ms':>8} {'hits/s':>9} {'misses/s':>9} {'RSS/proc':>10} {'PSS/proc':>10} "
        f"{'map RSS':>9} {'map PSS':>9} {'sum PSS':>9} {'sum map PSS':>12} {'sum PSS growth':>15}",
    ]
    for k, reports in shared.items():
        def mean(value: Any) -> float:
            return sum(value(r) for r in reports) / len(reports)
        lines.append(
            f"{k:>2} {mean(lambda r: r['load_seconds']):>6.2f} "
            f"{max(r['loop_stall_seconds'] for r in reports) * 1000:>8.0f} {mean(lambda r: r['hits_per_s']):>9,.0f} "
            f"{mean(lambda r: r['misses_per_s']):>9,.0f} {human(mean(lambda r: r['rollup']['Rss']) * kib):>10} "
            f"{human(mean(lambda r: r['rollup']['Pss']) * kib):>10} {human(mean(lambda r: r['mapping']['Rss']) * kib):>9} "
            f"{human(mean(lambda r: r['mapping']['Pss']) * kib):>9} "
            f"{human(sum(r['rollup']['Pss'] for r in reports) * kib):>9} "
            f"{human(sum(r['mapping']['Pss'] for r in reports) * kib):>12} "
            f"{human(sum(r['rollup']['Pss'] - r['baseline']['Pss'] for r in reports) * kib):>15}")
    lines += [
        "",
        "K worker processes each ran IndexReloader(snapshots=SharedSnapshots).load() on the file the build wrote",
        "(map + CRC check + catch-up read; 'stall ms': the longest event-loop stall of any of them meanwhile),",
        "then the lookups, and read their memory while all K were running.",
        "RSS/PSS per process: /proc/self/smaps_rollup (PSS splits each shared page between the processes",
        "mapping it); map RSS/PSS: the snapshot file's mapping alone (/proc/self/smaps). Sum PSS growth:",
        "each process's PSS once loaded minus its PSS before the load (Python, imports and the store",
        "connection are the baseline), summed. Today's path costs the arrays' VmRSS growth in every worker.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

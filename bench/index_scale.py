#!/usr/bin/env python3
"""Suppression index at scale, next to Postfix's own lookup table built from the same addresses.

    python3 bench/index_scale.py [--addresses N]          # default 1,000,000 (< 2 min, 2 cores)
    python3 bench/index_scale.py --addresses 10000000     # the docs/design.md claim: ten million

1. **fill**: N address entries into a fresh SQLite store through the real
   ``SQLiteSuppressionStore.add(..., bulk=True)``, in batches (the path ``suppress import``
   takes); reports time and rows/s.
2. **load** (in a fresh Python process, so the fill's garbage does not blur the numbers): the
   real ``IndexReloader.load`` (``store.load_snapshot`` + ``SuppressionIndex.replace``): load
   time, VmRSS growth once loaded (bytes per address) and the transient peak (VmHWM).
3. **lookups**: the real ``SuppressionPolicy.check`` on ``RecipientContext``s built the way
   the SMTP front builds them (hits and misses, separately), and the same including the
   per-recipient normalization (parse, key, hash, domain chain).
4. **peer**: ``postmap`` builds Postfix's own table (``hash:``; ``cdb:`` when ``postconf -m``
   offers it) from the same addresses; ``postmap -q - TYPE:FILE < keys`` answers the same hit
   and miss keys. Build time, file size, lookups/s and the guard/Postfix ratio.

This is a benchmark, not a test: it is not part of the pytest suite (project rule).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from checkout import code_version, cpu_model  # also puts this checkout first on sys.path

# Share of each list in the generated data (realistic-ish ESP export mix).
LIST_MIX = (("unsubscribed", 70), ("invalid", 20), ("complained", 10))
DOMAINS = 5000


def address(i: int) -> str:
    """The i-th generated address, already a normalized matching key (lower case, no
    sub-address, no dotless provider), so the store holds exactly what an import would."""
    return f"user{i}@d{i % DOMAINS}.example"


def list_of(i: int) -> str:
    slot = i % 100
    for name, share in LIST_MIX:
        if slot < share:
            return name
        slot -= share
    return LIST_MIX[0][0]


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False




def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return str(n)


# --- 1. fill ---------------------------------------------------------------------------------------

async def fill(store_path: Path, count: int, batch: int, keys_file: Path | None) -> dict:
    from smtp_guard.store.sqlite.db import Database
    from smtp_guard.store.sqlite.suppressions import SQLiteSuppressionStore
    from smtp_guard.suppression_model import SuppressionEntry

    keys = open(keys_file, "w") if keys_file else None
    store_seconds = 0.0
    started = time.monotonic()
    async with Database(store_path) as db:
        store = SQLiteSuppressionStore(db)
        added = 0
        for start in range(0, count, batch):
            end = min(count, start + batch)
            entries = [SuppressionEntry("address", address(i), list_of(i), source="bench") for i in range(start, end)]
            t0 = time.monotonic()
            added += await store.add(entries, bulk=True)
            store_seconds += time.monotonic() - t0
            if keys:
                keys.write("".join(f"{address(i)}\t{list_of(i)}\n" for i in range(start, end)))
            done = end
            if done % (10 * batch) == 0 or done == count:
                rate = done / (time.monotonic() - started)
                print(f"  filled {done:>11,} / {count:,}  ({rate:,.0f} rows/s)", file=sys.stderr, flush=True)
    if keys:
        keys.close()
    total = time.monotonic() - started
    if added != count:
        raise RuntimeError(f"store.add reported {added:,} new entries, expected {count:,}")
    return {"fill_seconds": total, "store_add_seconds": store_seconds, "rows": count,
            "db_bytes": sum(p.stat().st_size for p in store_path.parent.glob(store_path.name + "*"))}


# --- 2 + 3. load and lookups, in a fresh process -------------------------------------------------

def sample_addresses(count: int, lookups: int, seed: int = 1) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    hits = [address(rng.randrange(count)) for _ in range(lookups)]
    # Misses: same shape and domains, numbers past the filled range (never stored).
    misses = [address(count + rng.randrange(count)) for _ in range(lookups)]
    return hits, misses


async def measure(store_path: Path, count: int, lookups: int) -> dict:
    from smtp_guard.address_table import AddressTable
    from smtp_guard.addresses import AddressNormalizer, key_hash, parse_mailbox
    from smtp_guard.config import build_config
    from smtp_guard.index import IndexReloader, SuppressionIndex
    from smtp_guard.policy.base import RecipientContext
    from smtp_guard.policy.suppression import SuppressionPolicy
    from smtp_guard.store.sqlite.db import Database
    from smtp_guard.store.sqlite.suppressions import SQLiteSuppressionStore

    config = build_config({"store": {"path": str(store_path)}}, "bench")
    hits, misses = sample_addresses(count, lookups)
    normalizer = AddressNormalizer(config.addresses)

    def context(text: str) -> RecipientContext:
        # What smtp/transaction.py does at RCPT time.
        mailbox = parse_mailbox(text)
        key = normalizer.key(mailbox)
        return RecipientContext(mailbox=mailbox, key=key, key_hash=key_hash(key),
                                domain_chain=tuple(normalizer.domain_chain(mailbox.domain)),
                                sender="from@bench.test", client_ip="127.0.0.1")

    result: dict = {}
    async with Database(store_path) as db:
        store = SQLiteSuppressionStore(db)
        index = SuppressionIndex()
        reloader = IndexReloader(index, store, config.list_priority, config.store.reload_interval)
        gc.collect()
        rss_before = status_kb("VmRSS")
        peak_reset = reset_peak()
        started = time.monotonic()
        await reloader.load()
        result["load_seconds"] = time.monotonic() - started
        peak = status_kb("VmHWM")
        gc.collect()
        rss_after = status_kb("VmRSS")
        table = index._snapshot.addresses  # the table itself, for the payload figure
        result.update({
            "entries_in_index": len(index),
            "rss_before_kb": rss_before, "rss_after_kb": rss_after,
            "rss_growth_bytes": (rss_after - rss_before) * 1024,
            "rss_bytes_per_address": (rss_after - rss_before) * 1024 / max(1, len(index)),
            "peak_growth_bytes": (peak - rss_before) * 1024 if peak_reset else None,
            "table_bytes": AddressTable.size(len(table), table.prefix_bytes, table.list_bits),
        })
        if len(index) != count:
            raise RuntimeError(f"index holds {len(index):,} addresses, expected {count:,}")

        policy = SuppressionPolicy(index, config.lists)
        check = policy.check
        for name, texts, want_hit in (("hits", hits, True), ("misses", misses, False)):
            contexts = [context(text) for text in texts]
            best = None
            for _ in range(3):
                t0 = time.perf_counter()
                found = 0
                for ctx in contexts:
                    if check(ctx) is not None:
                        found += 1
                elapsed = time.perf_counter() - t0
                best = elapsed if best is None else min(best, elapsed)
            if found != (len(contexts) if want_hit else 0):
                raise RuntimeError(f"{name}: {found} of {len(contexts)} found")
            result[f"check_{name}_per_s"] = len(contexts) / best
            # Including the per-recipient work the SMTP front does before asking the policy.
            t0 = time.perf_counter()
            for text in texts:
                check(context(text))
            result[f"normalize_check_{name}_per_s"] = len(texts) / (time.perf_counter() - t0)
            del contexts
    return result


def run_measure_process(store_path: Path, count: int, lookups: int) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--_measure", str(store_path), "--addresses", str(count), "--lookups", str(lookups)],
        stdout=subprocess.PIPE, text=True, check=True, timeout=3600)
    return json.loads(output.stdout)


# --- 4. the peer: postmap ----------------------------------------------------------------------------

def timed_child(command: list[str], stdin=None, stdout=subprocess.DEVNULL,
                ok: tuple[int, ...] = (0,)) -> tuple[float, int, int]:
    """Run a command; (seconds, exit status, max RSS in KiB) of that one process."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode not in ok:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}): {process.stderr.read().decode()}")
    return elapsed, process.returncode, usage.ru_maxrss


def postfix_peer(workdir: Path, keys_file: Path, count: int, lookups: int) -> dict | None:
    postmap = shutil.which("postmap") or "/usr/sbin/postmap"
    if not os.access(postmap, os.X_OK):
        print("postmap not found (apt-get install postfix): no peer figures", file=sys.stderr)
        return None
    types = subprocess.run(["postconf", "-m"], capture_output=True, text=True).stdout.split()
    map_type = "cdb" if "cdb" in types else "hash"
    table = workdir / "suppressions"
    keys_file.rename(table)
    build_seconds, _, build_rss = timed_child([postmap, f"{map_type}:{table}"])
    files = [p for p in workdir.iterdir() if p.name.startswith("suppressions.")]
    result = {"map_type": map_type, "build_seconds": build_seconds, "build_max_rss_kb": build_rss,
              "file_bytes": sum(p.stat().st_size for p in files), "available_types": types}
    hits, misses = sample_addresses(count, lookups)
    # One process start with one key: subtracted below to give the per-lookup rate.
    (workdir / "one").write_text(hits[0] + "\n")
    with open(workdir / "one") as one:
        startup, _, _ = timed_child([postmap, "-q", "-", f"{map_type}:{table}"], stdin=one)
    for name, texts, want in (("hits", hits, len(hits)), ("misses", misses, 0)):
        query = workdir / f"{name}.keys"
        query.write_text("".join(t + "\n" for t in texts))
        answers = workdir / f"{name}.out"
        with open(query) as source, open(answers, "w") as sink:
            seconds, _, rss = timed_child([postmap, "-q", "-", f"{map_type}:{table}"], stdin=source, stdout=sink,
                                          ok=(0, 1))  # postmap -q exits 1 when nothing was found
        found = sum(1 for _ in open(answers))
        if found != want:
            raise RuntimeError(f"postmap -q: {found} of {len(texts)} {name} found, expected {want}")
        result[f"query_{name}_seconds"] = seconds
        result[f"query_{name}_per_s"] = len(texts) / seconds
        result[f"query_{name}_per_s_minus_startup"] = len(texts) / max(1e-9, seconds - startup)
        result[f"query_{name}_max_rss_kb"] = rss
    result["startup_seconds"] = startup
    return result


# --- main --------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--addresses", type=int, default=1_000_000, help="address entries (default 1,000,000)")
    parser.add_argument("--batch", type=int, default=100_000, help="entries per store.add(bulk=True) (default 100,000)")
    parser.add_argument("--lookups", type=int, default=200_000, help="hit and miss lookups each (default 200,000)")
    parser.add_argument("--no-postfix", action="store_true", help="skip the postmap comparison")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (store, map)")
    parser.add_argument("--_measure", metavar="DB", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        print(json.dumps(asyncio.run(measure(Path(args._measure), args.addresses, args.lookups))))
        return 0
    if not (1000 <= args.addresses <= 50_000_000 and 1 <= args.lookups <= 5_000_000):
        parser.error("bounded on purpose: --addresses 1000..50,000,000, --lookups 1..5,000,000")
    args.lookups = min(args.lookups, args.addresses)

    workdir = Path(tempfile.mkdtemp(prefix="smtp-guard-index-"))
    store_path = workdir / "guard.sqlite3"
    keys_file = None if args.no_postfix else workdir / "keys.txt"
    try:
        print(f"temp dir {workdir}", file=sys.stderr)
        filled = asyncio.run(fill(store_path, args.addresses, args.batch, keys_file))
        print("  loading the index in a fresh process ...", file=sys.stderr, flush=True)
        guard = run_measure_process(store_path, args.addresses, args.lookups)
        peer = None
        if keys_file is not None:
            print("  building and querying the Postfix table ...", file=sys.stderr, flush=True)
            peer = postfix_peer(workdir, keys_file, args.addresses, args.lookups)
        print(report(args, filled, guard, peer))
        if args.json:
            Path(args.json).write_text(json.dumps({"addresses": args.addresses, "lookups": args.lookups,
                                                   "cpu": cpu_model(), "code": code_version(), "fill": filled, "guard": guard,
                                                   "postfix": peer}, indent=2))
        return 0
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def report(args, filled: dict, guard: dict, peer: dict | None) -> str:
    n = args.addresses
    lines = [
        f"suppression index at {n:,} addresses — {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"host: {cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, SQLite "
        f"{__import__('sqlite3').sqlite_version}",
        f"smtp-guard code: {code_version()}",
        "",
        f"fill   store.add(bulk=True), {args.batch:,}/batch: {filled['fill_seconds']:.1f}s "
        f"({n / filled['fill_seconds']:,.0f} rows/s; store.add alone {filled['store_add_seconds']:.1f}s), "
        f"SQLite files {human(filled['db_bytes'])}",
        f"load   IndexReloader.load: {guard['load_seconds']:.2f}s ({n / guard['load_seconds']:,.0f} addresses/s)",
        f"memory VmRSS growth once loaded: {human(guard['rss_growth_bytes'])} = "
        f"{guard['rss_bytes_per_address']:.1f} bytes/address (the table alone {guard['table_bytes'] / n:.1f} B/address)"
        + (f"; transient peak during load +{human(guard['peak_growth_bytes'])}"
           if guard.get("peak_growth_bytes") is not None else ""),
        "",
        f"{'lookups/s':44}{'smtp-guard':>12}{'postmap -q':>12}{'guard/postfix':>15}",
    ]
    for kind in ("hits", "misses"):
        g = guard[f"check_{kind}_per_s"]
        gn = guard[f"normalize_check_{kind}_per_s"]
        if peer:
            p = peer[f"query_{kind}_per_s"]
            lines.append(f"{'  ' + kind + ': SuppressionPolicy.check':44}{g:>12,.0f}{p:>12,.0f}{g / p:>14.1f}x")
            lines.append(f"{'  ' + kind + ': normalize + check (RCPT work)':44}{gn:>12,.0f}{p:>12,.0f}{gn / p:>14.1f}x")
        else:
            lines.append(f"{'  ' + kind + ': SuppressionPolicy.check':44}{g:>12,.0f}")
            lines.append(f"{'  ' + kind + ': normalize + check (RCPT work)':44}{gn:>12,.0f}")
    if peer:
        lines += [
            "",
            f"postfix {peer['map_type']}: postmap build {peer['build_seconds']:.1f}s, file {human(peer['file_bytes'])} "
            f"({peer['file_bytes'] / n:.0f} bytes/address, on disk / shared page cache), "
            f"postmap -q max RSS {human(peer['query_hits_max_rss_kb'] * 1024)}; "
            f"process start {peer['startup_seconds'] * 1000:.0f} ms (without it: hits "
            f"{peer['query_hits_per_s_minus_startup']:,.0f}/s, misses {peer['query_misses_per_s_minus_startup']:,.0f}/s)",
            f"(cdb: not offered by this Postfix build; map types: {' '.join(peer['available_types'])})"
            if peer["map_type"] != "cdb" else "",
        ]
    lines += [
        "",
        "What is compared: the guard's lookup is an in-process search of its address table (a 64-bit",
        "key hash's range by its prefix, then one find), timed as Python calls on prebuilt RecipientContexts;",
        "Postfix's is a Berkeley DB (or cdb) file lookup in postmap, timed over one process answering",
        f"{args.lookups:,} keys on stdin (includes its stdin/stdout text I/O, as smtpd's check_*_access",
        "lookups include the map client). Memory: a one-process guard holds its index in its RAM, workers",
        "share one mapped file of it;",
        "Postfix's table lives on disk and in the OS page cache, shared by all its processes.",
    ]
    return "\n".join(line for line in lines if line is not None)


if __name__ == "__main__":
    sys.exit(main())

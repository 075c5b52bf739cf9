"""Snapshot files (index_file.py) and the snapshot that worker processes share (index_share.py),
on real files, a real SQLite store and, for the race, two real processes."""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import multiprocessing
import os
import stat
from array import array
from pathlib import Path
from typing import Any, Callable

import pytest

from smtp_guard.addresses import key_hash
from smtp_guard.address_table import AddressTable
from smtp_guard.index import IndexReloader, SuppressionIndex
from smtp_guard.index_file import SnapshotFileError, map_snapshot, read_header, write_snapshot
from smtp_guard.index_share import SNAPSHOT_NAME, SharedSnapshots
from smtp_guard.store.base import StoreFull
from smtp_guard.suppression_model import DomainRule, SuppressionDelta, SuppressionEntry, SuppressionSnapshot
from smtp_guard.store.sqlite.db import Database
from smtp_guard.store.sqlite.suppressions import SQLiteSuppressionStore

PRIORITY = ("complained", "unsubscribed", "bounced")
NOW = 1_700_000_000.0
DOMAINS = {"example.org": DomainRule("complained", True), "example.net": DomainRule("bounced", False)}


def array_snapshot(count: int, seq: int = 7, next_expiry: float | None = NOW + 60,
                   first: int = 0) -> SuppressionSnapshot:
    """A snapshot as the store builds it, from sorted unique hashes and parallel list numbers."""
    pairs = sorted((key_hash(f"user{i}@example.com"), i % len(PRIORITY)) for i in range(first, first + count))
    addresses = AddressTable.build(array("q", [h for h, _ in pairs]), array("B", [n for _, n in pairs]))
    return SuppressionSnapshot(addresses, PRIORITY, dict(DOMAINS), seq=seq, next_expiry=next_expiry)


def hashes(snapshot: SuppressionSnapshot) -> list[int]:
    return [key for key, _ in snapshot.addresses]


def probes(snapshot: SuppressionSnapshot) -> list[int]:
    """Every stored hash, its neighbours on both sides, and hashes never stored."""
    stored = hashes(snapshot)
    return [*stored, *(h + 1 for h in stored), *(h - 1 for h in stored),
            *(key_hash(f"other{i}@example.com") for i in range(500))]


# --- the file format -------------------------------------------------------------------------------


def test_round_trip_answers_every_lookup_as_the_arrays_do(tmp_path: Path) -> None:
    original = array_snapshot(2000)
    path = tmp_path / "index.snapshot"
    size = write_snapshot(original, path, list_priority=PRIORITY, built_at=NOW)
    mapped = map_snapshot(path)

    header = read_header(path)
    # 1 KiB of offsets (one-byte prefixes below 131,072 addresses), then 7 bytes an address and
    # its list number in 2 bits (three lists)
    assert size == path.stat().st_size == header.data_offset + 4 * 257 + 7 * 2000 + 2000 // 4
    assert (mapped.seq, mapped.next_expiry, mapped.list_names, mapped.domains) == (
        7, NOW + 60, PRIORITY, DOMAINS)
    assert list(mapped.addresses) == list(original.addresses)
    from_file, from_arrays = SuppressionIndex(mapped), SuppressionIndex(original)
    answers = [(from_file.lookup_address(h), from_arrays.lookup_address(h)) for h in probes(original)]
    assert all(a == b for a, b in answers) and sum(a is not None for a, _ in answers) == 2000
    assert from_file.lookup_domain(["www.example.org", "example.org"]) == "complained"
    assert from_file.lookup_domain(["www.example.net", "example.net"]) is None
    assert (header.list_priority, header.built_at, header.count, header.data_offset % 8) == (PRIORITY, NOW, 2000, 0)


def test_empty_snapshot_round_trips(tmp_path: Path) -> None:
    empty = SuppressionSnapshot(AddressTable.empty(), (), {}, seq=0, next_expiry=None)
    write_snapshot(empty, tmp_path / "empty.snapshot")
    mapped = map_snapshot(tmp_path / "empty.snapshot")
    assert len(mapped.addresses) == 0 and mapped.seq == 0 and mapped.next_expiry is None
    assert SuppressionIndex(mapped).lookup_address(key_hash("a@example.com")) is None


def test_changes_applied_over_a_mapped_snapshot_move_its_attributes_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "index.snapshot"
    write_snapshot(array_snapshot(10, seq=7, next_expiry=NOW + 60), path)
    index = SuppressionIndex(map_snapshot(path))
    index.apply(SuppressionDelta(seq=9, addresses={key_hash("new@example.com"): "bounced"}, next_expiry=NOW + 5))
    assert (index.seq, index.next_expiry) == (9, NOW + 5)
    assert index.lookup_address(key_hash("new@example.com")) == "bounced"
    assert (read_header(path).seq, read_header(path).next_expiry) == (7, NOW + 60)


def test_file_is_private_and_no_temp_file_stays(tmp_path: Path) -> None:
    write_snapshot(array_snapshot(10), tmp_path / "index.snapshot")
    assert stat.S_IMODE((tmp_path / "index.snapshot").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["index.snapshot"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "index.snapshot"
    write_snapshot(array_snapshot(10, seq=1), path)

    def full_disk(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_snapshot(array_snapshot(20, seq=2), path)
    monkeypatch.undo()
    assert map_snapshot(path).seq == 1 and len(map_snapshot(path).addresses) == 10
    assert [p.name for p in tmp_path.iterdir()] == ["index.snapshot"]


def _flip(offset: int) -> Callable[[bytes], bytes]:
    def flip(data: bytes) -> bytes:
        at = offset if offset >= 0 else len(data) + offset
        return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]
    return flip


DAMAGE: dict[str, tuple[Callable[[bytes], bytes], str, bool]] = {
    # name: (what is done to a good file, what the error says, whether read_header sees it too)
    "empty": (lambda data: b"", "shorter than the 24-byte prefix (truncated)", True),
    "cut in the prefix": (lambda data: data[:10], "shorter than the 24-byte prefix (truncated)", True),
    "cut in the header": (lambda data: data[:40], "header (truncated)", True),
    "cut in the arrays": (lambda data: data[:-1], "truncated or damaged", True),
    "bytes appended": (lambda data: data + b"\0", "truncated or damaged", True),
    "another file": (lambda data: b"SQLite format 3\0" + data[16:], "not a suppression snapshot file", True),
    "newer format": (lambda data: data[:8] + (3).to_bytes(4, "little") + data[12:], "format version 3", True),
    "older format (plain arrays)": (lambda data: data[:8] + (1).to_bytes(4, "little") + data[12:], "format version 1",
                                    True),
    "garbled header": (lambda data: data[:24] + b"!" + data[25:], "unreadable header", True),
    "a bit flipped in a hash": (_flip(-1000), "CRC-32 mismatch", False),
    "a bit flipped in a list number": (_flip(-1), "CRC-32 mismatch", False),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_file_is_refused_naming_it(tmp_path: Path, damage: str) -> None:
    mutate, problem, header_shows_it = DAMAGE[damage]
    path = tmp_path / "index.snapshot"
    write_snapshot(array_snapshot(500), path)
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(SnapshotFileError) as refused:
        map_snapshot(path)
    assert str(refused.value).startswith(f"suppression snapshot file {path}: ")
    assert problem in str(refused.value) and refused.value.path == path
    if header_shows_it:
        with pytest.raises(SnapshotFileError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            read_header(path)


def test_a_reader_keeps_its_map_when_the_file_is_replaced_and_unlinked(tmp_path: Path) -> None:
    path = tmp_path / "index.snapshot"
    old = array_snapshot(1000, seq=1)
    write_snapshot(old, path)
    reader = SuppressionIndex(map_snapshot(path))
    new = array_snapshot(1000, seq=2, first=5000)
    write_snapshot(new, path)  # renamed over the mapped file

    expected = SuppressionIndex(old)
    assert all(reader.lookup_address(h) == expected.lookup_address(h) for h in probes(old))
    assert reader.seq == 1 and reader.lookup_address(hashes(new)[0]) is None
    swapped = SuppressionIndex(map_snapshot(path))
    assert swapped.seq == 2 and swapped.lookup_address(hashes(new)[0]) is not None
    path.unlink()
    assert all(reader.lookup_address(h) == expected.lookup_address(h) for h in hashes(old))


# --- SharedSnapshots on a real store ---------------------------------------------------------------


def address(value: str, list_name: str = "unsubscribed", **fields: Any) -> SuppressionEntry:
    return SuppressionEntry("address", value, list_name, created_at=NOW, **fields)


@pytest.fixture
def store(db: Database) -> SQLiteSuppressionStore:
    return SQLiteSuppressionStore(db, clock=lambda: NOW)


async def test_the_first_get_builds_the_next_maps_the_same_file(store: SQLiteSuppressionStore, tmp_path: Path) -> None:
    await store.add([address(f"user{i}@example.com") for i in range(100)], bulk=True)
    first, second = SharedSnapshots(tmp_path / "index", store), SharedSnapshots(tmp_path / "index", store)
    built = await first.get(PRIORITY, NOW)
    mapped = await second.get(PRIORITY, NOW)
    assert (first.builds, first.maps, second.builds, second.maps) == (1, 0, 0, 1)
    assert list(mapped.addresses) == list(built.addresses) and mapped.seq == built.seq == await store.current_seq()
    assert SuppressionIndex(mapped).lookup_address(key_hash("user7@example.com")) == "unsubscribed"
    assert stat.S_IMODE((tmp_path / "index").stat().st_mode) == 0o700
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["suppressions.lock", SNAPSHOT_NAME]


async def test_a_few_changes_reuse_the_file_a_bulk_import_replaces_it(store: SQLiteSuppressionStore,
                                                                      tmp_path: Path) -> None:
    shared = SharedSnapshots(tmp_path / "index", store)
    await store.add([address("a@example.com")], bulk=True)
    await shared.get(PRIORITY, NOW)
    await store.add([address("b@example.com", "bounced")])  # one logged change: the reloader applies it
    assert (await shared.get(PRIORITY, NOW)).seq < await store.current_seq()
    assert (shared.builds, shared.maps) == (1, 1)
    await store.add([address("c@example.com")], bulk=True)  # a full-reload marker: the file is too old
    rebuilt = await shared.get(PRIORITY, NOW)
    assert (shared.builds, rebuilt.seq) == (2, await store.current_seq())
    assert SuppressionIndex(rebuilt).lookup_address(key_hash("c@example.com")) == "unsubscribed"


async def test_a_file_past_its_next_expiry_is_rebuilt(store: SQLiteSuppressionStore, tmp_path: Path) -> None:
    shared = SharedSnapshots(tmp_path / "index", store)
    await store.add([address("a@example.com", expires_at=NOW + 50), address("b@example.com")])
    assert (await shared.get(PRIORITY, NOW)).next_expiry == NOW + 50
    await shared.get(PRIORITY, NOW + 49)
    assert (shared.builds, shared.maps) == (1, 1)
    later = await shared.get(PRIORITY, NOW + 50)
    assert shared.builds == 2 and later.next_expiry is None
    assert SuppressionIndex(later).lookup_address(key_hash("a@example.com")) is None


async def test_another_priority_or_a_later_position_needs_another_file(store: SQLiteSuppressionStore,
                                                                       tmp_path: Path) -> None:
    shared = SharedSnapshots(tmp_path / "index", store)
    await store.add([address("a@example.com", "bounced"), address("a@example.com", "complained")])
    assert SuppressionIndex(await shared.get(PRIORITY, NOW)).lookup_address(key_hash("a@example.com")) == "complained"
    reordered = await shared.get(("bounced", "complained"), NOW)
    assert shared.builds == 2 and SuppressionIndex(reordered).lookup_address(key_hash("a@example.com")) == "bounced"
    await store.add([address("b@example.com")])
    await shared.get(("bounced", "complained"), NOW, at_least=await store.current_seq())
    assert shared.builds == 3 and shared.maps == 0


async def test_a_file_ahead_of_the_store_is_not_used(tmp_path: Path) -> None:
    """A store restored from a backup is behind the file built from the store it replaced."""
    async with Database(tmp_path / "live.sqlite3") as live, Database(tmp_path / "backup.sqlite3") as backup:
        live_store, backup_store = SQLiteSuppressionStore(live), SQLiteSuppressionStore(backup)
        await backup_store.add([address("old@example.com")])
        await live_store.add([address("old@example.com"), address("new@example.com")])
        await live_store.add([address("newer@example.com")])
        await SharedSnapshots(tmp_path / "index", live_store).get(PRIORITY, NOW)
        restored = SharedSnapshots(tmp_path / "index", backup_store)
        snapshot = await restored.get(PRIORITY, NOW)
        assert restored.builds == 1 and len(snapshot.addresses) == 1


async def test_a_damaged_file_is_logged_and_replaced(store: SQLiteSuppressionStore, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    shared = SharedSnapshots(tmp_path / "index", store)
    await store.add([address(f"user{i}@example.com") for i in range(50)])
    await shared.get(PRIORITY, NOW)
    data = bytearray(shared.path.read_bytes())
    data[-3] ^= 0xFF
    shared.path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="smtp_guard.index_share"):
        snapshot = await shared.get(PRIORITY, NOW)
    assert shared.builds == 2
    assert f"suppression snapshot file {shared.path}: CRC-32 mismatch" in caplog.text
    assert all(SuppressionIndex(snapshot).lookup_address(key_hash(f"user{i}@example.com")) for i in range(50))


async def test_a_full_disk_is_a_store_error_naming_the_directory(store: SQLiteSuppressionStore, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    shared = SharedSnapshots(tmp_path / "index", store)
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(StoreFull, match=f"shared suppression index in {tmp_path / 'index'}: .*No space left"):
        await shared.get(PRIORITY, NOW)
    assert shared.builds == 0 and not shared.path.exists()


async def test_reloaders_of_two_workers_share_one_build_and_follow_the_store(store: SQLiteSuppressionStore,
                                                                            tmp_path: Path) -> None:
    await store.add([address("a@example.com", "complained")], bulk=True)
    shared_one, shared_two = SharedSnapshots(tmp_path / "index", store), SharedSnapshots(tmp_path / "index", store)
    one, two = SuppressionIndex(), SuppressionIndex()
    reloader_one = IndexReloader(one, store, PRIORITY, interval=60, clock=lambda: NOW, snapshots=shared_one)
    reloader_two = IndexReloader(two, store, PRIORITY, interval=60, clock=lambda: NOW, snapshots=shared_two)
    await reloader_one.load()
    await store.add([address("b@example.com", "bounced")])  # after the build: applied at load, not rebuilt
    await reloader_two.load()
    assert (shared_one.builds, shared_two.builds, shared_two.maps) == (1, 0, 1)
    assert two.lookup_address(key_hash("b@example.com")) == "bounced" and two.seq == await store.current_seq()

    await store.remove("address", "a@example.com")
    await reloader_one.refresh()
    await reloader_two.refresh()
    for index in (one, two):
        assert index.lookup_address(key_hash("a@example.com")) is None
        assert index.lookup_address(key_hash("b@example.com")) == "bounced"
    await store.add([address(f"bulk{i}@example.com") for i in range(3)], bulk=True)
    await reloader_one.refresh()
    await reloader_two.refresh()
    assert (shared_one.builds + shared_two.builds, shared_one.maps + shared_two.maps) == (2, 2)
    for index in (one, two):
        assert index.overlay_size == 0 and index.lookup_address(key_hash("bulk2@example.com")) == "unsubscribed"


async def test_a_full_reload_for_too_many_changes_asks_for_a_newer_file(store: SQLiteSuppressionStore, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Overlay overflow: the file this worker already maps would give the same overlay back."""
    import smtp_guard.index as index_module

    monkeypatch.setattr(index_module, "MAX_OVERLAY", 2)
    shared = SharedSnapshots(tmp_path / "index", store)
    index = SuppressionIndex()
    reloader = IndexReloader(index, store, PRIORITY, interval=60, clock=lambda: NOW, snapshots=shared)
    await reloader.load()
    await store.add([address(f"user{i}@example.com") for i in range(3)])
    await reloader.refresh()
    assert shared.builds == 2 and index.overlay_size == 0 and len(index) == 3


# --- two processes at once ---------------------------------------------------------------------------


def _mapped_inode(path: Path) -> int | None:
    """The inode this process maps ``path`` from, read from /proc/self/maps."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].removesuffix(" (deleted)") == str(path):
            return int(fields[4])
    return None


def _worker(store_path: str, directory: str, start: Any, results: Any) -> None:
    """One worker process: open the store, wait for the other, ask for the snapshot."""
    async def run() -> dict[str, Any]:
        async with Database(store_path) as db:
            shared = SharedSnapshots(directory, SQLiteSuppressionStore(db))
            await asyncio.to_thread(start.wait)
            snapshot = await shared.get(PRIORITY, NOW)
            found = sum(SuppressionIndex(snapshot).lookup_address(key_hash(f"user{i}@example.com")) is not None
                        for i in range(0, 20_000, 7))
            return {"pid": os.getpid(), "builds": shared.builds, "maps": shared.maps, "found": found,
                    "inode": _mapped_inode(Path(directory) / SNAPSHOT_NAME), "seq": snapshot.seq}
    try:
        results.put(asyncio.run(run()))
    except BaseException as error:
        results.put({"error": repr(error)})
        raise


async def test_two_processes_asking_at_once_build_once_and_map_the_same_file(store: SQLiteSuppressionStore,
                                                                            db: Database, tmp_path: Path) -> None:
    await store.add([address(f"user{i}@example.com") for i in range(20_000)], bulk=True)
    directory = tmp_path / "index"
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_worker, args=(str(db.path), str(directory), start, results))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        reports = [await asyncio.to_thread(results.get, timeout=120) for _ in workers]
    finally:
        for worker in workers:
            await asyncio.to_thread(worker.join, 30)
    assert [r.get("error") for r in reports] == [None, None]
    assert sorted((r["builds"], r["maps"]) for r in reports) == [(0, 1), (1, 0)]
    file_inode = (directory / SNAPSHOT_NAME).stat().st_ino
    assert [r["inode"] for r in reports] == [file_inode, file_inode]
    assert [r["found"] for r in reports] == [len(range(0, 20_000, 7))] * 2
    assert {r["seq"] for r in reports} == {await store.current_seq()}
    assert [w.exitcode for w in workers] == [0, 0]

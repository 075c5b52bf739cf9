"""The suppression store on a real database (SQLite file, or PostgreSQL in that run): upserts, change
log, snapshot, expiry, purge."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from pathlib import Path
from typing import AsyncIterator

import pytest

from smtp_guard.addresses import key_hash
from smtp_guard.index import IndexReloader, SuppressionIndex
from smtp_guard.store.base import StoreError
from smtp_guard.store.postgres import suppressions as postgres_suppressions
from smtp_guard.store.sqlite import suppressions as sqlite_suppressions
from smtp_guard.store.sqlite.db import Database
from smtp_guard.store.sqlite.suppressions import SQLiteSuppressionStore
from smtp_guard.suppression_model import SuppressionStore
from smtp_guard.suppression_model import DomainRule, SuppressionEntry, SuppressionFilter

from conftest import EngineStore, ManualClock, open_engine_store, sqlite_only

PRIORITY = ("complained", "unsubscribed", "invalid", "bounced", "manual")
NOW = 1_700_000_000.0


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[EngineStore]:
    async with open_engine_store(tmp_path / "guard.sqlite3", clock=ManualClock(NOW)) as engine:
        yield engine


@pytest.fixture
def store(db: EngineStore) -> SuppressionStore:
    return db.suppressions  # type: ignore[no-any-return]


def set_max_delta(monkeypatch: pytest.MonkeyPatch, value: int) -> None:
    for module in (sqlite_suppressions, postgres_suppressions):
        monkeypatch.setattr(module, "MAX_DELTA", value)


def address(value: str, list_name: str = "unsubscribed", **fields: object) -> SuppressionEntry:
    return SuppressionEntry("address", value, list_name, **{"created_at": NOW, **fields})  # type: ignore[arg-type]


def domain(value: str, list_name: str = "unsubscribed", **fields: object) -> SuppressionEntry:
    return SuppressionEntry("domain", value, list_name, **{"created_at": NOW, **fields})  # type: ignore[arg-type]


async def changes(db: EngineStore) -> list[tuple[int | None, str | None]]:
    return [(row[0], row[1]) for row in await db.rows("SELECT key_hash, domain FROM suppression_changes ORDER BY seq")]


async def entries(store: SuppressionStore, **filters: object) -> list[SuppressionEntry]:
    return [e async for e in store.query(SuppressionFilter(**filters), NOW)]  # type: ignore[arg-type]


# --- add / remove ---------------------------------------------------------------------------------


async def test_add_counts_new_entries_and_logs_one_change_per_key(store, db) -> None:
    assert await store.add([address("a@example.com"), domain("example.org")]) == 2
    assert await changes(db) == [(key_hash("a@example.com"), None), (None, "example.org")]
    stored = await entries(store)
    assert [(e.kind, e.value, e.list_name) for e in stored] == [
        ("address", "a@example.com", "unsubscribed"), ("domain", "example.org", "unsubscribed")]


async def test_upsert_updates_details_but_keeps_created_at(store, db) -> None:
    await store.add([address("a@example.com", reason="first", created_at=NOW - 100)])
    assert await store.add([address("a@example.com", reason="second", source="api", created_at=NOW,
                                    expires_at=NOW + 50)]) == 0
    (entry,) = await entries(store)
    assert (entry.reason, entry.source, entry.created_at, entry.expires_at) == ("second", "api", NOW - 100, NOW + 50)
    assert len(await changes(db)) == 2


async def test_adding_the_same_entry_again_logs_nothing(store, db) -> None:
    await store.add([address("a@example.com", reason="r")])
    assert await store.add([address("a@example.com", reason="r")]) == 0
    assert len(await changes(db)) == 1


async def test_same_value_on_two_lists_is_two_entries(store) -> None:
    assert await store.add([address("a@example.com", "bounced"), address("a@example.com", "complained")]) == 2
    assert {e.list_name for e in await entries(store)} == {"bounced", "complained"}


async def test_zero_created_at_is_stamped_with_the_clock(store) -> None:
    await store.add([SuppressionEntry("address", "a@example.com", "manual")])
    (entry,) = await entries(store)
    assert entry.created_at == NOW


async def test_bulk_add_writes_one_reload_marker_and_nothing_when_unchanged(store, db) -> None:
    batch = [address(f"user{i}@example.com") for i in range(100)]
    assert await store.add(batch, bulk=True) == 100
    assert await changes(db) == [(None, None)]
    assert await store.add(batch, bulk=True) == 0
    assert await changes(db) == [(None, None)]
    more = batch[:10] + [address("new@example.com")]
    assert await store.add(more, bulk=True) == 1
    assert await changes(db) == [(None, None), (None, None)]


async def test_remove_from_one_list_or_every_list(store, db) -> None:
    await store.add([address("a@example.com", "bounced"), address("a@example.com", "complained"),
                     domain("example.org")])
    before = len(await changes(db))
    assert await store.remove("address", "a@example.com", "bounced") == 1
    assert [e.list_name for e in await entries(store, kind="address")] == ["complained"]
    assert await store.remove("address", "a@example.com") == 1
    assert await store.remove("address", "a@example.com") == 0
    assert await store.remove("domain", "example.org") == 1
    assert (await changes(db))[before:] == [(key_hash("a@example.com"), None)] * 2 + [(None, "example.org")]


# --- reads ----------------------------------------------------------------------------------------


async def test_find_matches_by_key_hash_and_domain_chain_and_skips_expired(store) -> None:
    await store.add([address("a@example.com", "complained"), address("a@example.com", "bounced", expires_at=NOW - 1),
                     domain("example.com", "manual"), domain("other.com"), address("b@example.com")])
    found = await store.find("a@example.com", ["mail.example.com", "example.com"], NOW)
    assert [(e.kind, e.value, e.list_name) for e in found] == [
        ("address", "a@example.com", "complained"), ("domain", "example.com", "manual")]
    assert await store.find(None, [], NOW) == []


async def test_query_filters_and_orders_oldest_first(store) -> None:
    await store.add([
        address("new_user@example.com", "bounced", source="sendgrid", created_at=NOW - 10),
        address("old@example.com", "complained", source="cli", created_at=NOW - 20),
        address("gone@example.com", "bounced", created_at=NOW - 30, expires_at=NOW - 1),
        domain("example.net", "manual", created_at=NOW - 5),
    ])
    assert [e.value for e in await entries(store)] == ["old@example.com", "new_user@example.com", "example.net"]
    assert [e.value for e in await entries(store, include_expired=True)][0] == "gone@example.com"
    assert [e.value for e in await entries(store, list_name="bounced")] == ["new_user@example.com"]
    assert [e.value for e in await entries(store, kind="domain")] == ["example.net"]
    assert [e.value for e in await entries(store, source="cli")] == ["old@example.com"]
    # "_" is a literal, not LIKE's any-character wildcard; matching ignores case.
    assert [e.value for e in await entries(store, contains="W_U")] == ["new_user@example.com"]
    assert [e.value for e in await entries(store, contains="w_x")] == []
    limited = [e async for e in store.query(SuppressionFilter(), NOW, limit=1)]
    assert [e.value for e in limited] == ["old@example.com"]


async def test_pages_follow_storage_order_without_repeats_or_gaps_while_entries_change(store) -> None:
    await store.add([address(f"u{i}@example.com", created_at=NOW - i) for i in range(5)])
    await store.add([address("gone@example.com", expires_at=NOW - 1)])
    first = await store.page(SuppressionFilter(), NOW, 2)
    assert [e.value for e in first.entries] == ["u0@example.com", "u1@example.com"] and first.next is not None
    # Removing a listed entry and adding a new one do not shift the pages that follow.
    await store.remove("address", "u0@example.com")
    await store.add([address("late@example.com", created_at=NOW - 100)])
    second = await store.page(SuppressionFilter(), NOW, 2, after=first.next)
    assert [e.value for e in second.entries] == ["u2@example.com", "u3@example.com"]
    last = await store.page(SuppressionFilter(), NOW, 2, after=second.next)
    assert [e.value for e in last.entries] == ["u4@example.com", "late@example.com"] and last.next is None
    expired = await store.page(SuppressionFilter(include_expired=True, contains="gone"), NOW, 10)
    assert [e.value for e in expired.entries] == ["gone@example.com"] and expired.next is None


async def test_count_by_list_counts_live_entries(store) -> None:
    await store.add([address("a@example.com", "bounced"), address("b@example.com", "bounced", expires_at=NOW - 1),
                     domain("example.org", "complained")])
    assert await store.count_by_list(NOW) == {"bounced": 1, "complained": 1}


async def test_next_expiry_is_that_of_the_first_entry_still_live(store) -> None:
    assert await store.next_expiry(NOW) is None
    await store.add([address("a@example.com", expires_at=NOW - 1), address("b@example.com"),
                     address("c@example.com", expires_at=NOW + 20), domain("example.org", "complained", expires_at=NOW + 10)])
    assert await store.next_expiry(NOW) == NOW + 10
    assert await store.next_expiry(NOW + 10) == NOW + 20
    assert await store.next_expiry(NOW + 20) is None


# --- snapshot and change log ----------------------------------------------------------------------


async def test_snapshot_keeps_the_highest_priority_list_per_address(store) -> None:
    await store.add([
        address("a@example.com", "bounced"), address("a@example.com", "complained"),
        address("b@example.com", "legacy"), address("b@example.com", "archive"),
        address("c@example.com", "manual"), address("d@example.com", "unsubscribed", expires_at=NOW - 1),
        address("e@example.com", "bounced", expires_at=NOW + 500), address("f@example.com", "bounced", expires_at=NOW + 90),
    ])
    snap = await store.load_snapshot(PRIORITY, NOW)
    assert snap.list_names == (*PRIORITY, "archive", "legacy")
    index = SuppressionIndex(snap)
    assert index.lookup_address(key_hash("a@example.com")) == "complained"
    assert index.lookup_address(key_hash("b@example.com")) == "archive"  # unconfigured lists: by name
    assert index.lookup_address(key_hash("c@example.com")) == "manual"
    assert index.lookup_address(key_hash("d@example.com")) is None  # expired
    assert len(snap.addresses) == 5 == len({key for key, _ in snap.addresses})
    assert snap.next_expiry == NOW + 90


@sqlite_only
async def test_snapshot_read_in_parallel_parts_equals_one_read(store, monkeypatch) -> None:
    """Past PARALLEL_FROM rows the SQLite store reads the snapshot's addresses in several
    processes, one hash range each: the arrays are the same as one read, hash ranges' edges
    included (rows with hashes at the ends of the int64 range and at the parts' boundaries)."""
    from smtp_guard.store.sqlite import snapshot_addresses

    entries = [address(f"user{i}@example.com", PRIORITY[i % len(PRIORITY)]) for i in range(3000)]
    entries += [address(f"user{i}@example.com", "complained") for i in range(0, 3000, 7)]  # on two lists
    entries += [address(f"gone{i}@example.com", "bounced", expires_at=NOW - 1) for i in range(50)]
    await store.add(entries)
    edges = [-(2 ** 63), -(2 ** 63) + 1, -1, 0, 1, 2 ** 62, 2 ** 63 - 1]
    edges += [low for low, _ in snapshot_addresses._ranges(3)] + [low - 1 for low, _ in snapshot_addresses._ranges(3)[1:]]
    path = store._db.path
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.executemany(
            "INSERT INTO suppressions (kind, value, key_hash, list_name, reason, source, created_at, expires_at, "
            "include_subdomains) VALUES ('address', ?, ?, 'manual', '', 'test', ?, NULL, 0)",
            [(f"edge{n}@example.com", edge, NOW) for n, edge in enumerate(sorted(set(edges)))])
    one = await store.load_snapshot(PRIORITY, NOW)
    # What a process killed while loading left behind goes; a running one's directory stays.
    gone = Path(path).parent / f".snapshot-parts-{_dead_pid()}-abc"
    kept = Path(path).parent / f".snapshot-parts-{os.getpid()}-def"
    for directory in (gone, kept):
        directory.mkdir()
        (directory / "part0").write_bytes(b"\0" * 9)
    monkeypatch.setattr(snapshot_addresses, "PARALLEL_FROM", 0)
    monkeypatch.setattr(snapshot_addresses, "_cores", lambda: 3)
    parts = await store.load_snapshot(PRIORITY, NOW)
    assert snapshot_addresses._parts(path, 5.0) == 3
    assert list(parts.addresses) == list(one.addresses)
    keys = [key for key, _ in one.addresses]
    assert len(set(keys)) == len(keys) == 3000 + len(set(edges)) and set(edges) <= set(keys)
    assert SuppressionIndex(parts).lookup_address(key_hash("user0@example.com")) == "complained"
    assert parts.seq == one.seq
    assert not gone.exists() and kept.exists()
    assert [p.name for p in Path(path).parent.glob(".snapshot-parts-*")] == [kept.name]


@sqlite_only
async def test_a_failing_snapshot_part_raises_its_own_error(store, tmp_path: Path) -> None:
    """A part process reports SQLite and OS errors as themselves (a locked or full store is told
    apart from other failures), and anything else with its last line of stderr."""
    from smtp_guard.store.sqlite import snapshot_addresses as parts
    from smtp_guard.store.sqlite.db import store_error

    job = (str(store._db.path), PRIORITY, NOW, 5.0, -(2 ** 63), 2 ** 63)
    with pytest.raises(sqlite3.OperationalError) as cannot_open:
        parts._finished(parts._start_part((str(tmp_path), *job[1:]), str(tmp_path / "part0")))
    assert getattr(cannot_open.value, "sqlite_errorname") == "SQLITE_CANTOPEN"
    assert "unable to open" in str(store_error(cannot_open.value))
    with pytest.raises(FileNotFoundError):
        parts._finished(parts._start_part(job, str(tmp_path / "missing" / "part0")))
    with pytest.raises(RuntimeError, match="a snapshot part process failed: .*TypeError"):
        parts._finished(parts._start_part(job[:3], str(tmp_path / "part0")))  # too few arguments


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


async def test_snapshot_domains_and_seq(store, db) -> None:
    await store.add([domain("example.org", "manual", include_subdomains=True), domain("example.org", "complained")])
    await store.add([domain("example.net", "bounced", expires_at=NOW - 1)])
    snap = await store.load_snapshot(PRIORITY, NOW)
    assert snap.domains == {"example.org": DomainRule("complained", False)}
    ((latest,),) = await db.rows("SELECT MAX(seq) FROM suppression_changes")
    assert snap.seq == latest and snap.next_expiry is None


async def test_empty_store_gives_an_empty_snapshot(store) -> None:
    snap = await store.load_snapshot(PRIORITY, NOW)
    assert len(snap.addresses) == 0 and snap.domains == {} and snap.seq == 0 and snap.list_names == PRIORITY


async def test_changes_since_resolves_each_key_to_its_current_list(store) -> None:
    seq = (await store.load_snapshot(PRIORITY, NOW)).seq
    await store.add([address("a@example.com", "bounced"), address("a@example.com", "unsubscribed"),
                     address("b@example.com", "manual"), domain("example.org", "bounced", include_subdomains=True)])
    await store.remove("address", "b@example.com")
    await store.add([address("c@example.com", "bounced", expires_at=NOW - 1)])
    delta = await store.changes_since(seq, PRIORITY, NOW)
    assert not delta.full_reload
    assert dict(delta.addresses) == {key_hash("a@example.com"): "unsubscribed", key_hash("b@example.com"): None,
                                     key_hash("c@example.com"): None}
    assert dict(delta.domains) == {"example.org": DomainRule("bounced", True)}
    nothing = await store.changes_since(delta.seq, PRIORITY, NOW)
    assert nothing.seq == delta.seq and not nothing.addresses and not nothing.full_reload


async def test_changes_since_asks_for_a_full_reload_after_a_bulk_write(store) -> None:
    await store.add([address("a@example.com")])
    await store.add([address("b@example.com")], bulk=True)
    delta = await store.changes_since(0, PRIORITY, NOW)
    assert delta.full_reload and delta.seq == 2


async def test_changes_since_asks_for_a_full_reload_when_too_much_changed(store, monkeypatch) -> None:
    set_max_delta(monkeypatch, 3)
    await store.add([address(f"user{i}@example.com") for i in range(4)])
    assert (await store.changes_since(0, PRIORITY, NOW)).full_reload
    assert not (await store.changes_since(1, PRIORITY, NOW)).full_reload


async def test_changes_since_a_position_the_store_never_reached_means_reload(store) -> None:
    await store.add([address("a@example.com")])
    assert (await store.changes_since(50, PRIORITY, NOW)).full_reload


async def test_reloader_follows_the_store(store) -> None:
    index = SuppressionIndex()
    reloader = IndexReloader(index, store, PRIORITY, interval=60, clock=lambda: NOW)
    await store.add([address("a@example.com", "complained")])
    await reloader.load()
    await store.add([address("b@example.com", "bounced")])
    await store.remove("address", "a@example.com")
    await reloader.refresh()
    assert index.lookup_address(key_hash("a@example.com")) is None
    assert index.lookup_address(key_hash("b@example.com")) == "bounced"
    await store.add([address(f"bulk{i}@example.com") for i in range(3)], bulk=True)
    await reloader.refresh()
    assert index.overlay_size == 0 and index.lookup_address(key_hash("bulk2@example.com")) == "unsubscribed"


# --- expiry ---------------------------------------------------------------------------------------


async def test_purge_expired_deletes_and_logs(store, db) -> None:
    await store.add([address("a@example.com", "bounced", expires_at=NOW - 1), domain("example.org", "bounced", expires_at=NOW),
                     address("b@example.com", "bounced", expires_at=NOW + 1)])
    before = len(await changes(db))
    assert await store.purge_expired(NOW) == 2
    assert [e.value for e in await entries(store, include_expired=True)] == ["b@example.com"]
    assert (await changes(db))[before:] == [(key_hash("a@example.com"), None), (None, "example.org")]
    assert await store.purge_expired(NOW) == 0


async def test_purge_of_many_entries_logs_one_reload_marker(store, db, monkeypatch) -> None:
    set_max_delta(monkeypatch, 2)
    await store.add([address(f"u{i}@example.com", "bounced", expires_at=NOW - 1) for i in range(3)], bulk=True)
    assert await store.purge_expired(NOW) == 3
    assert (await changes(db))[-1] == (None, None)


# --- failures -------------------------------------------------------------------------------------


@sqlite_only
async def test_sqlite_errors_become_store_errors(tmp_path: Path) -> None:
    database = Database(tmp_path / "guard.sqlite3")
    store = SQLiteSuppressionStore(database)
    with pytest.raises(StoreError):
        await store.add([address("a@example.com")])
    with pytest.raises(StoreError):
        await store.load_snapshot(PRIORITY, NOW)
    async with database:
        await database.execute("DROP TABLE suppressions")
        with pytest.raises(StoreError):
            [e async for e in store.query(SuppressionFilter(), NOW)]
        with pytest.raises(StoreError):
            await store.load_snapshot(PRIORITY, NOW)

"""The store under faults, on real SQLite files and over real loopback SMTP.

* ``database is locked`` (issue 7, observation 10): a read of one coroutine in flight on the
  shared connection must never make another coroutine's write fail at once while a second
  process writes; the write waits for it, as ``busy_timeout`` promises.
* Store locked by another process: mail that must be held gets 451 4.3.0 within
  ``[store] busy_timeout``, nothing is acknowledged that is not stored, and the next message
  after the lock is released is held, without a restart.
* Disk full (a small tmpfs as the data directory): 452 4.3.1, nothing stored, recovery when
  space returns; the sandbox upstream answers the same.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Sequence

import pytest

from smtp_guard import replies
from smtp_guard.app import Guard
from smtp_guard.audit_model import AuditFilter, AuditRecord
from smtp_guard.breaker.model import BreakerRecord
from smtp_guard.breaker.state import BreakerState
from smtp_guard.breaker.sync import BreakerSync
from smtp_guard.config import BreakerConfig
from smtp_guard.hold.model import HeldRecipient, NewHold
from smtp_guard.metrics import Metrics
from smtp_guard.relay.sandbox import SandboxUpstream
from smtp_guard.store.base import StoreBusy, StoreFull
from smtp_guard.store.sqlite.breakers import SQLiteBreakerStore
from smtp_guard.store.sqlite.db import Database
from smtp_guard.store.sqlite.holds import SQLiteHoldStore
from smtp_guard.suppression_model import SuppressionEntry

from conftest import wait_until, sqlite_only
from smtp_client import message, send

pytestmark = sqlite_only

SENDER = "news@shop.test"
HOLD_LISTS = {"manual": {"action": "hold"}}
HELD = "held@example.com"


async def put_on_hold_list(guard: Guard, address: str = HELD) -> None:
    await guard.backends.suppressions.add([SuppressionEntry("address", guard.backends.normalizer.key(address), "manual",
                                                   reason="test", source="test", created_at=time.time())])
    await guard.enforcement.reloader.refresh()


def new_hold(recipients: int = 1) -> NewHold:
    return NewHold(txn_id="t1", client="127.0.0.1", sender=SENDER, mail_options=(), content=b"Subject: x\r\n\r\nx\r\n",
                   recipients=[HeldRecipient(f"r{i}@example.com", "held", "test", "test") for i in range(recipients)])


class Locker:
    """Another process holding the store's write lock (``BEGIN EXCLUSIVE``) until released."""

    SCRIPT = ("import sqlite3, sys\n"
              "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
              "c.execute('BEGIN EXCLUSIVE')\n"
              "print('locked', flush=True)\n"
              "sys.stdin.readline()\n"
              "c.execute('COMMIT')\n")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> "Locker":
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", self.SCRIPT, str(self.path),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert self.process.stdout is not None
        assert await asyncio.wait_for(self.process.stdout.readline(), 10) == b"locked\n"
        return self

    async def release(self) -> None:
        if self.process is not None and self.process.returncode is None:
            assert self.process.stdin is not None
            self.process.stdin.write(b"\n")
            await self.process.stdin.drain()
            assert await asyncio.wait_for(self.process.wait(), 10) == 0

    async def __aexit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


# --- the `database is locked` race ------------------------------------------------------------

async def test_a_read_in_flight_never_makes_a_write_fail_while_another_process_writes(tmp_path):
    """Reads of other coroutines on the shared connection (the release worker, the index
    reloader) used to leave a cursor open across the breaker sync's BEGIN IMMEDIATE: SQLite
    then answers SQLITE_BUSY at once, without waiting busy_timeout. The write must wait."""
    path = tmp_path / "guard.sqlite3"
    async with Database(path, busy_timeout=10) as db:
        holds = SQLiteHoldStore(db)
        hold_id = await holds.hold(new_hold(recipients=50))
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            for _ in range(20):
                other.execute("BEGIN IMMEDIATE")
                other.execute("UPDATE held_messages SET client = client")
                asyncio.get_running_loop().call_later(0.05, other.execute, "COMMIT")
                # Tasks start in order: the reads' cursors are open when the write's BEGIN runs.
                reads = [asyncio.create_task(db.fetchall("SELECT address FROM held_recipients")) for _ in range(3)]
                write = asyncio.create_task(holds.release(hold_id, time.time(), ["r0@example.com"]))
                *rows, released = await asyncio.gather(*reads, write)  # the write waits, never raises
                assert released == 1 and all(len(found) == 50 for found in rows)
                await db.execute("UPDATE held_recipients SET state = 'held' WHERE hold_id = ?", (hold_id,))
        finally:
            other.close()


async def test_a_cli_and_a_server_opening_a_new_store_together_both_migrate_it(tmp_path):
    path = tmp_path / "guard.sqlite3"
    first, second = Database(path), Database(path)
    await asyncio.gather(first.open(), second.open())
    try:
        assert (await first.fetchone("PRAGMA user_version"))[0] == (await second.fetchone("PRAGMA user_version"))[0]
        await SQLiteHoldStore(second).hold(new_hold())
    finally:
        await first.close()
        await second.close()


async def test_three_openers_of_a_new_store_never_see_database_is_locked(tmp_path):
    """The switch to WAL is a lock upgrade SQLite refuses at once (no busy handler) when
    another opener holds a shared lock: seen 2 times in 300 before open() retried it."""
    for attempt in range(40):
        path = tmp_path / f"guard{attempt}.sqlite3"
        openers = [Database(path) for _ in range(3)]
        try:
            await asyncio.gather(*(opener.open() for opener in openers))
        finally:
            for opener in openers:
                await opener.close()


async def test_a_write_waits_at_most_busy_timeout_then_the_next_one_succeeds(tmp_path):
    path = tmp_path / "guard.sqlite3"
    async with Database(path, busy_timeout=0.3) as db:
        holds = SQLiteHoldStore(db)
        async with Locker(path) as locker:
            started = time.monotonic()
            # Two writers in this process: the second waits for the first and for the lock
            # together, never longer than busy_timeout in all.
            results = await asyncio.gather(holds.hold(new_hold()), holds.hold(new_hold()), return_exceptions=True)
            assert all(isinstance(result, StoreBusy) for result in results), results
            assert time.monotonic() - started < 0.3 + 1.0
            await locker.release()
        await holds.hold(new_hold())
        assert (await holds.stats()).held_messages == 1


# --- store locked by another process, over SMTP -----------------------------------------------

async def test_store_locked_by_another_process_gives_451_then_recovers_without_restart(start_guard, sink):
    guard = await start_guard(lists=HOLD_LISTS, store={"busy_timeout": "1s"})
    await put_on_hold_list(guard)
    async with Locker(guard.config.store.path) as locker:
        started = time.monotonic()
        outcome = await send(guard.smtp_address, SENDER, [HELD], message(subject="While locked"))
        elapsed = time.monotonic() - started
        assert outcome.data == str(replies.STORE_UNAVAILABLE)
        assert elapsed < 1.0 + 2.0, f"451 after {elapsed:.1f}s, not within busy_timeout"
        await locker.release()
    assert (await guard.backends.holds.stats()).held_messages == 0  # nothing acknowledged that is not stored

    outcome = await send(guard.smtp_address, SENDER, [HELD], message(subject="After the lock"))
    assert outcome.data == str(replies.QUEUED_HELD)
    [held] = await guard.backends.holds.list()
    assert [r.address for r in held.recipients] == [HELD]
    # The audit trail, written in the background, caught up too.
    await wait_until(lambda: guard.enforcement.audit.pending == 0, what="the audit buffer to be written")
    records = await guard.backends.audit.query(AuditFilter(verdict="hold"))
    assert len(records) == 2  # the refused attempt's decision and the held one


async def test_background_writers_keep_going_through_a_locked_store(start_guard, sink):
    """The audit flush (and the other loops: breaker sync, index and tombstone reloads,
    release worker, statistics) log and retry while another process holds the store, and
    catch up after it lets go."""
    guard = await start_guard(lists=HOLD_LISTS, store={"busy_timeout": "0.2s"})
    await put_on_hold_list(guard)
    async with Locker(guard.config.store.path) as locker:
        guard.enforcement.audit.record(AuditRecord(time=time.time(), kind="admin", verdict="test", rule="test",
                                       reason="written while locked", actor="test"))
        assert not await guard.enforcement.audit.flush()  # kept buffered, not lost
        assert guard.enforcement.audit.pending == 1
        await locker.release()
    await wait_until(lambda: guard.enforcement.audit.pending == 0, what="the audit trail to catch up")
    assert [r.reason for r in await guard.backends.audit.query(AuditFilter(verdict="test"))] == ["written while locked"]
    outcome = await send(guard.smtp_address, SENDER, [HELD], message())
    assert outcome.data == str(replies.QUEUED_HELD)
    await guard.background.update_stats()
    assert metric(guard, "smtp_guard_hold_messages") == 1


def metric(guard: Guard, name: str) -> float:
    return guard.metrics.registry.get_sample_value(name) or 0.0


# --- disk full --------------------------------------------------------------------------------

def _require_root_for_tmpfs() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run as root: this test mounts a small tmpfs as the data directory")
        pytest.skip("needs root to mount a small tmpfs as the data directory (CI runs it as root)")


@pytest.fixture
def small_disk(tmp_path: Path) -> AsyncIterator[Path]:
    """A 6 MB tmpfs, unmounted afterwards."""
    _require_root_for_tmpfs()
    mount_point = tmp_path / "data"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(directory: Path) -> Path:
    """Write a file until the disk is full; returns it (delete it to free the space)."""
    filler = directory / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


async def test_disk_full_gives_452_and_recovers_when_space_returns(start_guard, sink, small_disk):
    guard = await start_guard(lists=HOLD_LISTS, store={"path": str(small_disk / "guard.sqlite3")})
    await put_on_hold_list(guard)
    # Larger than any free room the WAL already has, so holding it needs new disk space.
    body = "x" * 500 + "\r\n"
    content = message(subject="Disk full", body=body * 1200)
    filler = fill(small_disk)
    try:
        outcome = await send(guard.smtp_address, SENDER, [HELD], content)
        assert outcome.data == str(replies.STORE_FULL)
    finally:
        filler.unlink()
    assert (await guard.backends.holds.stats()).held_messages == 0

    outcome = await send(guard.smtp_address, SENDER, [HELD], content)
    assert outcome.data == str(replies.QUEUED_HELD)
    [held] = await guard.backends.holds.list()
    stored = await guard.backends.holds.get(held.id)
    assert stored is not None and stored.content is not None and b"Disk full" in stored.content


async def test_store_translates_a_full_disk_into_store_full(small_disk):
    async with Database(small_disk / "guard.sqlite3") as db:
        holds = SQLiteHoldStore(db)
        big = NewHold(**{**new_hold().__dict__, "content": b"x" * 1_000_000})
        filler = fill(small_disk)
        try:
            with pytest.raises(StoreFull):
                await holds.hold(big)
        finally:
            filler.unlink()
        await holds.hold(big)
        assert (await holds.stats()).held_messages == 1


async def test_sandbox_answers_452_on_a_full_disk_and_captures_again_after(small_disk):
    sandbox = SandboxUpstream(small_disk / "sandbox")
    filler = fill(small_disk)
    try:
        transaction = await sandbox.begin(SENDER)
        await transaction.rcpt("someone@example.com")
        assert await transaction.data(b"Subject: x\r\n\r\n" + b"x" * 100_000) == replies.STORE_FULL
        assert list((small_disk / "sandbox" / "tmp").iterdir()) == []  # no partial file left
        assert list((small_disk / "sandbox" / "new").iterdir()) == []
    finally:
        filler.unlink()
    transaction = await sandbox.begin(SENDER)
    await transaction.rcpt("someone@example.com")
    assert await transaction.data(b"Subject: x\r\n\r\nx\r\n") == replies.SANDBOX_CAPTURED
    assert len(list((small_disk / "sandbox" / "new").iterdir())) == 1


# --- background sweeps are retried ------------------------------------------------------------

class FlakyHolds:
    """The real hold store, whose next ``discard_stream`` fails as under a locked store."""

    def __init__(self, holds: SQLiteHoldStore) -> None:
        self._holds = holds
        self.failures = 1

    def __getattr__(self, name: str) -> object:
        return getattr(self._holds, name)

    async def discard_stream(self, stream: str, rules: Sequence[str]) -> int:
        if self.failures:
            self.failures -= 1
            raise StoreBusy("the store stayed busy for 0.2s")
        return await self._holds.discard_stream(stream, rules)


async def test_a_cancellation_sweep_that_failed_is_retried_at_the_next_sync(tmp_path):
    """The breaker sync applies an admin's cancel and discards the stream's holds; when the
    store fails at that moment the sweep must not be lost with the decision already taken."""
    async with Database(tmp_path / "guard.sqlite3") as db:
        breakers, holds = SQLiteBreakerStore(db), SQLiteHoldStore(db)
        trip = BreakerRecord(stream="s", rule="breaker.volume", sender=SENDER, message_class="marketing",
                             status="tripped", threshold=10, ceiling=None, recipients=11, tripped_at=1.0,
                             updated_at=1.0)
        await breakers.save([trip])
        await holds.hold(NewHold(**{**new_hold().__dict__, "stream": "s", "message_class": "marketing",
                                    "recipients": [HeldRecipient("a@example.com", "held", "breaker.volume", "t")]}))
        state = BreakerState(BreakerConfig())
        sync = BreakerSync(state, breakers, FlakyHolds(holds), Metrics(), lambda record: None, interval=60)
        await sync.load()
        await breakers.decide("s", "cancelled", None, "cli:ann", time.time())
        with pytest.raises(StoreBusy):
            await sync.sync()
        assert state.trips["s"].status == "cancelled"
        assert (await holds.stream_counts("s")) == {"held": 1}
        await sync.sync()
        assert (await holds.stream_counts("s")) == {"discarded": 1}


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8])
def test_an_open_cancelled_part_way_leaves_no_thread_to_die_after_the_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """A stop signal during start-up cancels the store's open at any point (``steps`` turns
    of the loop in: while connecting, setting pragmas, migrating). aiosqlite's thread finishes
    the step it runs regardless; the open waits for it and closes what it opened, so the thread
    neither outlives the event loop nor dies on it ("Event loop is closed" on stderr)."""
    died: list[BaseException | None] = []
    monkeypatch.setattr("threading.excepthook", lambda args: died.append(args.exc_value))

    async def cancel_open() -> None:
        database = Database(tmp_path / f"guard-{steps}.sqlite3")
        opening = asyncio.create_task(database.open())
        for _ in range(steps):
            await asyncio.sleep(0)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        assert database._connection is None

    asyncio.run(cancel_open())  # a loop of its own, closed when this returns
    time.sleep(0.2)
    assert died == []
    assert not [t for t in threading.enumerate() if "_connection_worker_thread" in t.name]

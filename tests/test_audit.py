"""The audit trail: AuditLog buffering and flushing, and the SQLite store's query filters."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

import pytest

from smtp_guard.audit import AuditLog
from smtp_guard.audit_model import AuditFilter, AuditRecord
from smtp_guard.config import AuditConfig
from smtp_guard.services.audit import BadTime, format_time, parse_time
from smtp_guard.store.base import StoreError
from smtp_guard.store.sqlite.audit import SQLiteAuditStore

from conftest import open_engine_store

T0 = 1_700_000_000.0


def times(records: Sequence[AuditRecord]) -> list[float]:
    return [r.time - T0 for r in records]


def decision(n: int, **changes: object) -> AuditRecord:
    fields: dict[str, object] = dict(time=T0 + n, kind="decision", verdict="pass", rule="pass", reason="no rule matched",
                                     txn_id=f"txn-{n}", client="127.0.0.1", sender="news@shop.test",
                                     recipient=f"r{n}@example.com")
    fields.update(changes)
    return AuditRecord(**fields)  # type: ignore[arg-type]


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteAuditStore]:
    async with open_engine_store(tmp_path / "guard.sqlite3") as engine:
        yield engine.audit


class FlakyStore:
    """A real audit store that can be made to fail, and that counts its writes."""

    def __init__(self, inner: SQLiteAuditStore) -> None:
        self.inner = inner
        self.failing = False
        self.batches: list[int] = []

    async def append(self, records: Sequence[AuditRecord]) -> None:
        if self.failing:
            raise StoreError("database is locked")
        await self.inner.append(records)
        self.batches.append(len(records))

    async def query(self, filters: AuditFilter, limit: int = 100) -> list[AuditRecord]:
        return await self.inner.query(filters, limit)


async def test_store_query_filters_newest_first(store: SQLiteAuditStore) -> None:
    await store.append([
        decision(1, verdict="reject", rule="suppression.unsubscribed", recipient="jane@example.com"),
        decision(2, verdict="reject", rule="suppression.bounced"),
        decision(3, verdict="hold", rule="breaker.volume", sender="promo@shop.test"),
        decision(4, kind="admin", verdict="hold.release", rule="breaker.volume", txn_id="3f2a", actor="cli:alice"),
        decision(5, rule="suppression_x"),
    ])
    assert times(await store.query(AuditFilter())) == [5, 4, 3, 2, 1]
    assert times(await store.query(AuditFilter(), limit=2)) == [5, 4]
    assert times(await store.query(AuditFilter(since=T0 + 2, until=T0 + 4))) == [3, 2]
    assert times(await store.query(AuditFilter(rule_prefix="suppression."))) == [2, 1]
    assert times(await store.query(AuditFilter(rule_prefix="suppression_"))) == [5]  # "_" is no wildcard
    assert times(await store.query(AuditFilter(verdict="reject"))) == [2, 1]
    assert times(await store.query(AuditFilter(kind="admin"))) == [4]
    assert times(await store.query(AuditFilter(recipient="jane@example.com"))) == [1]
    assert times(await store.query(AuditFilter(sender="promo@shop.test"))) == [3]
    assert times(await store.query(AuditFilter(txn_id="3f2a"))) == [4]
    assert times(await store.query(AuditFilter(kind="decision", verdict="reject", rule_prefix="suppression",
                                               since=T0 + 2))) == [2]
    assert (await store.query(AuditFilter(kind="admin")))[0] == decision(
        4, kind="admin", verdict="hold.release", rule="breaker.volume", txn_id="3f2a", actor="cli:alice")


async def test_record_is_buffered_and_flushed_on_interval(store: SQLiteAuditStore) -> None:
    log = AuditLog(store, AuditConfig(flush_interval=0.05, batch_size=500))
    log.start()
    try:
        log.record(decision(1))
        assert log.pending == 1  # record() did no I/O
        await wait_until(lambda: log.pending == 0)
        assert len(await store.query(AuditFilter())) == 1
    finally:
        await log.stop()


async def test_full_batch_flushes_before_the_interval(store: SQLiteAuditStore) -> None:
    flaky = FlakyStore(store)
    log = AuditLog(flaky, AuditConfig(flush_interval=3600, batch_size=10))
    log.start()
    try:
        for n in range(25):
            log.record(decision(n))
        await wait_until(lambda: sum(flaky.batches) >= 20)
        assert all(size <= 10 for size in flaky.batches)
    finally:
        await log.stop()
    assert sum(flaky.batches) == 25
    assert [r.time - T0 for r in await store.query(AuditFilter(), limit=3)] == [24, 23, 22]


async def test_stop_flushes_what_is_left(store: SQLiteAuditStore) -> None:
    log = AuditLog(store, AuditConfig(flush_interval=3600, batch_size=500))
    log.start()
    for n in range(3):
        log.record(decision(n))
    await log.stop()
    assert log.pending == 0
    assert len(await store.query(AuditFilter())) == 3


async def test_failing_store_keeps_records_in_order_and_retries(
        store: SQLiteAuditStore, caplog: pytest.LogCaptureFixture) -> None:
    flaky = FlakyStore(store)
    flaky.failing = True
    log = AuditLog(flaky, AuditConfig(flush_interval=0.02, batch_size=2))
    log.start()
    try:
        with caplog.at_level(logging.ERROR, logger="smtp_guard.audit"):
            for n in range(5):
                log.record(decision(n))
            await wait_until(lambda: "cannot write" in caplog.text)
        assert log.pending == 5
        flaky.failing = False
        await wait_until(lambda: log.pending == 0)
    finally:
        await log.stop()
    assert [r.time - T0 for r in await store.query(AuditFilter())] == [4, 3, 2, 1, 0]
    assert log.dropped == 0


async def test_full_buffer_drops_oldest_and_counts(store: SQLiteAuditStore) -> None:
    flaky = FlakyStore(store)
    flaky.failing = True
    drops: list[int] = []
    log = AuditLog(flaky, AuditConfig(flush_interval=3600, batch_size=2), max_buffer=4, on_dropped=drops.append)
    for n in range(6):
        log.record(decision(n))
    assert not await log.flush()
    assert (log.pending, log.dropped, sum(drops)) == (4, 2, 2)
    flaky.failing = False
    assert await log.flush()
    assert [r.time - T0 for r in await store.query(AuditFilter())] == [5, 4, 3, 2]


@pytest.mark.parametrize(("text", "expected"), [
    ("90s", T0 - 90), ("30m", T0 - 1800), ("1h", T0 - 3600), ("2d", T0 - 172800), ("1w", T0 - 604800),
    ("1.5h", T0 - 5400), ("2023-11-14", 1_699_920_000.0), ("2023-11-14T22:13:20", T0),
    ("2023-11-15T00:13:20+02:00", T0),
])
def test_parse_time(text: str, expected: float) -> None:
    assert parse_time(text, T0) == expected


def test_parse_time_explains_bad_input() -> None:
    with pytest.raises(BadTime, match="30m, 1h, 2d"):
        parse_time("yesterday", T0)


def test_format_time_is_utc() -> None:
    assert format_time(T0) == "2023-11-14T22:13:20Z"


async def test_pseudonymizing_a_batch_lets_the_event_loop_run_between_slices(store: SQLiteAuditStore) -> None:
    """A flush of hundreds of records is pseudonymized a slice at a time: sessions get the
    loop in between instead of waiting for the whole batch (milliseconds at 500 records)."""
    from smtp_guard.addresses import AddressNormalizer
    from smtp_guard.config import AddressConfig
    from smtp_guard.erasure.keys import ErasureKey, KeyRing
    from smtp_guard.erasure.pseudonyms import PSEUDONYMIZE_SLICE, Pseudonymizer, PseudonymizingAuditStore

    ring = KeyRing(Path("unused"), [ErasureKey("k1", b"\x01" * 32, T0)])
    pseudonymizer = Pseudonymizer(AddressNormalizer(AddressConfig()), lambda: ring)
    turns = 0
    turns_at_write: list[int] = []

    class Noting(FlakyStore):
        async def append(self, records: Sequence[AuditRecord]) -> None:
            turns_at_write.append(turns)  # the pseudonymizing is done by now
            await super().append(records)

    trail = PseudonymizingAuditStore(Noting(store), pseudonymizer)
    records = [decision(n) for n in range(PSEUDONYMIZE_SLICE * 3 + 1)]

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = turns
    await trail.append(records)
    ticking.cancel()
    assert turns_at_write[0] - before >= 3  # the loop turned between each two of the four slices
    written = await store.query(AuditFilter(), limit=1000)
    assert len(written) == len(records)
    assert {r.recipient for r in written} == {pseudonymizer.pseudonym(r.recipient) for r in records}
    assert all(r.recipient.startswith("h:") for r in written)

"""The hold queue on a real database (SQLite file, or PostgreSQL in that run): durability and
every state transition."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import AsyncIterator

import pytest

from smtp_guard.hold.model import HeldRecipient, HoldStore, NewHold
from smtp_guard.store.sqlite.db import Database
from smtp_guard.store.sqlite.holds import SQLiteHoldStore

from conftest import ManualClock, open_engine_store, sqlite_only

CONTENT = b"From: news@shop.test\r\nSubject: Spring sale\r\n\r\nHello\r\n"
T0 = 1_700_000_000.0


def new_hold(*addresses: str, rule: str = "breaker.volume", content: bytes = CONTENT) -> NewHold:
    return NewHold(
        txn_id="txn-1", client="127.0.0.1", sender="news@shop.test", mail_options=("BODY=8BITMIME", "SIZE=100"),
        content=content,
        recipients=[HeldRecipient(a, "held", rule, "stream over 10x its baseline") for a in addresses],
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def store(tmp_path: Path, clock: ManualClock) -> AsyncIterator[HoldStore]:
    async with open_engine_store(tmp_path / "guard.sqlite3", clock=clock) as engine:
        yield engine.holds


def states(message) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {r.address: r.state for r in message.recipients}


@sqlite_only
async def test_hold_is_durable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "guard.sqlite3"
    async with Database(path) as db:
        hold_id = await SQLiteHoldStore(db, clock=ManualClock(T0)).hold(new_hold("a@example.com", "b@example.com"))
    # A separate plain connection sees it: hold() returned only after COMMIT.
    with closing(sqlite3.connect(path)) as raw:
        assert raw.execute("SELECT COUNT(*) FROM held_recipients WHERE hold_id = ?", (hold_id,)).fetchone() == (2,)
    async with Database(path) as db:
        message = await SQLiteHoldStore(db).get(hold_id)
    assert message is not None
    assert message.content == CONTENT
    assert message.size == len(CONTENT)
    assert message.created_at == T0
    assert message.mail_options == ("BODY=8BITMIME", "SIZE=100")
    assert [(r.address, r.state, r.rule) for r in message.recipients] == [
        ("a@example.com", "held", "breaker.volume"), ("b@example.com", "held", "breaker.volume")]


async def test_hold_ids_are_short_unique_and_option_safe(store: SQLiteHoldStore) -> None:
    ids = {await store.hold(new_hold("a@example.com")) for _ in range(20)}
    assert len(ids) == 20
    assert all(len(i) == 16 and not i.startswith("-") and i.isalnum() for i in ids)


async def test_duplicate_recipient_held_once(store: SQLiteHoldStore) -> None:
    hold_id = await store.hold(new_hold("a@example.com", "a@example.com"))
    message = await store.get(hold_id)
    assert message is not None and len(message.recipients) == 1


async def test_list_filters_by_state_newest_first_without_content(store: SQLiteHoldStore, clock: ManualClock) -> None:
    first = await store.hold(new_hold("a@example.com"))
    clock.now += 10
    second = await store.hold(new_hold("b@example.com", "c@example.com"))
    await store.release(second, clock.now, ["b@example.com"])

    assert [m.id for m in await store.list()] == [second, first]
    assert [m.id for m in await store.list("released")] == [second]
    assert [m.id for m in await store.list("delivered")] == []
    listed = await store.list(None, limit=1)
    assert [m.id for m in listed] == [second]
    assert listed[0].content is None
    assert states(listed[0]) == {"b@example.com": "released", "c@example.com": "held"}


async def test_get_unknown_is_none(store: SQLiteHoldStore) -> None:
    assert await store.get("0123456789abcdef") is None


async def test_release_all_or_some_and_due(store: SQLiteHoldStore, clock: ManualClock) -> None:
    hold_id = await store.hold(new_hold("a@example.com", "b@example.com", "c@example.com"))
    assert await store.due(clock.now) == []

    assert await store.release(hold_id, clock.now, ["b@example.com"]) == 1
    due = await store.due(clock.now)
    assert [m.id for m in due] == [hold_id]
    assert due[0].content == CONTENT
    assert [r.address for r in due[0].recipients] == ["b@example.com"]
    assert due[0].recipients[0].next_attempt_at == clock.now

    assert await store.release(hold_id, clock.now) == 2  # only the still-held ones move
    assert await store.release(hold_id, clock.now) == 0
    due = await store.due(clock.now)
    assert [r.address for r in due[0].recipients] == ["a@example.com", "b@example.com", "c@example.com"]


async def test_record_attempt_retry_is_not_due_until_its_time(store: SQLiteHoldStore, clock: ManualClock) -> None:
    hold_id = await store.hold(new_hold("a@example.com", "b@example.com"))
    await store.release(hold_id, clock.now)
    await store.record_attempt(hold_id, "a@example.com", "released", "451 4.3.0 busy", clock.now + 60)

    due = await store.due(clock.now)
    assert [r.address for r in due[0].recipients] == ["b@example.com"]
    due = await store.due(clock.now + 60)
    assert [r.address for r in due[0].recipients] == ["a@example.com", "b@example.com"]
    recipient = due[0].recipients[0]
    assert (recipient.attempts, recipient.last_reply) == (1, "451 4.3.0 busy")


async def test_content_deleted_when_last_recipient_finishes(store: SQLiteHoldStore, clock: ManualClock) -> None:
    hold_id = await store.hold(new_hold("a@example.com", "b@example.com"))
    await store.release(hold_id, clock.now)
    await store.record_attempt(hold_id, "a@example.com", "delivered", "250 2.0.0 queued", None)
    message = await store.get(hold_id)
    assert message is not None and message.content == CONTENT  # b still needs it

    await store.record_attempt(hold_id, "b@example.com", "failed", "550 5.1.1 no such user", None)
    message = await store.get(hold_id)
    assert message is not None and message.content is None
    assert await store.due(clock.now + 3600) == []
    assert [(r.address, r.state, r.attempts, r.last_reply) for r in message.recipients] == [
        ("a@example.com", "delivered", 1, "250 2.0.0 queued"),
        ("b@example.com", "failed", 1, "550 5.1.1 no such user"),
    ]


@sqlite_only
async def test_discard_some_then_all_deletes_content_and_addresses(
        db: Database, clock: ManualClock) -> None:
    store = SQLiteHoldStore(db, clock=clock)
    secret = b"Subject: x\r\n\r\nDISTINCTIVE-BODY-MARKER\r\n"
    hold_id = await store.hold(new_hold("a@example.com", "b@example.com", "c@example.com", content=secret))
    await store.release(hold_id, clock.now, ["c@example.com"])

    assert await store.discard(hold_id, ["a@example.com"]) == 1
    message = await store.get(hold_id)
    assert message is not None and message.content == secret
    assert states(message) == {"a@example.com": "discarded", "b@example.com": "held", "c@example.com": "released"}

    assert await store.discard(hold_id) == 2  # held and released-but-undelivered
    assert await store.discard(hold_id) == 0
    message = await store.get(hold_id)
    assert message is not None and message.content is None
    assert [r.state for r in message.recipients] == ["discarded"] * 3
    assert not any("@" in r.address for r in message.recipients)
    assert await store.due(clock.now) == []
    await db.close()
    # secure_delete + WAL: the bytes are gone from the database and its WAL, not just unlinked.
    for path in db.path.parent.iterdir():
        data = path.read_bytes()
        assert b"DISTINCTIVE-BODY-MARKER" not in data, path
        assert b"b@example.com" not in data, path


async def test_retry_after_discard_does_not_resurrect(store: SQLiteHoldStore, clock: ManualClock) -> None:
    hold_id = await store.hold(new_hold("a@example.com", "b@example.com"))
    await store.release(hold_id, clock.now)
    await store.discard(hold_id, ["a@example.com"])
    # The worker's attempt was in flight when the admin discarded; its retry must not win.
    await store.record_attempt(hold_id, "a@example.com", "released", "451 4.4.1 later", clock.now + 60)
    message = await store.get(hold_id)
    assert message is not None and states(message)["a@example.com"] == "discarded"


async def test_stats_count_held_and_released(store: SQLiteHoldStore, clock: ManualClock) -> None:
    empty = await store.stats()
    assert (empty.held_messages, empty.held_recipients, empty.oldest_held_at) == (0, 0, None)
    first = await store.hold(new_hold("a@example.com", "b@example.com"))
    clock.now += 5
    second = await store.hold(new_hold("c@example.com"))
    await store.release(first, clock.now, ["a@example.com"])
    stats = await store.stats()
    assert (stats.held_messages, stats.held_recipients, stats.oldest_held_at) == (2, 3, T0)
    await store.discard(first)
    await store.record_attempt(second, "c@example.com", "delivered", "250 ok", None)
    stats = await store.stats()
    assert (stats.held_messages, stats.held_recipients, stats.oldest_held_at) == (0, 0, None)


async def test_recipient_held_as_released_is_due_at_once(store: SQLiteHoldStore, clock: ManualClock) -> None:
    hold_id = await store.hold(NewHold(
        txn_id="txn-2", client="127.0.0.1", sender="", mail_options=(), content=CONTENT,
        recipients=[HeldRecipient("a@example.com", "released", "ratelimit.sender", "paced release")]))
    due = await store.due(clock.now)
    assert [(m.id, [r.next_attempt_at for r in m.recipients]) for m in due] == [(hold_id, [clock.now])]

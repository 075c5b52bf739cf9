"""Claims: a released recipient is attempted by one worker at a time, on any number of
connections to the same store (two pools, on PostgreSQL); a crashed attempt is retried once its
lease has passed."""

from __future__ import annotations

from pathlib import Path

from smtp_guard.hold.model import HeldRecipient, NewHold

from conftest import open_engine_store

NOW = 1_800_000_000.0


async def test_two_workers_on_one_store_claim_each_recipient_once(tmp_path: Path) -> None:
    path = tmp_path / "guard.sqlite3"
    async with open_engine_store(path, clock=lambda: NOW) as first_store, \
            open_engine_store(path, clock=lambda: NOW) as second_store:
        first, second = first_store.holds, second_store.holds
        hold_id = await first.hold(NewHold(
            txn_id="t1", client="127.0.0.1", sender="news@shop.test", mail_options=(), content=b"Subject: x\r\n\r\nhi\r\n",
            recipients=[HeldRecipient("a@example.com", "released", "r", "paced", next_attempt_at=NOW),
                        HeldRecipient("b@example.com", "held", "r", "waiting")]))
        [due] = await second.due(NOW)
        assert [r.address for r in due.recipients] == ["a@example.com"]

        assert await first.claim(hold_id, ["a@example.com", "b@example.com"], NOW, lease=900) == ["a@example.com"]
        assert await second.claim(hold_id, ["a@example.com"], NOW, lease=900) == []
        assert await second.due(NOW) == []

        # The first worker died without recording an outcome: after the lease, it is due again.
        assert await second.claim(hold_id, ["a@example.com"], NOW + 901, lease=900) == ["a@example.com"]
        await second.record_attempt(hold_id, "a@example.com", "delivered", "250 ok", None)
        assert await first.claim(hold_id, ["a@example.com"], NOW + 5000, lease=900) == []

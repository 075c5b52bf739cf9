"""smtp/transaction.py alone: the state machine of one mail transaction, without an SMTP front.

The test plays smtp/handler.py: ``mail``, ``rcpt`` per recipient, ``data`` (or ``end``), and
asserts the Reply each step returns — what the client would be told. Everything around the
transaction is real: the default pipeline built from a config, the in-memory suppression and
tombstone indexes, the SQLite hold and erasure stores on a file in tmp_path, the upstream pool
talking to the fault-injecting sink (tests/sink.py) on loopback, real metrics.

Over SMTP the same behaviours are in test_relay.py, test_hold_e2e.py, test_pacing_interplay.py
and test_breaker_e2e.py; here are the transitions between them: what the upstream transaction
and the hold queue hold after each step, and what is written when.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtp_guard import replies
from smtp_guard.addresses import AddressNormalizer, key_hash
from smtp_guard.breaker.state import BreakerState
from smtp_guard.decision_service import LocalDecider
from smtp_guard.classify import MessageClassifier
from smtp_guard.config import Config
from smtp_guard.counters import InMemoryCounters
from smtp_guard.erasure.index import TombstoneIndex
from smtp_guard.erasure.keys import KeyRing, erasure_token, new_key
from smtp_guard.index import SuppressionIndex
from smtp_guard.metrics import MESSAGE_OUTCOMES, Metrics
from smtp_guard.policy.default import default_pipeline
from smtp_guard.relay.pool import SMTPUpstream
from smtp_guard.replies import Reply
from smtp_guard.smtp.transaction import Collaborators, Transaction
from smtp_guard.wire import has_bare_line_ending
from smtp_guard.audit_model import AuditRecord
from smtp_guard.hold.model import HeldRecipient, HoldStore
from smtp_guard.suppression_model import SuppressionDelta
from smtp_guard.store.sqlite.db import Database
from smtp_guard.store.sqlite.erasure import SQLiteErasureStore
from smtp_guard.store.sqlite.holds import SQLiteHoldStore

from conftest import ManualClock, make_config
from sink import Sink
from smtp_client import message

T0 = 1_700_000_000.0
SENDER = "news@shop.test"
CLIENT = "192.0.2.7"
CONTENT = message(subject="Spring sale", body="Hello.\r\n")
# What the handler puts on top (the Received header); the transaction must relay and hold it first.
TRACE = b"Received: from client.test ([192.0.2.7])\r\n\tby guard.test with ESMTP id test;\r\n"
SANCTION = {"classify": {"rules": [{"class": "sanction", "subject": "policy violation"}]},
            "classes": {"sanction": {"approval_after": 1}}}
NOTICE = message(subject="Policy violation notice")


def sink_reply(line: str) -> Reply:
    """A reply of the sink (tests/sink.py), as the upstream pool hands it on."""
    code, text = line.split(" ", 1)
    return replies.upstream_reply(int(code), text)


SINK_RCPT_OK = sink_reply("250 2.1.5 OK")
SINK_QUEUED = sink_reply("250 2.0.0 OK queued")


class Harness:
    """One guard's worth of collaborators around the transactions a test runs."""

    def __init__(self, config: Config, sink: Sink, db: Database, holds: HoldStore, key_file: Path) -> None:
        self.config = config
        self.sink = sink
        self.clock = ManualClock(T0)
        self.normalizer = AddressNormalizer(config.addresses)
        self.index = SuppressionIndex()
        self.key = new_key(T0)
        self.tombstones = TombstoneIndex(KeyRing(key_file, [self.key]))
        self.erasure = SQLiteErasureStore(db)
        self.holds = holds
        self.upstream = SMTPUpstream(config.upstream)
        self.metrics = Metrics()
        self.audit: list[AuditRecord] = []
        pipeline = default_pipeline(config, self.tombstones, self.index, breakers=BreakerState(config.breaker),
                                    counters=InMemoryCounters(), clock=self.clock)
        self.parts = Collaborators(
            pipeline=pipeline, decider=LocalDecider(pipeline), upstream=self.upstream, holds=holds,
            normalizer=self.normalizer,
            classifier=MessageClassifier(config.classify, config.streams), metrics=self.metrics,
            record_audit=self.audit.append, record_erasure_attempts=self.erasure.record_attempts,
            max_recipients=config.smtp.max_recipients, bare_line_endings=config.smtp.bare_line_endings,
            strip=config.streams.strip_headers, clock=self.clock)

    def put_on_list(self, address: str, list_name: str) -> None:
        self.index.apply(SuppressionDelta(seq=self.index.seq + 1,
                                          addresses={key_hash(self.normalizer.key(address)): list_name}))

    async def erase(self, address: str, reference: str) -> None:
        digest = self.key.tombstone(erasure_token(self.normalizer.key(address)))
        await self.erasure.remember_key(self.key.id, self.key.check_value, T0)
        tombstone, _ = await self.erasure.add_tombstone(digest, self.key.id, reference, T0)
        self.tombstones.add([tombstone])

    def begin(self, sender: str = SENDER) -> Transaction:
        """A transaction after an accepted MAIL, as the handler makes one."""
        txn = Transaction(self.parts, CLIENT)
        assert txn.mail(sender, ["BODY=8BITMIME", "SIZE=1000"]) == replies.SENDER_OK
        return txn

    async def rcpts(self, txn: Transaction, *addresses: str) -> dict[str, Reply]:
        return {address: await txn.rcpt(address) for address in addresses}

    async def held(self) -> dict[str, HeldRecipient]:
        return {r.address: r for m in await self.holds.list(None) for r in m.recipients}

    def outcomes(self) -> dict[str, float]:
        """smtp_guard_messages_total, the outcomes that happened."""
        samples = {o: self.metrics.registry.get_sample_value("smtp_guard_messages_total", {"outcome": o})
                   for o in MESSAGE_OUTCOMES}
        return {o: value for o, value in samples.items() if value}

    def upstream_errors(self, error_class: str) -> float:
        return self.metrics.registry.get_sample_value("smtp_guard_upstream_errors_total",
                                                      {"class": error_class}) or 0.0

    def decisions(self) -> list[tuple[str, str, str]]:
        """(recipient, verdict, rule) of each audited decision, in order."""
        return [(r.recipient, r.verdict, r.rule) for r in self.audit]


@pytest.fixture
async def make_harness(tmp_path: Path, sink: Sink, db: Database) -> AsyncIterator[Callable[..., Harness]]:
    """``make_harness(holds=None, **config_overrides)``: collaborators relaying to ``sink``."""
    made: list[Harness] = []

    def make(holds: HoldStore | None = None, **overrides: Any) -> Harness:
        harness = Harness(make_config(tmp_path, sink.port, **overrides), sink, db,
                          holds or SQLiteHoldStore(db, clock=lambda: T0), tmp_path / "erasure.key")
        made.append(harness)
        return harness

    yield make
    for harness in made:
        await harness.upstream.close()


def test_the_state_machine_loads_without_aiosmtpd() -> None:
    """aiosmtpd is smtp/handler.py's business: the transaction runs without it."""
    code = "import sys, smtp_guard.smtp.transaction; print(sorted(m for m in sys.modules if 'aiosmtpd' in m))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.strip() == "[]"


# --- MAIL ---------------------------------------------------------------------------------------

def test_mail_takes_a_valid_sender_or_the_null_reverse_path(make_harness: Callable[..., Harness]) -> None:
    parts = make_harness().parts
    txn = Transaction(parts, CLIENT)
    assert txn.mail("not an address", []) == replies.BAD_SENDER
    assert txn.mail("<>", []) == replies.SENDER_OK
    # "<>" on aiosmtpd's envelope and in the audit trail; "" on the wire and in the hold queue.
    assert (txn.mail_from, txn.reverse_path) == ("<>", "")
    assert not txn.needs_cleanup  # nothing is sent upstream before the first relayed recipient


# --- all pass -----------------------------------------------------------------------------------

async def test_all_recipients_pass_and_the_250_is_the_upstreams_own(make_harness: Callable[..., Harness]) -> None:
    harness = make_harness()
    txn = harness.begin()
    # Each RCPT is offered to the upstream at once: the client gets the upstream's answer.
    assert await harness.rcpts(txn, "a@example.com", "b@example.org") == {
        "a@example.com": SINK_RCPT_OK, "b@example.org": SINK_RCPT_OK}
    assert txn.recipients == ["a@example.com", "b@example.org"] and txn.needs_cleanup
    assert harness.sink.messages == []

    assert await txn.data(CONTENT, TRACE) == SINK_QUEUED
    [delivered] = harness.sink.messages
    assert (delivered.mail_from, delivered.rcpt_tos) == (SENDER, ["a@example.com", "b@example.org"])
    assert delivered.content == TRACE + CONTENT
    assert not txn.needs_cleanup  # the upstream session went back to the pool
    assert harness.outcomes() == {"relayed": 1}
    assert harness.decisions() == [("a@example.com", "pass", "pass"), ("b@example.org", "pass", "pass")]
    assert {r.txn_id for r in harness.audit} == {txn.txn_id}


async def test_upstream_unavailable_at_the_first_rcpt_is_retried_at_the_next(
        make_harness: Callable[..., Harness]) -> None:
    harness = make_harness()
    port = harness.sink.port
    await harness.sink.stop()
    txn = harness.begin()
    assert await txn.rcpt("a@example.com") == replies.UPSTREAM_UNAVAILABLE
    assert (txn.recipients, txn.refused, txn.upstream) == ([], 1, None)
    await harness.sink.start_on(port)
    assert await txn.rcpt("b@example.com") == SINK_RCPT_OK
    assert await txn.data(CONTENT) == SINK_QUEUED
    assert harness.sink.delivered_to() == ["b@example.com"]
    assert harness.decisions() == [("a@example.com", "defer", "upstream.mail"), ("b@example.com", "pass", "pass")]
    assert harness.upstream_errors("connection") == 1


async def test_refused_recipients_count_towards_the_limit_and_a_duplicate_is_relayed_once(
        make_harness: Callable[..., Harness]) -> None:
    harness = make_harness(smtp={"max_recipients": 3})
    harness.sink.permfail_rcpt.add("nouser@example.com")
    txn = harness.begin()
    assert await harness.rcpts(txn, "nouser@example.com", "a@example.com") == {
        "nouser@example.com": sink_reply("550 5.1.1 No such user"), "a@example.com": SINK_RCPT_OK}
    assert await txn.rcpt("a@example.com") == replies.DUPLICATE_RECIPIENT
    assert await txn.rcpt("b@example.com") == SINK_RCPT_OK
    # One refused and two accepted: the third is the limit, however many got 250.
    assert await txn.rcpt("c@example.com") == replies.TOO_MANY_RECIPIENTS
    assert await txn.data(CONTENT) == SINK_QUEUED
    assert harness.sink.delivered_to() == ["a@example.com", "b@example.com"]
    assert harness.decisions()[0] == ("nouser@example.com", "reject", "upstream.rcpt")


# --- upstream refuses the message -----------------------------------------------------------------

@pytest.mark.parametrize("fault, reply, outcome, error_class", [
    ({"data_reply": "451 4.3.0 try again"}, sink_reply("451 4.3.0 try again"), "deferred", "4xx"),
    ({"data_reply": "554 5.7.1 content rejected"}, sink_reply("554 5.7.1 content rejected"), "refused", "5xx"),
    ({"disconnect_on": "data"}, replies.UPSTREAM_LOST, "deferred", "connection"),
])
async def test_upstream_refusing_data_is_the_answer_and_nothing_is_held_or_claimed(
        make_harness: Callable[..., Harness], fault: dict[str, str], reply: Reply, outcome: str,
        error_class: str) -> None:
    harness = make_harness(lists={"manual": {"action": "hold"}})
    harness.put_on_list("held@example.com", "manual")
    txn = harness.begin()
    assert await harness.rcpts(txn, "held@example.com", "ok@example.com") == {
        "held@example.com": replies.RECIPIENT_OK, "ok@example.com": SINK_RCPT_OK}
    for name, value in fault.items():
        setattr(harness.sink, name, value)
    assert await txn.data(CONTENT, TRACE) == reply
    # The message is refused as a whole: the held part is not stored either (the client retries
    # all of it, or bounces all of it).
    assert harness.sink.messages == []
    assert await harness.held() == {}
    assert harness.outcomes() == {outcome: 1}
    assert harness.upstream_errors(error_class) == 1
    assert not txn.needs_cleanup


# --- hold ---------------------------------------------------------------------------------------

async def test_pass_and_hold_in_one_message_the_held_part_is_on_disk_before_the_250(
        make_harness: Callable[..., Harness], db: Database) -> None:
    harness = make_harness(lists={"manual": {"action": "hold"}})
    harness.put_on_list("held@example.com", "manual")
    txn = harness.begin()
    assert await harness.rcpts(txn, "held@example.com", "ok@example.com") == {
        "held@example.com": replies.RECIPIENT_OK, "ok@example.com": SINK_RCPT_OK}
    assert list(txn.held) == ["held@example.com"] and list(txn.relayed) == ["ok@example.com"]

    assert await txn.data(CONTENT, TRACE) == SINK_QUEUED
    assert harness.sink.delivered_to() == ["ok@example.com"]
    # Committed when data() returned: another connection to the file sees it.
    with closing(sqlite3.connect(db.path)) as raw:
        assert raw.execute("SELECT address, state FROM held_recipients").fetchall() == [("held@example.com", "held")]
    [held] = await harness.holds.list()
    stored = await harness.holds.get(held.id)
    assert stored is not None
    assert (stored.txn_id, stored.client, stored.sender, stored.mail_options) == (
        txn.txn_id, CLIENT, SENDER, ("BODY=8BITMIME", "SIZE=1000"))
    assert stored.content == TRACE + CONTENT  # the same bytes the upstream got
    assert [(r.address, r.state, r.rule) for r in stored.recipients] == [
        ("held@example.com", "held", "suppression.manual")]
    assert harness.outcomes() == {"relayed": 1}


async def test_hold_store_failing_after_the_upstream_accepted_is_451_a_duplicate_not_a_loss(
        make_harness: Callable[..., Harness], tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite3"
    async with Database(path, busy_timeout=0.2) as locked_db:
        harness = make_harness(holds=SQLiteHoldStore(locked_db), lists={"manual": {"action": "hold"}})
        harness.put_on_list("held@example.com", "manual")
        txn = harness.begin()
        await harness.rcpts(txn, "held@example.com", "ok@example.com")
        with closing(sqlite3.connect(path, isolation_level=None)) as locker:
            locker.execute("BEGIN EXCLUSIVE")
            reply = await txn.data(CONTENT)
            locker.execute("COMMIT")
        assert reply == replies.STORE_UNAVAILABLE
        # The relayed part is delivered and the client will send it again: a duplicate. A 250
        # would have lost the held part.
        assert harness.sink.delivered_to() == ["ok@example.com"]
        assert await harness.held() == {}
        assert harness.outcomes() == {"deferred": 1}


async def test_only_held_recipients_never_open_an_upstream_transaction(make_harness: Callable[..., Harness]) -> None:
    harness = make_harness(lists={"manual": {"action": "hold"}})
    harness.put_on_list("held@example.com", "manual")
    txn = harness.begin()
    assert await txn.rcpt("held@example.com") == replies.RECIPIENT_OK
    assert not txn.needs_cleanup
    assert await txn.data(CONTENT) == replies.QUEUED_HELD
    assert harness.sink.connections == 0
    assert list(await harness.held()) == ["held@example.com"]
    assert harness.outcomes() == {"held": 1}


# --- message phase ------------------------------------------------------------------------------

PACED = {"name": "paced", "key": "sender", "rate": "1/s", "burst": 1, "action": "hold"}


async def test_message_phase_defer_is_451_for_the_whole_message_paced_recipients_included(
        make_harness: Callable[..., Harness]) -> None:
    stream_limit = {"name": "stream", "key": "stream", "rate": "1/h", "burst": 1, "action": "defer"}
    harness = make_harness(rate_limits=[PACED, stream_limit])
    campaign = message(subject="Spring sale", extra_headers="X-Campaign-ID: spring\r\n")
    first = harness.begin("other@shop.test")  # takes the stream's one token
    await first.rcpt("x@example.com")
    assert await first.data(campaign) == SINK_QUEUED

    txn = harness.begin()
    assert await harness.rcpts(txn, "r0@example.com", "r1@example.com", "r2@example.com") == {
        "r0@example.com": SINK_RCPT_OK, "r1@example.com": replies.PACED, "r2@example.com": replies.PACED}
    assert list(txn.paced) == ["r1@example.com", "r2@example.com"]
    assert await txn.data(campaign) == replies.rate_limited("stream")
    assert harness.sink.delivered_to() == ["x@example.com"]
    assert await harness.held() == {}  # the paced ones were waiting for a token: deferred with the rest
    assert harness.sink.rsets == 1  # the upstream transaction, with r0's RCPT, was reset
    assert harness.decisions()[-3:] == [(f"r{i}@example.com", "defer", "ratelimit.stream") for i in range(3)]
    assert harness.outcomes() == {"relayed": 1, "deferred": 1}


async def test_held_at_the_end_of_data_restarts_the_upstream_with_the_rest(
        make_harness: Callable[..., Harness]) -> None:
    harness = make_harness(**SANCTION)
    txn = harness.begin()
    recipients = ["r0@example.com", "r1@example.com", "r2@example.com"]
    assert await harness.rcpts(txn, *recipients) == dict.fromkeys(recipients, SINK_RCPT_OK)

    # The approval gate lets one through and holds the others, which the upstream already
    # has: RSET, MAIL and RCPT again with only r0 before the message goes.
    assert await txn.data(NOTICE, TRACE) == SINK_QUEUED
    [delivered] = harness.sink.messages
    assert delivered.rcpt_tos == ["r0@example.com"] and delivered.content == TRACE + NOTICE
    assert (harness.sink.transactions_started, harness.sink.rsets) == (2, 1)
    held = await harness.held()
    assert {a: (r.state, r.rule) for a, r in held.items()} == {
        "r1@example.com": ("held", "gate.sanction"), "r2@example.com": ("held", "gate.sanction")}
    assert harness.decisions()[-2:] == [("r1@example.com", "hold", "gate.sanction"),
                                        ("r2@example.com", "hold", "gate.sanction")]


@pytest.mark.parametrize("fault, reply", [
    ({"tempfail_rcpt": {"r0@example.com"}}, replies.UPSTREAM_CHANGED),  # refuses what it accepted
    ({"auth": ("user", "secret")}, replies.UPSTREAM_CHANGED),  # refuses MAIL with a 5xx
    ({"disconnect_on": "mail"}, replies.UPSTREAM_LOST),  # temporary: passed on
])
async def test_upstream_refusing_the_restarted_transaction_defers_the_whole_message(
        make_harness: Callable[..., Harness], fault: dict[str, Any], reply: Reply) -> None:
    harness = make_harness(**SANCTION)
    txn = harness.begin()
    await harness.rcpts(txn, "r0@example.com", "r1@example.com")
    for name, value in fault.items():
        setattr(harness.sink, name, value)
    # Every recipient got 250 at RCPT: a 5xx now would lie about the held one. 451, all of it.
    assert await txn.data(NOTICE) == reply
    assert harness.sink.messages == []
    assert await harness.held() == {}
    assert harness.outcomes() == {"deferred": 1}
    assert not txn.needs_cleanup


@pytest.mark.parametrize("stream_rate, rule, released_after", [
    ("6/m", "ratelimit.stream", (10.0, 20.0)),  # the message phase releases later: it wins
    ("10/s", "ratelimit.paced", (1.0, 2.0)),  # it would release sooner: the pacing stays
])
async def test_the_later_release_time_wins_over_pacing(make_harness: Callable[..., Harness], stream_rate: str,
                                                       rule: str, released_after: tuple[float, float]) -> None:
    stream_limit = {"name": "stream", "key": "stream", "rate": stream_rate, "burst": 1, "action": "hold"}
    harness = make_harness(rate_limits=[PACED, stream_limit])
    txn = harness.begin()
    await harness.rcpts(txn, "r0@example.com", "r1@example.com", "r2@example.com")
    assert {a: d.release_at for a, d in txn.held.items()} == {"r1@example.com": T0 + 1, "r2@example.com": T0 + 2}

    assert await txn.data(CONTENT) == SINK_QUEUED
    assert harness.sink.delivered_to() == ["r0@example.com"]
    assert harness.sink.transactions_started == 1  # nothing relayed was taken out: no restart
    held = await harness.held()
    assert {a: (r.state, r.rule) for a, r in held.items()} == {
        "r1@example.com": ("released", rule), "r2@example.com": ("released", rule)}
    assert [held[a].next_attempt_at for a in ("r1@example.com", "r2@example.com")] == pytest.approx(
        [T0 + after for after in released_after])


async def test_a_gate_stops_a_paced_recipient_for_an_admin(make_harness: Callable[..., Harness]) -> None:
    harness = make_harness(rate_limits=[PACED], **SANCTION)
    txn = harness.begin()
    await harness.rcpts(txn, "r0@example.com", "r1@example.com")
    assert await txn.data(NOTICE) == SINK_QUEUED
    held = await harness.held()
    # Held for review (no release time), not released at the paced time.
    assert {a: (r.state, r.rule, r.next_attempt_at) for a, r in held.items()} == {
        "r1@example.com": ("held", "gate.sanction", None)}


# --- dropped ------------------------------------------------------------------------------------

async def test_every_recipient_dropped_at_rcpt_is_accepted_and_the_upstream_never_contacted(
        make_harness: Callable[..., Harness]) -> None:
    harness = make_harness(lists={"bounced": {"action": "drop"}})
    for address in ("a@example.com", "b@example.com"):
        harness.put_on_list(address, "bounced")
    txn = harness.begin()
    assert await harness.rcpts(txn, "a@example.com", "b@example.com") == {
        "a@example.com": replies.RECIPIENT_OK, "b@example.com": replies.RECIPIENT_OK}
    assert await txn.data(CONTENT) == replies.ACCEPTED_NOT_RELAYED
    assert harness.sink.connections == 0
    assert txn.dropped == ["a@example.com", "b@example.com"]
    assert harness.outcomes() == {"dropped": 1}


async def test_a_message_refusal_does_not_lie_about_a_recipient_dropped_for_its_own_reason(
        make_harness: Callable[..., Harness]) -> None:
    harness = make_harness(lists={"bounced": {"action": "drop"}, "unsubscribed": {"scope": "marketing"}})
    harness.put_on_list("bounced@example.com", "bounced")
    harness.put_on_list("gone@example.com", "unsubscribed")
    txn = harness.begin()
    assert await harness.rcpts(txn, "bounced@example.com", "gone@example.com") == {
        "bounced@example.com": replies.RECIPIENT_OK, "gone@example.com": SINK_RCPT_OK}
    # The marketing list refuses the message for everyone it would still go to (gone@); a 550
    # would bounce bounced@, accepted at RCPT. So gone@ is left out and the rest is accepted.
    assert await txn.data(CONTENT) == replies.ACCEPTED_NOT_RELAYED
    assert txn.dropped == ["bounced@example.com", "gone@example.com"]
    assert harness.sink.messages == [] and harness.sink.rsets == 1
    assert harness.decisions()[-1] == ("gone@example.com", "drop", "suppression.unsubscribed")
    assert harness.outcomes() == {"dropped": 1}


async def test_a_message_refusal_takes_paced_recipients_along_and_keeps_the_ones_held_for_their_own_reason(
        make_harness: Callable[..., Harness]) -> None:
    harness = make_harness(rate_limits=[PACED],
                           lists={"manual": {"action": "hold"}, "unsubscribed": {"scope": "marketing"}})
    harness.put_on_list("held@example.com", "manual")
    for address in ("r0@example.com", "r1@example.com"):
        harness.put_on_list(address, "unsubscribed")
    txn = harness.begin()
    assert await harness.rcpts(txn, "held@example.com", "r0@example.com", "r1@example.com") == {
        "held@example.com": replies.RECIPIENT_OK, "r0@example.com": SINK_RCPT_OK, "r1@example.com": replies.PACED}
    # The marketing list refuses the message for r0 (relayed) and r1 (paced, waiting for a
    # token): both are left out; held@ was held by a list of its own and stays held.
    assert await txn.data(CONTENT) == replies.QUEUED_HELD
    assert set(txn.dropped) == {"r0@example.com", "r1@example.com"}
    held = await harness.held()
    assert {a: (r.state, r.rule) for a, r in held.items()} == {"held@example.com": ("held", "suppression.manual")}
    assert harness.sink.messages == [] and harness.sink.rsets == 1
    assert harness.outcomes() == {"held": 1}


# --- end without DATA ---------------------------------------------------------------------------

async def test_end_without_data_writes_the_erasure_evidence_and_resets_the_upstream(
        make_harness: Callable[..., Harness]) -> None:
    harness = make_harness()
    await harness.erase("jane@example.com", "DSR-1")
    txn = harness.begin()
    assert await harness.rcpts(txn, "ok@example.com", "JANE+news@Example.com") == {
        "ok@example.com": SINK_RCPT_OK, "JANE+news@Example.com": replies.ERASED}
    assert await harness.erasure.attempts() == []  # written when the transaction ends

    await txn.end()  # RSET, a new EHLO or a lost connection
    [attempt] = await harness.erasure.attempts()
    assert (attempt.reference, attempt.client, attempt.sender, attempt.stream, attempt.txn_id) == (
        "DSR-1", CLIENT, SENDER, "", txn.txn_id)
    assert harness.sink.rsets == 1 and not txn.needs_cleanup
    await txn.end()  # once more: nothing left to do
    assert len(await harness.erasure.attempts()) == 1
    assert harness.sink.messages == [] and harness.outcomes() == {}


@settings(max_examples=500, deadline=None, derandomize=bool(os.environ.get("CI")), database=None)
@given(st.binary(max_size=40).map(lambda raw: bytes(b"ab\r\n"[byte % 4] for byte in raw)))
def test_the_bare_line_ending_check_finds_what_the_pattern_finds(content: bytes) -> None:
    assert has_bare_line_ending(content) == bool(re.search(rb"\r(?!\n)|(?<!\r)\n", content))

"""The breaker policy alone: approval gates, volume breaker, fan-out detector, shadow mode,
admin decisions and baseline learning — with an injected clock and no network. The store
tests at the end run on a real SQLite file."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from smtp_guard import replies
from smtp_guard.addresses import key_hash, parse_mailbox
from smtp_guard.breaker.model import Baseline, BreakerRecord
from smtp_guard.breaker.policy import BreakerPolicy
from smtp_guard.breaker.state import BreakerState
from smtp_guard.breaker.tally import MemoryTallies
from smtp_guard.config import BreakerConfig, ClassConfig
from smtp_guard.policy.base import MessageContext, MessageVerdict, RecipientContext, StreamAsk, Verdict
from smtp_guard.store.sqlite.breakers import SQLiteBreakerStore
from smtp_guard.store.sqlite.db import Database

from conftest import ManualClock

SENDER = "news@shop.test"
CLASSES = {
    "marketing": ClassConfig(),
    "transactional": ClassConfig(fanout_limit=5),
    "sanction": ClassConfig(approval_after=3),
}


def recipients(count: int, start: int = 0, domain: str = "example.com") -> list[str]:
    return [f"user{i}@{domain}" for i in range(start, start + count)]


def context(address: str) -> RecipientContext:
    mailbox = parse_mailbox(address)
    return RecipientContext(mailbox=mailbox, key=address.lower(), key_hash=key_hash(address.lower()),
                            domain_chain=(mailbox.domain,), sender=SENDER, client_ip="127.0.0.1")


def message(addresses: list[str], now: float, stream: str = "spring-sale", message_class: str = "marketing",
            body: str = "body-1", sender: str = SENDER) -> MessageContext:
    return MessageContext(sender=sender, client_ip="127.0.0.1", auth_user=None, headers={}, subject="Hi",
                          stream=stream, message_class=message_class, body_hash=body,
                          recipients=tuple(context(a) for a in addresses), now=now)


class Counting:
    """The breaker policy with each of its stream asks counted in memory, as the pipeline does."""

    def __init__(self, policy: BreakerPolicy, state: BreakerState) -> None:
        self._policy = policy
        self._state = state

    def check_message(self, message: MessageContext) -> MessageVerdict | None:
        asked = self._policy.check_message(message)
        if isinstance(asked, StreamAsk):
            return asked.answer(asyncio.run(self._state.tallies.count(asked.request)))
        return asked


def policy(shadow_all: bool = False, classes: dict[str, ClassConfig] | None = None,
           **breaker: object) -> tuple[Counting, BreakerState]:
    config = BreakerConfig(**{"floor": 10, "factor": 5.0, "window": 3600.0, "stream_idle": 1800.0, **breaker})  # type: ignore[arg-type]
    state = BreakerState(config)
    return Counting(BreakerPolicy(state, config, classes or CLASSES, shadow_all), state), state


def finish_idle(state: BreakerState, now: float) -> list[Baseline]:
    """What the breaker sync does with idle streams (without the store): end them, learn."""
    ended = state.ended(asyncio.run(state.tallies.finish(state.idle(now), now, state.config.stream_idle)))
    return [state.learn(sender, size, now) for sender, size in ended.learn]


def verdicts(verdict: MessageVerdict | None) -> dict[str, str]:
    assert verdict is None or verdict.message is None, verdict
    return {} if verdict is None else {a: f"{d.verdict.value}:{d.rule}" for a, d in verdict.recipients.items()}


# --- approval gates ---------------------------------------------------------------------------

def test_gate_lets_the_first_n_through_and_holds_the_rest_of_the_stream() -> None:
    clock = ManualClock(1_000_000.0)
    check, state = policy()
    first = recipients(5)
    assert verdicts(check.check_message(message(first, clock.now, message_class="sanction"))) == {
        a: "hold:gate.sanction" for a in first[3:]}
    trip = state.trips["spring-sale"]
    assert (trip.status, trip.rule, trip.threshold, trip.recipients) == ("tripped", "gate.sanction", 3, 4)
    # Every later recipient of the stream waits, also ones seen before.
    later = check.check_message(message(recipients(2, start=3) + recipients(1), clock.now, message_class="sanction"))
    assert verdicts(later) == {a: "hold:gate.sanction" for a in recipients(2, start=3) + recipients(1)}
    assert later is not None
    decision = next(iter(later.recipients.values()))
    assert decision.reply == replies.HELD_FOR_REVIEW
    # Another stream of the class has its own N.
    assert verdicts(check.check_message(message(recipients(3), clock.now, stream="other", message_class="sanction"))) == {}


def test_gate_of_zero_holds_from_the_first_recipient_and_never_defers() -> None:
    check, state = policy(classes={"marketing": ClassConfig(), "account": ClassConfig(approval_after=0)},
                          action="defer")
    assert verdicts(check.check_message(message(recipients(2), 0.0, message_class="account"))) == {
        a: "hold:gate.account" for a in recipients(2)}


# --- volume breaker ---------------------------------------------------------------------------

def test_new_sender_trips_past_the_floor() -> None:
    check, state = policy()
    assert check.check_message(message(recipients(10), 0.0)) is None
    assert verdicts(check.check_message(message(recipients(3, start=10), 1.0))) == {
        a: "hold:breaker.volume" for a in recipients(3, start=10)}
    assert state.trips["spring-sale"].threshold == 10


def test_ten_times_the_baseline_trips_and_within_the_baseline_does_not() -> None:
    check, state = policy()
    state.learn(SENDER, 20, 0.0)  # threshold: max(floor 10, 5 x 20) = 100
    assert check.check_message(message(recipients(20), 0.0, stream="usual")) is None
    assert check.check_message(message(recipients(100, start=100), 0.0, stream="big")) is None
    verdict = check.check_message(message(recipients(100, start=200), 0.0, stream="big"))
    assert verdicts(verdict) == {a: "hold:breaker.volume" for a in recipients(100, start=200)}
    assert "usual" not in state.trips and state.trips["big"].threshold == 100


def test_repeated_recipients_count_once_and_the_window_slides() -> None:
    clock = ManualClock(1_000_000.0)
    check, state = policy()
    assert check.check_message(message(recipients(8), clock.now)) is None
    assert check.check_message(message(recipients(8), clock.now)) is None  # same people: still 8
    clock.advance(3601)  # the first 8 leave the one-hour window
    assert check.check_message(message(recipients(8, start=100), clock.now)) is None
    assert "spring-sale" not in state.trips


def test_absolute_ceiling_trips_even_a_large_baseline() -> None:
    check, state = policy(ceiling=50)
    state.learn(SENDER, 1000, 0.0)
    verdict = check.check_message(message(recipients(51), 0.0))
    assert verdicts(verdict) == {recipients(51)[-1]: "hold:breaker.volume"}
    assert state.trips["spring-sale"].threshold == 50


def test_defer_action_defers_the_whole_message() -> None:
    check, state = policy(action="defer")
    verdict = check.check_message(message(recipients(12), 0.0))
    assert verdict is not None and verdict.message is not None
    assert (verdict.message.verdict, verdict.message.rule, verdict.message.reply) == (
        Verdict.DEFER, "breaker.volume", replies.BREAKER_DEFERRED)
    # The platform retries the same recipients: they are not counted twice.
    assert state.active["spring-sale"].size == 12
    check.check_message(message(recipients(12), 1.0))
    assert state.active["spring-sale"].size == 12


def test_memory_stays_bounded_far_past_the_limit() -> None:
    check, state = policy(floor=10)
    check.check_message(message(recipients(5000), 0.0))
    assert isinstance(state.tallies, MemoryTallies)
    tally = state.tallies.tallies["spring-sale"]
    assert tally.size == 5000
    assert len(tally._seen) == 2 * 10 + 1000 and tally.overflow == 5000 - 1020


# --- admin decisions --------------------------------------------------------------------------

def test_cancelled_stream_is_refused_whole() -> None:
    check, state = policy()
    check.check_message(message(recipients(11), 0.0))
    state.apply(replace(state.trips["spring-sale"], status="cancelled", decided_at=5.0, decided_by="cli:ann"))
    verdict = check.check_message(message(recipients(1, start=500), 6.0))
    assert verdict is not None and verdict.message is not None
    assert (verdict.message.verdict, verdict.message.reply) == (Verdict.REJECT, replies.STREAM_CANCELLED)


def test_approved_stream_passes_up_to_its_ceiling_then_trips_again() -> None:
    check, state = policy()
    check.check_message(message(recipients(11), 0.0))
    state.dirty(0.0, {"spring-sale": 11})
    state.apply(replace(state.trips["spring-sale"], status="approved", ceiling=15, decided_at=5.0, decided_by="cli:ann"))
    assert check.check_message(message(recipients(4, start=11), 6.0)) is None  # 15 recipients
    verdict = check.check_message(message(recipients(2, start=15), 7.0))
    assert verdicts(verdict) == {a: "hold:breaker.volume" for a in recipients(2, start=15)}
    trip = state.trips["spring-sale"]
    # Tripped again on top of the decision it knew (the store keeps a newer one if any).
    assert (trip.status, trip.threshold, trip.ceiling, trip.decided_at) == ("tripped", 15, 15, 5.0)
    # An older or repeated decision changes nothing.
    assert state.apply(replace(trip, status="approved")) is None


# --- fan-out detector -------------------------------------------------------------------------

def test_same_personal_body_to_too_many_trips_the_fanout_detector() -> None:
    check, state = policy(floor=100)
    for i in range(6):  # six different personal bodies, one recipient each: fine
        assert check.check_message(message(recipients(1, start=i), 0.0, message_class="transactional",
                                           body=f"body-{i}")) is None
    verdict = check.check_message(message(recipients(8, start=100), 0.0, message_class="transactional", body="same"))
    assert verdicts(verdict) == {a: "hold:breaker.fanout" for a in recipients(8, start=100)[5:]}
    assert state.trips["spring-sale"].rule == "breaker.fanout"


# --- several guards counting one stream ---------------------------------------------------------

class Reported:
    def __init__(self) -> None:
        self.trips: list[BreakerRecord] = []

    def tripped(self, record: BreakerRecord) -> None:
        self.trips.append(record)

    def decided(self, verdict: str, rule: str, message_class: str, recipients: int) -> None:
        pass


def test_guards_sharing_the_tallies_trip_a_stream_once_and_each_holds_it() -> None:
    """Two guards' states over one set of tallies (as over one Redis): the guard whose message
    crosses the limit claims and reports the trip; the other adopts it with its next message."""
    config = BreakerConfig(floor=10, window=3600.0, stream_idle=1800.0)
    tallies = MemoryTallies()
    reports = (Reported(), Reported())
    states = tuple(BreakerState(config, report, tallies) for report in reports)
    guards = [Counting(BreakerPolicy(state, config, CLASSES), state) for state in states]
    outcomes = [verdicts(guards[i % 2].check_message(message(recipients(3, start=3 * i), float(i))))
                for i in range(5)]
    assert outcomes == [{}, {}, {}, {a: "hold:breaker.volume" for a in recipients(2, start=10)},
                        {a: "hold:breaker.volume" for a in recipients(3, start=12)}]
    assert [len(r.trips) for r in reports] == [0, 1]  # claimed by the second guard's message, reported there
    assert states[0].trips["spring-sale"].status == "tripped"  # adopted by the first with its next message
    assert (states[0].trips["spring-sale"].threshold, states[0].trips["spring-sale"].tripped_at) == (10, 3.0)

    # An approval reaches both; past its ceiling (counted across both) the stream trips once more.
    for state in states:
        state.apply(replace(state.trips["spring-sale"], status="approved", ceiling=20, decided_at=9.0))
    outcomes = [verdicts(guards[i % 2].check_message(message(recipients(2, start=100 + 2 * i), 10.0 + i)))
                for i in range(4)]
    assert outcomes == [{}, {}, {recipients(1, start=105)[0]: "hold:breaker.volume"},
                        {a: "hold:breaker.volume" for a in recipients(2, start=106)}]
    assert [len(r.trips) for r in reports] == [1, 1]  # the re-trip crossed on the first guard, once
    assert states[0].trips["spring-sale"].status == states[1].trips["spring-sale"].status == "tripped"


# --- shadow mode ------------------------------------------------------------------------------

def test_shadow_mode_marks_would_have_decisions_and_enforces_nothing() -> None:
    check, state = policy(shadow=True)
    verdict = check.check_message(message(recipients(13), 0.0))
    assert verdict is not None and verdict.message is None
    decisions = list(verdict.recipients.values())
    assert len(decisions) == 3 and all(d.verdict is Verdict.PASS for d in decisions)
    assert [(d.shadowed[0].verdict, d.shadowed[0].rule) for d in decisions] == [(Verdict.HOLD, "breaker.volume")] * 3
    assert state.trips == {} and state.shadow_trips == {"spring-sale": "breaker.volume"}


def test_a_shadowed_gate_does_not_hide_an_enforced_breaker() -> None:
    classes = {"marketing": ClassConfig(), "sanction": ClassConfig(approval_after=2, shadow=True)}
    check, state = policy(classes=classes)
    verdict = check.check_message(message(recipients(12), 0.0, message_class="sanction"))
    assert verdict is not None
    shadowed = [a for a, d in verdict.recipients.items() if d.verdict is Verdict.PASS]
    assert len(shadowed) == 8  # recipients 3..10 would have been held by the gate
    assert verdicts(MessageVerdict(recipients={a: d for a, d in verdict.recipients.items()
                                               if d.verdict is not Verdict.PASS})) == {
        a: "hold:breaker.volume" for a in recipients(12)[10:]}


# --- baselines --------------------------------------------------------------------------------

def test_idle_streams_teach_the_baseline_and_undecided_trips_do_not() -> None:
    clock = ManualClock(1_000_000.0)
    check, state = policy(learning_rate=0.5)
    check.check_message(message(recipients(8), clock.now, stream="a"))
    check.check_message(message(recipients(30), clock.now, stream="b"))  # trips, nobody decided
    clock.advance(1800)
    [learned] = finish_idle(state, clock.now)
    assert (learned.sender, learned.baseline, learned.streams) == (SENDER, 8.0, 1)
    check.check_message(message(recipients(4), clock.now, stream="c"))
    clock.advance(1800)
    [learned] = finish_idle(state, clock.now)
    assert (learned.baseline, learned.streams) == (6.0, 2)
    assert state.trips["b"].status == "tripped"  # still waiting for an admin


# --- the store --------------------------------------------------------------------------------

def record(**changes: object) -> BreakerRecord:
    base = BreakerRecord(stream="s", rule="breaker.volume", sender=SENDER, message_class="marketing",
                         status="tripped", threshold=10, ceiling=None, recipients=11, tripped_at=1.0, updated_at=1.0)
    return replace(base, **changes)  # type: ignore[arg-type]


async def test_store_never_lets_the_server_undo_a_decision_it_has_not_seen(tmp_path: Path) -> None:
    async with Database(tmp_path / "guard.sqlite3") as db:
        store = SQLiteBreakerStore(db)
        await store.save([record()])
        decided = await store.decide("s", "approved", 100, "cli:ann", 50.0)
        assert decided is not None and decided.decided_at == 50.0
        # The server, not yet aware of the approval, writes counts and a re-trip: counts land.
        await store.save([record(recipients=40, updated_at=60.0, threshold=99)])
        stored = await store.get("s")
        assert stored is not None
        assert (stored.status, stored.ceiling, stored.recipients, stored.threshold) == ("approved", 100, 40, 10)
        # Once it knows the decision, its re-trip past the ceiling is stored.
        await store.save([record(recipients=101, threshold=100, decided_at=50.0, decided_by="cli:ann")])
        stored = await store.get("s")
        assert stored is not None and (stored.status, stored.threshold) == ("tripped", 100)
        assert [r.stream for r in await store.decided_since(50.0)] == ["s"]
        assert await store.decided_since(50.1) == []
        assert await store.decide("unknown", "cancelled", None, "cli:ann", 70.0) is None
        await store.save_baselines([Baseline(SENDER, 20.0, 1, 5.0)])
        await store.save_baselines([Baseline(SENDER, 26.0, 2, 6.0)])
        assert await store.baselines() == [Baseline(SENDER, 26.0, 2, 6.0)]


# --- the README's examples --------------------------------------------------------------------

def test_readme_bulk_send_examples_are_valid_config() -> None:
    import re
    import tomllib

    from smtp_guard.config import build_config

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Bulk-send protection", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.DOTALL)
    assert len(blocks) >= 4
    for block in blocks:
        build_config(tomllib.loads(block), "README.md")

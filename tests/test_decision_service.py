"""The message phase decided in one process for every worker: a real DecisionServer on a Unix
socket in tmp_path, deciding with a real pipeline (default_pipeline, a real BreakerState with a
volume floor of 10), asked by RemoteDeciders as the workers will. Peers that misbehave on
purpose (silent, hanging up, answering out of order, sending garbage) are small raw servers
and clients written here against the real wire format."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import stat
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest

from smtp_guard import replies
from smtp_guard.addresses import key_hash, parse_mailbox
from smtp_guard.breaker.state import BreakerState
from smtp_guard.config import Config
from smtp_guard.decision_service import (
    HEADER, WIRE_TYPES, DecisionServer, DecisionServiceError, LocalDecider, RemoteDecider, decode, encode)
from smtp_guard.erasure.index import TombstoneIndex
from smtp_guard.erasure.keys import KeyRing, new_key
from smtp_guard.index import SuppressionIndex
from smtp_guard.policy.base import Decision, MessageContext, MessageVerdict, RecipientContext, Verdict
from smtp_guard.policy.default import default_pipeline
from smtp_guard.policy.pipeline import MessageOutcome, Pipeline
from smtp_guard.breaker.model import BreakerRecord
from smtp_guard.erasure.model import Tombstone

from conftest import make_config, mode, wait_until

LIMIT = 10  # [breaker] floor: a stream trips at its 11th distinct recipient
STREAM = "spring-sale"
NOW = 1_000_000.0


def recipients(count: int, start: int = 0, domain: str = "example.com") -> list[str]:
    return [f"user{i}@{domain}" for i in range(start, start + count)]


def context(address: str) -> RecipientContext:
    mailbox = parse_mailbox(address)
    return RecipientContext(mailbox=mailbox, key=address, key_hash=key_hash(address), domain_chain=(mailbox.domain,),
                            sender="news@shop.test", client_ip="127.0.0.1")


def message(addresses: list[str], stream: str = STREAM, now: float = NOW,
            headers: dict[str, str] | None = None) -> MessageContext:
    return MessageContext(sender="news@shop.test", client_ip="127.0.0.1", auth_user=None,
                          headers=headers or {"subject": "Spring sale"}, subject="Spring sale", stream=stream,
                          message_class="marketing", body_hash="b1", recipients=tuple(context(a) for a in addresses),
                          now=now)


def held(outcome: MessageOutcome) -> list[str]:
    assert outcome.message is None, outcome.message
    return sorted(a for a, d in outcome.recipients.items() if d.verdict is Verdict.HOLD)


def deferred_by(outcome: MessageOutcome) -> str:
    """The rule of a fail-closed deferral (and that it is one: DEFER, 451 4.3.5)."""
    assert outcome.message is not None and outcome.message.verdict is Verdict.DEFER, outcome
    assert outcome.message.reply == replies.POLICY_FAILED
    assert not outcome.recipients
    return outcome.message.rule


class Trips:
    """The breaker state's observer: every trip, as the supervisor's metrics will see them."""

    def __init__(self) -> None:
        self.records: list[BreakerRecord] = []

    def tripped(self, record: BreakerRecord) -> None:
        self.records.append(record)

    def decided(self, verdict: str, rule: str, message_class: str, recipients: int) -> None:
        pass


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, 25, breaker={"floor": LIMIT})


@pytest.fixture
def state(config: Config) -> BreakerState:
    return BreakerState(config.breaker)


@pytest.fixture
def pipeline(tmp_path: Path, config: Config, state: BreakerState) -> Pipeline:
    tombstones = TombstoneIndex(KeyRing(tmp_path / "erasure.key", [new_key()]))
    return default_pipeline(config, tombstones, SuppressionIndex(), breakers=state)


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "decide.sock"


@pytest.fixture
async def server(pipeline: Pipeline, socket_path: Path) -> AsyncIterator[DecisionServer]:
    running = DecisionServer(pipeline, socket_path)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


@asynccontextmanager
async def remote(path: Path, timeout: float = 5.0, **options: int) -> AsyncIterator[RemoteDecider]:
    decider = RemoteDecider(path, timeout=timeout, **options)
    try:
        yield decider
    finally:
        await decider.close()


@asynccontextmanager
async def raw_server(path: Path, serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
                     ) -> AsyncIterator[None]:
    """A misbehaving decision server: ``serve`` decides what it does with each connection."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)  # type: ignore[arg-type]
        try:
            await serve(reader, writer)
        finally:
            writer.close()

    listening = await asyncio.start_unix_server(handle, path=str(path))
    try:
        yield
    finally:
        listening.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await listening.wait_closed()
        path.unlink(missing_ok=True)


async def read_request(reader: asyncio.StreamReader) -> tuple[int, MessageContext]:
    length, request_id = HEADER.unpack(await reader.readexactly(HEADER.size))
    return request_id, decode(await reader.readexactly(length), MessageContext)


# --- one state for every worker ----------------------------------------------------------------

async def test_two_workers_sending_one_stream_trip_one_breaker_at_the_global_count(
        server: DecisionServer, state: BreakerState, socket_path: Path) -> None:
    trips = Trips()
    state.observer = trips
    async with remote(socket_path) as first, remote(socket_path) as second:
        # 3 + 3 + 3 + 3 recipients, alternating: 6 per worker, each far below the limit of 10.
        outcomes = [await worker.decide_message(message(recipients(3, start=3 * i)))
                    for i, worker in enumerate([first, second, first, second])]
        assert [held(o) for o in outcomes] == [[], [], [], sorted(recipients(2, start=10))]
        assert server.connections == 2
        # The stream stays tripped for both.
        later = [await worker.decide_message(message(recipients(1, start=20 + i))) for i, worker in
                 enumerate([first, second])]
        assert [held(o) for o in later] == [recipients(1, start=20), recipients(1, start=21)]
    assert [(r.stream, r.rule, r.threshold, r.recipients) for r in trips.records] == [
        (STREAM, "breaker.volume", LIMIT, LIMIT + 1)]
    assert state.active[STREAM].size == 14
    assert server.served == 6


async def test_the_server_decides_with_the_workers_time(server: DecisionServer, state: BreakerState,
                                                        socket_path: Path) -> None:
    """``now`` comes from the worker: recipients an hour apart (the breaker's window) by the
    message's time do not add up, although they arrive a moment apart by the wall clock."""
    async with remote(socket_path) as worker:
        assert held(await worker.decide_message(message(recipients(8), now=0.0))) == []
        assert held(await worker.decide_message(message(recipients(8, start=100), now=3601.0))) == []
    assert STREAM not in state.trips
    assert state.active[STREAM].last_seen == 3601.0


async def test_a_remote_outcome_equals_the_local_one(tmp_path: Path, server: DecisionServer, socket_path: Path,
                                                     config: Config) -> None:
    """The same messages through the socket and in place, on two fresh states: same outcomes,
    including a trip's decisions (with their replies) and a policy error's fail-closed 4.3.5."""
    local_pipeline = default_pipeline(config, TombstoneIndex(KeyRing(tmp_path / "k", [new_key()])),
                                      SuppressionIndex(), breakers=BreakerState(config.breaker))
    local = LocalDecider(local_pipeline)
    sequence = [message(recipients(6)), message(recipients(6, start=6)), message(recipients(2, start=12))]
    async with remote(socket_path) as worker:
        assert [await worker.decide_message(m) for m in sequence] == [await local.decide_message(m) for m in sequence]


async def test_a_policy_that_raises_is_deferred_as_in_the_single_process_guard(tmp_path: Path) -> None:
    class Broken:
        name = "broken"
        shadow = False

        def check_message(self, message: MessageContext) -> MessageVerdict | None:
            raise RuntimeError("boom")

    path = tmp_path / "run" / "decide.sock"
    server = DecisionServer(Pipeline([], [Broken()]), path)
    await server.start()
    try:
        async with remote(path) as worker:
            outcome = await worker.decide_message(message(recipients(1)))
    finally:
        await server.stop()
    assert outcome == await Pipeline([], [Broken()]).decide_message(message(recipients(1)))
    assert outcome.message is not None and outcome.message.reply == replies.POLICY_FAILED
    assert outcome.message.rule == "broken.error"


async def test_an_outcome_that_cannot_be_sent_is_deferred(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    class Local(str):  # a class defined in a function cannot be pickled
        pass

    class Odd:
        name = "odd"
        shadow = False

        def check_message(self, message: MessageContext) -> MessageVerdict | None:
            return MessageVerdict(recipients={
                r.mailbox.text: Decision(Verdict.HOLD, "odd", Local("why"), replies.HELD_FOR_REVIEW)
                for r in message.recipients})

    path = tmp_path / "run" / "decide.sock"
    server = DecisionServer(Pipeline([], [Odd()]), path)
    await server.start()
    try:
        async with remote(path) as worker:
            with caplog.at_level(logging.ERROR, logger="smtp_guard.decision_service"):
                assert deferred_by(await worker.decide_message(message(recipients(1)))) == "decision_service.error"
            assert "deciding a message failed" in caplog.text
    finally:
        await server.stop()


# --- many requests on one connection -----------------------------------------------------------

async def test_requests_in_flight_together_get_their_own_answers(server: DecisionServer, socket_path: Path) -> None:
    """Streams of 1 to 24 recipients at once: each answer holds exactly its own stream's
    recipients past the 10th, over one connection."""
    sizes = list(range(1, 25))
    async with remote(socket_path) as worker:
        outcomes = await asyncio.gather(*(
            worker.decide_message(message(recipients(n, domain=f"d{n}.example"), stream=f"stream-{n}"))
            for n in sizes))
        assert server.connections == 1
    assert [held(o) for o in outcomes] == [sorted(recipients(n, domain=f"d{n}.example")[LIMIT:]) for n in sizes]


async def test_answers_out_of_order_reach_their_requests(socket_path: Path) -> None:
    """A server that answers the second request first: the id in each frame, not the order,
    ties an answer to its request."""
    async def backwards(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first, second = await read_request(reader), await read_request(reader)
        for request_id, request in (second, first):
            answer = MessageOutcome(message=Decision(Verdict.REJECT, request.stream, "", replies.REFUSED))
            writer.write(encode(request_id, answer))
        await writer.drain()
        await reader.read()

    async with raw_server(socket_path, backwards), remote(socket_path) as worker:
        one = asyncio.create_task(worker.decide_message(message(recipients(1), stream="one")))
        await wait_until(lambda: "in_flight=1" in repr(worker), what="the first request on the wire")
        two = await worker.decide_message(message(recipients(1), stream="two"))
        assert two.message is not None and two.message.rule == "two"
        answer = await one
        assert answer.message is not None and answer.message.rule == "one"


async def test_a_late_answer_is_dropped_and_the_next_request_gets_its_own(socket_path: Path) -> None:
    """The first request times out; its answer comes after the second request was sent. The
    second request gets the second answer, not the late one."""
    async def slow_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await read_request(reader)
        second = await read_request(reader)  # only sent once the first has timed out
        for request_id, request in (first, second):
            writer.write(encode(request_id, MessageOutcome(
                message=Decision(Verdict.REJECT, request.stream, "", replies.REFUSED))))
        await writer.drain()
        await reader.read()

    async with raw_server(socket_path, slow_first), remote(socket_path, timeout=0.3) as worker:
        assert deferred_by(await worker.decide_message(message(recipients(1), stream="one"))) == \
            "decision_service.timeout"
        worker.timeout = 5.0
        answer = await worker.decide_message(message(recipients(1), stream="two"))
        assert answer.message is not None and answer.message.rule == "two"


# --- fail closed -------------------------------------------------------------------------------

async def test_no_server_defers_at_once_and_logs_the_outage_once(socket_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    async with remote(socket_path, timeout=5.0) as worker:
        started = loop.time()
        with caplog.at_level(logging.WARNING, logger="smtp_guard.decision_service"):
            for _ in range(3):
                assert deferred_by(await worker.decide_message(message(recipients(1)))) == \
                    "decision_service.unreachable"
        assert loop.time() - started < 1.0
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert "unreachable" in caplog.text and str(socket_path) in caplog.text


async def test_a_server_that_does_not_answer_defers_within_the_timeout(socket_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    loop = asyncio.get_running_loop()
    async with raw_server(socket_path, silent), remote(socket_path, timeout=0.3) as worker:
        started = loop.time()
        outcomes = await asyncio.gather(*(worker.decide_message(message(recipients(1))) for _ in range(5)))
        elapsed = loop.time() - started
    assert [deferred_by(o) for o in outcomes] == ["decision_service.timeout"] * 5
    assert 0.3 <= elapsed < 2.0


async def test_a_server_hanging_up_defers_the_messages_in_flight_at_once(socket_path: Path) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    loop = asyncio.get_running_loop()
    async with raw_server(socket_path, hang_up), remote(socket_path, timeout=30.0) as worker:
        started = loop.time()
        outcomes = await asyncio.gather(*(worker.decide_message(message(recipients(1))) for _ in range(3)))
        assert loop.time() - started < 5.0
    assert [deferred_by(o) for o in outcomes] == ["decision_service.unreachable"] * 3


async def test_after_a_server_restart_the_worker_reconnects(pipeline: Pipeline, socket_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    server = DecisionServer(pipeline, socket_path)
    await server.start()
    async with remote(socket_path) as worker:
        assert held(await worker.decide_message(message(recipients(1)))) == []
        await server.stop()
        await wait_until(lambda: not worker.is_connected, what="the worker to see the server gone")
        assert deferred_by(await worker.decide_message(message(recipients(1)))) == "decision_service.unreachable"
        server = DecisionServer(pipeline, socket_path)
        await server.start()
        try:
            with caplog.at_level(logging.WARNING, logger="smtp_guard.decision_service"):
                assert held(await worker.decide_message(message(recipients(1, start=1)))) == []
            assert "reachable again" in caplog.text
            assert worker.is_connected and server.served == 1
        finally:
            await server.stop()


async def test_an_answer_that_cannot_be_read_defers_that_message_only(socket_path: Path) -> None:
    """A server of another version: its unreadable answer defers one message; the framing
    held, so the connection goes on serving."""
    async def garbled_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_id, _ = await read_request(reader)
        writer.write(HEADER.pack(5, request_id) + b"junk!")
        request_id, request = await read_request(reader)
        writer.write(encode(request_id, MessageOutcome(
            message=Decision(Verdict.REJECT, request.stream, "", replies.REFUSED))))
        await reader.read()

    async with raw_server(socket_path, garbled_first), remote(socket_path) as worker:
        assert deferred_by(await worker.decide_message(message(recipients(1)))) == "decision_service.error"
        answer = await worker.decide_message(message(recipients(1), stream="two"))
        assert answer.message is not None and answer.message.rule == "two"


async def test_a_context_over_the_frame_limit_is_deferred_without_being_sent(server: DecisionServer,
                                                                             socket_path: Path) -> None:
    async with remote(socket_path, max_frame=4096) as worker:
        big = message(recipients(1), headers={"subject": "x" * 5000})
        assert deferred_by(await worker.decide_message(big)) == "decision_service.error"
        assert held(await worker.decide_message(message(recipients(1)))) == []
    assert server.served == 1


# --- a bad client is dropped, the others are served --------------------------------------------

class Mkdir:
    """A pickle that would create a directory when loaded by a plain unpickler."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.path),)


async def test_bad_frames_drop_their_connection_and_the_server_serves_the_others(
        server: DecisionServer, socket_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    marker = tmp_path / "should-not-exist"
    foreign = pickle.dumps(Mkdir(marker))
    bad_frames = {
        "absurd length": HEADER.pack(2**32 - 1, 1),
        "not a pickle": HEADER.pack(5, 2) + b"junk!",
        "a foreign class": HEADER.pack(len(foreign), 3) + foreign,
        "an answer instead of a request": encode(4, MessageOutcome()),
    }
    async with remote(socket_path) as worker:
        for what, frame in bad_frames.items():
            reader, writer = await asyncio.open_unix_connection(socket_path)
            with caplog.at_level(logging.WARNING, logger="smtp_guard.decision_service"):
                writer.write(frame)
                await writer.drain()
                assert await asyncio.wait_for(reader.read(), timeout=5.0) == b"", what  # hung up, no answer
            writer.close()
            assert held(await worker.decide_message(message(recipients(1)))) == [], what
    assert not marker.exists()
    assert caplog.text.count("dropping a connection that sent a bad frame") == len(bad_frames)
    assert server.served == len(bad_frames)


# --- the socket file ---------------------------------------------------------------------------

async def test_socket_is_0600_in_a_0700_directory_and_stop_removes_it(pipeline: Pipeline, socket_path: Path,
                                                                      open_umask: None) -> None:
    server = DecisionServer(pipeline, socket_path)
    await server.start()
    try:
        assert stat.S_ISSOCK(socket_path.stat().st_mode)
        assert (oct(mode(socket_path.parent)), oct(mode(socket_path))) == (oct(0o700), oct(0o600))
    finally:
        await server.stop()
    assert not socket_path.exists()


async def test_a_directory_others_can_enter_is_refused_and_left_alone(pipeline: Pipeline, socket_path: Path) -> None:
    socket_path.parent.mkdir()
    os.chmod(socket_path.parent, 0o755)
    with pytest.raises(DecisionServiceError, match="chmod 700"):
        await DecisionServer(pipeline, socket_path).start()
    assert mode(socket_path.parent) == 0o755 and not socket_path.exists()


async def test_a_stale_socket_is_replaced(pipeline: Pipeline, socket_path: Path) -> None:
    socket_path.parent.mkdir(mode=0o700)
    killed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    killed.bind(str(socket_path))  # a supervisor killed before it could unlink its socket
    killed.close()
    server = DecisionServer(pipeline, socket_path)
    await server.start()
    try:
        async with remote(socket_path) as worker:
            assert held(await worker.decide_message(message(recipients(1)))) == []
    finally:
        await server.stop()


async def test_a_live_server_is_not_replaced(server: DecisionServer, pipeline: Pipeline, socket_path: Path) -> None:
    with pytest.raises(DecisionServiceError, match="another decision server"):
        await DecisionServer(pipeline, socket_path).start()
    async with remote(socket_path) as worker:
        assert held(await worker.decide_message(message(recipients(1)))) == []


async def test_a_file_that_is_not_a_socket_is_not_removed(pipeline: Pipeline, socket_path: Path) -> None:
    socket_path.parent.mkdir(mode=0o700)
    socket_path.write_text("someone's notes")
    with pytest.raises(DecisionServiceError, match="not a socket"):
        await DecisionServer(pipeline, socket_path).start()
    assert socket_path.read_text() == "someone's notes"


# --- the values on the wire --------------------------------------------------------------------

def test_every_wire_type_survives_a_round_trip() -> None:
    tombstone = Tombstone(7, bytes(range(32)), "k1", "ticket-1", 5.0)
    would = Decision(Verdict.DEFER, "ratelimit.bulk", "would have deferred", replies.rate_limited("bulk"))
    decision = Decision(Verdict.HOLD, "breaker.volume", "paused", replies.HELD_FOR_REVIEW, tombstone=tombstone,
                        release_at=9.5, shadowed=(would,))
    outcome = MessageOutcome(message=None, recipients={"a@example.com": decision}, shadowed=[("", would)])
    request = message(recipients(2), headers={"subject": "café \ufffd", "x-campaign": "spring"})
    request_id, payload = 2**64 - 1, encode(2**64 - 1, outcome)[HEADER.size:]
    assert decode(payload, MessageOutcome) == outcome
    assert decode(encode(request_id, request)[HEADER.size:], MessageContext) == request
    assert decode(payload, MessageOutcome).recipients["a@example.com"].verdict is Verdict.HOLD
    names = {name for _, name in WIRE_TYPES}
    assert names == {"MessageContext", "RecipientContext", "Mailbox", "MessageOutcome", "Decision", "Verdict",
                     "Reply", "Tombstone"}


def test_a_frame_naming_any_other_class_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "should-not-exist"
    with pytest.raises(pickle.UnpicklingError, match="not part of the decision protocol"):
        decode(pickle.dumps(Mkdir(marker)), MessageContext)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="expected MessageContext"):
        decode(pickle.dumps(("a", 1)), MessageContext)


def test_the_local_decider_decides_in_place(pipeline: Pipeline) -> None:
    """No task and no suspension: the coroutine finishes on its first step."""
    coroutine = LocalDecider(pipeline).decide_message(message(recipients(LIMIT + 1)))
    with pytest.raises(StopIteration) as finished:
        coroutine.send(None)
    assert held(finished.value.value) == [recipients(LIMIT + 1)[-1]]


async def test_a_socket_path_too_long_for_unix_sockets_is_explained(pipeline: Pipeline, tmp_path: Path) -> None:
    path = tmp_path / "run" / ("x" * 120 + ".sock")
    with pytest.raises(DecisionServiceError, match="shorter than 108 bytes"):
        await DecisionServer(pipeline, path).start()


async def test_a_request_the_worker_gave_up_on_is_not_decided(pipeline: Pipeline, state: BreakerState,
                                                               socket_path: Path) -> None:
    """Its worker deferred the message after its own timeout: counting its recipients now would
    tally mail that was not sent (and keep an overloaded supervisor busy for nobody)."""
    server = DecisionServer(pipeline, socket_path, expire_after=5.0, clock=lambda: NOW + 6.0)
    await server.start()
    try:
        async with remote(socket_path, timeout=0.5) as worker:
            stale = await worker.decide_message(message(recipients(3), now=NOW))
            fresh = await worker.decide_message(message(recipients(3, start=3), now=NOW + 2.0))
    finally:
        await server.stop()
    assert deferred_by(stale) == "decision_service.timeout" and server.expired == 1
    assert held(fresh) == [] and server.served == 1
    assert state.active[STREAM].size == 3  # only the fresh message's recipients

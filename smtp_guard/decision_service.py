"""The message phase decided in one process for every SMTP worker.

With ``[smtp] workers = N`` the SMTP front runs in N processes, but the breaker's per-stream
tallies (``BreakerState``) must be global: a breaker trips once for a stream spread over all
workers. So the supervisor owns the one BreakerState and the message-phase pipeline, and a
``DecisionServer`` answers every worker's end-of-DATA question over a private Unix socket.
The SMTP front asks through a ``MessageDecider``: ``RemoteDecider`` in a worker, or
``LocalDecider`` in the single-process guard (a direct call, nothing else). RCPT time stays
local in each worker; the end of DATA already waits for the upstream, so one local round trip
there costs little (median 0.16 ms with 1 recipient, 0.22 ms with 10, on a busy 2-core VM:
``bench/decision_service.py``).

Fail closed and temporary (STYLE.md habit 6): when the service cannot be reached, does not
answer within ``timeout``, or answers garbage, the message is deferred with 451 4.3.5
(``replies.POLICY_FAILED``, what Postfix's ``smtpd_policy_service_default_action`` answers
when its policy service is unavailable), under a rule of its own (``decision_service.*``),
and the cause is logged. Mail is never passed undecided. A request is never sent twice: the
service may have counted it already (a timed-out request may still be decided later; the
platform's retry then counts the same recipients again only in the rate-limit buckets, as
the stream tally counts distinct recipients).

Wire format: frames of a 12-byte header (payload length, request id; network byte order) and
a pickled payload: a ``MessageContext`` one way, a ``MessageOutcome`` back. Answers come in
any order; the id ties each to its request, so many requests share one connection.

Pickle, and why it is acceptable here: unpickling data runs code of the sender's choosing,
so it is only acceptable because no one but the guard's own user can connect — the socket is
0600 inside a 0700 directory, and the server refuses a directory open to anyone else. As a
second fence, frames are read by an unpickler that resolves only the classes of the protocol
(``WIRE_TYPES``) and refuses any other global, and a frame longer than ``max_frame`` drops the
connection. The values are frozen dataclasses whose default pickling is compact and quick
(a one-recipient context with nine header fields: 1.0 kB, 14 us to encode and decode; each
further recipient about 190 bytes and 6 us), so none needs a ``__reduce__`` of its own.

Time: the worker decides ``MessageContext.now``; the server decides with it as given, so a
worker's clock is the clock of its messages, as in the single-process guard.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import os
import pickle
import stat
import struct
import time
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

from . import replies
from .addresses import Mailbox
from .config import SMTPConfig
from .policy.base import Decision, MessageContext, RecipientContext, Verdict
from .policy.pipeline import MessageOutcome, Pipeline
from .replies import Reply
from .erasure.model import Tombstone

log = logging.getLogger(__name__)

HEADER = struct.Struct("!IQ")  # payload length, request id
DEFAULT_TIMEOUT = 5.0
SOCKET_MODE = 0o600
DIRECTORY_MODE = 0o700

# Every class a frame may name, by the (module, qualified name) pickle writes for it.
WIRE_TYPES: dict[tuple[str, str], type[object]] = {
    (cls.__module__, cls.__qualname__): cls
    for cls in (MessageContext, RecipientContext, Mailbox, MessageOutcome, Decision, Verdict, Reply, Tombstone)
}


def frame_limit(smtp: SMTPConfig) -> int:
    """A frame cap no legitimate request reaches. A context carries the message's header
    fields, decoded: at most ``max_message_size`` bytes of message, and a byte that is not
    UTF-8 becomes U+FFFD, three bytes pickled. A recipient is its address in three spellings
    (at most 254 bytes each) and its domain with every parent (at most 127 names of at most
    253 bytes, 16 kB): under 20 kB even when built to be long."""
    return 3 * smtp.max_message_size + 20480 * smtp.max_recipients + 65536


DEFAULT_MAX_FRAME = frame_limit(SMTPConfig())


class DecisionServiceError(Exception):
    """The decision server cannot listen on its socket; the text says what to change."""


class MessageDecider(Protocol):
    """Decides the message phase (end of DATA) of one message."""

    async def decide_message(self, message: MessageContext) -> MessageOutcome:
        """The pipeline's message outcome; never raises for a failure to decide (fails closed)."""

    async def close(self) -> None:
        """Let go of any connection (at shutdown)."""


class LocalDecider:
    """The single-process guard: the pipeline, called in place (no task, no copy)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def __repr__(self) -> str:
        return f"<LocalDecider {self._pipeline!r}>"

    async def decide_message(self, message: MessageContext) -> MessageOutcome:
        return await self._pipeline.decide_message(message)

    async def close(self) -> None:
        return None


def unavailable(rule: str, reason: str) -> MessageOutcome:
    """The outcome when the service could not decide: defer the whole message, 451 4.3.5."""
    return MessageOutcome(message=Decision(Verdict.DEFER, rule, reason, replies.POLICY_FAILED))


_T = TypeVar("_T")


class _WireUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return WIRE_TYPES[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of the decision protocol") from None


def encode(request_id: int, value: MessageContext | MessageOutcome) -> bytes:
    """One frame: header and pickled payload."""
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload), request_id) + payload


def decode(payload: bytes, expected: type[_T]) -> _T:
    """A frame's payload as ``expected``; raises for anything else (garbage, foreign classes)."""
    value = _WireUnpickler(io.BytesIO(payload)).load()
    if not isinstance(value, expected):
        raise pickle.UnpicklingError(f"expected {expected.__name__}, got {type(value).__name__}")
    return value


async def _read_frame(reader: asyncio.StreamReader, max_frame: int) -> tuple[int, bytes]:
    """(request id, payload). Raises IncompleteReadError at end of stream and ValueError for a
    frame longer than ``max_frame`` (its payload is left unread)."""
    length, request_id = HEADER.unpack(await reader.readexactly(HEADER.size))
    if length > max_frame:
        raise ValueError(f"frame of {length} bytes exceeds the limit of {max_frame}")
    return request_id, await reader.readexactly(length)


# --- the worker's side -------------------------------------------------------------------------

class _Lost(Exception):
    """The connection ended before the answer came."""


class _BadAnswer(Exception):
    """An answer that is not a MessageOutcome (a server of another version)."""


class _Connection:
    """One connection to the server: requests written in turn, answers matched by id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame: int,
                 path: Path) -> None:
        self._writer = writer
        self._path = path
        self.pending: dict[int, asyncio.Future[MessageOutcome]] = {}
        self.is_lost = False
        self._reading = asyncio.create_task(self._read(reader, max_frame), name="decision-client")

    async def request(self, request_id: int, frame: bytes) -> MessageOutcome:
        if self.is_lost:  # a write to a closed transport would be dropped without an error
            raise _Lost("connection closed")
        future: asyncio.Future[MessageOutcome] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        try:
            self._writer.write(frame)
            await self._writer.drain()
            return await future
        finally:
            self.pending.pop(request_id, None)

    async def _read(self, reader: asyncio.StreamReader, max_frame: int) -> None:
        why = "closed by the server"
        try:
            while True:
                request_id, payload = await _read_frame(reader, max_frame)
                future = self.pending.get(request_id)
                if future is None or future.done():
                    continue  # its request timed out or was cancelled: nobody waits for it
                try:
                    future.set_result(decode(payload, MessageOutcome))
                except Exception as error:  # the framing holds: only this answer is lost
                    future.set_exception(_BadAnswer(str(error) or type(error).__name__))
        except asyncio.IncompleteReadError:
            pass
        except (OSError, ValueError) as error:
            why = str(error) or type(error).__name__
        finally:
            if not self.is_lost:
                log.warning("decision service at %s: connection lost (%s) with %d message(s) in flight",
                            self._path, why, len(self.pending))
                self._lose(why)

    def _lose(self, why: str) -> None:
        self.is_lost = True
        for future in self.pending.values():
            if not future.done():
                future.set_exception(_Lost(why))
        self._writer.close()

    async def close(self) -> None:
        self._lose("the worker is closing")
        self._reading.cancel()
        try:
            await self._reading
        except asyncio.CancelledError:
            pass


class RemoteDecider:
    """A worker's client of the ``DecisionServer``: one persistent connection, many requests in
    flight on it, reconnected on the next request after it broke. Never raises for a failure
    to decide: the message is deferred (451 4.3.5) and the cause logged."""

    def __init__(self, socket_path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT,
                 max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.path = Path(socket_path)
        self.timeout = timeout
        self._max_frame = max_frame
        self._ids = itertools.count(1)
        self._connection: _Connection | None = None
        self._connecting = asyncio.Lock()
        self._reachable = True  # as last seen: a change is logged once, not per message

    def __repr__(self) -> str:
        in_flight = 0 if self._connection is None else len(self._connection.pending)
        return f"<RemoteDecider {self.path} connected={self.is_connected} in_flight={in_flight}>"

    @property
    def is_connected(self) -> bool:
        return self._connection is not None and not self._connection.is_lost

    async def decide_message(self, message: MessageContext) -> MessageOutcome:
        request_id = next(self._ids)
        try:
            frame = encode(request_id, message)
        except Exception:
            log.exception("decision service: the message context cannot be encoded; deferring")
            return unavailable("decision_service.error", "the message context could not be encoded")
        if len(frame) - HEADER.size > self._max_frame:
            log.error("decision service: the message context is %d bytes, over the frame limit of %d; deferring",
                      len(frame) - HEADER.size, self._max_frame)
            return unavailable("decision_service.error", "the message context exceeds the frame limit")
        try:
            async with asyncio.timeout(self.timeout):
                connection = await self._connect()
                outcome = await connection.request(request_id, frame)
        except TimeoutError:
            log.warning("decision service at %s did not answer within %gs; deferring the message (451 4.3.5)",
                        self.path, self.timeout)
            return unavailable("decision_service.timeout", f"the decision service did not answer within {self.timeout:g}s")
        except (OSError, _Lost) as error:
            self._unreachable(error)
            return unavailable("decision_service.unreachable", "the decision service is unreachable")
        except _BadAnswer as error:
            log.error("decision service at %s sent an answer that cannot be read (%s); deferring the message",
                      self.path, error)
            return unavailable("decision_service.error", "the decision service's answer could not be read")
        except Exception:
            log.exception("decision service at %s: asking failed; deferring the message", self.path)
            return unavailable("decision_service.error", "asking the decision service failed")
        return outcome

    async def _connect(self) -> _Connection:
        async with self._connecting:  # concurrent requests share one connection attempt
            if self._connection is None or self._connection.is_lost:
                reader, writer = await asyncio.open_unix_connection(self.path)
                self._connection = _Connection(reader, writer, self._max_frame, self.path)
                if not self._reachable:
                    log.warning("decision service at %s reachable again", self.path)
                self._reachable = True
            return self._connection

    def _unreachable(self, error: BaseException) -> None:
        if self._reachable:
            log.error("decision service at %s unreachable (%s); deferring messages (451 4.3.5) until it answers",
                      self.path, str(error) or type(error).__name__)
        self._reachable = False

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()


# --- the supervisor's side ---------------------------------------------------------------------

class DecisionServer:
    """Serves ``pipeline.decide_message`` to the workers. Each request is decided in a task of
    its own, started in the order requests arrive: the message policies are CPU-only and run
    without a pause, so each decision is taken whole against the one state; only the counters
    may wait (Redis, ``[counters] url``: the rate limits' buckets, the breaker's stream counts),
    and a request waiting there holds up no other — answers go back as they are ready, matched
    by their id."""

    def __init__(self, pipeline: Pipeline, socket_path: str | os.PathLike[str], *,
                 max_frame: int = DEFAULT_MAX_FRAME, expire_after: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``expire_after``: a request whose message time (``MessageContext.now``, the worker's
        clock, the same wall clock as ``clock``) is older than this is dropped unanswered: the
        worker gave up on it after its own timeout, the same figure (the supervisor passes
        ``DEFAULT_TIMEOUT``). None: every request is decided, whatever its time."""
        self.path = Path(socket_path)
        self._pipeline = pipeline
        self._max_frame = max_frame
        self._expire_after = expire_after
        self._clock = clock
        self.expired = 0
        self._server: asyncio.Server | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the socket it made
        self._handlers: set[asyncio.Task[Any]] = set()
        self._deciding: set[asyncio.Task[None]] = set()
        self.served = 0

    def __repr__(self) -> str:
        return (f"<DecisionServer {self.path} listening={self._server is not None} "
                f"connections={len(self._handlers)} served={self.served}>")

    @property
    def connections(self) -> int:
        return len(self._handlers)

    async def start(self) -> None:
        self._prepare_directory()
        await self._remove_stale_socket()
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        except OSError as error:
            hint = "; a Unix socket path must be shorter than 108 bytes" if len(os.fsencode(self.path)) >= 108 else ""
            raise DecisionServiceError(f"{self.path}: cannot listen ({error}){hint}") from None
        os.chmod(self.path, SOCKET_MODE)  # the directory already keeps others out; this says so twice
        info = os.stat(self.path)
        self._identity = (info.st_dev, info.st_ino)
        log.info("decision service listening on %s", self.path)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in [*self._handlers, *self._deciding]:
            task.cancel()
        await asyncio.gather(*self._handlers, *self._deciding, return_exceptions=True)
        await server.wait_closed()
        try:
            info = os.stat(self.path)
            # Only our own socket: a new supervisor may already have put its own there.
            if (info.st_dev, info.st_ino) == self._identity:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _prepare_directory(self) -> None:
        directory = self.path.parent
        if not directory.exists():
            if not directory.parent.is_dir():
                raise DecisionServiceError(
                    f"{self.path}: the directory {directory.parent} does not exist; correct the socket path")
            directory.mkdir(mode=DIRECTORY_MODE)
            os.chmod(directory, DIRECTORY_MODE)  # mkdir's mode is filtered by the umask
        info = os.stat(directory)
        if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
            # The socket hands out decisions and unpickles what it is sent: only the guard's user
            # may reach it. A shared directory is not tightened (it would lock others out).
            raise DecisionServiceError(
                f"{self.path}: the directory {directory} must belong to this user with mode 0700 (it is "
                f"{stat.S_IMODE(info.st_mode):04o}, owner uid {info.st_uid}); run `chmod 700 {directory}` "
                "or give the socket a directory of its own")

    async def _remove_stale_socket(self) -> None:
        """A socket left by a killed supervisor is replaced; a live one is not."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise DecisionServiceError(f"{self.path} exists and is not a socket; remove it or correct the socket path")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(self.path), timeout=1.0)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("decision service: replacing the stale socket %s (left by a stopped supervisor)", self.path)
            os.unlink(self.path)
            return
        except TimeoutError:
            pass  # accepted nothing within a second: alive, with a full backlog
        except OSError as error:
            raise DecisionServiceError(f"{self.path}: cannot tell whether it is in use ({error}); remove it") from None
        else:
            writer.close()
        raise DecisionServiceError(
            f"{self.path}: another decision server is listening there; stop the other supervisor first")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            while True:
                try:
                    request_id, payload = await _read_frame(reader, self._max_frame)
                    message = decode(payload, MessageContext)
                except asyncio.IncompleteReadError as error:
                    if error.partial:
                        log.warning("decision service: a client closed in the middle of a frame")
                    return
                except ConnectionError:
                    return
                except Exception as error:
                    # Not a client of this version speaking this protocol: the rest of the
                    # stream cannot be trusted either, so the connection goes (others stay).
                    log.warning("decision service: dropping a connection that sent a bad frame (%s)", error)
                    return
                if self._expire_after is not None and self._clock() - message.now > self._expire_after:
                    # The worker stopped waiting and deferred it: deciding it now would spend
                    # rate-limit tokens and count recipients for a message that was not sent,
                    # and keep an overloaded supervisor busy with work nobody waits for.
                    self.expired += 1
                    log.warning("decision service: dropped a request %.1fs old (the worker deferred it)",
                                self._clock() - message.now)
                    continue
                deciding = asyncio.create_task(self._answer(request_id, message, writer), name="decision")
                self._deciding.add(deciding)
                deciding.add_done_callback(self._deciding.discard)
        except ConnectionError:
            pass
        finally:
            self._handlers.discard(handler)
            writer.close()  # answers still being decided for it are dropped: the worker is gone

    async def _answer(self, request_id: int, message: MessageContext, writer: asyncio.StreamWriter) -> None:
        try:
            frame = encode(request_id, await self._pipeline.decide_message(message))
        except Exception:
            log.exception("decision service: deciding a message failed; deferring it (451 4.3.5)")
            frame = encode(request_id, unavailable("decision_service.error", "the decision service failed"))
        self.served += 1
        if writer.is_closing():
            return  # the worker went away: nobody waits for this answer
        writer.write(frame)  # one write per frame: answers of concurrent tasks never interleave
        try:
            await writer.drain()
        except ConnectionError:
            pass

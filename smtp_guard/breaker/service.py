"""Admin operations on tripped streams, shared by the CLI and the HTTP API.

* approve — the stream may grow to a new ceiling; its held recipients are released (the
  running server's release worker delivers each exactly once);
* cancel — its held recipients are discarded (never delivered) and the running server
  refuses further mail of the stream with 550 5.7.1.

The stream's held recipients are swept first, and only then is the decision written to the
store: a running server takes the decision up within ``[store] reload_interval`` (at once when
the command waits for it, ``services/propagation.py``) and sweeps the stream's holds once more,
and that sweep must only find mail held after the admin's own — otherwise a server that read
the decision between the two would sweep everything itself, the admin would be told nothing was
released or discarded, and the server's audit record would follow the admin's. Every decision
is recorded in the audit trail.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..audit_model import AuditRecord
from ..classify import parse_headers
from ..hold.model import RecipientState
from ..services.context import AdminContext
from .model import Baseline, BreakerRecord, BreakerStatus
from .rules import cancelling_rules, holding_rules


class BreakerNotFound(LookupError):
    """No breaker record for this stream (it never tripped)."""

    def __init__(self, stream: str) -> None:
        super().__init__(f"no tripped stream {stream!r}")
        self.stream = stream


class CeilingTooLow(ValueError):
    """An approval's ceiling below the audience the stream already has."""

    def __init__(self, record: BreakerRecord, ceiling: int) -> None:
        super().__init__(f"ceiling {ceiling} is below the {record.recipients} recipients stream "
                         f"{record.stream!r} already has")
        self.record = record
        self.ceiling = ceiling


@dataclass(frozen=True)
class Sample:
    """One held message of the stream, as the admin needs to judge it."""

    hold_id: str
    subject: str
    from_header: str
    recipients: tuple[str, ...]  # the first few held ones
    held: int  # held recipients of this message


@dataclass(frozen=True)
class BreakerSummary:
    record: BreakerRecord
    held: int  # recipients of the stream waiting in the hold queue


@dataclass(frozen=True)
class BreakerDetails:
    record: BreakerRecord
    baseline: Baseline | None
    recipients_by_state: dict[RecipientState, int]
    samples: tuple[Sample, ...]

    @property
    def held(self) -> int:
        return self.recipients_by_state.get("held", 0)


@dataclass(frozen=True)
class BreakerAction:
    record: BreakerRecord  # after the decision
    changed: int  # held recipients released (approve) or discarded (cancel)


async def list_breakers(ctx: AdminContext, status: BreakerStatus | None = "tripped",
                        limit: int = 100) -> list[BreakerSummary]:
    records = await ctx.breakers.list(status, limit)
    return [BreakerSummary(r, (await ctx.holds.stream_counts(r.stream)).get("held", 0)) for r in records]


async def show_breaker(ctx: AdminContext, stream: str, samples: int = 3, sample_recipients: int = 5) -> BreakerDetails:
    """The stream's record, its sender's baseline, its hold-queue counts and sample messages."""
    record = await _get(ctx, stream)
    found: list[Sample] = []
    for message in await ctx.holds.stream_messages(stream, samples):
        stored = await ctx.holds.get(message.id)
        headers = parse_headers(stored.content) if stored is not None and stored.content is not None else {}
        held = [r.address for r in message.recipients if r.state == "held"]
        found.append(Sample(message.id, headers.get("subject", ""), headers.get("from", ""),
                            tuple(held[:sample_recipients]), len(held)))
    return BreakerDetails(record, await ctx.breakers.baseline(record.sender),
                          await ctx.holds.stream_counts(stream), tuple(found))


async def approve_breaker(ctx: AdminContext, stream: str, ceiling: int) -> BreakerAction:
    """Let the stream grow to ``ceiling`` recipients and release what it has waiting."""
    record = await _get(ctx, stream)
    if ceiling < record.recipients:
        raise CeilingTooLow(record, ceiling)
    now = ctx.clock()
    released = await ctx.holds.release_stream(stream, holding_rules(record.rule, record.message_class), now)
    decided = await ctx.breakers.decide(stream, "approved", ceiling, ctx.actor, now)
    if decided is None:
        raise BreakerNotFound(stream)
    await _audit(ctx, decided, "breaker.approve",
                 f"stream {stream!r} approved up to {ceiling} recipients (audience {record.recipients}); "
                 f"released {released} held recipient(s)", now)
    return BreakerAction(decided, released)


async def cancel_breaker(ctx: AdminContext, stream: str) -> BreakerAction:
    """Discard the stream's held mail and refuse the rest of it."""
    record = await _get(ctx, stream)
    now = ctx.clock()
    discarded = await ctx.holds.discard_stream(stream, cancelling_rules(
        record.rule, record.message_class, [limit.name for limit in ctx.config.rate_limits]))
    decided = await ctx.breakers.decide(stream, "cancelled", record.ceiling, ctx.actor, now)
    if decided is None:
        raise BreakerNotFound(stream)
    await _audit(ctx, decided, "breaker.cancel",
                 f"stream {stream!r} cancelled (audience {record.recipients}); discarded {discarded} held "
                 "recipient(s); further mail of the stream is refused", now)
    return BreakerAction(decided, discarded)


async def _get(ctx: AdminContext, stream: str) -> BreakerRecord:
    record = await ctx.breakers.get(stream)
    if record is None:
        raise BreakerNotFound(stream)
    return record


async def _audit(ctx: AdminContext, record: BreakerRecord, verb: str, reason: str, now: float) -> None:
    await ctx.audit.append([AuditRecord(time=now, kind="admin", verdict=verb, rule=record.rule, reason=reason,
                                        sender=record.sender, actor=ctx.actor)])

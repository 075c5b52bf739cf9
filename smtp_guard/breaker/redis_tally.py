"""The breaker's stream tallies in Redis (``[counters] url``): global across guard instances.

A stream spread over several guards behind a load balancer is counted once: its distinct
recipients in the window, its audience, the recipients of each of its bodies — and it trips
once, at the first recipient past a limit, whichever guard counts that recipient.

**One message, one round trip.** ``count`` runs one Lua script (EVALSHA) over the stream's keys:
Redis runs a script alone, so counting a message's recipients and claiming the trip they cause
is atomic across guards. The scripts are ``tally.py`` (``MemoryTallies``, ``StreamTally``)
translated function by function; times travel as exact text both ways (``repr`` in, ``%.17g``
out), so both give the same answers — tests/test_redis_tally.py checks it on random sequences of
requests, clocks that step back included.

**Keys** (``<key_prefix><kind>:<64-bit hash>``, no stream name, body or address in clear):

* ``st:`` a hash per stream — ``size``, ``overflow``, ``seen`` (the tally's time) and the
  trip it recorded (``trip_rule``, ``trip_threshold``, ``trip_at``, ``trip_basis``);
* ``sw:`` a sorted set per stream: the recipients within the window (their 64-bit key
  hashes, as the in-memory tally keeps them), scored by when each was last seen;
* ``sb:`` a hash per (stream, body): ``seen``, ``count`` and one field per recipient.

A stream's keys expire ``stream_idle`` plus an hour after its last count: by then a guard has
ended it (``finish``) and learned from it, unless none that counted it is running — as a
restart of a guard without Redis loses its tallies. A body's key expires a minute after the
window (its count starts anew after a window anyway). Keep Redis's ``maxmemory-policy`` at
``noeviction``: an evicted tally would restart a stream's count, and forget its trip.

The connection (pool, timeout, failures as ``CountersUnavailable``, metrics) is shared with the
rate counters (``redis_connection.py``).
"""

from __future__ import annotations

import math
from typing import Sequence

from ..redis_connection import RedisConnection
from .tally import Counted, CountRequest, Ending, Trip

# How long a stream's keys outlive its ``stream_idle``, for a guard to end it and learn from it.
TALLY_EXPIRY_MARGIN = 3600.0
# How long a body's key outlives the window: clocks of guards and Redis a little apart.
BODY_EXPIRY_MARGIN = 60.0

# tally.py's MemoryTallies.count, in Lua; the names follow the Python ones.
COUNT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local carry = tonumber(ARGV[4])
local basis = ARGV[5]
local tally_ms = tonumber(ARGV[6])
local body_ms = tonumber(ARGV[7])
local next_arg = 8
local function arg()
  local value = ARGV[next_arg]
  next_arg = next_arg + 1
  return value
end
local bounds = {}
for i = 1, tonumber(arg()) do
  bounds[i] = {rule = arg(), measure = arg(), threshold = arg()}
  bounds[i].limit = tonumber(bounds[i].threshold)
end
local counts_body = #KEYS == 3
local function exact(value)
  return string.format('%.17g', value)
end

-- version: any admin decision is newer than none ('')
local function version(decided_at)
  if decided_at == '' then
    return -math.huge
  end
  return tonumber(decided_at)
end

-- the StreamTally, created with the carried audience; its time never goes back
local fields = redis.call('HMGET', KEYS[1], 'size', 'overflow', 'seen', 'trip_rule', 'trip_threshold',
                          'trip_at', 'trip_basis')
local tally
if fields[3] then
  tally = {size = tonumber(fields[1]), overflow = tonumber(fields[2]), last_seen = tonumber(fields[3])}
else
  redis.call('DEL', KEYS[2])  -- a window left by a tally that expired before it is not this one's
  tally = {size = carry, overflow = 0, last_seen = now}
end
if now < tally.last_seen then
  now = tally.last_seen
end
-- is_current
local trip = nil
if fields[4] and version(fields[7]) >= version(basis) then
  trip = {rule = fields[4], threshold = fields[5], at = fields[6], basis = fields[7]}
end

-- _forget_before(now - window), then the remembered recipients
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. exact(now - window))
local remembered = redis.call('ZCARD', KEYS[2])

-- the body, counted anew when it was not seen for a window
local body = 0
if counts_body then
  local seen = redis.call('HMGET', KEYS[3], 'seen', 'count')
  if seen[1] and tonumber(seen[1]) >= now - window then
    body = tonumber(seen[2])
  else
    redis.call('DEL', KEYS[3])
  end
end

local windows, sizes, bodies = {}, {}, {}
local claimed = 0
local position = 0
local seen_at = exact(now)
for i = next_arg, #ARGV do
  local key = ARGV[i]
  position = position + 1
  -- StreamTally.add: below the cap one ZADD says whether the recipient is new; at the cap only
  -- one already remembered is (seen again and) not counted
  local new
  if remembered < cap then
    new = redis.call('ZADD', KEYS[2], seen_at, key) == 1
    if new then
      remembered = remembered + 1
    end
  else
    new = not redis.call('ZSCORE', KEYS[2], key)
    if new then
      tally.overflow = tally.overflow + 1
    else
      redis.call('ZADD', KEYS[2], seen_at, key)
    end
  end
  if new then
    tally.size = tally.size + 1
  end
  local in_window = remembered + tally.overflow
  -- _add_body
  if counts_body and body < cap and redis.call('HSETNX', KEYS[3], 'r' .. key, 1) == 1 then
    body = body + 1
  end
  windows[position] = in_window
  sizes[position] = tally.size
  bodies[position] = body
  -- exceeded: the first bound past its limit claims the trip
  if trip == nil then
    for _, bound in ipairs(bounds) do
      local value = body
      if bound.measure == 'window' then
        value = in_window
      elseif bound.measure == 'size' then
        value = tally.size
      end
      if value > bound.limit then
        trip = {rule = bound.rule, threshold = bound.threshold, at = seen_at, basis = basis}
        claimed = position
        redis.call('HSET', KEYS[1], 'trip_rule', trip.rule, 'trip_threshold', trip.threshold,
                   'trip_at', trip.at, 'trip_basis', trip.basis)
        break
      end
    end
  end
end

redis.call('HSET', KEYS[1], 'size', tally.size, 'overflow', tally.overflow, 'seen', seen_at)
redis.call('PEXPIRE', KEYS[1], tally_ms)
redis.call('PEXPIRE', KEYS[2], tally_ms)
if counts_body then
  redis.call('HSET', KEYS[3], 'seen', seen_at, 'count', body)
  redis.call('PEXPIRE', KEYS[3], body_ms)
end
-- The counts as text: a few thousand integers in a reply cost redis-py milliseconds to parse.
local reply = {seen_at, claimed, '', '', '', '', table.concat(windows, ' '), table.concat(sizes, ' '),
               table.concat(bodies, ' ')}
if trip ~= nil then
  reply[3], reply[4], reply[5], reply[6] = trip.rule, trip.threshold, trip.at, trip.basis
end
return reply
"""

# MemoryTallies.sizes: -1 for a stream without a tally.
SIZES = """
local sizes = {}
for i, key in ipairs(KEYS) do
  sizes[i] = tonumber(redis.call('HGET', key, 'size') or -1)
end
return sizes
"""

# MemoryTallies.finish; KEYS are (tally, window) per stream.
FINISH = """
local now = tonumber(ARGV[1])
local stream_idle = tonumber(ARGV[2])
local endings = {}
for i = 1, #KEYS, 2 do
  local fields = redis.call('HMGET', KEYS[i], 'seen', 'size')
  if not fields[1] then
    endings[#endings + 1] = 'gone'
    endings[#endings + 1] = ''
  elseif now - tonumber(fields[1]) < stream_idle then
    endings[#endings + 1] = 'active'
    endings[#endings + 1] = fields[1]
  else
    redis.call('DEL', KEYS[i], KEYS[i + 1])
    endings[#endings + 1] = 'finished'
    endings[#endings + 1] = fields[2]
  end
end
return endings
"""


def _milliseconds(seconds: float) -> str:
    return str(math.ceil(seconds * 1000))


def _integers(text: bytes) -> tuple[int, ...]:
    return tuple(map(int, text.split()))


class RedisTallies:
    """``StreamTallies`` in Redis, over the guard's ``RedisConnection``."""

    def __init__(self, connection: RedisConnection) -> None:
        self._connection = connection
        self._count = connection.script(COUNT)
        self._sizes = connection.script(SIZES)
        self._finish = connection.script(FINISH)

    def __repr__(self) -> str:
        return f"<RedisTallies {self._connection!r}>"

    def keys(self, stream: str) -> tuple[str, str]:
        """The stream's tally and window keys."""
        return self._connection.key("st", stream), self._connection.key("sw", stream)

    def body_key(self, stream: str, body: str) -> str:
        return self._connection.key("sb", f"{stream}\n{body}")

    async def count(self, request: CountRequest) -> Counted:
        keys = list(self.keys(request.stream))
        if request.body is not None:
            keys.append(self.body_key(request.stream, request.body))
        args = [repr(request.now), repr(request.window), str(request.cap), str(request.carry),
                "" if request.basis is None else repr(request.basis),
                _milliseconds(request.stream_idle + TALLY_EXPIRY_MARGIN),
                _milliseconds(request.window + BODY_EXPIRY_MARGIN), str(len(request.bounds))]
        for bound in request.bounds:
            args += [bound.rule, bound.measure, str(bound.limit)]
        args += [str(key_hash) for key_hash in request.recipients]
        reply = await self._connection.call("count", lambda: self._count(keys=keys, args=args))
        last_seen, claimed, rule, threshold, at, basis, windows, sizes, bodies = reply
        trip = None if rule == b"" else Trip(rule.decode(), int(threshold), float(at),
                                             None if basis == b"" else float(basis))
        return Counted(_integers(windows), _integers(sizes), _integers(bodies), float(last_seen), trip,
                       None if claimed == 0 else int(claimed) - 1)

    async def sizes(self, streams: Sequence[str]) -> dict[str, int]:
        keys = [self.keys(stream)[0] for stream in streams]
        reply = await self._connection.call("sizes", lambda: self._sizes(keys=keys))
        return {stream: int(size) for stream, size in zip(streams, reply) if size >= 0}

    async def finish(self, streams: Sequence[str], now: float, stream_idle: float) -> dict[str, Ending]:
        keys = [key for stream in streams for key in self.keys(stream)]
        reply = await self._connection.call(
            "finish", lambda: self._finish(keys=keys, args=[repr(now), repr(stream_idle)]))
        endings: dict[str, Ending] = {}
        for stream, state, value in zip(streams, reply[0::2], reply[1::2]):
            if state == b"finished":
                endings[stream] = Ending("finished", size=int(value))
            elif state == b"active":
                endings[stream] = Ending("active", last_seen=float(value))
            else:
                endings[stream] = Ending("gone")
        return endings

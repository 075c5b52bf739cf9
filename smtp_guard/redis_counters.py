"""Rate-limit counters in Redis (``[counters] url``): global across guard instances.

Several guard instances behind a load balancer enforce one limit: "100/m" is 100/m across all
of them, and the buckets outlive any one of them (a restarted guard finds them as they were).

**One request, one round trip.** ``settle`` runs one Lua script (EVALSHA) with every bucket of
the request as its keys: Redis runs a script alone, so the all-or-nothing take, the shadowed
groups and the reservations of one recipient (or one message) are atomic across all of them,
whichever guard sends them — the role the flock plays for ``SharedCounters``. The script is
``counters.py``'s arithmetic (``Bucket``, ``take_from``, ``reserve_from``, ``settle_on``)
translated function by function; Lua's numbers are the same IEEE doubles as Python's floats,
values travel as shortest round-trip text both ways, so both give the same answers to the
last bit — tests/test_redis_counters.py checks it on random sequences of requests.

**Keys**: ``<key_prefix>rl:<64-bit hash of the bucket key>``, a hash of two fields (``t``
tokens, ``u`` updated). No address reaches Redis. A key expires once its bucket is full
again, plus a second (an absent bucket is a full one), so idle buckets vanish by themselves.
The time is the guard's (``now``, as for every implementation): guard hosts keep their clocks
in step (NTP); a guard whose clock is behind refills nothing until it catches up, as when a
clock steps back — slower, never faster.

The connection — its pool, timeout, metrics and failures as ``CountersUnavailable`` (the
pipeline defers with 451 4.3.0, or lets the mail through as "would have" with ``[counters]
on_error = "allow"``) — is ``redis_connection.py``, shared with the breaker's stream tallies.
"""

from __future__ import annotations

from .config import CountersConfig
from .counters import SLACK, Request, Settlement, Take
from .metrics import Metrics
from .redis_connection import RedisConnection

# A bucket's key lives this long after the bucket is full again, so that neither rounding to
# milliseconds nor a Redis clock running a little fast ever drops a bucket still refilling.
EXPIRY_MARGIN_MS = 1000

# counters.py, in Lua. The names follow the Python ones; keep the two in step (the property
# test compares them).
SETTLE = """
local now = tonumber(ARGV[1])
local slack = tonumber(ARGV[2])
local margin_ms = tonumber(ARGV[3])
local next_arg = 4
local function number()
  local value = tonumber(ARGV[next_arg])
  next_arg = next_arg + 1
  return value
end

-- Bucket
local function refill(bucket, rate, burst)
  if now > bucket.updated then
    bucket.tokens = math.min(burst, bucket.tokens + (now - bucket.updated) * rate)
    bucket.updated = now
    return true
  end
  return false
end
local function can_take(bucket, amount, rate, burst)
  return bucket.tokens + rate * slack >= math.min(amount, burst)
end
local function full_at(bucket, rate, burst)
  return bucket.updated + math.max(0.0, burst - bucket.tokens) / rate
end
local function due(bucket, rate)
  if bucket.tokens + rate * slack >= 0 then
    return now
  end
  return now + (-bucket.tokens) / rate
end

-- Buckets: KEYS[k] read once per request, then kept here; written exactly (%.17g), expiring
-- once full again (an absent key is a full bucket).
local buckets = {}
local function save(k, bucket, rate, burst)
  redis.call('HSET', KEYS[k], 't', string.format('%.17g', bucket.tokens), 'u', string.format('%.17g', bucket.updated))
  redis.call('PEXPIRE', KEYS[k], math.ceil((full_at(bucket, rate, burst) - now) * 1000) + margin_ms)
end
-- "Refilled to now (created full), kept so" even when nothing is taken, as counters.py's
-- Buckets.load: a later request whose clock is behind must not refill the same time again.
local function load(k, rate, burst)
  local bucket = buckets[k]
  local created = false
  if bucket == nil then
    local fields = redis.call('HMGET', KEYS[k], 't', 'u')
    if fields[1] then
      bucket = {tokens = tonumber(fields[1]), updated = tonumber(fields[2])}
    else
      bucket = {tokens = burst, updated = now}
      created = true
    end
    buckets[k] = bucket
  end
  if refill(bucket, rate, burst) or created then
    save(k, bucket, rate, burst)
  end
  return bucket
end

-- take_from: all or nothing; the position of the first short take, 0 when all were taken.
local function take_from(takes)
  local needed, first, order = {}, {}, {}
  for i, take in ipairs(takes) do
    if needed[take.k] == nil then
      needed[take.k] = 0.0
      first[take.k] = i
      order[#order + 1] = take.k
    end
    needed[take.k] = needed[take.k] + take.amount
  end
  local loaded = {}
  for _, k in ipairs(order) do
    local take = takes[first[k]]
    loaded[k] = load(k, take.rate, take.burst)
  end
  for _, k in ipairs(order) do
    local take = takes[first[k]]
    if not can_take(loaded[k], needed[k], take.rate, take.burst) then
      return first[k]
    end
  end
  for _, k in ipairs(order) do
    local take = takes[first[k]]
    loaded[k].tokens = loaded[k].tokens - needed[k]
    save(k, loaded[k], take.rate, take.burst)
  end
  return 0
end

local function reserve_from(k, rate, burst)
  local bucket = load(k, rate, burst)
  bucket.tokens = bucket.tokens - 1
  save(k, bucket, rate, burst)
  return due(bucket, rate)
end

local function takes()
  local list = {}
  for i = 1, number() do
    local k = number()
    local rate = number()
    local burst = number()
    list[i] = {k = k, rate = rate, burst = burst, amount = number()}
  end
  return list
end

-- settle_on
local short = take_from(takes())
if short > 0 then
  return {'short', short}
end
local settled = {'settled'}
for _ = 1, number() do
  settled[#settled + 1] = take_from(takes()) == 0 and 1 or 0
end
for _, take in ipairs(takes()) do
  settled[#settled + 1] = string.format('%.17g', reserve_from(take.k, take.rate, take.burst))
end
return settled
"""

class RedisCounters:
    """``RateCounters`` in Redis, over a ``RedisConnection`` (``connect`` opens one from
    ``[counters]``; ``close`` closes it)."""

    def __init__(self, connection: RedisConnection) -> None:
        self.connection = connection
        self._script = connection.script(SETTLE)

    @classmethod
    def connect(cls, config: CountersConfig, metrics: Metrics) -> RedisCounters:
        """A client for ``config.url``; nothing is sent until the first request."""
        return cls(RedisConnection.connect(config, metrics))

    def __repr__(self) -> str:
        return f"<RedisCounters {self.connection!r}>"

    def bucket_key(self, key: str) -> str:
        """The Redis key of the bucket ``key``: no address or other value in clear."""
        return self.connection.key("rl", key)

    async def settle(self, request: Request, now: float) -> Settlement:
        keys, args = self._encode(request, now)
        reply = await self.connection.call("settle", lambda: self._script(keys=keys, args=args))
        if reply[0] == b"short":
            return Settlement(request.take_all[int(reply[1]) - 1])
        met = tuple(bool(flag) for flag in reply[1:1 + len(request.groups)])
        due = tuple(float(value) for value in reply[1 + len(request.groups):])
        return Settlement(None, met, due)

    async def probe(self) -> str | None:
        return await self.connection.probe()

    async def close(self) -> None:
        await self.connection.close()

    def _encode(self, request: Request, now: float) -> tuple[list[str], list[str]]:
        """KEYS (each bucket once) and ARGV: now, the slack, the expiry margin, then each list
        of takes as its length and (key index, rate, burst, amount) per take. ``repr`` of a
        float reads back (Lua's ``tonumber``) as exactly the same double."""
        index: dict[str, int] = {}
        args = [repr(now), repr(SLACK), str(EXPIRY_MARGIN_MS)]

        def add(takes: tuple[Take, ...]) -> None:
            args.append(str(len(takes)))
            for take in takes:
                args.extend((str(index.setdefault(take.key, len(index) + 1)), repr(float(take.rate)),
                             repr(float(take.burst)), str(take.amount)))

        add(request.take_all)
        args.append(str(len(request.groups)))
        for group in request.groups:
            add(group)
        add(request.reserve)  # a reservation is one token: its amount is not read
        return [self.bucket_key(key) for key in index], args

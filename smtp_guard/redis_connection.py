"""One guard process's connection to Redis (``[counters] url``): the rate counters
(``redis_counters.py``) and the breaker's stream tallies (``breaker/redis_tally.py``) share it.

What both need the same way:

* **one pool** of at most ``[counters] max_connections``, each request within ``[counters]
  timeout`` (connecting included);
* **no retries**: a request is one script, and a reply lost after the script ran would count
  twice. After a Redis restart a script is loaded again on first use (NOSCRIPT);
* **failures become ``CountersUnavailable``** — Redis refusing, closed, slower than the
  timeout, out of memory, or a replica that cannot write — with the operating system's or
  Redis's own words; the pipeline then fails closed (451 4.3.0) or, with ``[counters] on_error
  = "allow"``, lets the mail through as "would have";
* each round trip's time and each failure are counted (``smtp_guard_redis_*``), by operation
  and error class only;
* **keys** are ``<key_prefix><kind>:<64-bit hash>``: no address or other value in clear.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Awaitable, Callable

import redis.asyncio
import redis.commands.core
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .addresses import key_hash
from .config import CountersConfig
from .counters import CountersUnavailable
from .metrics import Metrics


def _error_class(error: BaseException) -> str:
    """One of ``metrics.REDIS_ERRORS``."""
    if isinstance(error, (TimeoutError, redis.exceptions.TimeoutError)):
        return "timeout"
    if isinstance(error, redis.exceptions.ConnectionError):
        return "connection"
    return "response"


def _describe(error: BaseException) -> str:
    """The operating system's words for a failed connection ("Connection refused"), not the
    library's wrapping of them; Redis's own for a refused command."""
    if isinstance(error, TimeoutError) or isinstance(error, redis.exceptions.TimeoutError):
        return "no answer within [counters] timeout"
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return f"cannot connect: {os.strerror(cause.errno)}"
        cause = cause.__cause__ or cause.__context__
    return " ".join(str(error).split()) or type(error).__name__


class RedisConnection:
    """``connect`` builds it from ``[counters]``; ``close`` ends it."""

    def __init__(self, client: redis.asyncio.Redis, metrics: Metrics, *, key_prefix: str = "smtp-guard:",
                 timeout: float = 1.0, where: str = "") -> None:
        self.client = client
        self._metrics = metrics
        self._prefix = key_prefix
        self._timeout = timeout
        self.where = where  # the server, for logs and /readyz (no password)

    @classmethod
    def connect(cls, config: CountersConfig, metrics: Metrics) -> RedisConnection:
        """A client for ``config.url``; nothing is sent until the first request."""
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            config.url, max_connections=config.max_connections, timeout=config.timeout,
            socket_timeout=config.timeout, socket_connect_timeout=config.timeout,
            # No retries: a request whose reply was lost may have been counted already.
            retry=Retry(NoBackoff(), 0))
        kwargs = pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        # from_pool: the client owns the pool, and closing it closes every connection.
        return cls(redis.asyncio.Redis.from_pool(pool), metrics, key_prefix=config.key_prefix,
                   timeout=config.timeout, where=str(where))

    def __repr__(self) -> str:
        return f"<RedisConnection {self.where} prefix={self._prefix!r}>"

    def key(self, kind: str, value: str) -> str:
        """The Redis key of ``value`` (a bucket, a stream): its 64-bit hash, never the value."""
        return f"{self._prefix}{kind}:{key_hash(value) & 0xFFFF_FFFF_FFFF_FFFF:016x}"

    def script(self, source: str) -> redis.commands.core.AsyncScript:
        return self.client.register_script(source)

    async def call(self, operation: str, send: Callable[[], Awaitable[Any]]) -> Any:
        """One request (``operation``: one of ``metrics.REDIS_OPERATIONS``), timed and counted;
        raises ``CountersUnavailable`` naming what failed."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout):
                return await send()
        except (TimeoutError, redis.exceptions.RedisError) as error:
            self._metrics.redis_errors.labels(operation, _error_class(error)).inc()
            raise CountersUnavailable(f"Redis at {self.where} ([counters] url): {_describe(error)}") from error
        finally:
            self._metrics.redis_duration.labels(operation).observe(time.monotonic() - started)

    async def probe(self) -> str | None:
        """What keeps Redis from answering right now (for ``/readyz``), or None."""
        try:
            await self.call("ping", self.client.ping)
        except CountersUnavailable as error:
            return str(error)
        return None

    async def close(self) -> None:
        await self.client.aclose()

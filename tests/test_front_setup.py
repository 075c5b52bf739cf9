"""The per-listener copy of aiosmtpd's protocol set-up is the set-up aiosmtpd itself builds.

``SessionSetup`` runs aiosmtpd's ``SMTP.__init__`` once and copies its result into every
session (aiosmtpd rebuilds its command tables per connection). If a new aiosmtpd sets some
attribute differently, this test names it.
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

from aiosmtpd.smtp import SMTP

from smtp_guard.smtp.server import GuardSMTP


def _comparable(value: Any, owner: object) -> Any:
    """A bound method as (function, bound to its own protocol?); readers and futures by type."""
    if isinstance(value, types.MethodType):
        return value.__func__, value.__self__ is owner or value.__self__
    if isinstance(value, dict):
        return {k: _comparable(v, owner) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_comparable(v, owner) for v in value)
    if isinstance(value, (asyncio.StreamReader, asyncio.Future)) or type(value).__name__ == "ReferenceType":
        return type(value)
    if type(value).__name__ == "deque":
        return list(value)
    return value


async def test_copied_setup_equals_aiosmtpd_setup(start_guard, sink):
    guard = await start_guard()
    server = guard.front.smtp
    copied = server._factory()()
    reference = GuardSMTP(server._handler, server.registry, server._config, server._metrics,
                          allow_plaintext_auth_on_loopback=False, auth_throttle=server.auth_throttle,
                          **{**server._smtp_kwargs(), "hostname": copied.hostname})
    mine, theirs = vars(copied), vars(reference)
    # Each session has its own command-size table (aiosmtpd shares one on the class).
    assert mine.pop("command_size_limits") is not SMTP.command_size_limits
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert _comparable(mine[name], copied) == _comparable(theirs[name], reference), name
    # Nothing mutable is shared between two sessions.
    other = server._factory()()
    for name in ("_smtp_methods", "_auth_methods", "_drain_waiters", "_closed", "command_size_limits"):
        assert getattr(other, name) is not getattr(copied, name), name
    assert copied._smtp_methods["MAIL"].__self__ is copied

"""Mail the admin API can act on, made the way production makes it: real SMTP through the
guard. ``HOLD_LISTS`` and ``GATED`` are overrides for ``start_admin``."""

from __future__ import annotations

from email.header import Header
from typing import Any

from conftest import wait_until
from smtp_client import message, send

SENDER = "notices@platform.test"
HOLD_LISTS = {"manual": {"action": "hold"}}
APPROVAL_AFTER = 3
# Mail whose subject says "policy violation" waits for an admin after APPROVAL_AFTER recipients.
GATED = {
    "classify": {"rules": [{"class": "sanction", "subject": "policy violation"}]},
    "classes": {"sanction": {"approval_after": APPROVAL_AFTER}},
}


async def hold_mail(admin: Any, recipients: list[str], content: bytes | None = None) -> str:
    """Put the recipients on the hold list ``manual``, mail them, and return the hold's id."""
    status, body, _ = await admin.call("POST", "/api/v1/suppressions", json={"values": recipients, "list": "manual"})
    assert status in (200, 201), body
    outcome = await send(admin.guard.smtp_address, SENDER, recipients, content or message(sender=SENDER))
    assert outcome.data is not None and outcome.data.startswith("250"), outcome
    [held] = await admin.guard.backends.holds.list()
    return str(held.id)


def audience(count: int, start: int = 0) -> list[str]:
    return [f"member{i}@users.example" for i in range(start, start + count)]


def gated_notice(stream: str) -> bytes:
    """A notice the sanction gate stops, of the given stream (RFC 2047-encoded when not ASCII,
    as a mail library writes it)."""
    header = stream if stream.isascii() else Header(stream, "utf-8").encode()
    return message(subject="Policy violation: earnings forfeited", sender=SENDER,
                   extra_headers=f"X-Campaign-ID: {header}\r\n")


async def trip_gate(admin: Any, stream: str, recipients: list[str]) -> None:
    """Send a gated notice to the recipients as one stream: the first APPROVAL_AFTER go, the
    rest are held; returns once the trip is in the store, where the API reads it."""
    outcome = await send(admin.guard.smtp_address, SENDER, recipients, gated_notice(stream))
    assert outcome.accepted == recipients, outcome
    await wait_until(lambda: admin.guard.backends.breakers.get(stream), what="the trip to reach the store")


async def finished_job(admin: Any, location: str) -> dict[str, Any]:
    """Poll an import job's page until the job is done or failed; return it."""
    async def poll() -> dict[str, Any] | None:
        status, job, _ = await admin.call("GET", location, token=admin.viewer_token)
        assert status == 200, job
        return job if job["state"] != "running" else None

    return await wait_until(poll, what=f"the import job {location} to finish")  # type: ignore[no-any-return]

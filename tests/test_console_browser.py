"""The web console in a real browser: headless Chromium driven by Playwright (async API, in the
test's own event loop, beside the guard), against a running guard relaying to the test sink.

Each test does what an operator does — by label and role, as a keyboard or screen-reader user
finds things — and checks the effect on real mail: a suppression refuses the next message, a
released or approved message arrives at the sink. Screenshots of the main pages go to
``$SMTP_GUARD_ARTIFACTS`` (default: pytest's temporary directory, ``console-screenshots``).

Chromium is Debian's (``/usr/bin/chromium``, or ``$SMTP_GUARD_CHROMIUM``): no ``playwright
install``. Without it these tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiosmtplib
import pytest

from admin_client import AdminAPI
from conftest import wait_until
from sink import Sink
from smtp_client import message, send

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # the browser fixture says so: a skip, or under CI a failure
    async_playwright = None  # type: ignore[assignment]

CHROMIUM = os.environ.get("SMTP_GUARD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LAPTOP = {"width": 1366, "height": 768}
Start = Callable[..., Awaitable[AdminAPI]]

SENDER = "notices@platform.test"
STREAM = "sanction-2026-05"
APPROVAL_AFTER = 25
SANCTION = {  # tests/test_breaker_e2e.py: a sensitive class behind an approval gate
    "classify": {"rules": [{"class": "sanction", "subject": "policy violation"}]},
    "classes": {"sanction": {"approval_after": APPROVAL_AFTER}},
}


def _missing() -> str | None:
    if async_playwright is None:
        return "the playwright Python package is not installed (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"chromium is not installed at {CHROMIUM} (apt-get install chromium; .ci/run does this)"
    return None


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if (reason := _missing()) is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI must run every test")
        pytest.skip(reason)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("SMTP_GUARD_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.getbasetemp() / "console-screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Operator:
    """One browser tab logged in to the console."""

    def __init__(self, page: Page, admin: AdminAPI, artifacts: Path) -> None:
        self.page = page
        self.admin = admin
        self.artifacts = artifacts
        self.problems: list[str] = []
        page.on("console", self._console_message)

    def _console_message(self, message: Any) -> None:
        # A form answered 422 (an error shown at its field) is logged as a failed load; it is not one.
        if message.type == "error" and "status of 422" not in message.text:
            self.problems.append(message.text)

    async def open(self, path: str) -> None:
        await self.page.goto(self.admin.url(path))

    async def shot(self, name: str) -> None:
        await self.page.screenshot(path=str(self.artifacts / f"{name}.png"), full_page=True)

    async def login(self, token: str | None = None, screenshot: bool = False) -> None:
        await self.open("/")
        await expect(self.page.get_by_role("heading", name="Log in to smtp-guard")).to_be_visible()
        if screenshot:
            await self.shot("login")
        field = self.page.get_by_label("Admin token")
        await expect(field).to_be_focused()  # autofocus: type and press Enter
        await field.fill(token or self.admin.admin_token)
        await field.press("Enter")
        await expect(self.page.get_by_role("heading", name="Suppressions", exact=True)).to_be_visible()

    async def flash(self) -> str:
        status = self.page.get_by_role("status")
        await expect(status).to_be_visible()
        return await status.inner_text()

    def check_no_problems(self) -> None:
        """Nothing the Content-Security-Policy refused, no failed load: the pages need nothing else."""
        assert self.problems == []


@pytest.fixture
async def operator(browser: Browser, start_admin: Start, artifacts: Path) -> AsyncIterator[Callable[..., Awaitable[Operator]]]:
    contexts: list[Any] = []

    async def start(**overrides: Any) -> Operator:
        admin = await start_admin(**overrides)
        context = await browser.new_context(viewport=LAPTOP)
        contexts.append(context)
        return Operator(await context.new_page(), admin, artifacts)

    yield start
    for context in contexts:
        await context.close()


async def refused(admin: AdminAPI, recipient: str) -> int:
    host, port = admin.guard.smtp_address
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as error:
        await aiosmtplib.send(message(subject="After"), sender="news@shop.test", recipients=[recipient],
                              hostname=host, port=port)
    return error.value.recipients[0].code


async def test_log_in_add_a_suppression_and_the_next_message_is_refused(operator: Callable[..., Awaitable[Operator]],
                                                                        sink: Sink) -> None:
    op = await operator()
    await op.login(screenshot=True)
    page = op.page
    await page.get_by_label("Addresses or @domains").fill(
        "jane.doe@example.com\nmax@example.org\nsales@shop.example\n@spam-trap.test")
    await page.get_by_label("List", exact=True).nth(1).select_option("unsubscribed")
    await page.get_by_label("Reason").fill("asked by phone, ticket 4711")
    await page.get_by_role("button", name="Add", exact=True).click()
    assert "Added 4 entries to unsubscribed (4 new). In force on 1 guard." in await op.flash()
    rows = page.get_by_role("row")
    await expect(rows.filter(has_text="jane.doe@example.com")).to_contain_text("asked by phone")
    await op.shot("suppressions")
    # In force when the page came back: the next message to that person is refused.
    assert await refused(op.admin, "Jane.Doe+news@Example.com") == 550
    await aiosmtplib.send(message(), sender="news@shop.test", recipients=["other@example.com"],
                          hostname=op.admin.guard.smtp_address[0], port=op.admin.guard.smtp_address[1])
    assert sink.delivered_to() == ["other@example.com"]

    # A bad value is shown at its field and nothing is stored.
    await page.get_by_label("Addresses or @domains").fill("ok@example.com\nnot an address")
    await page.get_by_role("button", name="Add", exact=True).click()
    values = page.get_by_label("Addresses or @domains")
    await expect(values).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("#add-values-error")).to_contain_text("is not an address")
    await op.open("/check?address=ok@example.com")
    await expect(page.get_by_role("heading", name=re.compile("ok@example.com: pass"))).to_be_visible()
    op.check_no_problems()


async def test_review_a_held_message_and_release_it_to_the_upstream(operator: Callable[..., Awaitable[Operator]],
                                                                    sink: Sink) -> None:
    op = await operator(lists={"manual": {"action": "hold"}})
    await op.login()
    page = op.page
    await page.get_by_label("Addresses or @domains").fill("vip@example.com")
    await page.get_by_label("List", exact=True).nth(1).select_option("manual")
    await page.get_by_role("button", name="Add", exact=True).click()
    await op.flash()
    content = (b"From: Shop <news@shop.test>\r\nTo: vip@example.com\r\nSubject: Your VIP preview\r\n"
               b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
               b"<html><body><h1>Spring preview</h1><p>Dear VIP, <b>30%</b> off.</p>"
               b"<script>alert(1)</script><img src=http://tracker.test/p.gif></body></html>\r\n")
    outcome = await send(op.admin.guard.smtp_address, "news@shop.test", ["vip@example.com"], content)
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == []

    await page.get_by_role("link", name="Held mail").click()
    await expect(page.get_by_role("heading", name="Held mail")).to_be_visible()
    held = page.get_by_role("row").filter(has_text="news@shop.test")
    await expect(held).to_contain_text("1 held")
    await op.shot("holds")
    await held.get_by_role("link").click()
    preview = page.locator("pre.preview")
    await expect(preview).to_have_text("Spring preview\n\nDear VIP, 30% off.")
    assert await page.locator("main img, main script, main h1:has-text('Spring')").count() == 0
    await op.shot("hold-detail")
    await page.get_by_role("button", name="Release for delivery").click()
    assert "Released 1 recipient(s)" in await op.flash()
    await wait_until(lambda: sink.delivered_to() == ["vip@example.com"], what="the released message at the sink")
    await op.open(page.url.removeprefix(op.admin.base))
    await expect(page.get_by_role("row").filter(has_text="vip@example.com")).to_contain_text("delivered")
    op.check_no_problems()


async def test_approve_a_stopped_stream_and_its_held_mail_is_delivered(operator: Callable[..., Awaitable[Operator]],
                                                                      sink: Sink) -> None:
    op = await operator(**SANCTION)
    guard = op.admin.guard
    audience = [f"member{i}@users.example" for i in range(40)]
    notice = message(subject="Policy violation: earnings forfeited", sender=SENDER,
                     body="Partner 4711: your account may be closed.\r\n",
                     extra_headers=f"X-Campaign-ID: {STREAM}\r\n")
    await send(guard.smtp_address, SENDER, audience, notice)
    assert sink.delivered_to() == audience[:APPROVAL_AFTER]
    await wait_until(lambda: guard.backends.breakers.get(STREAM), what="the trip to reach the store")

    await op.login()
    page = op.page
    await page.get_by_role("link", name="Stopped streams").click()
    row = page.get_by_role("row").filter(has_text=STREAM)
    await expect(row).to_contain_text("gate.sanction")
    await expect(row).to_contain_text("15")
    await op.shot("breakers")
    await row.get_by_role("link", name=STREAM).click()
    await expect(page.get_by_text("Policy violation: earnings forfeited")).to_be_visible()
    ceiling = page.get_by_label("Approve up to this many recipients")
    await expect(ceiling).to_have_value("40")
    await op.shot("breaker")
    await ceiling.fill("10")  # below the audience it has: the browser itself refuses it (min=40)
    await page.get_by_role("button", name=re.compile("Approve and release")).click()
    assert await ceiling.evaluate("field => field.validity.rangeUnderflow")
    assert await page.get_by_role("status").count() == 0
    await ceiling.fill("100")
    await page.get_by_role("button", name=re.compile("Approve and release")).click()
    assert "Approved stream 'sanction-2026-05' up to 100 recipients; released 15 held recipient(s)" in await op.flash()
    await wait_until(lambda: sorted(sink.delivered_to()) == sorted(audience), timeout=15,
                     what="the held mail of the approved stream at the sink")
    await expect(page.locator(".facts")).to_contain_text("approved by console:ops")
    op.check_no_problems()


async def test_erase_an_address_see_its_receipt_and_the_audit_trail(operator: Callable[..., Awaitable[Operator]],
                                                                    sink: Sink) -> None:
    op = await operator()
    await op.login()
    page = op.page
    await page.get_by_label("Addresses or @domains").fill("erase.me@example.com")
    await page.get_by_role("button", name="Add", exact=True).click()
    await op.flash()
    await page.get_by_role("link", name="Erasure").click()
    await page.get_by_label("Addresses or erasure tokens").fill("Erase.Me+news@example.com")
    await page.get_by_label("Reference").fill("DSR-2026-0042")
    await page.get_by_role("button", name="Erase").click()
    await expect(page.locator("#erase-confirm-error")).to_contain_text("cannot be undone")  # nothing erased yet
    await page.get_by_label("Yes, erase: this cannot be undone").check()
    await page.get_by_role("button", name="Erase").click()
    await expect(page.get_by_role("heading", name=re.compile("Erasure receipt"))).to_be_visible()
    facts = page.locator(".facts").first
    await expect(facts).to_contain_text("DSR-2026-0042")
    await expect(page.get_by_role("row").filter(has_text="suppressions")).to_contain_text("1")
    assert "erase.me" not in (await page.content()).lower()  # a receipt names no address
    await op.shot("erasure-receipt")
    assert await refused(op.admin, "erase.me@example.com") == 550

    await page.get_by_role("link", name="Erasure", exact=True).click()
    await page.get_by_label("Address", exact=True).fill("erase.me@example.com")
    await page.get_by_role("button", name="Verify").click()
    await expect(page.get_by_role("heading", name="Verified", exact=True)).to_be_visible()

    await page.get_by_role("link", name="Audit").click()
    await page.get_by_label("Kind").select_option("admin")
    await page.get_by_role("button", name="Search").click()
    await expect(page.get_by_role("row").filter(has_text="erasure.erased")).to_contain_text("console:ops")
    await op.shot("audit")
    op.check_no_problems()


async def test_upload_an_import_and_watch_it_finish(operator: Callable[..., Awaitable[Operator]], sink: Sink,
                                                    tmp_path: Path) -> None:
    op = await operator()
    await op.login()
    page = op.page
    await page.get_by_role("link", name="Imports").click()
    export = "email,created,reason,status\n" + "".join(
        f"user{i}@bounces.example,1714557600,550 5.1.1 no such user,5.1.1\n" for i in range(2000)) + \
        "not-an-address,1714557600,bad,5.1.1\n"
    await page.get_by_label("Format").select_option("sendgrid")
    await page.get_by_label("File").set_input_files(
        {"name": "bounces.csv", "mimeType": "text/csv", "buffer": export.encode()})
    await page.get_by_role("button", name="Upload and import").click()
    await expect(page.get_by_role("heading", name="Import of bounces.csv")).to_be_visible()
    # The page reloads itself (a meta refresh, no script) until the job is done.
    await expect(page.locator(".state")).to_have_text("done", timeout=20_000)
    await expect(page.locator("#job-progress")).to_have_attribute("value", "100.0")
    await expect(page.locator(".facts")).to_contain_text("2000")
    await expect(page.locator(".bad-rows")).to_contain_text("bounces.csv:2002:")
    await expect(page.get_by_text("In force on 1 guard.")).to_be_visible()
    await op.shot("import-job")
    assert await refused(op.admin, "user1999@bounces.example") == 550
    op.check_no_problems()

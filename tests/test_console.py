"""The web console over real HTTP against a running guard on a real SQLite store: login,
session cookie, CSRF and origin checks, roles, expiry, security headers, error pages, and that
a held message's HTML is never rendered. (tests/test_console_browser.py drives it in Chromium.)"""

from __future__ import annotations

import html
import re
import time
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import aiosmtplib
import pytest

from conftest import TLSFiles, wait_until
from console_client import Console, open_console
from sink import Sink

StartConsole = Callable[..., Awaitable[Console]]
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")
HOLD_LISTS = {"manual": {"action": "hold"}}


@pytest.fixture
async def start_console(start_admin: Callable[..., Awaitable[Any]]) -> AsyncIterator[StartConsole]:
    """``console = await start_console(**guard_overrides)``: a guard with its admin listener and a
    console client (not logged in)."""
    consoles: list[Console] = []

    async def start(**overrides: Any) -> Console:
        console = await open_console(await start_admin(**overrides))
        consoles.append(console)
        return console

    yield start
    for console in consoles:
        await console.http.close()


class Clock:
    """Wall time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def send(console: Console, recipient: str, content: bytes = b"Subject: hi\r\n\r\nhello\r\n") -> None:
    host, port = console.admin.guard.smtp_address
    await aiosmtplib.send(content, sender="news@platform.test", recipients=[recipient], hostname=host, port=port)


def auth_failures(console: Console, reason: str) -> float:
    registry = console.admin.guard.metrics.registry
    return registry.get_sample_value("smtp_guard_admin_auth_failures_total", {"reason": reason}) or 0.0


async def entries_for(console: Console, address: str) -> list[Any]:
    status, body, _ = await console.admin.call("GET", f"/api/v1/check?address={address}")
    assert status == 200, body
    return list(body["entries"])


# --- login, session, logout --------------------------------------------------------------------

async def test_every_console_page_needs_a_login_and_carries_the_security_headers(start_console: StartConsole) -> None:
    console = await start_console()
    page = await console.get("/holds?state=all")
    assert page.status == 303 and page.location == "/login?next=%2Fholds%3Fstate%3Dall"
    for path in ("/holds?state=all", "/login", "/nope"):
        page = await console.get(path)
        headers = page.response.headers
        assert headers["Content-Security-Policy"] == CSP, path
        assert (headers["X-Frame-Options"], headers["Referrer-Policy"]) == ("DENY", "no-referrer"), path
    login = await console.get("/login?next=/holds")
    assert login.status == 200 and login.response.content_type == "text/html"
    assert '<label for="token">Admin token</label>' in login.text and 'value="/holds"' in login.text
    assert "<script" not in login.text and "style=" not in login.text  # nothing the policy would block
    css = await console.get("/static/console.css")
    assert css.status == 200 and css.response.content_type == "text/css"
    health = await console.get("/healthz")
    assert (health.status, health.text) == (200, "ok\n")


async def test_a_login_sets_a_strict_http_only_session_cookie_and_leads_on(start_console: StartConsole) -> None:
    console = await start_console()
    page = await console.post("/login", {"token": console.admin.admin_token, "next": "/holds"}, csrf=None)
    assert page.status == 303 and page.location == "/holds"
    cookie = page.response.headers["Set-Cookie"]
    assert cookie.startswith("smtp_guard_session=")
    flags = {part.strip().split("=")[0].lower(): part for part in cookie.split(";")[1:]}
    assert "httponly" in flags and flags["samesite"].strip() == "SameSite=Strict" and flags["path"].strip() == "Path=/"
    assert "secure" not in flags  # plain HTTP: a Secure cookie would never come back
    assert flags["max-age"].strip() == f"Max-Age={8 * 3600}"
    held = await console.get("/holds")
    assert held.status == 200 and "Held mail" in held.text and "ops" in held.text
    # A redirect target from the form never leads off the console.
    console.http.cookie_jar.clear()
    page = await console.post("/login", {"token": console.admin.admin_token, "next": "//evil.test/x"}, csrf=None)
    assert page.location == "/"


async def test_the_session_cookie_is_secure_over_tls(start_console: StartConsole, tls: TLSFiles) -> None:
    console = await start_console(admin={"tls_cert": str(tls.cert_file), "tls_key": str(tls.key_file)})
    console.admin.scheme = "https"
    console.ssl_context = tls.client_context
    page = await console.post("/login", {"token": console.admin.admin_token}, csrf=None)
    assert page.status == 303
    assert "secure" in [part.strip().lower() for part in page.response.headers["Set-Cookie"].split(";")]


async def test_a_bad_token_is_refused_and_repeated_failures_are_throttled(start_console: StartConsole) -> None:
    console = await start_console(admin={"auth_max_failures": 3})
    for token in ("sgt_wrong", "sgt_also_wrong", ""):
        page = await console.post("/login", {"token": token}, csrf=None)
        assert page.status == 401 and "Set-Cookie" not in page.response.headers
        assert 'aria-invalid="true"' in page.text and 'id="token-error"' in page.text
    assert (auth_failures(console, "invalid"), auth_failures(console, "missing")) == (2, 1)
    # The API's own failures and the console's count together: the right token waits too, on both.
    page = await console.post("/login", {"token": console.admin.admin_token}, csrf=None)
    assert page.status == 429 and int(page.response.headers["Retry-After"]) > 0
    assert "Too many failed logins" in page.text and page.response.content_type == "text/html"
    status, _, _ = await console.admin.call("GET", "/api/v1/check?address=a@example.com")
    assert status == 429
    assert auth_failures(console, "throttled") == 2


async def test_an_expired_session_leads_back_to_the_login(start_console: StartConsole) -> None:
    clock = Clock()
    console = await start_console(clock=clock, admin={"session_lifetime": "1h"})
    await console.login()
    assert (await console.get("/audit")).status == 200
    clock.offset += 3601
    page = await console.get("/audit?kind=admin")
    assert page.status == 303 and page.location == "/login?next=%2Faudit%3Fkind%3Dadmin&m=expired"
    assert "smtp_guard_session=\"\"" in page.response.headers["Set-Cookie"]  # the browser drops it
    login = await console.follow(page)
    assert "Your session has ended" in login.text
    # A form posted with the old session changes nothing.
    page = await console.post("/suppressions", {"values": "late@example.com", "list": "manual"})
    assert page.status == 303 and page.location.startswith("/login")
    assert await entries_for(console, "late@example.com") == []


async def test_logout_ends_the_session(start_console: StartConsole) -> None:
    console = await start_console()
    await console.login()
    cookie = console.session_cookie()
    assert (await console.post("/logout", {}, csrf=None)).status == 403  # logout is a form like any other
    page = await console.post("/logout", {})
    assert page.status == 303 and page.location == "/login?m=out"
    assert "You are logged out" in (await console.follow(page)).text
    console.http.cookie_jar.update_cookies({"smtp_guard_session": cookie})  # replaying the old cookie
    assert (await console.get("/suppressions")).location.startswith("/login")


# --- forged and refused changes ----------------------------------------------------------------

@pytest.mark.parametrize("csrf", [None, "forged-token"])
async def test_a_post_without_the_sessions_csrf_token_is_refused_and_changes_nothing(
        start_console: StartConsole, csrf: str | None) -> None:
    console = await start_console()
    await console.login()
    page = await console.post("/suppressions", {"values": "forged@example.com", "list": "manual"}, csrf=csrf)
    assert page.status == 403 and "security token" in page.text and page.response.content_type == "text/html"
    assert page.response.headers["Content-Security-Policy"] == CSP
    assert await entries_for(console, "forged@example.com") == []
    assert auth_failures(console, "forbidden") == 0  # a forged form is not a failed login


async def test_a_cross_origin_post_is_refused_even_with_the_token(start_console: StartConsole) -> None:
    console = await start_console()
    await console.login()
    for headers in ({"Origin": "http://evil.test"}, {"Origin": console.admin.base.replace("127.0.0.1", "localhost")},
                    {"Origin": "null", "Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        page = await console.post("/suppressions", {"values": "cross@example.com", "list": "manual"},
                                  headers=headers)
        assert page.status == 403 and "another site" in page.text, headers
    assert await entries_for(console, "cross@example.com") == []
    # The console's own forms: the origin itself, or "null" (Referrer-Policy: no-referrer hides it).
    for number, headers in enumerate(({"Origin": console.admin.base, "Sec-Fetch-Site": "same-origin"},
                                      {"Origin": "null", "Sec-Fetch-Site": "same-origin"})):
        page = await console.post("/suppressions", {"values": f"same{number}@example.com", "list": "manual"},
                                  headers=headers)
        assert page.status == 303
        assert len(await entries_for(console, f"same{number}@example.com")) == 1


async def test_a_viewer_sees_everything_but_no_change_form_and_cannot_post(start_console: StartConsole) -> None:
    console = await start_console()
    await console.login(console.admin.viewer_token)
    page = await console.get("/suppressions")
    assert page.status == 200 and "Add to a list" not in page.text and "auditor" in page.text
    for path in ("/imports", "/erasures"):
        page = await console.get(path)
        assert page.status == 200 and 'method="post" action="/' + path.strip("/") not in page.text
    page = await console.post("/suppressions", {"values": "viewer@example.com", "list": "manual"})
    assert page.status == 403 and "role 'admin'" in html.unescape(page.text)
    assert await entries_for(console, "viewer@example.com") == []
    assert auth_failures(console, "forbidden") == 1


# --- changes: in force on return, errors at the field ------------------------------------------

async def test_a_suppression_added_is_in_force_when_the_redirect_returns(start_console: StartConsole) -> None:
    console = await start_console()
    await console.login()
    page = await console.post("/suppressions", {"values": "Jane.Doe+news@Example.com\n@blocked.test",
                                                "list": "unsubscribed", "reason": "asked by phone"})
    assert page.status == 303 and page.location == "/suppressions?list=unsubscribed"
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await send(console, "jane.doe@example.com")
    assert refused.value.recipients[0].code == 550
    listed = await console.follow(page)
    assert "Added 2 entries to unsubscribed (2 new). In force on 1 guard." in listed.text
    assert "jane.doe@example.com" in listed.text and "@blocked.test" in listed.text
    checked = await console.get("/check?address=jane.doe%2Bother@example.com")
    assert "suppression.unsubscribed" in checked.text and "asked by phone" in checked.text
    audit = await console.get("/audit?kind=admin")
    assert "console:ops" in audit.text and "suppress.add" in audit.text

    page = await console.post("/suppressions/remove", {"value": "jane.doe@example.com", "list": "unsubscribed",
                                                       "back": "/suppressions?q=jane"})
    assert page.status == 303 and page.location == "/suppressions?q=jane"
    await send(console, "jane.doe@example.com")
    assert "Removed jane.doe@example.com from unsubscribed (1 entry). In force on 1 guard." in \
        (await console.follow(page)).text


@pytest.mark.parametrize("form, field, message", [
    ({"values": "ok@example.com\nnot-an-address", "list": "manual"}, "values", "is not an address"),
    ({"values": "ok@example.com", "list": "no-such-list"}, "list", "choose one of the configured lists"),
    ({"values": "ok@example.com", "list": "manual", "lifetime": "soon"}, "lifetime", "is not a duration"),
    ({"values": "ok@example.com", "list": "manual", "include_subdomains": "1"}, "include_subdomains",
     "applies to @domain entries only"),
    ({"values": "", "list": "manual"}, "values", "enter at least one"),
])
async def test_form_errors_are_shown_at_their_field_and_nothing_is_stored(
        start_console: StartConsole, form: dict[str, str], field: str, message: str) -> None:
    console = await start_console()
    await console.login()
    page = await console.post("/suppressions", form)
    assert page.status == 422
    error = f'<p class="error" id="add-{field}-error">'
    assert error in page.text and message in html.unescape(page.text.split(error, 1)[1].split("</p>", 1)[0])
    assert 'aria-describedby="' in page.text and 'aria-invalid="true"' in page.text
    assert html.escape(form["values"].split("\n")[0]) in page.text  # the operator's input is kept
    assert await entries_for(console, "ok@example.com") == []


async def test_suppressions_are_searched_and_paged(start_console: StartConsole) -> None:
    console = await start_console()
    await console.login()
    values = "\n".join(f"member{i:03}@paged.test" for i in range(120))
    assert (await console.post("/suppressions", {"values": values, "list": "bounced"})).status == 303
    first = await console.get("/suppressions?q=paged&list=bounced")
    assert "Entries 1–50" in first.text and "member049@paged.test" in first.text
    assert "member050@paged.test" not in first.text and 'rel="next"' in first.text
    last = await console.get("/suppressions?q=paged&list=bounced&page=3")
    assert "Entries 101–120" in last.text and "member119@paged.test" in last.text and 'rel="next"' not in last.text
    nothing = await console.get("/suppressions?q=nobody-here")
    assert "No entries match" in nothing.text
    bad = await console.get("/suppressions?list=nope&page=x")
    assert bad.status == 422 and 'id="filter-list-error"' in bad.text and "no list named &#39;nope&#39;" in bad.text


# --- held mail: never rendered as HTML ---------------------------------------------------------

def html_message() -> bytes:
    message = EmailMessage()
    message["From"] = "News <news@platform.test>"
    message["To"] = "held@example.com"
    message["Subject"] = "<b>Big</b> sale"
    message.set_content("<script>alert('plain')</script> Plain part with <img src=http://tracker.test/p.gif>")
    message.add_alternative("<html><body><h1>Sale</h1><script>alert(1)</script>"
                            "<img src=http://tracker.test/pixel.gif>Visit us</body></html>", subtype="html")
    return message.as_bytes(policy=SMTP)


def html_only_message() -> bytes:
    message = EmailMessage()
    message["Subject"] = "html only"
    message.set_content("<html><head><style>p{}</style></head><body><p>Hello &amp; welcome</p>"
                        "<script>alert(1)</script><img src=http://tracker.test/pixel.gif>Bye</body></html>",
                        subtype="html")
    return message.as_bytes(policy=SMTP)


async def test_a_held_messages_html_is_never_rendered(start_console: StartConsole) -> None:
    console = await start_console(lists=HOLD_LISTS)
    await console.login()
    await console.post("/suppressions", {"values": "held@example.com\nheld2@example.com", "list": "manual"})
    await send(console, "held@example.com", html_message())
    await send(console, "held2@example.com", html_only_message())
    await wait_until(lambda: _count(console, 2), what="two held messages")
    held = await console.admin.guard.backends.holds.list()
    pages = {m.recipients[0].address: await console.get(f"/holds/{m.id}") for m in held}
    for page in pages.values():
        lowered = page.text.lower()
        assert page.status == 200 and "<script" not in lowered and "<img" not in lowered and "<b>" not in lowered
        assert not re.search(r"<[^>]*tracker\.test", page.text)  # no tag of the page points at it
    with_plain = pages["held@example.com"].text
    # The text/plain part is shown, as text: its markup escaped, never a tag.
    assert "&lt;script&gt;alert(&#39;plain&#39;)&lt;/script&gt; Plain part with &lt;img src=http://tracker.test/p.gif&gt;" \
        in with_plain
    assert "&lt;b&gt;Big&lt;/b&gt; sale" in with_plain  # the Subject header, escaped
    html_only = pages["held2@example.com"].text
    assert "Hello &amp; welcome\nBye" in html_only and "alert" not in html_only and "pixel.gif" not in html_only


async def _count(console: Console, count: int) -> bool:
    return len(await console.admin.guard.backends.holds.list()) == count


# --- errors and uploads ------------------------------------------------------------------------

async def test_console_errors_are_html_pages_and_api_errors_stay_problem_json(start_console: StartConsole) -> None:
    console = await start_console()
    await console.login()
    page = await console.get("/holds/0123456789abcdef")
    assert page.status == 404 and page.response.content_type == "text/html" and "No held message" in page.text
    page = await console.get("/no/such/page")
    assert page.status == 404 and "There is no page at this address" in page.text
    page = await console.request("PUT", "/suppressions")
    assert page.status == 405 and page.response.content_type == "text/html"
    status, body, response = await console.admin.call("GET", "/api/v1/nope")
    assert status == 404 and response.content_type == "application/problem+json" and body["status"] == 404
    assert "Content-Security-Policy" not in response.headers


def upload_form(csrf: str, content: bytes, file_name: str = "unsubs.csv", **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("csrf", csrf)
    for name, value in fields.items():
        form.add_field(name, value)
    form.add_field("file", content, filename=file_name, content_type="text/csv")
    return form


async def test_an_upload_is_checked_whole_then_imported_with_progress(start_console: StartConsole) -> None:
    console = await start_console()
    await console.login()
    await console.get("/imports")
    # A plain CSV without a list column needs a list: refused whole, at the field, nothing written.
    page = await console.post("/imports", upload_form(console.csrf, b"a@import.test\nb@import.test\n"))
    assert page.status == 422 and 'id="import-file-error"' in page.text and "/uploads/" not in page.text
    assert await entries_for(console, "a@import.test") == []
    page = await console.post("/imports", upload_form("forged", b"a@import.test\n", list="bounced"))
    assert page.status == 403
    page = await console.post("/imports", upload_form(console.csrf, b"a@import.test\nnot an address\nb@import.test\n",
                                                      list="bounced", format="csv"))
    assert page.status == 303 and page.location.startswith("/imports/")
    job_url = page.location

    async def finished() -> str | None:
        job = await console.get(job_url)
        return job.text if "state-done" in job.text else None

    text = await wait_until(finished, what="the import job to finish")
    assert "<progress" in text and 'value="100.0"' in text and 'http-equiv="refresh"' not in text
    assert "unsubs.csv:2:" in text and "In force on 1 guard." in text
    assert len(await entries_for(console, "b@import.test")) == 1
    running_page = (await console.get("/imports")).text
    assert "unsubs.csv" in running_page


async def test_a_running_import_page_refreshes_itself(start_console: StartConsole) -> None:
    console = await start_console()
    await console.login()
    await console.get("/imports")
    rows = b"".join(b"user%d@many.test\n" % i for i in range(30_000))
    page = await console.post("/imports", upload_form(console.csrf, rows, list="bounced"))
    job = await console.get(page.location)
    assert job.status == 200
    if "state-running" in job.text:  # the import may already be done on a fast machine
        assert '<meta http-equiv="refresh" content="1">' in job.text
    await wait_until(lambda: _job_done(console, page.location), timeout=30, what="the import to finish")


async def _job_done(console: Console, url: str) -> bool:
    return "state-done" in (await console.get(url)).text


async def test_a_console_change_is_recorded_as_console_and_the_token_name(start_console: StartConsole) -> None:
    console = await start_console()
    await console.login()
    page = await console.post("/erasures", {"targets": "gone@example.com", "reference": "DSR-1", "confirm": "1"})
    assert page.status == 303 and page.location.startswith("/erasures/receipts/")

    async def erase_record() -> str | None:
        audit = (await console.get("/audit?kind=admin&verdict=erase")).text
        return audit if "erasure.erased" in audit else None

    audit = await wait_until(erase_record, what="the erasure's audit record")
    assert "console:ops" in audit and "DSR-1" in audit and "gone@example.com" not in audit


async def test_destructive_actions_need_their_confirmation_and_a_low_ceiling_is_refused(
        start_console: StartConsole, sink: Sink) -> None:
    console = await start_console(classify={"rules": [{"class": "sanction", "subject": "policy violation"}]},
                                  classes={"sanction": {"approval_after": 2}})
    guard = console.admin.guard
    host, port = guard.smtp_address
    await aiosmtplib.send(b"Subject: Policy violation\r\nX-Campaign-ID: s1\r\n\r\nclosed\r\n",
                          sender="n@platform.test", recipients=[f"m{i}@users.example" for i in range(5)],
                          hostname=host, port=port)
    await wait_until(lambda: guard.backends.breakers.get("s1"), what="the trip to reach the store")
    await console.login()
    stream = await console.get("/breakers/s1")
    assert stream.status == 200 and 'value="5"' in stream.text  # the ceiling suggested: its audience
    page = await console.post("/breakers/approve", {"stream": "s1", "ceiling": "3"})
    assert page.status == 422 and 'id="approve-ceiling-error"' in page.text and "already has 5 recipients" in page.text
    page = await console.post("/breakers/cancel", {"stream": "s1"})
    assert page.status == 422 and 'id="cancel-confirm-error"' in page.text
    [held] = await guard.backends.holds.list()
    page = await console.post(f"/holds/{held.id}/discard", {})
    assert page.status == 422 and 'id="discard-confirm-error"' in page.text
    page = await console.post("/erasures", {"targets": "m0@users.example", "reference": "DSR-9"})
    assert page.status == 422 and 'id="erase-confirm-error"' in page.text
    page = await console.post("/erasures", {"targets": "m0@users.example\nnope", "reference": "DSR-9",
                                            "confirm": "1"})
    assert page.status == 422 and "neither an address nor" in html.unescape(page.text)
    assert (await guard.backends.holds.stream_counts("s1")) == {"held": 3}
    assert await guard.backends.erasure.receipts(10) == []
    assert sink.delivered_to() == ["m0@users.example", "m1@users.example"]

    page = await console.post("/breakers/cancel", {"stream": "s1", "confirm": "1"})
    assert page.status == 303 and page.location == "/breakers/s1"
    assert "Cancelled stream &#39;s1&#39;; discarded 3 held recipient(s)." in (await console.follow(page)).text

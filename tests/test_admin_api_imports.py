"""Suppression imports through the admin API, over real HTTP: a streamed upload, a job to poll,
in force when done; a file the importer would refuse, or one too large, stores nothing."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from smtp_guard import replies

from admin_setup import SENDER, finished_job
from smtp_client import message, send

Start = Callable[..., Awaitable[Any]]
CSV = b"email,reason\r\njane@example.com,asked\r\nnot-an-address,oops\r\n@spam.example,\r\n"


async def entries(admin: Any) -> list[dict[str, Any]]:
    _, body, _ = await admin.call("GET", "/api/v1/suppressions?limit=1000")
    return list(body["items"])


async def test_an_uploaded_csv_is_imported_and_in_force_when_the_job_is_done(start_admin: Start) -> None:
    admin = await start_admin()
    status, job, response = await admin.call(
        "POST", "/api/v1/suppressions/import?list=unsubscribed&file_name=crm.csv", data=CSV,
        headers={"Content-Type": "text/csv"})
    assert status == 202, job
    assert response.headers["Location"] == f"/api/v1/imports/{job['id']}"
    assert (job["file_name"], job["format"], job["actor"]) == ("crm.csv", "csv", "api:ops")

    done = await finished_job(admin, response.headers["Location"])
    assert done["state"] == "done" and done["percent"] == 100.0, done
    assert (done["result"]["new"], done["result"]["bad"], done["result"]["lists"]) == (2, 1, ["unsubscribed"])
    assert done["bad_rows"] == ["crm.csv:3: 'not-an-address' is not an address"]
    assert done["in_force"]["all_confirmed"]
    outcome = await send(admin.guard.smtp_address, SENDER, ["jane@example.com", "x@mail.spam.example"],
                         message(sender=SENDER))
    assert outcome.rcpt["jane@example.com"] == str(replies.SUPPRESSED)
    assert {(e["kind"], e["value"], e["source"]) for e in await entries(admin)} == {
        ("address", "jane@example.com", "upload:crm.csv"), ("domain", "spam.example", "upload:crm.csv")}

    status, body, _ = await admin.call("GET", "/api/v1/imports", token=admin.viewer_token)
    assert [item["id"] for item in body["items"]] == [job["id"]]
    # The same file again: idempotent.
    status, job, response = await admin.call("POST", "/api/v1/suppressions/import?list=unsubscribed", data=CSV)
    again = await finished_job(admin, response.headers["Location"])
    assert (again["result"]["new"], again["file_name"]) == (0, "upload")


async def test_a_sendgrid_export_takes_its_list_from_the_file_name(start_admin: Start) -> None:
    admin = await start_admin()
    export = b"email,created\r\nspam@example.com,1714000000\r\n"
    status, job, response = await admin.call("POST", "/api/v1/suppressions/import?file_name=spam_reports.csv",
                                             data=export)
    assert status == 202 and job["format"] == "sendgrid"
    done = await finished_job(admin, response.headers["Location"])
    assert done["result"]["lists"] == ["complained"]


async def test_a_file_the_importer_would_refuse_is_a_422_and_stores_nothing(start_admin: Start) -> None:
    admin = await start_admin()
    uploads = admin.guard.config.store.data_dir / "uploads"
    status, body, _ = await admin.call("POST", "/api/v1/suppressions/import", data=b"jane@example.com\r\n")
    assert body["detail"] == ("file: upload has no list column; say which list the addresses go to, e.g. "
                              "?list=unsubscribed; nothing was imported")
    for query, data, field in [
        ("", b"jane@example.com\r\n", "file"),  # no list column and no ?list=
        ("?format=mailchimp", b"Email Address,FNAME\r\njane@example.com,Jane\r\n", "file"),  # subscribed members
        ("?format=ses", b"email\r\njane@example.com\r\n", "file"),
        ("?list=unsubscribed", b"", "file"),
        ("?list=no-such-list", b"email\r\njane@example.com\r\n", "list"),
        ("?format=excel", b"email\r\njane@example.com\r\n", "format"),
        ("?list=unsubscribed&colour=red", b"email\r\njane@example.com\r\n", "colour"),
        ("?list=unsubscribed&file_name=a%0Ab.csv", b"email\r\njane@example.com\r\n", "file_name"),
    ]:
        status, body, _ = await admin.call("POST", "/api/v1/suppressions/import" + query, data=data)
        assert (status, body["field"]) == (422, field), (query, body)
    assert await entries(admin) == []
    assert list(uploads.iterdir()) == []  # refused uploads are deleted
    status, body, _ = await admin.call("GET", "/api/v1/imports")
    assert body["items"] == []


async def test_an_upload_larger_than_max_upload_is_a_413(start_admin: Start) -> None:
    admin = await start_admin(admin={"max_upload": 1024})
    big = b"email\r\n" + b"".join(b"user%d@example.com\r\n" % i for i in range(200))
    status, body, _ = await admin.call("POST", "/api/v1/suppressions/import?list=bounced", data=big)
    assert (status, body["field"]) == (413, "file") and "max_upload" in body["detail"]

    async def chunks() -> Any:  # no Content-Length: refused while streaming
        for start in range(0, len(big), 256):
            yield big[start:start + 256]

    status, body, _ = await admin.call("POST", "/api/v1/suppressions/import?list=bounced", data=chunks())
    assert (status, body["field"]) == (413, "file")
    assert await entries(admin) == []
    assert not any((admin.guard.config.store.data_dir / "uploads").iterdir())


async def test_imports_need_role_admin_and_unknown_jobs_are_404(start_admin: Start) -> None:
    admin = await start_admin()
    status, body, _ = await admin.call("POST", "/api/v1/suppressions/import?list=bounced", data=CSV,
                                       token=admin.viewer_token)
    assert status == 403
    status, body, _ = await admin.call("POST", "/api/v1/suppressions/import?list=bounced", data={"file": "x"})
    assert (status, body["field"]) == (415, "file")
    status, body, _ = await admin.call("GET", "/api/v1/imports/nope")
    assert status == 404 and "GET /api/v1/imports" in body["detail"]
    assert await entries(admin) == []

"""``/api/v1/suppressions/import`` and ``/api/v1/imports``: upload an export, follow its job.

The upload is the raw request body (the file itself, not a form), streamed to a private file
and checked whole before anything is written: a file the importer would refuse (unknown
layout, a missing column) is a 422 on ``file`` with nothing stored. The import then runs in
the background; the 202 names the job to poll.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..services import importers
from .api_suppressions import known_list
from .problems import Problem, bad_input, not_found
from .query import Query
from .requests import JOBS, context, require_admin

UPLOAD_CHUNK = 64 * 1024
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def routes(prefix: str) -> list[web.RouteDef]:
    return [
        web.post(f"{prefix}/suppressions/import", import_suppressions),
        web.get(f"{prefix}/imports", list_imports, allow_head=False),
        web.get(f"{prefix}/imports/{{id}}", show_import, allow_head=False, name="import_job"),
    ]


async def import_suppressions(request: web.Request) -> web.Response:
    """POST /suppressions/import?format=auto&list=NAME&source=TEXT&file_name=NAME with the file
    as the body: 202 and the job (``Location`` is its page)."""
    require_admin(request)
    query = Query(request, {"format", "list", "source", "file_name"})
    fmt = query.choice("format", importers.FORMATS, "auto")
    ctx = context(request)
    list_name = query.text("list", max_length=63)
    if list_name is not None:
        known_list(ctx, list_name)
    source = query.text("source", max_length=200)
    file_name = query.text("file_name", max_length=255) or "upload"
    for name, value in (("source", source), ("file_name", file_name)):
        if value is not None and not value.isprintable():  # both end up in logs and messages
            raise bad_input(name, "contains control characters")
    if request.content_type in FORM_TYPES:
        raise Problem(415, "Unsupported media type", "send the file itself as the body (e.g. curl --data-binary "
                      "@bounces.csv -H 'Content-Type: text/csv'), not a form", field="file")
    jobs = request.app[JOBS]
    if request.content_length is not None and request.content_length > jobs.max_upload:
        # Refused before a byte is read: the declared length already says it is too large.
        raise Problem(413, "Upload too large", f"file: {request.content_length} bytes is larger than [admin] "
                      f"max_upload ({jobs.max_upload} bytes); split the file or raise the setting", field="file")
    path = await jobs.receive(request.content.iter_chunked(UPLOAD_CHUNK), "file")
    try:
        detected = await asyncio.to_thread(importers.check_file, path, fmt, list_name, file_name)
    except importers.ImportFailed as error:
        path.unlink(missing_ok=True)
        raise bad_input("file", f"{_in_api_terms(str(error))}; nothing was imported") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    job = jobs.start(ctx, path, file_name, detected, list_name, source)
    location = request.app.router["import_job"].url_for(id=job.id)
    return web.json_response(job.as_json(), status=202, headers={"Location": str(location)})


def _in_api_terms(message: str) -> str:
    """The importer speaks to the CLI's user; here its options are query parameters."""
    return message.replace("--list ", "?list=").replace("--format ", "?format=")


async def list_imports(request: web.Request) -> web.Response:
    """GET /imports: this guard's recent import jobs, newest first (forgotten at a restart)."""
    Query(request, ())
    return web.json_response({"items": [job.as_json() for job in request.app[JOBS].recent()]})


async def show_import(request: web.Request) -> web.Response:
    """GET /imports/{id}: progress, then the result, bad rows and whether it is in force."""
    Query(request, ())
    job_id = request.match_info["id"]
    job = request.app[JOBS].get(job_id)
    if job is None:
        raise not_found(f"no import job {job_id!r} on this guard; GET /api/v1/imports lists the recent ones "
                        "(jobs are forgotten when the guard restarts: upload the file again, it is idempotent)")
    return web.json_response(job.as_json())

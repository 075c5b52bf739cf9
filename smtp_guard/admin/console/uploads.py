"""Console pages for suppression imports: upload an export file (a multipart form), then watch
its job page, which reloads itself (``<meta http-equiv="refresh">``, no script) until done.

The upload is refused whole, before anything is written, when its format or columns are wrong
(``services.importers.check_file``); once accepted it runs as an ``ImportJobs`` job, like an
upload through the API, and bad rows are listed on its page as ``FILE:LINE: reason``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

from aiohttp import BodyPartReader, web

from ...services import importers
from ..problems import Problem
from ..requests import JOBS, context, principal, require_admin
from ..sessions import CSRF_FIELD, has_csrf_token
from .forms import Form
from .login import csrf_refused
from .pages import in_force_text, redirect, render, session

CHUNK = 64 * 1024
MAX_FIELD = 1000  # bytes of a text field (format, list, source)
REFRESH_SECONDS = 1
TEXT_FIELDS = frozenset({"format", "list", "source"})
FORMAT_LABELS = {"auto": "detect from the file", "csv": "plain CSV", "sendgrid": "SendGrid", "mailchimp": "Mailchimp",
                 "ses": "Amazon SES"}


def add_routes(app: web.Application) -> None:
    app.router.add_get("/imports", imports_page)
    app.router.add_post("/imports", upload)
    app.router.add_get("/imports/{id}", job_page)


async def imports_page(request: web.Request) -> web.Response:
    return _page(request, Form(), 200)


def _page(request: web.Request, form: Form, status: int) -> web.Response:
    ctx = context(request)
    return render(request, "imports.html", status=status, form=form,
                  format_choices=[(name, FORMAT_LABELS.get(name, name)) for name in importers.FORMATS],
                  lists=ctx.config.lists, jobs=request.app[JOBS].recent(), max_upload=request.app[JOBS].max_upload,
                  may_change=principal(request).may_change)


async def upload(request: web.Request) -> web.Response:
    """multipart/form-data: ``csrf`` first (checked before anything else is read), then
    ``format``, ``list`` and ``source``, then ``file``."""
    reader = await request.multipart()
    first = await reader.next()
    if not isinstance(first, BodyPartReader) or first.name != CSRF_FIELD or \
            not has_csrf_token(session(request), await _small_text(first, 200)):
        raise csrf_refused()
    require_admin(request)
    ctx = context(request)
    jobs = request.app[JOBS]
    form, path, file_name = Form(), None, ""
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue  # a nested multipart is nothing a console form sends
            if part.name == "file" and path is None and part.filename:
                file_name = Path(part.filename).name[:200]
                try:
                    path = await jobs.receive(_chunks(part), "file")
                except Problem as refused:  # too large or empty: shown at the field
                    form.error("file", refused.detail.removeprefix("file: "))
                    break
            elif part.name in TEXT_FIELDS:
                form.data[part.name] = await _small_text(part, MAX_FIELD)
        if path is None:
            form.error("file", "choose a file to upload")
        fmt = form.text("format") or "auto"
        if fmt not in importers.FORMATS:
            form.error("format", f"choose one of {', '.join(importers.FORMATS)}")
        list_name = form.text("list", 63) or None
        if list_name is not None and list_name not in ctx.config.lists:
            form.error("list", f"no list named {list_name!r}")
        if path is not None and not form.errors:
            try:
                # The file as a whole (layout, columns) is checked before anything is written.
                await asyncio.to_thread(importers.check_file, path, fmt, list_name)
            except importers.ImportFailed as error:
                form.error("file", str(error).replace(str(path), file_name))
        if form.errors:
            return _page(request, form, 422)
        assert path is not None
        job = jobs.start(ctx, path, file_name, fmt, list_name, form.text("source") or None)
        path = None  # the job owns the file now
        return redirect(f"/imports/{job.id}")
    finally:
        if path is not None:
            path.unlink(missing_ok=True)


async def _small_text(part: BodyPartReader, limit: int) -> str:
    """A text field of the form, read no further than ``limit`` bytes (the rest is skipped)."""
    data = b""
    while len(data) <= limit and (chunk := await part.read_chunk(limit + 1)):
        data += chunk
    return data[:limit].decode("utf-8", "replace")


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(CHUNK):
        yield chunk


async def job_page(request: web.Request) -> web.Response:
    job = request.app[JOBS].get(request.match_info["id"])
    if job is None:
        raise web.HTTPNotFound(text="No such import job. Jobs are remembered until the guard restarts; the "
                                    "import itself is idempotent, so uploading the file again finishes it.")
    in_force = None
    if job.in_force is not None:
        in_force = in_force_text(job.in_force)
    return render(request, "import_job.html", job=job, in_force=in_force,
                  refresh=REFRESH_SECONDS if job.state == "running" else None)

"""Suppression imports through the API and console: the upload is streamed to a private file
beside the store, checked whole (format, columns) before anything is written, then imported by
``services.importers`` in the background while the caller polls its progress. A job is
``done`` once its entries are in force on every running guard (or the job says which guard
did not confirm them), as a CLI import reports when it returns.

Jobs live in the process's memory: after a restart a job's page is gone, but the import is
idempotent, so uploading the file again finishes it without duplicating anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal

from ..services.context import AdminContext
from ..services.importers import BadRow, ImportProgress, ImportResult, import_file
from .problems import Problem
from .requests import InForce, in_force

log = logging.getLogger(__name__)

JobState = Literal["running", "done", "failed"]
MAX_BAD_ROWS_SHOWN = 100
KEEP_FINISHED = 50  # finished jobs remembered for their pages; older ones are forgotten


@dataclass
class ImportJob:
    id: str
    actor: str
    file_name: str
    format: str
    size: int
    started_at: float
    state: JobState = "running"
    progress: ImportProgress | None = None
    result: ImportResult | None = None
    error: str | None = None
    bad_rows: list[str] = field(default_factory=list)
    finished_at: float | None = None
    in_force: InForce | None = None  # None until done, and when nothing was imported

    @property
    def percent(self) -> float:
        if self.state == "done":
            return 100.0
        if self.progress is None or not self.progress.bytes_total:
            return 0.0
        return round(100.0 * self.progress.bytes_read / self.progress.bytes_total, 1)

    def as_json(self) -> dict[str, Any]:
        result = self.result
        return {
            "id": self.id, "state": self.state, "file_name": self.file_name, "format": self.format,
            "size": self.size, "actor": self.actor, "started_at": self.started_at, "finished_at": self.finished_at,
            "percent": self.percent, "rows": self.progress.rows if self.progress else 0,
            "error": self.error, "bad_rows": self.bad_rows,
            "in_force": None if self.in_force is None else self.in_force.as_json(),
            "result": None if result is None else {
                "format": result.format, "read": result.read, "new": result.new, "present": result.present,
                "expired": result.expired, "bad": result.bad, "erased": result.erased, "lists": list(result.lists)},
        }


class ImportJobs:
    def __init__(self, upload_dir: Path, max_upload: int, clock: Callable[[], float] = time.time) -> None:
        self._dir = upload_dir
        self._max = max_upload
        self._clock = clock
        self._jobs: OrderedDict[str, ImportJob] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def max_upload(self) -> int:
        return self._max

    async def receive(self, chunks: AsyncIterator[bytes], field_name: str) -> Path:
        """Write an upload to a new 0600 file; 413 naming ``field_name`` past ``max_upload``."""
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._dir / f"upload-{secrets.token_hex(8)}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        size = 0
        try:
            with os.fdopen(fd, "wb") as file:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self._max:
                        raise Problem(413, "Upload too large", f"{field_name}: larger than [admin] max_upload "
                                      f"({self._max} bytes); split the file or raise the setting", field=field_name)
                    file.write(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if size == 0:
            path.unlink()
            raise Problem(422, "Invalid field", f"{field_name}: the upload is empty", field=field_name)
        return path

    def start(self, ctx: AdminContext, path: Path, file_name: str, fmt: str, list_name: str | None,
              source: str | None) -> ImportJob:
        job = ImportJob(id=secrets.token_hex(8), actor=ctx.actor, file_name=file_name, format=fmt,
                        size=path.stat().st_size, started_at=self._clock())
        self._jobs[job.id] = job
        self._forget_old()
        task = asyncio.create_task(self._run(ctx, job, path, fmt, list_name, source), name=f"import {job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def get(self, job_id: str) -> ImportJob | None:
        return self._jobs.get(job_id)

    def recent(self) -> list[ImportJob]:
        return list(reversed(self._jobs.values()))

    async def _run(self, ctx: AdminContext, job: ImportJob, path: Path, fmt: str, list_name: str | None,
                   source: str | None) -> None:
        def on_bad_row(bad: BadRow) -> None:
            if len(job.bad_rows) < MAX_BAD_ROWS_SHOWN:
                job.bad_rows.append(f"{job.file_name}:{bad.line}: {bad.reason}")

        def on_progress(progress: ImportProgress) -> None:
            job.progress = progress

        try:
            result = await import_file(ctx, path, fmt, list_name, source or f"upload:{job.file_name}",
                                       on_progress=on_progress, on_bad_row=on_bad_row, name=job.file_name)
            if result.new or result.present:  # entries already present may have a new expiry
                job.in_force = await in_force(ctx)
            job.result, job.state = result, "done"
            log.info("import %s of %s by %s: %d new, %d present, %d bad rows", job.id, job.file_name, job.actor,
                     job.result.new, job.result.present, job.result.bad)
        except asyncio.CancelledError:
            job.state, job.error = "failed", "stopped: the guard shut down; upload the file again to finish it"
            raise
        except Exception as error:  # the job's page says what failed; the listener keeps serving
            job.state, job.error = "failed", str(error)
            log.warning("import %s of %s by %s failed: %s", job.id, job.file_name, job.actor, error)
        finally:
            job.finished_at = self._clock()
            path.unlink(missing_ok=True)

    def _forget_old(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.state != "running"]
        for job_id in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job_id]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

"""Import of suppression exports: plain CSV, SendGrid, Mailchimp and Amazon SES.

Formats (``auto`` tells them apart by the header):

* **csv** — one address (or ``@domain``) per line, or a header row with an ``email``,
  ``address`` or ``value`` column and optional ``list``, ``kind``, ``reason``, ``source``,
  ``created_at``, ``expires_at``, ``include_subdomains`` columns (what ``suppress export``
  writes, so an export reads back). Without a ``list`` column, ``--list`` is required.
* **sendgrid** — Suppressions exports (``email,created`` plus ``reason``/``status``/``ip``):
  spam reports -> complained, unsubscribes -> unsubscribed, invalid emails -> invalid, blocks
  -> bounced, bounces -> invalid for a 5.1.x status (no such mailbox), else bounced. The kind
  is read from the file name (``spam_reports.csv``) when it says, else from the columns.
* **mailchimp** — audience exports of Unsubscribed (``UNSUB_TIME``) -> unsubscribed and Cleaned
  (``CLEAN_TIME``) -> invalid members, keyed by ``Email Address``.
* **ses** — ``aws sesv2 list-suppressed-destinations`` JSON (``SuppressedDestinationSummaries``)
  or a CSV with ``EmailAddress,Reason``: COMPLAINT -> complained, BOUNCE -> bounced.

``list_name`` overrides every mapping. The file is streamed and written in batches of
``BATCH_SIZE`` rows, one transaction each; a batch larger than ``INCREMENTAL_MAX`` entries
makes the running servers reload their index, a smaller one is applied to it entry by entry.
Bad rows are reported as ``FILE:LINE: reason`` and skipped; the good rows are kept.

Idempotent: an entry is keyed by (kind, value, list) and a row without its own time is dated
by the file's modification time, so importing the same file again changes nothing (and
logs no change for the running servers). Resumable: ``ImportProgress.rows``
counts the data rows whose batch is committed; after an interruption, ``skip_rows`` with
that number continues where the import stopped (re-running from the start is also safe,
only slower). Progress is not stored anywhere: the store schema has no place for it, and
idempotence already makes a re-run correct.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator, Literal, Mapping, Sequence, TextIO

from ..suppression_model import SuppressionEntry
from .context import AdminContext
from .suppressions import expiry, parse_target, record, require_list

if TYPE_CHECKING:
    from _csv import Reader as CSVReader

ImportFormat = Literal["csv", "sendgrid", "mailchimp", "ses"]
FORMATS: tuple[str, ...] = ("auto", "csv", "sendgrid", "mailchimp", "ses")
BATCH_SIZE = 10_000
# A batch of at most this many entries is logged entry by entry, which a running server applies
# to its index in place; a larger one logs one "reload everything" marker instead. A daily
# import of a few hundred bounces then no longer reloads a ten-million-address index in every
# process (8 s of CPU each), and is in force within one change poll.
INCREMENTAL_MAX = 1_000
# A JSON object in an SES export is a few hundred bytes; one this large means a broken file.
_MAX_JSON_OBJECT = 1 << 20
_JSON_SEPARATORS = re.compile(r"[\s,]*")

_SENDGRID_COLUMNS = frozenset({"email", "created", "reason", "status", "ip"})
_ADDRESS_COLUMNS = ("value", "email", "e-mail", "email address", "email_address", "address", "recipient")


class ImportFailed(Exception):
    """The file as a whole cannot be imported (unreadable, unknown layout, nothing to
    suppress); the message names the file and says what to do."""


class RowError(ValueError):
    """One row cannot be imported; the message is the reason shown after ``FILE:LINE:``."""


@dataclass(frozen=True)
class BadRow:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class ImportProgress:
    rows: int  # data rows (header excluded) read and committed: resume with skip_rows=rows
    bytes_read: int
    bytes_total: int


@dataclass(frozen=True)
class ImportResult:
    path: str
    format: ImportFormat
    read: int = 0  # data rows read, skipped ones excluded
    new: int = 0  # entries that were not there before
    present: int = 0  # entries already there (updated if reason, source or expiry differed)
    expired: int = 0  # rows whose entry would already have expired; not imported
    bad: int = 0
    skipped: int = 0  # rows passed over by skip_rows
    lists: tuple[str, ...] = ()  # lists the rows went to
    erased: int = 0  # rows naming an erased address; never stored again


@dataclass(frozen=True)
class _Row:
    """One row of any format, before normalization."""

    line: int
    target: str
    list_name: str | None
    reason: str = ""
    source: str = ""
    created: str = ""
    expires: str | None = None
    include_subdomains: bool = False


@dataclass
class _Counts:
    read: int = 0
    new: int = 0
    present: int = 0
    expired: int = 0
    bad: int = 0
    skipped: int = 0
    erased: int = 0
    lists: dict[str, None] = field(default_factory=dict)


async def import_file(ctx: AdminContext, path: str | os.PathLike[str], fmt: str = "auto",
                      list_name: str | None = None, source: str | None = None, skip_rows: int = 0,
                      on_progress: Callable[[ImportProgress], None] = lambda progress: None,
                      on_bad_row: Callable[[BadRow], None] = lambda bad: None,
                      name: str | None = None) -> ImportResult:
    """Import one export file; see the module docstring for formats and guarantees.

    Raises ImportFailed when the file cannot be read or recognized; rows that cannot be
    imported go to ``on_bad_row`` and the rest are kept. ``name`` is what messages and the
    audit trail call the file, and what a SendGrid export's list is read from (default: the
    path; an upload is stored under a name of the guard's own).
    """
    if list_name is not None:
        require_list(ctx, list_name)
    name = str(path) if name is None else name
    with _opened(path, name) as (raw, head, text):
        stat = os.fstat(raw.fileno())
        detected, rows = _open_rows(text, head, name, fmt, list_name)
        rules = _Rules(ctx, name, list_name, source or "", _default_source(detected, name), stat.st_mtime)
        counts = _Counts()
        batch: list[SuppressionEntry] = []
        position = 0
        for row in rows:
            position += 1
            if position <= skip_rows:
                counts.skipped += 1
            else:
                entry = rules.accept(row, counts, on_bad_row)
                if entry is not None:
                    batch.append(entry)
            # Commit by row position, not by entries collected, so progress.rows is exact
            # (a resume point) even in a stretch of bad or skipped rows.
            if position % BATCH_SIZE == 0:
                await _commit(ctx, batch, counts)
                on_progress(ImportProgress(position, raw.tell(), stat.st_size))
        await _commit(ctx, batch, counts)
        on_progress(ImportProgress(position, raw.tell(), stat.st_size))
    result = ImportResult(name, detected, counts.read, counts.new, counts.present, counts.expired, counts.bad,
                          counts.skipped, tuple(counts.lists), counts.erased)
    if result.new or result.present:
        summary = (f"import of {name} ({detected}): {result.new} new, {result.present} already present, "
                   f"{result.bad} bad rows")
        for imported_list in result.lists:
            await record(ctx, "suppress.import", imported_list, [""], summary, ctx.clock())
    return result


def check_file(path: str | os.PathLike[str], fmt: str = "auto", list_name: str | None = None,
               name: str | None = None) -> ImportFormat:
    """The file's format, or ImportFailed for everything ``import_file`` would refuse before its
    first write (unreadable, unknown layout, a column the format needs missing): an upload can
    be refused whole instead of half-imported. ``name`` as for ``import_file``."""
    name = str(path) if name is None else name
    with _opened(path, name) as (_, head, text):
        detected, rows = _open_rows(text, head, name, fmt, list_name)
        next(rows, None)  # the row readers check their columns when the first row is read
    return detected


@contextmanager
def _opened(path: str | os.PathLike[str], name: str) -> Iterator[tuple[BinaryIO, bytes, TextIO]]:
    """The file, its first bytes (for telling JSON from CSV) and a text view of it."""
    try:
        raw = open(path, "rb")
    except OSError as error:
        raise ImportFailed(f"cannot read {name}: {error.strerror or error}") from None
    with raw:
        head = raw.peek(4096)[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
        # Bad UTF-8 becomes U+FFFD and that row is reported (see _Rules.entry), not the file.
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
        try:
            yield raw, head, text
        finally:
            text.detach()  # ``with raw`` closes the file


async def _commit(ctx: AdminContext, batch: list[SuppressionEntry], counts: _Counts) -> None:
    """Write one batch in one transaction (emptying ``batch``) and count what was new."""
    if batch:
        new = await ctx.suppressions.add(batch, bulk=len(batch) > INCREMENTAL_MAX)
        counts.new += new
        counts.present += len(batch) - new
        batch.clear()


@dataclass(frozen=True)
class _Rules:
    """How rows of one file become entries: overrides, defaults, and the file's own time."""

    ctx: AdminContext
    path: str
    list_override: str | None
    source_override: str
    default_source: str
    # A row without its own time is dated by the file, not by the clock, so that a re-import
    # computes the same expiry and changes nothing.
    mtime: float

    def accept(self, row: _Row | BadRow, counts: _Counts, on_bad_row: Callable[[BadRow], None]) -> SuppressionEntry | None:
        """The entry for one row, or None (reported as bad, or already expired)."""
        counts.read += 1
        if not isinstance(row, BadRow):
            try:
                entry = self.entry(row)
            except ValueError as error:
                row = BadRow(self.path, row.line, str(error))
            else:
                if entry.has_expired(self.ctx.clock()):
                    counts.expired += 1
                    return None
                if entry.kind == "address" and self.ctx.tombstones.lookup(entry.value) is not None:
                    # An old export must not bring an erased address back onto disk.
                    counts.erased += 1
                    return None
                counts.lists[entry.list_name] = None
                return entry
        counts.bad += 1
        on_bad_row(row)
        return None

    def entry(self, row: _Row) -> SuppressionEntry:
        """Raises ValueError (RowError, InvalidTarget, UnknownList) with the reason."""
        if "\ufffd" in row.target:
            # U+FFFD would pass as an SMTPUTF8 local part; it stands for bytes that were lost.
            raise RowError("contains bytes that are not UTF-8; save the file as UTF-8 and import it again")
        target = parse_target(self.ctx, row.target)
        list_name = self.list_override or row.list_name
        if list_name is None:
            raise RowError("no list for this row; give one with --list (e.g. --list unsubscribed)")
        require_list(self.ctx, list_name)
        created_at = parse_time(row.created, "created time") if row.created else self.mtime
        if row.expires is not None:
            expires_at = parse_time(row.expires, "expiry time") if row.expires else None
        else:
            expires_at = expiry(self.ctx, list_name, created_at)
        return SuppressionEntry(target.kind, target.value, list_name, row.reason,
                                self.source_override or row.source or self.default_source, created_at, expires_at,
                                row.include_subdomains and target.kind == "domain")


def _default_source(fmt: ImportFormat, path: str) -> str:
    return f"import:{Path(path).name}" if fmt == "csv" else fmt


def parse_time(text: str, what: str) -> float:
    """Epoch seconds (or milliseconds), or an ISO 8601 / "YYYY-MM-DD HH:MM:SS" time (UTC when
    no zone is given), as exports write them."""
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        epoch = number / 1000 if number > 1e11 else number
        # "nan" and "inf" parse as floats; SQLite stores NaN as NULL and no export can write
        # either, so a time must be a date the calendar (years 1-9999) can show.
        if math.isfinite(epoch) and _is_calendar_time(epoch):
            return epoch
        raise RowError(f"{what} {text!r} is not a date (write 2024-05-01T12:30:00Z or epoch seconds)")
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        epoch = moment.timestamp()
        if not _is_calendar_time(epoch):
            raise ValueError(text)
    except (ValueError, OverflowError):  # OverflowError: 9999-12-31T23:59:59-14:00 is past year 9999 in UTC
        raise RowError(f"{what} {text!r} is not a date (write 2024-05-01T12:30:00Z or epoch seconds)") from None
    return epoch


def _is_calendar_time(epoch: float) -> bool:
    try:
        datetime.fromtimestamp(epoch, timezone.utc)
    except (ValueError, OverflowError, OSError):
        return False
    return True


# --- reading the formats ----------------------------------------------------------------------

RowSource = Iterator["_Row | BadRow"]


def _open_rows(text: TextIO, head: bytes, path: str, fmt: str,
               list_override: str | None) -> tuple[ImportFormat, RowSource]:
    """Detect the format (unless forced) from the first bytes and the header; return it with
    an iterator over the rows."""
    if head.startswith(b"{"):
        if fmt not in ("auto", "ses"):
            raise ImportFailed(f"{path} is JSON; only the SES format is JSON (use --format ses or auto)")
        return "ses", _ses_json_rows(text, path)
    reader = csv.reader(text)
    try:
        header = next(reader, None)
    except csv.Error as error:
        raise ImportFailed(f"{path}:1: not a CSV file ({error})") from None
    if header is None:
        raise ImportFailed(f"{path} is empty; nothing to import")
    columns = [cell.strip().lower() for cell in header]
    detected = _detect(columns) if fmt == "auto" else fmt
    if detected == "ses":
        return "ses", _ses_csv_rows(reader, columns, path)
    if detected == "mailchimp":
        return "mailchimp", _mailchimp_rows(reader, columns, path)
    if detected == "sendgrid":
        return "sendgrid", _sendgrid_rows(reader, columns, path)
    if detected == "csv":
        return "csv", _csv_rows(reader, header, columns, path, list_override)
    raise ImportFailed(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _detect(columns: Sequence[str]) -> ImportFormat:
    names = set(columns)
    if {"emailaddress", "reason"} <= names:
        return "ses"
    if "email address" in names:
        return "mailchimp"
    if {"email", "created"} <= names <= _SENDGRID_COLUMNS:
        return "sendgrid"
    return "csv"


def _column(columns: Sequence[str], path: str, wanted: str, fmt: str) -> int:
    try:
        return columns.index(wanted)
    except ValueError:
        raise ImportFailed(f"{path}:1: no {wanted!r} column in the header ({', '.join(columns)}); "
                           f"is this a {fmt} export? Try --format auto") from None


def _records(reader: CSVReader, path: str) -> Iterator[tuple[int, list[str]] | BadRow]:
    """Data rows with the line each starts on (``line_num`` is where a row ends, and a quoted
    field may span lines); blank lines are skipped, unparsable ones reported."""
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            yield BadRow(path, start, f"not valid CSV: {error}")
            continue
        if cells and any(cell.strip() for cell in cells):
            yield start, cells


def _cell(cells: Sequence[str], index: int | None) -> str:
    return cells[index].strip() if index is not None and index < len(cells) else ""


def _optional(columns: Sequence[str], *names: str) -> int | None:
    return next((columns.index(name) for name in names if name in columns), None)


def _csv_rows(reader: CSVReader, header: list[str], columns: list[str], path: str,
              list_override: str | None) -> RowSource:
    value = _optional(columns, *_ADDRESS_COLUMNS)
    if value is None:
        # No header: the first line is already data, one address per line.
        if list_override is None:
            raise ImportFailed(f"{path} has no list column; say which list the addresses go to, "
                               "e.g. --list unsubscribed")
        yield from _header_as_row(header, path)
        for item in _records(reader, path):
            yield item if isinstance(item, BadRow) else _Row(item[0], _cell(item[1], 0), None)
        return
    list_column = _optional(columns, "list", "list_name")
    if list_column is None and list_override is None:
        raise ImportFailed(f"{path} has no list column; say which list the addresses go to, e.g. --list unsubscribed")
    kind = _optional(columns, "kind")
    reason = _optional(columns, "reason")
    source = _optional(columns, "source")
    created = _optional(columns, "created_at", "created", "date")
    expires = _optional(columns, "expires_at", "expires")
    subdomains = _optional(columns, "include_subdomains")
    for item in _records(reader, path):
        if isinstance(item, BadRow):
            yield item
            continue
        line, cells = item
        target = _cell(cells, value)
        if _cell(cells, kind) == "domain" and not target.startswith("@"):
            target = "@" + target
        yield _Row(line, target, _cell(cells, list_column) or None, _cell(cells, reason), _cell(cells, source),
                   _cell(cells, created), None if expires is None else _cell(cells, expires),
                   _cell(cells, subdomains).lower() in ("true", "1", "yes"))


def _header_as_row(header: list[str], path: str) -> RowSource:
    if header and header[0].strip():
        yield _Row(1, header[0].strip(), None)


def _sendgrid_rows(reader: CSVReader, columns: list[str], path: str) -> RowSource:
    email = _column(columns, path, "email", "SendGrid")
    created = _optional(columns, "created")
    reason = _optional(columns, "reason")
    status = _optional(columns, "status")
    fixed = _sendgrid_list(Path(path).name.lower(), columns)
    for item in _records(reader, path):
        if isinstance(item, BadRow):
            yield item
            continue
        line, cells = item
        list_name = fixed or ("invalid" if _cell(cells, status).startswith("5.1.") else "bounced")
        yield _Row(line, _cell(cells, email), list_name, _cell(cells, reason) or f"SendGrid {list_name}",
                   created=_cell(cells, created))


def _sendgrid_list(file_name: str, columns: Sequence[str]) -> str | None:
    """The list for a whole SendGrid export, or None for bounces (decided per row by status)."""
    for hint, list_name in (("spam", "complained"), ("unsub", "unsubscribed"), ("invalid", "invalid"),
                            ("block", "bounced"), ("bounce", None)):
        if hint in file_name:
            return list_name
    if "status" in columns:
        return None
    if "ip" in columns:
        return "complained"
    return "invalid" if "reason" in columns else "unsubscribed"


def _mailchimp_rows(reader: CSVReader, columns: list[str], path: str) -> RowSource:
    email = _column(columns, path, "email address", "Mailchimp")
    if "unsub_time" in columns:
        when, list_name = columns.index("unsub_time"), "unsubscribed"
        reason, other = _optional(columns, "unsub_reason"), _optional(columns, "unsub_reason_other")
    elif "clean_time" in columns:
        when, list_name = columns.index("clean_time"), "invalid"
        reason, other = None, _optional(columns, "clean_campaign_title")
    else:
        raise ImportFailed(f"{path} is a Mailchimp export of subscribed members (no UNSUB_TIME or CLEAN_TIME "
                           "column); export the Unsubscribed or Cleaned members instead")
    for item in _records(reader, path):
        if isinstance(item, BadRow):
            yield item
            continue
        line, cells = item
        if list_name == "invalid":
            campaign = _cell(cells, other)
            text = f"cleaned by Mailchimp after campaign {campaign!r}" if campaign else "cleaned by Mailchimp"
        else:
            text = ": ".join(part for part in (_cell(cells, reason), _cell(cells, other)) if part)
        yield _Row(line, _cell(cells, email), list_name, text or "unsubscribed in Mailchimp",
                   created=_cell(cells, when))


_SES_LISTS: Mapping[str, str] = {"BOUNCE": "bounced", "COMPLAINT": "complained"}


def _ses_row(line: int, address: object, reason: object, updated: object, path: str) -> _Row | BadRow:
    if not isinstance(address, str) or not isinstance(reason, str):
        return BadRow(path, line, "needs EmailAddress and Reason")
    list_name = _SES_LISTS.get(reason.strip().upper())
    if list_name is None:
        return BadRow(path, line, f"SES reason {reason!r} is neither BOUNCE nor COMPLAINT")
    return _Row(line, address, list_name, f"SES {reason.strip().lower()}",
                created=updated if isinstance(updated, str) else "")


def _ses_csv_rows(reader: CSVReader, columns: list[str], path: str) -> RowSource:
    email = _column(columns, path, "emailaddress", "SES")
    reason = _column(columns, path, "reason", "SES")
    updated = _optional(columns, "lastupdatetime")
    for item in _records(reader, path):
        if isinstance(item, BadRow):
            yield item
            continue
        line, cells = item
        yield _ses_row(line, _cell(cells, email), _cell(cells, reason), _cell(cells, updated), path)


def _ses_json_rows(text: TextIO, path: str) -> RowSource:
    """Stream the objects of ``SuppressedDestinationSummaries`` without loading the document
    (a full account export can be millions of entries)."""
    decoder = json.JSONDecoder()
    buffer, pos, line, eof = "", 0, 1, False

    def more() -> None:
        nonlocal buffer, pos, eof
        buffer, pos = buffer[pos:], 0
        chunk = text.read(1 << 16)
        eof = not chunk
        buffer += chunk

    marker = '"SuppressedDestinationSummaries"'
    while (start := buffer.find(marker)) < 0 or buffer.find("[", start) < 0:
        if eof:
            raise ImportFailed(f"{path} is JSON without SuppressedDestinationSummaries; expected the output of "
                               "`aws sesv2 list-suppressed-destinations --output json`")
        more()
    opening = buffer.find("[", buffer.find(marker)) + 1
    line += buffer.count("\n", 0, opening)
    pos = opening
    while True:
        skip = _JSON_SEPARATORS.match(buffer, pos)
        end = skip.end() if skip else pos
        line += buffer.count("\n", pos, end)
        pos = end
        if pos >= len(buffer):
            if eof:
                yield BadRow(path, line, "file ends inside the list (truncated?)")
                return
            more()
            continue
        if buffer[pos] == "]":
            return
        try:
            item, end = decoder.raw_decode(buffer, pos)
        except json.JSONDecodeError as error:
            if eof or len(buffer) - pos > _MAX_JSON_OBJECT:
                yield BadRow(path, line, f"not valid JSON ({error.msg}); the rest of the file is not read")
                return
            more()
            continue
        except (ValueError, RecursionError) as error:
            # More data cannot help: a number past Python's 4300-digit limit, or nesting deeper
            # than the recursion limit. Neither is an SES summary.
            why = "nested too deeply" if isinstance(error, RecursionError) else "a number too long"
            yield BadRow(path, line, f"not valid JSON ({why}); the rest of the file is not read")
            return
        if isinstance(item, dict):
            yield _ses_row(line, item.get("EmailAddress"), item.get("Reason"), item.get("LastUpdateTime"), path)
        else:
            yield BadRow(path, line, "expected an object with EmailAddress and Reason")
        line += buffer.count("\n", pos, end)
        pos = end

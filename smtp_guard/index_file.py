"""The suppression snapshot as a file that several processes map read-only (zero copy).

Layout (all integers in the writing machine's byte order, which the header records)::

    0   8   magic  b"SGINDEX\\n"
    8   4   format version (uint32, little-endian)
    12  4   header length H (uint32, little-endian)
    16  4   CRC-32 of every byte from offset 24 to the end of the file (uint32, little-endian)
    20  4   reserved, 0
    24  H   header: UTF-8 JSON (seq, next_expiry, built_at, list_priority, list_names,
            domains, count, byteorder)
    ..      zero padding up to the next multiple of 8
    D   8n  sorted unique key hashes, int64
    D+8n n  list numbers, uint8

The file is exactly ``D + 9n`` bytes long. ``write_snapshot`` writes it to a temporary file
in the same directory, fsyncs it, renames it over the target and fsyncs the directory, so a
reader opens either the old file or the new one, never half of one. ``map_snapshot`` checks
magic, version, length and CRC (0.1 s for ten million addresses) before it hands out a
snapshot whose arrays are memoryviews over the map: a damaged file is refused with an error
naming it, never looked up in.

A process that maps a file keeps its pages after the file is renamed over or unlinked (Linux:
the inode lives until its last mapping goes), so a reader swaps to a newer file when it likes.
The header's ``seq`` and ``next_expiry`` become plain attributes of the returned snapshot;
``SuppressionIndex.apply`` moves them on without touching the mapped bytes.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import tempfile
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .suppression_model import DomainRule, SuppressionSnapshot

MAGIC = b"SGINDEX\n"
VERSION = 1
_PREFIX = struct.Struct("<8sIIII")  # magic, version, header length, CRC-32, reserved
_ALIGN = 8


class SnapshotFileError(Exception):
    """A snapshot file that must not be used (truncated, damaged, another format)."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        super().__init__(f"suppression snapshot file {os.fspath(path)}: {problem}")
        self.path = Path(path)
        self.problem = problem


@dataclass(frozen=True)
class SnapshotHeader:
    """What a snapshot file says about itself, read without mapping its arrays."""

    seq: int
    next_expiry: float | None
    built_at: float | None
    list_priority: tuple[str, ...]  # the configured priority it was built for
    list_names: tuple[str, ...]
    domains: dict[str, DomainRule]
    count: int
    data_offset: int

    @property
    def size(self) -> int:
        """The exact length of the file this header belongs to."""
        return self.data_offset + 9 * self.count


def write_snapshot(snapshot: SuppressionSnapshot, path: str | os.PathLike[str], *,
                   list_priority: Sequence[str] = (), built_at: float | None = None) -> int:
    """Write ``snapshot`` to ``path`` atomically (temp file, fsync, rename, directory fsync).
    ``list_priority`` and ``built_at`` record what it was built for. Returns the file size."""
    target = Path(path)
    count = len(snapshot.hashes)
    if len(snapshot.lists) != count:
        raise ValueError(f"{count} hashes but {len(snapshot.lists)} list numbers")
    header = json.dumps({
        "seq": snapshot.seq, "next_expiry": snapshot.next_expiry, "built_at": built_at,
        "list_priority": list(list_priority), "list_names": list(snapshot.list_names),
        "domains": [[domain, rule.list_name, rule.include_subdomains] for domain, rule in snapshot.domains.items()],
        "count": count, "byteorder": sys.byteorder,
    }, separators=(",", ":")).encode()
    padding = bytes(-(_PREFIX.size + len(header)) % _ALIGN)
    hashes, lists = _buffer(snapshot.hashes, "q"), _buffer(snapshot.lists, "B")
    crc = 0
    for part in (header, padding, hashes, lists):
        crc = zlib.crc32(part, crc)
    # mkstemp creates the file 0600: the hashes identify addresses (anyone can hash a guess).
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            for part in (_PREFIX.pack(MAGIC, VERSION, len(header), crc, 0), header, padding, hashes, lists):
                file.write(part)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)
    return _PREFIX.size + len(header) + len(padding) + 9 * count


def read_header(path: str | os.PathLike[str]) -> SnapshotHeader:
    """The header of a snapshot file, with its length checked (not its CRC: ``map_snapshot``
    checks that). Raises ``SnapshotFileError``; a missing file raises ``FileNotFoundError``."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        prefix = file.read(_PREFIX.size)
        length = _check_prefix(path, prefix, size)
        return _parse_header(path, file.read(length), size)


def map_snapshot(path: str | os.PathLike[str]) -> SuppressionSnapshot:
    """Map a snapshot file read-only and return a snapshot over the map: ``hashes`` is a
    memoryview of int64 ('q'), ``lists`` of uint8 ('B'), both without copying. The map stays
    as long as the snapshot does. Raises ``SnapshotFileError`` for a file that must not be
    used; a missing file raises ``FileNotFoundError``."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size < _PREFIX.size:
            raise SnapshotFileError(path, f"{size} bytes, shorter than the {_PREFIX.size}-byte prefix (truncated)")
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        length = _check_prefix(path, mapped[:_PREFIX.size], size)
        header = _parse_header(path, mapped[_PREFIX.size:_PREFIX.size + length], size)
        _, _, _, crc, _ = _PREFIX.unpack_from(mapped)
        if zlib.crc32(memoryview(mapped)[_PREFIX.size:]) != crc:
            raise SnapshotFileError(path, "CRC-32 mismatch: the file is damaged")
    except BaseException:
        mapped.close()
        raise
    view = memoryview(mapped)
    end = header.data_offset + 8 * header.count
    return SuppressionSnapshot(view[header.data_offset:end].cast("q"), view[end:header.size],
                               header.list_names, header.domains, seq=header.seq, next_expiry=header.next_expiry)


def _check_prefix(path: str | os.PathLike[str], prefix: bytes, size: int) -> int:
    """The header length, once the prefix is a snapshot prefix of a version this code reads."""
    if len(prefix) < _PREFIX.size:
        raise SnapshotFileError(path, f"{size} bytes, shorter than the {_PREFIX.size}-byte prefix (truncated)")
    magic, version, length, _, _ = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise SnapshotFileError(path, f"not a snapshot file (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise SnapshotFileError(path, f"format version {version}; this smtp-guard reads version {VERSION}")
    if _PREFIX.size + length > size:
        raise SnapshotFileError(path, f"{size} bytes, shorter than its {length}-byte header (truncated)")
    return int(length)


def _parse_header(path: str | os.PathLike[str], raw: bytes, size: int) -> SnapshotHeader:
    try:
        fields: dict[str, Any] = json.loads(raw)
        if fields["byteorder"] != sys.byteorder:
            raise SnapshotFileError(path, f"written on a {fields['byteorder']}-endian machine, this one is "
                                          f"{sys.byteorder}-endian")
        count = int(fields["count"])
        header = SnapshotHeader(
            seq=int(fields["seq"]),
            next_expiry=None if fields["next_expiry"] is None else float(fields["next_expiry"]),
            built_at=None if fields["built_at"] is None else float(fields["built_at"]),
            list_priority=tuple(str(name) for name in fields["list_priority"]),
            list_names=tuple(str(name) for name in fields["list_names"]),
            domains={str(domain): DomainRule(str(list_name), bool(subdomains))
                     for domain, list_name, subdomains in fields["domains"]},
            count=count,
            data_offset=_PREFIX.size + len(raw) + (-(_PREFIX.size + len(raw)) % _ALIGN),
        )
    except SnapshotFileError:
        raise
    except (ValueError, KeyError, TypeError) as error:  # json.JSONDecodeError and UnicodeError are ValueErrors
        raise SnapshotFileError(path, f"unreadable header ({error.__class__.__name__}: {error})") from None
    if count < 0 or header.size != size:
        raise SnapshotFileError(path, f"{size} bytes, but its header describes {count:,} addresses in "
                                      f"{header.size} bytes (truncated or damaged)")
    if len(header.list_names) > 256:
        raise SnapshotFileError(path, f"{len(header.list_names)} list names; list numbers are one byte")
    return header


def _buffer(values: Sequence[int], typecode: str) -> memoryview:
    """The values as raw bytes in machine order: the buffer itself for an array or memoryview
    of the right type, else a copy (a list, in tests)."""
    if isinstance(values, memoryview) and values.format == typecode and values.c_contiguous:
        return values.cast("B")
    if isinstance(values, array) and values.typecode == typecode:
        return memoryview(values).cast("B")
    return memoryview(array(typecode, values)).cast("B")


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable: fsync the directory entry, not only the file."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

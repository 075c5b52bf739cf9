"""Files that the processes of one guard map read-only and share: one framing for every kind.

Layout (the arrays in the writing machine's byte order, which the header records)::

    0   8   magic (one per kind of file)
    8   4   format version (uint32, little-endian)
    12  4   header length H (uint32, little-endian)
    16  4   CRC-32 of every byte from offset 24 to the end of the file (uint32, little-endian)
    20  4   reserved, 0
    24  H   header: UTF-8 JSON, an object with at least "byteorder"
    ..      zero padding up to the next multiple of 8
    D       the kind's arrays, back to back (the kind's header says how long each is)

``write_file`` writes to a temporary file in the same directory, fsyncs it, renames it over
the target and fsyncs the directory, so a reader opens either the old file or the new one,
never half of one. ``map_file`` checks magic, version and CRC before it hands out the map; the
kind checks that the header describes exactly the file's length. A damaged file is refused
with an error naming it (``MappedFileError``), never looked up in.

A process that maps a file keeps its pages after the file is renamed over or unlinked (Linux:
the inode lives until its last mapping goes), so a reader swaps to a newer file when it likes.
Used by ``index_file.py`` (the suppression snapshot) and ``erasure/tombstone_file.py``.
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
from typing import Any, Callable, Sequence, TypeVar

_PREFIX = struct.Struct("<8sIIII")  # magic, version, header length, CRC-32, reserved
_ALIGN = 8
_Header = TypeVar("_Header")


class MappedFileError(Exception):
    """A shared file that must not be used (truncated, damaged, another format)."""

    def __init__(self, path: str | os.PathLike[str], problem: str, what: str) -> None:
        super().__init__(f"{what} file {os.fspath(path)}: {problem}")
        self.path = Path(path)
        self.problem = problem


@dataclass(frozen=True)
class FileKind:
    """One kind of shared file: its name in errors, magic, version and error class."""

    name: str  # "suppression snapshot": errors read "suppression snapshot file PATH: ..."
    magic: bytes
    version: int
    error: type[MappedFileError] = MappedFileError

    def refuse(self, path: str | os.PathLike[str], problem: str) -> MappedFileError:
        return self.error(path, problem, self.name)


@dataclass(frozen=True)
class Framed:
    """A file's header fields, where its arrays start, and its length."""

    fields: dict[str, Any]
    data_offset: int
    size: int


def write_file(kind: FileKind, path: str | os.PathLike[str], fields: dict[str, Any],
               arrays: Sequence[memoryview | bytes]) -> int:
    """Write a file of ``kind`` atomically (temp file, fsync, rename, directory fsync):
    ``fields`` (with "byteorder" added) as its header, then ``arrays``. Returns its size."""
    target = Path(path)
    header = json.dumps({**fields, "byteorder": sys.byteorder}, separators=(",", ":")).encode()
    padding = bytes(-(_PREFIX.size + len(header)) % _ALIGN)
    crc = 0
    for part in (header, padding, *arrays):
        crc = zlib.crc32(part, crc)
    # mkstemp creates the file 0600: what these files hold identifies people (anyone can hash a
    # guess of an address).
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            for part in (_PREFIX.pack(kind.magic, kind.version, len(header), crc, 0), header, padding, *arrays):
                file.write(part)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)
    return _PREFIX.size + len(header) + len(padding) + sum(len(memoryview(part).cast("B")) for part in arrays)


def read_file_header(kind: FileKind, path: str | os.PathLike[str], describe: Callable[[Framed], _Header]) -> _Header:
    """A file's header as ``describe`` reads it (raising the kind's error when the header does
    not describe the file's exact length), without mapping the file or checking its CRC
    (``map_file`` does). A missing file raises ``FileNotFoundError``."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        length = _check_prefix(kind, path, file.read(_PREFIX.size), size)
        return describe(_framed(kind, path, file.read(length), size))


def map_file(kind: FileKind, path: str | os.PathLike[str],
             describe: Callable[[Framed], _Header]) -> tuple[_Header, memoryview]:
    """Map a file of ``kind`` read-only: its header as ``describe`` reads it, and a view of the
    whole map (it stays mapped as long as a view of it lives). Raises the kind's error for a
    file that must not be used; a missing file raises ``FileNotFoundError``."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size < _PREFIX.size:
            raise kind.refuse(path, f"{size} bytes, shorter than the {_PREFIX.size}-byte prefix (truncated)")
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        length = _check_prefix(kind, path, mapped[:_PREFIX.size], size)
        header = describe(_framed(kind, path, mapped[_PREFIX.size:_PREFIX.size + length], size))
        _, _, _, crc, _ = _PREFIX.unpack_from(mapped)
        if zlib.crc32(memoryview(mapped)[_PREFIX.size:]) != crc:
            raise kind.refuse(path, "CRC-32 mismatch: the file is damaged")
    except BaseException:
        mapped.close()
        raise
    return header, memoryview(mapped)


def as_bytes(values: Sequence[int] | Sequence[float], typecode: str) -> memoryview:
    """The values as raw bytes in machine order: the buffer itself for an array or memoryview
    of the right type, else a copy (a list, in tests)."""
    if isinstance(values, memoryview) and values.format == typecode and values.c_contiguous:
        return values.cast("B")
    if isinstance(values, array) and values.typecode == typecode:
        return memoryview(values).cast("B")
    return memoryview(array(typecode, values)).cast("B")


def _check_prefix(kind: FileKind, path: str | os.PathLike[str], prefix: bytes, size: int) -> int:
    """The header length, once the prefix is one of ``kind`` in a version this code reads."""
    if len(prefix) < _PREFIX.size:
        raise kind.refuse(path, f"{size} bytes, shorter than the {_PREFIX.size}-byte prefix (truncated)")
    magic, version, length, _, _ = _PREFIX.unpack(prefix)
    if magic != kind.magic:
        raise kind.refuse(path, f"not a {kind.name} file (magic {magic!r}, expected {kind.magic!r})")
    if version != kind.version:
        raise kind.refuse(path, f"format version {version}; this smtp-guard reads version {kind.version}")
    if _PREFIX.size + length > size:
        raise kind.refuse(path, f"{size} bytes, shorter than its {length}-byte header (truncated)")
    return int(length)


def _framed(kind: FileKind, path: str | os.PathLike[str], raw: bytes, size: int) -> Framed:
    try:
        fields = json.loads(raw)
        if not isinstance(fields, dict):
            raise TypeError(f"a JSON {type(fields).__name__}, not an object")
        byteorder = fields["byteorder"]
    except (ValueError, KeyError, TypeError) as error:  # json.JSONDecodeError and UnicodeError are ValueErrors
        raise kind.refuse(path, f"unreadable header ({error.__class__.__name__}: {error})") from None
    if byteorder != sys.byteorder:
        raise kind.refuse(path, f"written on a {byteorder}-endian machine, this one is {sys.byteorder}-endian")
    return Framed(fields, _PREFIX.size + len(raw) + (-(_PREFIX.size + len(raw)) % _ALIGN), size)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable: fsync the directory entry, not only the file."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

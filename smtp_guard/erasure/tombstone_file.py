"""Every tombstone as one file that the processes of a multi-worker guard map and share.

With ``[smtp] workers = N`` every process enforces erasures (the workers at RCPT, the
supervisor when it releases held mail) and pseudonymizes audit records, so each would hold
every tombstone as Python objects: ~350 bytes apiece (tracemalloc, a 16-character
reference), 35 MB per process at 100,000 erasures. Instead the supervisor writes them at
start into a file in its run directory (``RunPaths.tombstones``) and every process maps it:
its pages sit once in shared memory. Each process keeps in memory only the tombstones made
after the file (``TombstoneIndex``'s own, from the store's ``tombstones_since(last_id)``):
the erasures of one run, not of years.

The framing is ``mapped_file.py``'s (magic ``b"SGTOMBS\\n"``); the header holds count,
last_id, built_at, key_ids (the distinct key ids, in order) and references_size. Then, one
entry per tombstone, sorted by digest::

    8n   digest prefixes: the digest's first 8 bytes as a big-endian uint64 (for bisect)
    8n   tombstone ids, int64
    8n   created_at, float64
    8n   end offset of each reference in the references (uint64; each starts where the last ended)
    32n  digests (HMAC-SHA256)
    n    key numbers, uint8 (an index into key_ids)
    R    references, UTF-8, back to back

A lookup bisects the prefixes (in C, over the map) and compares the full digest; only a match
becomes a ``Tombstone`` object.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import Sequence

from ..mapped_file import FileKind, Framed, MappedFileError, as_bytes, map_file, write_file
from .model import Tombstone

DIGEST_SIZE = 32  # HMAC-SHA256
_FIXED = 8 + 8 + 8 + 8 + DIGEST_SIZE + 1  # bytes per entry before the references


class TombstoneFileError(MappedFileError):
    """A shared tombstone file that must not be used (truncated, damaged, another format)."""


TOMBSTONE_FILE = FileKind("shared tombstone", b"SGTOMBS\n", 1, TombstoneFileError)


@dataclass(frozen=True)
class _Header:
    count: int
    last_id: int
    key_ids: tuple[str, ...]
    references_size: int
    data_offset: int


def write_tombstones(tombstones: Sequence[Tombstone], path: str | os.PathLike[str]) -> int:
    """Write every tombstone to ``path`` atomically; returns the file size."""
    ordered = sorted(tombstones, key=lambda t: t.digest)
    for tombstone in ordered:
        if len(tombstone.digest) != DIGEST_SIZE:
            raise ValueError(f"tombstone {tombstone.id}: a {len(tombstone.digest)}-byte digest, not {DIGEST_SIZE}")
    key_ids = sorted({t.key_id for t in ordered})
    if len(key_ids) > 256:
        raise ValueError(f"{len(key_ids)} erasure keys; key numbers in the file are one byte")
    key_numbers = {key_id: number for number, key_id in enumerate(key_ids)}
    references = [t.reference.encode() for t in ordered]
    ends, end = [], 0
    for reference in references:
        end += len(reference)
        ends.append(end)
    blob = b"".join(references)
    fields = {"count": len(ordered), "last_id": max((t.id for t in ordered), default=0), "built_at": time.time(),
              "key_ids": key_ids, "references_size": len(blob)}
    return write_file(TOMBSTONE_FILE, path, fields, [
        as_bytes([int.from_bytes(t.digest[:8], "big") for t in ordered], "Q"),
        as_bytes([t.id for t in ordered], "q"),
        as_bytes([t.created_at for t in ordered], "d"),
        as_bytes(ends, "Q"),
        b"".join(t.digest for t in ordered),
        bytes(key_numbers[t.key_id] for t in ordered),
        blob,
    ])


class MappedTombstones:
    """The tombstones of a shared file, looked up by digest over the map (``map_tombstones``)."""

    def __init__(self, header: _Header, view: memoryview) -> None:
        self.last_id = header.last_id
        self.key_ids = header.key_ids
        self._count = n = header.count
        at = header.data_offset
        self._prefixes = view[at:at + 8 * n].cast("Q")
        self._ids = view[at + 8 * n:at + 16 * n].cast("q")
        self._created = view[at + 16 * n:at + 24 * n].cast("d")
        self._ends = view[at + 24 * n:at + 32 * n].cast("Q")
        at += 32 * n
        self._digests = view[at:at + DIGEST_SIZE * n]
        at += DIGEST_SIZE * n
        self._keys = view[at:at + n]
        self._references = view[at + n:at + n + header.references_size]

    def __len__(self) -> int:
        return self._count

    def get(self, digest: bytes) -> Tombstone | None:
        prefix = int.from_bytes(digest[:8], "big")
        at = bisect_left(self._prefixes, prefix)
        while at < self._count and self._prefixes[at] == prefix:
            if self._digests[DIGEST_SIZE * at:DIGEST_SIZE * (at + 1)] == digest:
                return self._tombstone(at)
            at += 1
        return None

    def _tombstone(self, at: int) -> Tombstone:
        start = self._ends[at - 1] if at else 0
        return Tombstone(id=self._ids[at], digest=bytes(self._digests[DIGEST_SIZE * at:DIGEST_SIZE * (at + 1)]),
                         key_id=self.key_ids[self._keys[at]],
                         reference=bytes(self._references[start:self._ends[at]]).decode(),
                         created_at=self._created[at])


def map_tombstones(path: str | os.PathLike[str]) -> MappedTombstones:
    """Map a shared tombstone file read-only. Raises ``TombstoneFileError`` for a file that must
    not be used; a missing file raises ``FileNotFoundError``."""
    header, view = map_file(TOMBSTONE_FILE, path, lambda framed: _header(path, framed))
    return MappedTombstones(header, view)


def _header(path: str | os.PathLike[str], framed: Framed) -> _Header:
    fields = framed.fields
    try:
        header = _Header(count=int(fields["count"]), last_id=int(fields["last_id"]),
                         key_ids=tuple(str(key_id) for key_id in fields["key_ids"]),
                         references_size=int(fields["references_size"]), data_offset=framed.data_offset)
    except (ValueError, KeyError, TypeError) as error:
        raise TOMBSTONE_FILE.refuse(path, f"unreadable header ({error.__class__.__name__}: {error})") from None
    size = header.data_offset + _FIXED * header.count + header.references_size
    if header.count < 0 or header.references_size < 0 or size != framed.size:
        raise TOMBSTONE_FILE.refuse(path, f"{framed.size} bytes, but its header describes {header.count:,} "
                                          f"tombstones in {size} bytes (truncated or damaged)")
    return header

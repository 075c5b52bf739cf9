"""The suppression snapshot as a file that several processes map read-only (zero copy).

The framing (magic ``b"SGINDEX\\n"``, version, JSON header, CRC-32, atomic writes) is
``mapped_file.py``'s. The header holds seq, next_expiry, built_at, list_priority, list_names,
domains, count, prefix_bytes and list_bits; after it comes the ``AddressTable`` as its
``parts()`` (offsets, records, packed list numbers), so the file is exactly
``D + AddressTable.size(...)`` bytes long (D: where the table starts). ``map_snapshot`` checks
magic, version, length and CRC (0.1 s for ten million addresses) before it hands out a
snapshot whose table reads the map: a damaged file is refused with an error naming it, never
looked up in. Version 1 held the plain arrays (9 bytes per address); a version 1 file is
refused like any other foreign file, and the supervisor builds a new one at every start.

The header's ``seq`` and ``next_expiry`` become plain attributes of the returned snapshot;
``SuppressionIndex.apply`` moves them on without touching the mapped bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from .address_table import LIST_BITS, AddressTable
from .mapped_file import FileKind, Framed, MappedFileError, map_file, read_file_header, write_file
from .suppression_model import DomainRule, SuppressionSnapshot

MAGIC = b"SGINDEX\n"
VERSION = 2


class SnapshotFileError(MappedFileError):
    """A snapshot file that must not be used (truncated, damaged, another format)."""


SNAPSHOT_FILE = FileKind("suppression snapshot", MAGIC, VERSION, SnapshotFileError)


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
    prefix_bytes: int
    list_bits: int
    data_offset: int

    @property
    def size(self) -> int:
        """The exact length of the file this header belongs to."""
        return self.data_offset + AddressTable.size(self.count, self.prefix_bytes, self.list_bits)


def write_snapshot(snapshot: SuppressionSnapshot, path: str | os.PathLike[str], *,
                   list_priority: Sequence[str] = (), built_at: float | None = None) -> int:
    """Write ``snapshot`` to ``path`` atomically (temp file, fsync, rename, directory fsync).
    ``list_priority`` and ``built_at`` record what it was built for. Returns the file size."""
    table = snapshot.addresses
    fields = {
        "seq": snapshot.seq, "next_expiry": snapshot.next_expiry, "built_at": built_at,
        "list_priority": list(list_priority), "list_names": list(snapshot.list_names),
        "domains": [[domain, rule.list_name, rule.include_subdomains] for domain, rule in snapshot.domains.items()],
        "count": len(table), "prefix_bytes": table.prefix_bytes, "list_bits": table.list_bits,
    }
    return write_file(SNAPSHOT_FILE, path, fields, table.parts())


def read_header(path: str | os.PathLike[str]) -> SnapshotHeader:
    """The header of a snapshot file, with its length checked (not its CRC: ``map_snapshot``
    checks that). Raises ``SnapshotFileError``; a missing file raises ``FileNotFoundError``."""
    return read_file_header(SNAPSHOT_FILE, path, lambda framed: _header(path, framed))


def map_snapshot(path: str | os.PathLike[str]) -> SuppressionSnapshot:
    """Map a snapshot file read-only and return a snapshot whose address table reads the map,
    without copying. The map stays as long as the snapshot does. Raises ``SnapshotFileError``
    for a file that must not be used; a missing file raises ``FileNotFoundError``."""
    header, view = map_file(SNAPSHOT_FILE, path, lambda framed: _header(path, framed))
    addresses = AddressTable.over(view.obj, header.data_offset, header.count, header.prefix_bytes,  # type: ignore[arg-type]
                                  header.list_bits)
    return SuppressionSnapshot(addresses, header.list_names, header.domains, seq=header.seq,
                               next_expiry=header.next_expiry)


def _header(path: str | os.PathLike[str], framed: Framed) -> SnapshotHeader:
    fields = framed.fields
    try:
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
            prefix_bytes=int(fields["prefix_bytes"]),
            list_bits=int(fields["list_bits"]),
            data_offset=framed.data_offset,
        )
    except (ValueError, KeyError, TypeError) as error:
        raise SNAPSHOT_FILE.refuse(path, f"unreadable header ({error.__class__.__name__}: {error})") from None
    if header.prefix_bytes not in (1, 2) or header.list_bits not in LIST_BITS:
        raise SNAPSHOT_FILE.refuse(path, f"prefix_bytes {header.prefix_bytes}, list_bits {header.list_bits} "
                                         f"(1 or 2; one of {LIST_BITS})")
    if count < 0 or header.size != framed.size:
        raise SNAPSHOT_FILE.refuse(path, f"{framed.size} bytes, but its header describes {count:,} addresses in "
                                         f"{header.size} bytes (truncated or damaged)")
    if len(header.list_names) > 256:
        raise SNAPSHOT_FILE.refuse(path, f"{len(header.list_names)} list names; list numbers are one byte")
    return header

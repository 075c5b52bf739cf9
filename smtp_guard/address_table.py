"""The suppression snapshot's addresses, compact: 6 bytes per address instead of 9.

Each address is a 64-bit key hash and the number of the list it is on. Sorted, neighbouring
hashes share their leading bits, so the table keeps a hash's first ``prefix_bytes`` bytes only
once: as the position of the first hash that starts with them (``offsets``, one entry per
possible prefix). Per address it keeps the rest of the hash (``8 - prefix_bytes`` bytes,
big-endian, in ``records``) and its list number in as few bits as the lists need (``lists``:
none for one list, 2 bits for up to four, 8 for up to 256). Ten million addresses on three
lists: 60 MiB instead of 86. No hash bit is dropped, so a lookup matches exactly what the
sorted hashes matched before.

A lookup takes the range of records its prefix selects (ten million addresses over 65,536
two-byte prefixes: ~150 records) and finds its remaining bytes there with one C-speed
``find``; a match that does not start on a record boundary is passed over.

The table lives in memory (``build``, from the store's sorted arrays) or over a shared file's
map (``over``, ``index_file.py``); either way its parts are plain bytes-like objects.
"""

from __future__ import annotations

import mmap
import sys
from array import array
from bisect import bisect_left
from typing import Iterator, Literal, Union

Searchable = Union[bytes, bytearray, mmap.mmap]  # has ``find(sub, start, end)``

_MASK = (1 << 64) - 1
# From this many addresses on, prefixes are two bytes (65,537 offsets, 256 KiB); below, one
# byte (257 offsets, 1 KiB): a small list would otherwise pay for 65,536 mostly empty ranges.
TWO_BYTE_PREFIX_FROM = 1 << 17
LIST_BITS = (0, 1, 2, 4, 8)  # bits per list number: the fewest that hold the highest one


class AddressTable:
    """Sorted key hashes with their list numbers (see the module's docstring)."""

    def __init__(self, count: int, prefix_bytes: int, offsets: array[int] | memoryview, records: Searchable,
                 records_at: int, lists: bytes | memoryview, list_bits: int) -> None:
        """``records`` from ``records_at`` on (a shared file's map holds the whole file);
        ``lists``: the list numbers, ``list_bits`` each, packed from the low bits of each byte."""
        if prefix_bytes not in (1, 2):
            raise ValueError(f"prefix_bytes must be 1 or 2, not {prefix_bytes}")
        if list_bits not in LIST_BITS:
            raise ValueError(f"list_bits must be one of {LIST_BITS}, not {list_bits}")
        self._count = count
        self.prefix_bytes = prefix_bytes
        self._offsets = offsets
        self._width = 8 - prefix_bytes
        self._shift = 64 - 8 * prefix_bytes
        self._rest = (1 << self._shift) - 1
        self._records = records
        self._at = records_at
        self._lists = lists
        self.list_bits = list_bits
        self._per_byte = 8 // list_bits if list_bits else 0
        self._list_mask = (1 << list_bits) - 1

    # --- the hot path ------------------------------------------------------------------------------

    def list_number(self, key_hash: int) -> int | None:
        """The list number of ``key_hash`` (a signed or unsigned 64-bit value), or None."""
        unsigned = key_hash & _MASK
        prefix = unsigned >> self._shift
        first, end = self._offsets[prefix], self._offsets[prefix + 1]
        if first == end:
            return None
        width, at = self._width, self._at
        needle = (unsigned & self._rest).to_bytes(width, "big")
        stop = at + end * width
        found = self._records.find(needle, at + first * width, stop)
        while found != -1 and (found - at) % width:  # straddles two records: not a match
            found = self._records.find(needle, found + 1, stop)
        if found == -1:
            return None
        return self._list_at((found - at) // width)

    def _list_at(self, position: int) -> int:
        if not self.list_bits:
            return 0
        byte, slot = divmod(position, self._per_byte)
        return self._lists[byte] >> (slot * self.list_bits) & self._list_mask

    # --- building, writing, reading ----------------------------------------------------------------

    @classmethod
    def build(cls, hashes: array[int], lists: array[int]) -> "AddressTable":
        """The table of ``hashes`` (int64, sorted ascending as signed numbers, unique) and their
        list numbers (uint8). Every step is a C-speed pass over the arrays: ~0.5 s for ten
        million addresses."""
        count = len(hashes)
        if len(lists) != count:
            raise ValueError(f"{count} hashes but {len(lists)} list numbers")
        prefix_bytes = 2 if count >= TWO_BYTE_PREFIX_FROM else 1
        # As unsigned numbers the negative hashes (top bit set) come after the others.
        split = bisect_left(hashes, 0)
        unsigned = hashes[split:]
        unsigned.extend(hashes[:split])
        if sys.byteorder == "little":
            unsigned.byteswap()  # big-endian: a hash's bytes in the order its prefix comes first
        # Each record is a hash's bytes after its prefix: copied column by column, in units of
        # two bytes where the prefix allows (half the strided passes of single bytes).
        unit: Literal["H", "B"] = "H" if prefix_bytes % 2 == 0 else "B"
        size = 2 if unit == "H" else 1
        source = memoryview(unsigned).cast("B").cast(unit)
        records = bytearray((8 - prefix_bytes) * count)
        target = memoryview(records).cast(unit)
        columns, skip = (8 - prefix_bytes) // size, prefix_bytes // size
        for column in range(columns):
            target[column::columns] = source[skip + column::8 // size]
        del source, target
        shift = 64 - 8 * prefix_bytes
        offsets = array("I", [0]) * _offset_count(prefix_bytes)
        for prefix in range(1 << (8 * prefix_bytes)):
            lowest = prefix << shift  # the first unsigned hash with this prefix
            if lowest < 1 << 63:
                offsets[prefix] = bisect_left(hashes, lowest, split) - split
            else:
                offsets[prefix] = count - split + bisect_left(hashes, lowest - (1 << 64), 0, split)
        offsets[-1] = count
        in_order = lists[split:]
        in_order.extend(lists[:split])
        numbers = in_order.tobytes()
        # The fewest bits that hold every number: deleting the numbers below 2**bits leaves none.
        list_bits = next(bits for bits in LIST_BITS if not numbers.translate(None, bytes(range(1 << bits))))
        return cls(count, prefix_bytes, offsets, records, 0, _packed(numbers, list_bits), list_bits)

    @classmethod
    def empty(cls) -> "AddressTable":
        return cls.build(array("q"), array("B"))

    @staticmethod
    def size(count: int, prefix_bytes: int, list_bits: int) -> int:
        """Bytes ``parts()`` takes for a table of this shape."""
        return _lists_at(count, prefix_bytes) + _packed_size(count, list_bits)

    def parts(self) -> list[bytes | memoryview]:
        """The table as bytes to write, in the order ``over`` reads them: offsets (uint32,
        native order), records, list numbers."""
        records = memoryview(self._records)[self._at:self._at + self._width * self._count]
        return [memoryview(self._offsets).cast("B"), records, memoryview(self._lists)]

    @classmethod
    def over(cls, mapped: mmap.mmap, at: int, count: int, prefix_bytes: int, list_bits: int) -> "AddressTable":
        """The table written (``parts()``) at ``at`` in a mapped file, without copying: lookups
        read the mapped pages."""
        view = memoryview(mapped)
        records_at = at + 4 * _offset_count(prefix_bytes)
        lists_at = at + _lists_at(count, prefix_bytes)
        return cls(count, prefix_bytes, view[at:records_at].cast("I"), mapped, records_at,
                   view[lists_at:lists_at + _packed_size(count, list_bits)], list_bits)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Every (signed key hash, list number), in unsigned order of the hash (tests, tools)."""
        width, at, rest_bits = self._width, self._at, self._shift
        for prefix in range(len(self._offsets) - 1):
            for position in range(self._offsets[prefix], self._offsets[prefix + 1]):
                start = at + position * width
                unsigned = prefix << rest_bits | int.from_bytes(self._records[start:start + width], "big")
                signed = unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned
                yield signed, self._list_at(position)


def _offset_count(prefix_bytes: int) -> int:
    """One offset per possible prefix, and one past the last."""
    return (1 << (8 * prefix_bytes)) + 1


def _lists_at(count: int, prefix_bytes: int) -> int:
    """Where the list numbers start, after the offsets (uint32) and the records."""
    return 4 * _offset_count(prefix_bytes) + (8 - prefix_bytes) * count


def _packed_size(count: int, list_bits: int) -> int:
    return -(-count * list_bits // 8)


def _packed(numbers: bytes, bits: int) -> bytes:
    """``numbers`` (uint8, each below 2**bits), ``8 // bits`` to a byte from its low bits up.
    C-speed: one strided column per slot, shifted into place by ``translate`` and merged with
    the other columns as one big integer each (an OR of whole integers, not of bytes)."""
    if bits == 0:
        return b""
    if bits == 8:
        return numbers
    per_byte = 8 // bits
    raw = numbers + bytes(-len(numbers) % per_byte)
    merged = 0
    for slot in range(per_byte):
        shift = bytes(((value << (slot * bits)) & 0xFF) for value in range(256))
        merged |= int.from_bytes(raw[slot::per_byte].translate(shift), "little")
    return merged.to_bytes(len(raw) // per_byte, "little")


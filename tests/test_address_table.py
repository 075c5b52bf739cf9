"""AddressTable: the suppression snapshot's compact addresses answer exactly as a dict of the
same hashes would, for one-byte and two-byte prefixes, in memory and over a mapped file."""

from __future__ import annotations

import mmap
from array import array
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtp_guard import address_table
from smtp_guard.address_table import AddressTable

LOWEST, HIGHEST = -(2 ** 63), 2 ** 63 - 1
EDGES = [LOWEST, LOWEST + 1, -(2 ** 48), -1, 0, 1, 2 ** 48 - 1, 2 ** 48, 2 ** 56, HIGHEST - 1, HIGHEST]

signed_hashes = st.one_of(st.integers(LOWEST, HIGHEST), st.sampled_from(EDGES),
                          # many hashes under a few prefixes: long record runs to search
                          st.builds(lambda top, low: (top << 48 | low) - 2 ** 63,
                                    st.integers(0, 3) | st.integers(0xFFFC, 0xFFFF), st.integers(0, 2 ** 48 - 1)))


def table_of(entries: dict[int, int]) -> AddressTable:
    keys = sorted(entries)
    return AddressTable.build(array("q", keys), array("B", [entries[k] for k in keys]))


def straddling(table: AddressTable) -> list[int]:
    """Hashes whose remaining bytes appear in the records across a record boundary (the end of
    one record and the start of the next, under one prefix): found by a plain search, they
    must not match."""
    keys = [key & (2 ** 64 - 1) for key, _ in table]
    width = 8 - table.prefix_bytes
    shift = 64 - 8 * table.prefix_bytes
    probes = []
    for first, second in zip(keys, keys[1:]):
        if first >> shift != second >> shift:
            continue
        tail = (first & (2 ** shift - 1)).to_bytes(width, "big")
        head = (second & (2 ** shift - 1)).to_bytes(width, "big")
        for cut in range(1, width):
            rest = int.from_bytes(tail[cut:] + head[:cut], "big")
            unsigned = (first >> shift) << shift | rest
            probes.append(unsigned - 2 ** 64 if unsigned >= 2 ** 63 else unsigned)
    return probes


@pytest.fixture(params=["one-byte prefixes", "two-byte prefixes"])
def prefixes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "two-byte prefixes":  # normally from 131,072 addresses on
        monkeypatch.setattr(address_table, "TWO_BYTE_PREFIX_FROM", 0)
    return str(request.param)


# The fixture only sets the prefix width for the whole test: nothing to reset between examples.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.sampled_from([0, 1, 3, 15, 255]).flatmap(  # highest list number: 0, 1, 2, 4, 8 bits
           lambda top: st.dictionaries(signed_hashes, st.integers(0, top), max_size=300)),
       others=st.lists(signed_hashes, max_size=50))
def test_a_lookup_answers_as_a_dict_of_the_same_hashes(prefixes: str, entries: dict[int, int],
                                                       others: list[int]) -> None:
    table = table_of(entries)
    assert table.prefix_bytes == (2 if prefixes == "two-byte prefixes" else 1)
    assert table.list_bits == next(bits for bits in (0, 1, 2, 4, 8) if max(entries.values(), default=0) < 2 ** bits)
    assert len(table) == len(entries)
    for key in [*entries, *others, *straddling(table), *(k + 1 for k in entries if k < HIGHEST)]:
        assert table.list_number(key) == entries.get(key)
        assert table.list_number(key & (2 ** 64 - 1)) == entries.get(key)  # unsigned spelling, same hash
    assert sorted(table) == sorted(entries.items())


def test_one_list_keeps_no_list_numbers_and_answers_zero() -> None:
    table = table_of({k: 0 for k in EDGES})
    assert table.list_bits == 0
    assert all(table.list_number(k) == 0 for k in EDGES) and table.list_number(2) is None
    assert AddressTable.size(len(EDGES), 1, 0) == 4 * 257 + 7 * len(EDGES)


@pytest.mark.parametrize("lists", [1, 2, 3, 5, 17])
def test_the_parts_mapped_from_a_file_answer_as_the_table(prefixes: str, tmp_path: Path, lists: int) -> None:
    entries = {k: i % lists for i, k in enumerate(EDGES)}
    table = table_of(entries)
    path = tmp_path / "table"
    header = b"H" * 16  # what a file's header would be: the table starts after it
    path.write_bytes(header + b"".join(bytes(part) for part in table.parts()))
    assert path.stat().st_size == len(header) + AddressTable.size(len(table), table.prefix_bytes, table.list_bits)
    with path.open("rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    over = AddressTable.over(mapped, len(header), len(table), table.prefix_bytes, table.list_bits)
    assert list(over) == list(table)
    assert all(over.list_number(k) == v for k, v in entries.items()) and over.list_number(2) is None


def test_unsorted_or_mismatched_input_is_refused() -> None:
    with pytest.raises(ValueError, match="2 hashes but 1 list numbers"):
        AddressTable.build(array("q", [1, 2]), array("B", [0]))

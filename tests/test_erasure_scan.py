"""The byte-level scan behind ``erase verify`` (smtp_guard/erasure/scan.py): every spelling
that would match an address is found, its neighbours are not, and a match is found exactly
once wherever it falls relative to the 1 MiB read chunks."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from smtp_guard.addresses import AddressNormalizer, parse_mailbox
from smtp_guard.config import AddressConfig
from smtp_guard.erasure import scan
from smtp_guard.erasure.scan import address_pattern, is_sqlite_file, scan_directory, scan_file

CONFIG = AddressConfig()
NORMALIZER = AddressNormalizer(CONFIG)


def pattern_for(address: str, config: AddressConfig = CONFIG):
    return address_pattern(parse_mailbox(address), AddressNormalizer(config), config)


def found(address: str, text: str, config: AddressConfig = CONFIG) -> list[str]:
    return [m.group(0).decode("utf-8") for m in pattern_for(address, config).finditer(text.encode("utf-8"))]


@pytest.mark.parametrize(("address", "spelling"), [
    ("jane@example.com", "jane@example.com"),
    ("jane@example.com", "JANE@EXAMPLE.COM"),
    ("jane@example.com", "Jane+news@Example.com"),
    ("jane@example.com", "jane+a.b-c@example.com"),
    ("Jane+x@Example.com", "jane@example.com"),  # any spelling in, every spelling found
    ("Jane.Doe@gmail.com", "janedoe@gmail.com"),
    ("Jane.Doe@gmail.com", "j.a.n.e.d.o.e@gmail.com"),
    ("Jane.Doe@gmail.com", "JANE.DOE+promo@GMAIL.COM"),
    ("Jane.Doe@gmail.com", "jane.doe@googlemail.com"),
    ("Jane.Doe@gmail.com", "JaneDoe@GoogleMail.com"),
    ("janedoe@googlemail.com", "jane.doe@gmail.com"),
    ("jane@bücher.example", "jane@bücher.example"),
    ("jane@bücher.example", "jane@xn--bcher-kva.example"),
    ("jane@bücher.example", "JANE@XN--BCHER-KVA.EXAMPLE"),
    ("jane@bücher.example", "Jane+x@BÜCHER.example"),
    ("jane@xn--bcher-kva.example", "jane@bücher.example"),
    ("jöhn@example.com", "JÖHN@example.com"),
])
def test_every_spelling_of_the_address_is_found(address, spelling):
    text = f"To: Someone <{spelling}>, other@example.com\r\n"
    assert found(address, text) == [spelling]
    assert found(address, f"{spelling}") == [spelling]  # at the very start and end too
    assert found(address, f"mail {spelling}.") == [spelling]  # end of a sentence


@pytest.mark.parametrize(("address", "neighbour"), [
    ("jane@example.com", "notjane@example.com"),
    ("jane@example.com", "x.jane@example.com"),
    ("jane@example.com", "mary+jane@example.com"),
    ("jane@example.com", "janet@example.com"),
    ("jane@example.com", "jane@example.community"),
    ("jane@example.com", "jane@example.com-shop.test"),
    ("jane@example.com", "jane@example.com.au"),
    ("jane@example.com", "jane@sub.example.com"),
    ("jane@example.com", "jane@example.org"),
    ("Jane.Doe@gmail.com", "janedoe2@gmail.com"),
    ("Jane.Doe@gmail.com", "xjanedoe@gmail.com"),
    ("Jane.Doe@gmail.com", "janedoe@gmail.co"),
    ("jane@bücher.example", "jane@bucher.example"),
])
def test_neighbours_are_not_found(address, neighbour):
    assert found(address, f"To: <{neighbour}>\r\n{neighbour} {neighbour}.") == []


def test_separators_and_aliases_follow_the_config():
    config = AddressConfig(subaddress_separators="+-", dotless_domains=(), domain_aliases={"old.example": "new.example"})
    assert found("jane@new.example", "jane-x@old.example jane+y@NEW.example j.ane@new.example", config) \
        == ["jane-x@old.example", "jane+y@NEW.example"]
    no_tags = AddressConfig(subaddress_separators="")
    assert found("jane@example.com", "jane+x@example.com jane@example.com", no_tags) == ["jane@example.com"]


def write_around(path: Path, position: int, needle: bytes, before: bytes = b"x", size: int = 3 << 20) -> None:
    """A file of ``size`` bytes of filler with ``needle`` at ``position`` (``before`` is the
    filler byte, so a test can choose what precedes and follows it)."""
    data = bytearray(b" " * size)
    data[position - len(before):position] = before
    data[position:position + len(needle)] = needle
    path.write_bytes(bytes(data))


NEEDLE = b"Jane@Example.com"


@pytest.mark.parametrize("position", [
    0,
    scan._CHUNK - len(NEEDLE),  # ends exactly at the first boundary
    scan._CHUNK - 5,  # straddles it
    scan._CHUNK,  # starts exactly at it
    scan._CHUNK - scan._OVERLAP,  # starts where the next window's overlap begins
    scan._CHUNK - scan._OVERLAP - 1,
    2 * scan._CHUNK - 3,  # straddles the second boundary
    (3 << 20) - len(NEEDLE),  # ends at end of file
])
def test_a_match_is_found_once_wherever_it_falls_relative_to_the_chunks(tmp_path, position):
    path = tmp_path / "blob"
    write_around(path, position, NEEDLE, before=b" " if position else b"")
    findings = list(scan_file(path, pattern_for("jane@example.com")))
    assert [(f.offset, f.text) for f in findings] == [(position, NEEDLE.decode())]


@pytest.mark.parametrize("neighbour, offset_in_neighbour", [
    (b"jane@example.community", len(b"jane@example.com")),  # boundary right after ".com"
    (b"jane@example.community", len(b"jane@example.com") - 2),
    (b"notjane@example.com", len(b"not")),  # boundary right before "jane"
])
@pytest.mark.parametrize("boundary", [scan._CHUNK, scan._CHUNK - scan._OVERLAP])
def test_a_neighbour_split_by_a_chunk_boundary_is_not_reported(tmp_path, neighbour, offset_in_neighbour, boundary):
    path = tmp_path / "blob"
    write_around(path, boundary - offset_in_neighbour, neighbour, before=b" ")
    assert list(scan_file(path, pattern_for("jane@example.com"))) == []


def test_scan_directory_reads_every_file_including_wal_and_nested(tmp_path):
    (tmp_path / "sandbox" / "new").mkdir(parents=True)
    (tmp_path / "guard.sqlite3").write_bytes(b"\x00" * 100)
    (tmp_path / "guard.sqlite3-wal").write_bytes(b"\x00\x01jane@example.com\x00")
    (tmp_path / "sandbox" / "new" / "1.eml").write_bytes(b"X-Sandbox-Recipients: JANE+x@example.com\r\n")
    (tmp_path / "link").symlink_to(tmp_path / "guard.sqlite3-wal")
    findings = scan_directory(tmp_path, pattern_for("jane@example.com"))
    assert sorted((f.path.relative_to(tmp_path).as_posix(), f.offset) for f in findings) == [
        ("guard.sqlite3-wal", 2), ("sandbox/new/1.eml", 22)]


def test_sqlite_rows_are_searched_without_boundaries(tmp_path):
    """Column values touch in a SQLite record, so the address is looked for on its own there;
    in other files its neighbours still do not count."""
    database = tmp_path / "guard.sqlite3"
    with contextlib.closing(sqlite3.connect(database)) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("CREATE TABLE suppressions (kind TEXT, value TEXT, list_name TEXT)")
        connection.execute("INSERT INTO suppressions VALUES ('address', 'jane@example.com', 'manual')")
        connection.execute("INSERT INTO suppressions VALUES ('address', 'notjane@example.org', 'manual')")
        connection.commit()
        assert (tmp_path / "guard.sqlite3-wal").stat().st_size > 0
        (tmp_path / "notes.txt").write_text("notjane@example.com\n")
        strict = pattern_for("jane@example.com")
        packed = address_pattern(parse_mailbox("jane@example.com"), NORMALIZER, CONFIG, packed=True)
        assert is_sqlite_file(tmp_path / "guard.sqlite3-wal") and not is_sqlite_file(tmp_path / "notes.txt")
        assert scan_directory(tmp_path, strict) == []  # "addressjane@example.commanual"
        findings = scan_directory(tmp_path, strict, packed)
    assert {(f.path.name, f.text) for f in findings} == {("guard.sqlite3-wal", "jane@example.com")}

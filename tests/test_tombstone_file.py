"""The tombstones a multi-worker guard's processes share as one mapped file
(erasure/tombstone_file.py), and the index that looks up in it and in its own later ones."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtp_guard.erasure.index import TombstoneIndex
from smtp_guard.erasure.keys import ErasureKey, KeyRing, erasure_token
from smtp_guard.erasure.model import Tombstone
from smtp_guard.erasure.tombstone_file import TombstoneFileError, map_tombstones, write_tombstones


def ring(tmp_path: Path, *ids: str) -> KeyRing:
    return KeyRing(tmp_path / "erasure.key", [ErasureKey(key_id, secrets.token_bytes(32), n)
                                              for n, key_id in enumerate(ids or ("k1",))])


def erased(key_ring: KeyRing, address: str, tombstone_id: int, reference: str = "DSR-1",
           key: ErasureKey | None = None) -> Tombstone:
    key = key or key_ring.primary
    return Tombstone(tombstone_id, key.tombstone(erasure_token(address)), key.id, reference, 1_700_000_000.0 + tombstone_id)


@settings(max_examples=40, deadline=None)
@given(digests=st.lists(st.binary(min_size=32, max_size=32), unique=True, max_size=60),
       references=st.lists(st.text(max_size=12), min_size=60, max_size=60),
       shared_prefix=st.booleans())
def test_every_tombstone_comes_back_from_the_file_and_nothing_else(tmp_path_factory, digests, references,
                                                                   shared_prefix) -> None:
    if shared_prefix:  # equal first 8 bytes: the lookup must compare whole digests
        digests = list({b"\x01" * 8 + d[8:]: None for d in digests})
    tombstones = [Tombstone(n + 1, digest, ("k1", "k2")[n % 2], references[n], 1_700_000_000.5 + n)
                  for n, digest in enumerate(digests)]
    path = tmp_path_factory.mktemp("tombstones") / "tombstones"
    write_tombstones(tombstones, path)
    mapped = map_tombstones(path)
    assert len(mapped) == len(tombstones)
    assert mapped.last_id == len(tombstones)
    for tombstone in tombstones:
        assert mapped.get(tombstone.digest) == tombstone
    for digest in digests:
        other = digest[:31] + bytes([digest[31] ^ 1])
        if other not in digests:
            assert mapped.get(other) is None


def test_the_file_is_private_and_an_empty_one_looks_up_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tombstones"
    write_tombstones([], path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    mapped = map_tombstones(path)
    assert len(mapped) == 0 and mapped.last_id == 0 and mapped.get(bytes(32)) is None


@pytest.mark.parametrize("damage, problem", [
    (lambda data: data[:-1], "truncated or damaged"),
    (lambda data: data[:-3] + bytes([data[-3] ^ 1]) + data[-2:], "CRC-32 mismatch"),
    (lambda data: b"SGINDEX\n" + data[8:], "not a shared tombstone file"),
])
def test_a_damaged_file_is_refused_naming_it(tmp_path: Path, damage, problem: str) -> None:
    key_ring = ring(tmp_path)
    path = tmp_path / "tombstones"
    write_tombstones([erased(key_ring, f"p{n}@example.com", n + 1) for n in range(5)], path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(TombstoneFileError, match=f"shared tombstone file {path}: .*{problem}"):
        map_tombstones(path)


def test_a_digest_of_the_wrong_size_is_not_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tombstone 7: a 20-byte digest"):
        write_tombstones([Tombstone(7, bytes(20), "k1", "r", 0.0)], tmp_path / "tombstones")
    assert not (tmp_path / "tombstones").exists()


def test_the_index_finds_shared_and_later_tombstones_under_their_own_key(tmp_path: Path) -> None:
    key_ring = ring(tmp_path, "old", "new")
    old, new = key_ring.keys
    path = tmp_path / "tombstones"
    write_tombstones([erased(key_ring, "jane@example.com", 1, "DSR-1", key=old),
                      erased(key_ring, "joe@example.com", 2, "DSR-2", key=new)], path)
    index = TombstoneIndex(key_ring, [erased(key_ring, "ann@example.com", 3, "DSR-3")], shared=map_tombstones(path))
    assert len(index) == 3 and index.last_id == 3 and index.broken is None
    assert [index.lookup(a).reference for a in ("jane@example.com", "joe@example.com", "ann@example.com")] == [
        "DSR-1", "DSR-2", "DSR-3"]
    assert index.lookup("someone@example.com") is None
    # A digest made with one key never matches a tombstone recorded under another.
    forged = Tombstone(4, old.tombstone(erasure_token("eve@example.com")), "new", "DSR-4", 0.0)
    write_tombstones([forged], path)
    assert TombstoneIndex(key_ring, shared=map_tombstones(path)).lookup("eve@example.com") is None


def test_a_shared_file_needing_a_key_the_ring_lacks_breaks_enforcement(tmp_path: Path) -> None:
    """As a tombstone read from the store would: the erasure policy then fails closed (451)."""
    path = tmp_path / "tombstones"
    write_tombstones([erased(ring(tmp_path, "lost"), "jane@example.com", 1)], path)
    index = TombstoneIndex(ring(tmp_path, "k1"), shared=map_tombstones(path))
    assert index.broken is not None and "'lost'" in index.broken


async def test_a_shared_file_that_cannot_be_written_or_read_stops_the_start_naming_it(
        tmp_path: Path, make_config, monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor cannot write the file (its run directory is full): the start fails with
    the setting and the file named, and no half-written file is left; a worker that finds the
    file damaged refuses to start the same way, never enforcing without the tombstones."""
    import errno

    from smtp_guard.backends import SharedTombstones, open_backends
    from smtp_guard.startup import StartupError

    config = make_config(tmp_path, 1)
    path = tmp_path / "run" / "tombstones"
    path.parent.mkdir()
    setting = f"[smtp] workers 2 (shared tombstones {path})"

    def full_disk(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async with open_backends(config, server=True):  # the store and its erasure key, as a first start makes them
        pass
    with monkeypatch.context() as patched:
        patched.setattr(os, "fsync", full_disk)
        with pytest.raises(StartupError, match=r"\[smtp\] workers 2 \(shared tombstones .*\): .*No space left"):
            async with open_backends(config, server=True, shared_tombstones=SharedTombstones(path, True, setting)):
                pass
    assert list(path.parent.iterdir()) == []
    async with open_backends(config, server=True, shared_tombstones=SharedTombstones(path, True, setting)) as built:
        assert len(built.tombstones) == 0 and path.exists()
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")
    with pytest.raises(StartupError, match=f"shared tombstone file {path}: .*(CRC-32|truncated)"):
        async with open_backends(config, server=True, shared_tombstones=SharedTombstones(path, False, setting)):
            pass

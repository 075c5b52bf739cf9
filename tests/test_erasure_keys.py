"""The erasure key file: a missing, too-open, replaced or stale key file is a loud error —
at start-up, in every admin command, and in a running guard (which then defers all mail) —
never a silent end of enforcement. Rotation keeps old tombstones enforced.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

from smtp_guard import replies
from smtp_guard.app import Guard
from smtp_guard.private_directory import make_private_directory
from smtp_guard.startup import StartupError
from smtp_guard.erasure.keys import ErasureKeyError, create_key_ring

from conftest import wait_until
from erasure_support import SENDER, accepts, cli, cli_config_for, cli_json, mail, refuses, write_cli_config
from smtp_client import send


def same_id_new_secret(path: Path) -> None:
    data = json.loads(path.read_text())
    for key in data["keys"]:
        key["secret"] = base64.b64encode(secrets.token_bytes(32)).decode()
    path.write_text(json.dumps(data))


def freshly_generated(path: Path) -> None:
    path.unlink()
    create_key_ring(path)


def not_json(path: Path) -> None:
    path.write_text("{ this is not a key file")


def too_open(path: Path) -> None:
    path.chmod(0o644)


def group_readable(path: Path) -> None:
    path.chmod(0o640)


def missing(path: Path) -> None:
    path.unlink()


BROKEN_KEY_FILES = [
    pytest.param(missing, "erasure key file not found, but the store has 1 tombstone made with key k", id="missing"),
    pytest.param(too_open, "readable by others; run: chmod 600", id="mode-0644"),
    pytest.param(group_readable, "readable by others; run: chmod 600", id="mode-0640"),
    pytest.param(same_id_new_secret, "is not the key the store remembers under that id (the store has 1 tombstone "
                 "made with it)", id="same-id-new-secret"),
    pytest.param(freshly_generated, "the store has 1 tombstone made with key k", id="freshly-generated"),
    pytest.param(not_json, "not a valid erasure key file", id="not-json"),
]


async def erase_and_stop(start_guard, tmp_path: Path) -> tuple[Guard, Path]:
    """A guard whose store has a tombstone for jane@example.com, stopped; and its CLI config."""
    guard = await start_guard()
    config_file = cli_config_for(tmp_path, guard)
    await cli(config_file, "erase", "jane@example.com", "--ref", "DSR-1")
    await guard.stop()
    return guard, config_file


@pytest.mark.parametrize(("breakage", "message"), BROKEN_KEY_FILES)
async def test_broken_key_file_stops_start_up_and_every_admin_command(start_guard, tmp_path, breakage: Callable[
        [Path], None], message: str):
    guard, config_file = await erase_and_stop(start_guard, tmp_path)
    key_file = guard.config.erasure_key_file
    backup = key_file.read_bytes()
    breakage(key_file)
    state = key_file.read_bytes() if key_file.exists() else None

    restarted = Guard(guard.config)
    try:
        with pytest.raises(StartupError, match=re.escape(f"[erasure] key_file {key_file}: ")) as raised:
            await restarted.start()
        assert message in str(raised.value) and "\n" not in str(raised.value)
        assert not restarted.ready
    finally:
        await restarted.stop()

    for command in (["erase", "verify", "jane@example.com"], ["erase", "jane@example.com", "--ref", "DSR-2"],
                    ["suppress", "list"], ["hold", "list"], ["audit", "list"]):
        result = await cli(config_file, *command, exit_code=1)
        assert "erasure key problem" in result.output, (command, result.output)
        assert str(key_file) in result.output and message in result.output, (command, result.output)
    # Nothing "repaired" the key file behind the operator's back.
    assert (key_file.read_bytes() if key_file.exists() else None) == state

    # Restoring the backup (mode 0600) brings everything back, tombstone enforced.
    key_file.write_bytes(backup)
    key_file.chmod(0o600)
    again = await start_guard()
    assert await refuses(again, "Jane+x@EXAMPLE.com")
    verified = await cli(config_file, "erase", "verify", "jane@example.com")
    assert "ENFORCED" in verified.output


async def test_key_file_is_created_private_on_first_use(start_guard, tmp_path):
    guard = await start_guard()
    key_file = guard.config.erasure_key_file
    assert key_file.exists()
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert not [p for p in key_file.parent.iterdir() if p.name.endswith(".tmp")]


async def test_key_file_lost_while_running_does_not_stop_enforcement(start_guard, tmp_path):
    """The ring is in memory: a key file deleted under a running guard changes nothing until
    a tombstone needs a key the guard does not have."""
    guard = await start_guard()
    config_file = cli_config_for(tmp_path, guard)
    await cli(config_file, "erase", "jane@example.com", "--ref", "DSR-1")
    await wait_until(lambda: refuses(guard, "jane@example.com"), what="the erasure to be enforced")
    guard.config.erasure_key_file.unlink()
    await guard.enforcement.tombstone_reloader.refresh()
    assert await refuses(guard, "JANE@example.com")
    assert await accepts(guard, "someone@example.com")


async def test_rotated_key_new_erasures_use_it_and_old_ones_stay_enforced(start_guard, sink, tmp_path):
    guard = await start_guard()
    config_file = cli_config_for(tmp_path, guard)
    # An audit record for carol under the first key, before any rotation.
    assert (await send(guard.smtp_address, SENDER, ["carol@example.org"], mail(to="carol"))).data.startswith("250")
    await guard.enforcement.audit.flush()

    first, = await cli_json(config_file, "erase", "jane@example.com", "--ref", "DSR-1")
    await wait_until(lambda: refuses(guard, "jane@example.com"), what="the first erasure")
    rotated = await cli(config_file, "erase", "rotate-key")
    new_id = rotated.output.split("New primary erasure key ", 1)[1].split()[0]
    assert new_id != first["key_id"]
    assert json.loads(guard.config.erasure_key_file.read_text())["keys"][-1]["id"] == new_id
    assert guard.config.erasure_key_file.stat().st_mode & 0o777 == 0o600

    second, = await cli_json(config_file, "erase", "bob@example.org", "--ref", "DSR-2")
    assert second["key_id"] == new_id
    # The running guard reloads its key ring for the tombstone made with the new key.
    await wait_until(lambda: refuses(guard, "Bob+x@example.org"), what="the running guard to load the new key")
    assert guard.backends.tombstones.ring.primary.id == new_id
    assert await refuses(guard, "jane@example.com")
    for address in ("jane@example.com", "bob@example.org"):
        verified = await cli(config_file, "erase", "verify", address)
        assert "ENFORCED" in verified.output and "NO COPIES" in verified.output

    # carol's records, pseudonymized with the old key, are found and erased after rotation.
    assert await accepts(guard, "carol@example.org")  # one more record, now under the new key
    await guard.enforcement.audit.flush()
    found = json.loads((await cli(config_file, "audit", "list", "--recipient", "carol@example.org",
                                  "--json")).stdout)
    assert len({r["recipient"] for r in found}) == 2  # one pseudonym per key
    await cli(config_file, "erase", "carol@example.org", "--ref", "DSR-3")
    assert json.loads((await cli(config_file, "audit", "list", "--recipient", "carol@example.org",
                                 "--json")).stdout) == []

    # And a restart with the rotated key file enforces all three.
    await guard.stop()
    restarted = await start_guard()
    for address in ("jane@example.com", "bob@example.org", "carol@example.org"):
        assert await refuses(restarted, address)


@pytest.mark.parametrize("guard_key_file", ["stale", "corrupted"])
async def test_running_guard_defers_all_mail_when_a_tombstone_needs_a_key_it_cannot_load(
        start_guard, sink, tmp_path, guard_key_file):
    """The key was rotated on the admin host and the new key file never reached the guard:
    a tombstone made with the new key cannot be matched there, so the guard defers every
    recipient (451 4.3.5) instead of letting the erased address through — until the key
    file is fixed, which it picks up on its own."""
    guard = await start_guard()
    guard_key = guard.config.erasure_key_file
    admin_key = tmp_path / "admin" / "erasure.key"
    admin_key.parent.mkdir()
    shutil.copy(guard_key, admin_key)
    admin_key.chmod(0o600)
    admin_config = write_cli_config(tmp_path / "admin" / "smtp-guard.toml", guard.config, key_file=admin_key)
    guard_config = cli_config_for(tmp_path, guard)

    await cli(admin_config, "erase", "first@example.com", "--ref", "DSR-1")
    await wait_until(lambda: refuses(guard, "first@example.com"), what="the first erasure (shared key)")
    await cli(admin_config, "erase", "rotate-key")
    new_key, = await cli_json(admin_config, "erase", "jane@example.com", "--ref", "DSR-2")
    if guard_key_file == "corrupted":
        not_json(guard_key)

    await wait_until(lambda: refuses(guard, "jane@example.com", replies.POLICY_FAILED),
                     what="the guard to defer the recipient whose tombstone it cannot match")
    outcome = await send(guard.smtp_address, SENDER, ["jane@example.com", "someone@example.com"], mail(to="x"))
    assert outcome.rcpt == {"jane@example.com": str(replies.POLICY_FAILED),
                            "someone@example.com": str(replies.POLICY_FAILED)}
    assert outcome.data is None and sink.delivered_to() == []
    assert guard.backends.tombstones.broken is not None and str(guard_key) in guard.backends.tombstones.broken

    # An admin command on the guard host says what is wrong.
    result = await cli(guard_config, "erase", "verify", "jane@example.com", exit_code=1)
    assert "erasure key problem" in result.output and str(guard_key) in result.output
    if guard_key_file == "stale":
        assert new_key["key_id"] in result.output

    shutil.copy(admin_key, guard_key)
    guard_key.chmod(0o600)
    await wait_until(lambda: refuses(guard, "jane@example.com"), what="the guard to load the fixed key file")
    assert guard.backends.tombstones.broken is None
    assert await refuses(guard, "first@example.com")
    assert await accepts(guard, "someone@example.com")
    assert (await send(guard.smtp_address, SENDER, ["jane@example.com", "someone@example.com"],
                       mail(to="x"))).rcpt["jane@example.com"] == str(replies.ERASED)
    assert sink.delivered_to() == ["someone@example.com"]


# --- what the key file must hold: what the store depends on, not what it remembers -------------

def elsewhere(tmp_path: Path) -> Path:
    """A key file outside the data directory, in a directory the operator made (0700)."""
    directory = tmp_path / "elsewhere"
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory / "erasure.key"


def key_id_of(path: Path) -> str:
    return str(json.loads(path.read_text())["keys"][-1]["id"])


@pytest.mark.parametrize("default_key_file", ["missing", "another-key"])
async def test_a_key_nothing_was_made_with_is_forgotten_with_a_warning(start_guard, tmp_path, caplog,
                                                                        default_key_file):
    """The reported case: a first start with a mistyped [erasure] key_file, no erasure and no
    mail; the restart with the default key file starts, says which key it forgot, and the new
    key is the one the store now holds to."""
    typo = elsewhere(tmp_path)
    first = await start_guard(erasure={"key_file": str(typo)})
    old_id = key_id_of(typo)
    assert set(await first.backends.erasure.key_checks()) == {old_id}
    await first.stop()

    default = first.config.store.data_dir / "erasure.key"
    if default_key_file == "another-key":
        create_key_ring(default)
    with caplog.at_level(logging.WARNING, logger="smtp_guard.erasure.keys"):
        restarted = await start_guard()
    assert restarted.config.erasure_key_file == default
    new_id = key_id_of(default)
    assert new_id != old_id and restarted.backends.tombstones.ring.primary.id == new_id
    assert set(await restarted.backends.erasure.key_checks()) == {new_id}
    warned, = [r.getMessage() for r in caplog.records if r.name == "smtp_guard.erasure.keys"]
    found = (f"erasure key file not found; the store remembers key {old_id}" if default_key_file == "missing"
             else f"this key file does not hold key {old_id}, which the store remembers")
    assert warned.startswith(f"{default}: {found}, but it made no tombstone and no audit pseudonym; forgetting it")
    assert warned.endswith("; generating a new key (back the new key file up)") == (default_key_file == "missing")

    # The new key is the store's from now on: erasures work, and survive a restart quietly.
    config_file = cli_config_for(tmp_path, restarted)
    erased, = await cli_json(config_file, "erase", "jane@example.com", "--ref", "DSR-1")
    assert erased["key_id"] == new_id
    await wait_until(lambda: refuses(restarted, "jane@example.com"), what="the erasure to be enforced")
    await restarted.stop()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="smtp_guard.erasure.keys"):
        again = await start_guard()
    assert await refuses(again, "jane@example.com")
    assert not [r for r in caplog.records if r.name == "smtp_guard.erasure.keys"]


async def test_missing_key_file_with_tombstones_is_refused_with_their_count(start_guard, tmp_path):
    guard = await start_guard()
    config_file = cli_config_for(tmp_path, guard)
    for address, reference in (("jane@example.com", "DSR-1"), ("bob@example.org", "DSR-2")):
        await cli(config_file, "erase", address, "--ref", reference)
    key_file = guard.config.erasure_key_file
    key_id = key_id_of(key_file)
    await guard.stop()
    key_file.unlink()

    restarted = Guard(guard.config)
    try:
        with pytest.raises(StartupError) as raised:
            await restarted.start()
    finally:
        await restarted.stop()
    assert str(raised.value) == (
        f"[erasure] key_file {key_file}: erasure key file not found, but the store has 2 tombstones made with key "
        f"{key_id}; restore the key file from backup, or set [erasure] key_file to where it is (erasures would no "
        "longer be enforced)")
    assert not key_file.exists()
    result = await cli(config_file, "erase", "verify", "jane@example.com", exit_code=1)
    assert "2 tombstones made with key " + key_id in result.output and not key_file.exists()


async def test_a_key_that_pseudonymized_audit_records_is_kept(start_guard, sink, tmp_path):
    """No tombstone, but mail went through under the first key: its audit records name the
    recipient by that key's pseudonym, so a restart without it is refused (they could no
    longer be found or erased by address), and moving the key file into place fixes it."""
    typo = elsewhere(tmp_path)
    first = await start_guard(erasure={"key_file": str(typo)})
    assert (await send(first.smtp_address, SENDER, ["carol@example.org"], mail(to="carol"))).data.startswith("250")
    await first.enforcement.audit.flush()
    records = await first.backends.erasure.pseudonymized_audit_records()
    assert records >= 1
    old_id = key_id_of(typo)
    await first.stop()

    default = first.config.store.data_dir / "erasure.key"
    with pytest.raises(StartupError) as raised:
        await start_guard()
    assert str(raised.value) == (
        f"[erasure] key_file {default}: erasure key file not found; the store has 0 tombstones, but {records} audit "
        f"record{'' if records == 1 else 's'} with recipients named by pseudonyms made with an erasure key that is "
        f"not available now (the store remembers {old_id}), and without it those records can no longer be found or "
        "erased by address; restore the key file from backup, or set [erasure] key_file to where it is")
    assert not default.exists()

    typo.rename(default)
    again = await start_guard()
    assert again.backends.tombstones.ring.primary.id == old_id
    found = json.loads((await cli(cli_config_for(tmp_path, again), "audit", "list", "--recipient",
                                  "carol@example.org", "--json")).stdout)
    assert found


async def test_admin_commands_never_replace_a_key(start_guard, tmp_path):
    """Only the guard's start forgets a key nothing was made with: an admin command pointed at
    a missing key file refuses and creates nothing (it may be an admin host whose key_file
    differs from the running guard's)."""
    typo = elsewhere(tmp_path)
    guard = await start_guard(erasure={"key_file": str(typo)})
    old_id = key_id_of(typo)
    config_file = cli_config_for(tmp_path, guard)  # the default key path: data/erasure.key
    result = await cli(config_file, "suppress", "list", exit_code=1)
    default = guard.config.store.data_dir / "erasure.key"
    assert (f"{default}: erasure key file not found; the store remembers key {old_id}, but it made no tombstone "
            "and no audit pseudonym; start the guard with this config (smtp-guard serve") in result.output
    assert not default.exists()
    assert set(await guard.backends.erasure.key_checks()) == {old_id}


async def test_mistyped_key_file_directory_is_not_created(start_guard, tmp_path):
    key_file = tmp_path / "nonexistent" / "dir" / "erasure.key"
    with pytest.raises(StartupError) as raised:
        await start_guard(erasure={"key_file": str(key_file)})
    message = str(raised.value)
    assert message.startswith(f"[erasure] key_file {key_file}: the directory {key_file.parent} does not exist; "
                              "correct [erasure] key_file")
    assert not (tmp_path / "nonexistent").exists()


def test_the_data_directory_is_the_one_directory_created_for_the_key_file(tmp_path):
    data = tmp_path / "data"
    ring = create_key_ring(data / "erasure.key", data_dir=data)
    assert ring.path.stat().st_mode & 0o777 == 0o600
    assert data.stat().st_mode & 0o777 == 0o700
    with pytest.raises(ErasureKeyError, match=re.escape(f"the directory {tmp_path / 'other'} does not exist")):
        create_key_ring(tmp_path / "other" / "erasure.key", data_dir=data)
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("directory_exists", [True, False])
def test_guards_creating_the_key_at_once_on_one_directory_end_up_with_one_key(tmp_path: Path,
                                                                              directory_exists: bool) -> None:
    """Two instances started together on a shared directory: the first key file written wins,
    the others load it (an earlier fixed temporary name made the second start fail). Neither
    fails when the data directory is still to be made (the second's mkdir found the first's)."""
    path = tmp_path / "data" / "erasure.key"
    if directory_exists:
        path.parent.mkdir(mode=0o700)
    with ThreadPoolExecutor(8) as pool:
        rings = list(pool.map(lambda _: create_key_ring(path, path.parent), range(16)))
    assert len({ring.primary.id for ring in rings}) == 1
    assert [p.name for p in path.parent.iterdir()] == ["erasure.key"]  # no temporary left behind


def test_a_data_directory_another_guard_made_after_the_check_is_used(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The window between "is it there?" and mkdir, made certain: two instances starting
    together on a new directory, the other one's mkdir first. Neither start may fail on it
    (it did, "[Errno 17] File exists", for an instance beside a PostgreSQL store)."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    real_is_dir = Path.is_dir

    def not_there_when_checked() -> None:
        asked: list[Path] = []

        def is_dir(path: Path) -> bool:
            if path == data and not asked:  # the check; mkdir's own look afterwards is real
                asked.append(path)
                return False
            return real_is_dir(path)
        monkeypatch.setattr(Path, "is_dir", is_dir)

    not_there_when_checked()
    make_private_directory(data)
    not_there_when_checked()
    ring = create_key_ring(data / "erasure.key", data_dir=data)
    monkeypatch.undo()
    assert ring.path.is_file() and data.stat().st_mode & 0o777 == 0o700

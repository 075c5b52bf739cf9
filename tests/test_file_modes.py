"""The guard is one more copy of nobody's address: its data directory is 0700 and every file
holding addresses or the erasure key (store, -wal, -shm, sandbox mail, key file) is 0600,
whatever the umask, on real files. A store found readable by others is tightened at open."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from smtp_guard import replies
from smtp_guard.store.sqlite.db import Database

from conftest import mode, sqlite_only
from smtp_client import message, send

pytestmark = sqlite_only


async def test_data_directory_store_sandbox_and_key_are_private(start_guard, tmp_path, open_umask):
    guard = await start_guard(upstream={"mode": "sandbox"})
    data = tmp_path / "data"
    outcome = await send(guard.smtp_address, "news@shop.test", ["someone@example.com"], message())
    assert outcome.data == str(replies.SANDBOX_CAPTURED)

    assert mode(data) == 0o700
    store = Path(guard.config.store.path)
    files = [store, store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm"),
             guard.config.erasure_key_file]
    sandbox = data / "sandbox"
    files += list((sandbox / "new").iterdir())
    assert len(files) == 5
    assert {str(f): oct(mode(f)) for f in files} == {str(f): oct(0o600) for f in files}
    assert {oct(mode(d)) for d in (sandbox, sandbox / "new", sandbox / "tmp", sandbox / "cur")} == {oct(0o700)}


async def test_a_store_open_to_others_is_tightened_at_open_with_a_warning(tmp_path, caplog):
    data = tmp_path / "data"
    path = data / "guard.sqlite3"
    async with Database(path):
        pass
    os.chmod(data, 0o755)
    os.chmod(path, 0o644)
    wal = path.with_name(path.name + "-wal")
    wal.touch()
    os.chmod(wal, 0o666)
    with caplog.at_level(logging.WARNING, logger="smtp_guard.store.sqlite.db"):
        async with Database(path):
            assert (mode(data), mode(path), mode(wal)) == (0o700, 0o600, 0o600)
    warned = " ".join(record.getMessage() for record in caplog.records)
    assert str(data) in warned and str(path) in warned and str(wal) in warned


async def test_a_shared_directory_is_left_alone_but_the_store_files_are_private(tmp_path, caplog):
    """A store put in a directory other programs use (e.g. /var/lib) must not lock them out:
    the directory is only warned about."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    (shared / "someone-else.conf").write_text("x")
    with caplog.at_level(logging.WARNING, logger="smtp_guard.store.sqlite.db"):
        async with Database(shared / "guard.sqlite3"):
            pass
    assert mode(shared) == 0o755
    assert mode(shared / "guard.sqlite3") == 0o600
    assert any("directory of its own" in record.getMessage() for record in caplog.records)

"""The run directory's claim (smtp_guard/run_directory.py), on its own, in a private parent."""

from __future__ import annotations

import fcntl
import socket
from pathlib import Path

import pytest

from smtp_guard import file_lock
from smtp_guard.config import ListenAddress
from smtp_guard.run_directory import LOCK_NAME, RunDirectory
from smtp_guard.startup import StartupError


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_claim_whose_directory_is_removed_under_it_claims_the_new_one(tmp_path: Path, monkeypatch) -> None:
    """The supervisor before it stops (removes the directory, then unlocks) between this claim's
    open and its lock: a lock on the removed file would keep out nobody."""
    listen = ListenAddress("127.0.0.1", free_port())
    first = RunDirectory(listen, tmp_path)
    first.claim()
    real_flock, released = fcntl.flock, []

    def flock(descriptor: int, operation: int) -> None:
        if not released:
            released.append(True)
            first.release()
        real_flock(descriptor, operation)

    monkeypatch.setattr(file_lock.fcntl, "flock", flock)
    second = RunDirectory(listen, tmp_path)
    paths = second.claim()
    assert released and paths.root.is_dir()
    with open(paths.root / LOCK_NAME) as lock, pytest.raises(BlockingIOError):
        real_flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: by the claim, on the file that is there
    monkeypatch.undo()
    with pytest.raises(StartupError, match="another smtp-guard"):
        RunDirectory(listen, tmp_path).claim()
    second.release()
    assert not paths.root.exists()


def test_a_port_something_else_listens_on_is_refused_and_the_directory_removed(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("0.0.0.0", 0))
        other.listen()
        port = other.getsockname()[1]
        claim = RunDirectory(ListenAddress("127.0.0.1", port), tmp_path)
        with pytest.raises(StartupError, match=f"port {port} is in use on 127.0.0.1 already"):
            claim.claim()
    assert not claim.paths.root.exists()
    again = RunDirectory(ListenAddress("127.0.0.1", port), tmp_path)
    again.claim()  # free again: claimed
    again.release()

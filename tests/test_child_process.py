"""child_process.start: a function of this package (or of any module on this process's search
path) in a fresh interpreter, without multiprocessing."""

from __future__ import annotations

import subprocess

from smtp_guard import child_process


def test_the_child_has_this_search_path_its_arguments_and_its_payload() -> None:
    # pool_targets is importable only through the search path pytest gave this process.
    child = child_process.start("pool_targets:payload_size", ["7"], b"x" * 193)
    assert child.wait(30) == 200


def test_a_child_that_dies_before_reading_a_large_payload_is_only_an_exit_status() -> None:
    child = child_process.start("no_such_module_anywhere:main", [], b"x" * 1_000_000, stderr=subprocess.PIPE)
    _, errors = child.communicate(timeout=30)
    assert child.returncode == 1
    assert b"ModuleNotFoundError: No module named 'no_such_module_anywhere'" in errors

"""The one way the guard makes a directory of its own: 0700 whatever the umask, and no error
when another guard process made it a moment earlier (two instances starting together)."""

from __future__ import annotations

import os
from pathlib import Path

DIRECTORY_MODE = 0o700


def make_private_directory(directory: Path) -> None:
    """Create ``directory`` (and its parents) mode 0700 unless it is there already."""
    if not directory.is_dir():
        directory.mkdir(parents=True, mode=DIRECTORY_MODE, exist_ok=True)
        os.chmod(directory, DIRECTORY_MODE)  # mkdir's mode is filtered by the umask

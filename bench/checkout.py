"""What a benchmark measures and where: the smtp-guard code of this checkout (whatever an
editable install points at), its commit, and the machine's CPU. Importing this module puts
the checkout first on ``sys.path``."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def code_version() -> str:
    """Which smtp-guard is measured: checkout path, commit, and whether smtp_guard/ has local edits."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "smtp_guard"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return f"{REPO} @ {commit or 'unknown commit'}{' + uncommitted changes in smtp_guard/' if dirty else ''}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

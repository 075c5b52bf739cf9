"""The shipped systemd unit and Dockerfile keep the operational promises: admin commands and
the server use one config (so one store), shutdown gets longer than the grace period, and
data files are private."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from smtp_guard.config import Config, parse_duration

ROOT = Path(__file__).resolve().parent.parent


def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ROOT / "config" / "smtp-guard.service")
    return parser


def test_systemd_unit_runs_serve_with_a_checked_config_and_private_files() -> None:
    service = unit()["Service"]
    assert service["ExecStart"].endswith("smtp-guard serve")
    assert service["ExecStartPre"].endswith("smtp-guard config check")
    assert service["Environment"] == "SMTP_GUARD_CONFIG=/etc/smtp-guard/smtp-guard.toml"
    assert service["UMask"] == "0077" and service["StateDirectoryMode"] == "0700"
    assert service["User"] and service["User"] != "root"


def test_systemd_stop_timeout_outlasts_the_shutdown_grace() -> None:
    stop = parse_duration(unit()["Service"]["TimeoutStopSec"], "TimeoutStopSec")
    assert stop is not None and stop > Config().smtp.shutdown_grace + 10


def test_docker_image_names_its_config_for_serve_and_admin_commands() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"SMTP_GUARD_CONFIG=/etc/smtp-guard/smtp-guard.toml", dockerfile)
    assert "COPY config/docker.toml /etc/smtp-guard/smtp-guard.toml" in dockerfile
    assert 'CMD ["serve"]' in dockerfile
    assert "chmod 0700 /var/lib/smtp-guard" in dockerfile


def test_the_reference_haproxy_config_is_valid_and_fits_the_guard() -> None:
    import subprocess

    from haproxy import REFERENCE, haproxy_path

    result = subprocess.run([haproxy_path(), "-c", "-f", str(REFERENCE)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    text = REFERENCE.read_text()
    defaults = Config()
    for side in ("client", "server"):
        timeout = parse_duration(re.search(rf"timeout {side} (\S+)", text).group(1), side)  # type: ignore[union-attr]
        assert timeout is not None and timeout > max(defaults.smtp.idle_timeout, defaults.upstream.command_timeout)
    assert "send-proxy-v2" in text and "option httpchk GET /readyz" in text
    assert f"maxconn {defaults.smtp.max_sessions} " in text
    assert f"check port {defaults.metrics.listen.port if defaults.metrics.listen else 0} " in text

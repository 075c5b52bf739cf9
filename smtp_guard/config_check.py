"""``smtp-guard config check``: the settings that are valid but dangerous, in words.

Loading already refuses what can never be right (unknown keys, an upstream host beside the
sandbox, an allow-list open to the world without its override). What is left here is legal
and sometimes meant — a lab upstream without certificate checks, shadow mode during a
rollout — so it is said plainly, once, before the guard runs with it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import Config
from .smtp.access import AccessControl


@dataclass(frozen=True)
class Danger:
    setting: str
    text: str

    def __str__(self) -> str:
        return f"{self.setting}: {self.text}"


def _is_loopback(host: str) -> bool:
    """A configured host (a name or an address) that only this machine can reach."""
    return host == "localhost" or AccessControl.is_loopback(host)


def dangers(config: Config) -> list[Danger]:
    """Every dangerous setting of ``config``, most serious first."""
    found: list[Danger] = []

    def warn(setting: str, text: str) -> None:
        found.append(Danger(setting, text))

    if config.access.allow_open_relay and config.access.open_networks():
        warn("[access] allow_open_relay", "the relay is open to "
             f"{', '.join(map(str, config.access.open_networks()))}: anyone there can send mail through it")
    if config.logging.plaintext_addresses:
        warn("[logging] plaintext_addresses", "logs carry addresses in plaintext, so an erased address survives "
             "wherever the logs go: this breaks the erasure guarantee")
    if config.policy.shadow:
        warn("[policy] shadow", "every protection only logs what it would have done; suppressed recipients "
             "ARE mailed (erasures are still enforced)")
    for name, listing in config.lists.items():
        if listing.shadow and not config.policy.shadow:
            warn(f"[lists.{name}] shadow", f"entries of {name!r} are logged, not enforced: they ARE mailed")
    if config.breaker.shadow or not config.breaker.enabled:
        state = "disabled" if not config.breaker.enabled else "in shadow mode"
        warn("[breaker]", f"the volume breaker is {state}: a send far larger than usual is not stopped")
    if config.counters.url and config.counters.on_error == "allow":
        warn("[counters] on_error", "\"allow\": while Redis cannot be reached, mail passes every rate limit, "
             "volume breaker, approval gate and fan-out detector uncounted (logged and audited as "
             "counters.unavailable; streams already tripped stay held)")
    if config.upstream.mode == "sandbox":
        warn("[upstream] mode", "\"sandbox\": mail is captured in the data directory and never delivered")
    else:
        up = config.upstream
        if up.tls in ("none", "opportunistic") and not _is_loopback(up.host):
            warn("[upstream] tls", f"{up.tls!r}: mail to {up.host} may cross the network unencrypted; "
                 "use \"starttls\" or \"implicit\"")
        if up.tls in ("starttls", "implicit") and not up.tls_verify:
            warn("[upstream] tls_verify", "false: the upstream's certificate is not checked, so anyone on "
                 "the path can pose as it")
    listen = config.smtp.listen
    if not _is_loopback(listen.host) and not config.smtp.tls.enabled:
        warn("[smtp] listen", f"{listen} is reachable from the network without STARTTLS ([smtp.tls] cert "
             "and key): mail and AUTH passwords travel in plaintext")
    if config.smtp.auth.users and not config.smtp.tls.enabled:
        warn("[smtp.auth] users", "AUTH needs TLS, and [smtp.tls] has no certificate: AUTH is offered only "
             "to loopback clients with allow_plaintext_on_loopback, to nobody else")
    if config.smtp.bare_line_endings == "normalize":
        warn("[smtp] bare_line_endings", "\"normalize\": a message with bare CR or LF is rewritten instead of "
             "refused (use only for a platform that cannot be fixed)")
    if not config.smtp.received_header:
        warn("[smtp] received_header", "false: relayed mail carries no trace of this hop (RFC 5321 "
             "section 4.4 asks a relay for one)")
    for name, where in (("[metrics] listen", config.metrics.listen), ("[admin] listen", config.admin.listen)):
        if where is not None and not _is_loopback(where.host):
            warn(name, f"{where} is reachable from the network; restrict it with a firewall")
    _warn_files(config, warn)
    return found


def _warn_files(config: Config, warn: Callable[[str, str], None]) -> None:
    """The data directory and everything in it, and the key file: the guard's user only. (A
    PostgreSQL store's files are the database server's: only its local directory is checked.)"""
    data_dir = config.store.data_dir
    directory_setting = "[store] directory" if config.store.is_postgresql else "[store] path"
    if not config.store.is_postgresql and not Path(config.store.path).exists():
        warn("[store] path", f"{config.store.path} does not exist yet; `smtp-guard serve` or `smtp-guard init` "
             "creates it (admin commands never do)")
    too_open = [path for path in (data_dir, *_walk(data_dir), config.erasure_key_file) if _is_too_open(path)]
    for path in too_open[:MAX_LISTED]:
        setting = "[erasure] key_file" if path == config.erasure_key_file else directory_setting
        wanted = "0700" if path.is_dir() else "0600"
        warn(setting, f"{path} has mode {stat.S_IMODE(path.stat().st_mode):04o}; it holds addresses or secrets: "
             f"chmod {wanted} {path}")
    if len(too_open) > MAX_LISTED:
        warn(directory_setting, f"{len(too_open) - MAX_LISTED} more files under {data_dir} can be read by others: "
             f"chmod -R go-rwx {data_dir}")


MAX_LISTED = 5  # files named one by one; a sandbox may hold thousands
MAX_WALKED = 100_000


def _walk(directory: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(directory):
        found += [Path(root) / name for name in (*dirs, *files)]
        if len(found) >= MAX_WALKED:
            break
    return found


def _is_too_open(path: Path) -> bool:
    try:
        return bool(stat.S_IMODE(os.lstat(path).st_mode) & 0o077) and not path.is_symlink()
    except OSError:
        return False

"""The erasure key ring: secrets that turn an address into a tombstone without keeping it.

A tombstone is ``HMAC-SHA256(secret, token)`` where the *erasure token* is
``SHA-256(normalized address)`` in hex. The token lets a privacy team's system send erasures
without ever sending the address (``smtp-guard erase token`` prints it); only the guard can
turn a token into a tombstone, because only it has the secret.

The key file (JSON, mode 0600) holds every key ever used; the newest is the one new
tombstones are made with, and every key is tried on lookup, so rotating adds a key and never
loses an existing tombstone. The store remembers a check value per key id, so a missing,
replaced or wrong key file is a loud error at start-up — never a silent end of enforcement.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from ..addresses import AddressNormalizer, InvalidAddress

if TYPE_CHECKING:
    from ..store.base import ErasureStore

_CHECK_MESSAGE = b"smtp-guard erasure key check v1"
_AUDIT_PREFIX = b"smtp-guard audit pseudonym v1:"


class KeyError_(Exception):
    """The key file is missing, unreadable, too open, malformed or does not match the store."""


# Exported under a clear name; the trailing underscore only avoids shadowing the builtin.
ErasureKeyError = KeyError_


def erasure_token(normalized_key: str) -> str:
    """The erasure token of a normalized address: SHA-256, hex."""
    return hashlib.sha256(normalized_key.encode("utf-8")).hexdigest()


def address_token(normalizer: AddressNormalizer, address: str) -> str | None:
    """The erasure token of an address as given, or None if it is not a valid mailbox."""
    try:
        return erasure_token(normalizer.key(address))
    except InvalidAddress:
        return None


def is_token(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text.lower())


@dataclass(frozen=True)
class ErasureKey:
    id: str
    secret: bytes
    created_at: float

    def tombstone(self, token: str) -> bytes:
        return hmac.new(self.secret, bytes.fromhex(token), hashlib.sha256).digest()

    def pseudonym(self, token: str) -> str:
        """A short keyed pseudonym for audit records, ``h:1a2b3c4d5e6f7a8b``. Derived from the
        token's tombstone digest, so that an erasure given only a token — and a running server
        given only the new tombstone — can still find and erase it."""
        return self.pseudonym_of_digest(self.tombstone(token))

    def pseudonym_of_digest(self, digest: bytes) -> str:
        return "h:" + hmac.new(self.secret, _AUDIT_PREFIX + digest, hashlib.sha256).hexdigest()[:16]

    @property
    def check_value(self) -> str:
        return hmac.new(self.secret, _CHECK_MESSAGE, hashlib.sha256).hexdigest()


class KeyRing:
    def __init__(self, path: Path, keys: list[ErasureKey]) -> None:
        if not keys:
            raise KeyError_(f"{path}: the key file holds no key")
        self.path = path
        self.keys = tuple(sorted(keys, key=lambda k: k.created_at))

    @property
    def primary(self) -> ErasureKey:
        return self.keys[-1]

    def by_id(self, key_id: str) -> ErasureKey | None:
        return next((k for k in self.keys if k.id == key_id), None)

    def check_against(self, remembered: Mapping[str, str]) -> None:
        """Refuse a key file that cannot verify the tombstones in the store."""
        for key_id, check in remembered.items():
            key = self.by_id(key_id)
            if key is None:
                raise KeyError_(
                    f"{self.path}: the store has tombstones made with key {key_id!r}, which this key file "
                    "does not hold; restore the key file from backup (erasures would no longer be enforced)")
            if not hmac.compare_digest(key.check_value, check):
                raise KeyError_(
                    f"{self.path}: key {key_id!r} is not the key the store's tombstones were made with; "
                    "restore the original key file from backup")

    def pseudonyms(self, token: str) -> list[str]:
        return [key.pseudonym(token) for key in self.keys]


def load_key_ring(path: Path) -> KeyRing:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyError_(f"{path}: erasure key file not found") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyError_(f"{path}: erasure key file is readable by others; run: chmod 600 {path}")
    try:
        data = json.loads(path.read_text("utf-8"))
        keys = [ErasureKey(k["id"], base64.b64decode(k["secret"], validate=True), float(k["created_at"]))
                for k in data["keys"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise KeyError_(f"{path}: not a valid erasure key file ({error}); restore it from backup") from None
    if any(len(k.secret) < 32 for k in keys):
        raise KeyError_(f"{path}: a key is shorter than 32 bytes")
    return KeyRing(path, keys)


def _write_key_file(path: Path, keys: tuple[ErasureKey, ...]) -> None:
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
        os.chmod(path.parent, 0o700)  # mkdir's mode is filtered by the umask
    payload = json.dumps({"keys": [
        {"id": k.id, "created_at": k.created_at, "secret": base64.b64encode(k.secret).decode()} for k in keys
    ]}, indent=2)
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # a left-over temporary file keeps its old mode through O_TRUNC
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def new_key(now: float | None = None) -> ErasureKey:
    created = time.time() if now is None else now
    return ErasureKey(f"k{int(created)}-{secrets.token_hex(3)}", secrets.token_bytes(32), created)


def create_key_ring(path: Path) -> KeyRing:
    """First use: generate the first key. Refuses to overwrite an existing file."""
    if path.exists():
        return load_key_ring(path)
    key = new_key()
    _write_key_file(path, (key,))
    return KeyRing(path, [key])


def rotate(ring: KeyRing) -> KeyRing:
    """Add a new primary key; old keys stay so existing tombstones keep matching."""
    keys = ring.keys + (new_key(),)
    _write_key_file(ring.path, keys)
    return KeyRing(ring.path, list(keys))


async def open_key_ring(path: Path, store: "ErasureStore") -> KeyRing:
    """The key ring for a store: created on first use, and refused when it cannot verify the
    tombstones the store already has (missing, replaced or wrong key file)."""
    remembered = await store.key_checks()
    if not path.exists():
        if remembered:
            raise KeyError_(
                f"{path}: erasure key file not found, but the store has tombstones made with key(s) "
                f"{', '.join(sorted(remembered))}; restore the key file from backup (or set [erasure] key_file)")
        ring = create_key_ring(path)
    else:
        ring = load_key_ring(path)
    ring.check_against(remembered)
    # Remember every key at once, not only when it makes a tombstone: audit pseudonyms depend
    # on it too, and a lost key file must be a loud error from then on, never a silent new key.
    for key in ring.keys:
        if key.id not in remembered:
            await store.remember_key(key.id, key.check_value, key.created_at)
    return ring

"""The erasure key ring: secrets that turn an address into a tombstone without keeping it.

A tombstone is ``HMAC-SHA256(secret, token)`` where the *erasure token* is
``SHA-256(normalized address)`` in hex. The token lets a privacy team's system send erasures
without ever sending the address (``smtp-guard erase token`` prints it); only the guard can
turn a token into a tombstone, because only it has the secret.

The key file (JSON, mode 0600) holds every key ever used; the newest is the one new
tombstones are made with, and every key is tried on lookup, so rotating adds a key and never
loses an existing tombstone. The store remembers a check value per key id, so a missing,
replaced or wrong key file is a loud error at start-up — never a silent end of enforcement.

What a key file must hold is what the store depends on, not what it remembers: a key is
needed when a tombstone was made with it, or while audit records name recipients by
pseudonyms (which do not say which key made them). A remembered key that made neither — the
key of a first start with a mistyped ``[erasure] key_file`` — is forgotten at the next start,
with a warning, instead of locking the store to a key nobody needs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from ..addresses import AddressNormalizer, InvalidAddress
from ..private_directory import make_private_directory

if TYPE_CHECKING:
    from .model import ErasureStore

log = logging.getLogger(__name__)

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


def _write_key_file(path: Path, keys: tuple[ErasureKey, ...], *, exclusive: bool = False) -> None:
    """Write the file whole or not at all (a temporary of this process's own, then renamed).
    ``exclusive``: never over an existing file (FileExistsError): two instances starting at
    once on a shared directory must end up with one key, not each with its own."""
    payload = json.dumps({"keys": [
        {"id": k.id, "created_at": k.created_at, "secret": base64.b64encode(k.secret).decode()} for k in keys
    ]}, indent=2)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            os.link(temporary, path)  # fails if the file exists: the first writer wins
        else:
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def new_key(now: float | None = None) -> ErasureKey:
    created = time.time() if now is None else now
    return ErasureKey(f"k{int(created)}-{secrets.token_hex(3)}", secrets.token_bytes(32), created)


def create_key_ring(path: Path, data_dir: Path | None = None) -> KeyRing:
    """First use: generate the first key. Refuses to overwrite an existing file.

    Only the data directory (the store's, which the guard creates 0700) is created if
    missing: any other missing directory is a mistyped ``[erasure] key_file``, and creating
    it would hide the mistake — a first start once created ``/nonexistent/dir/`` as root."""
    if path.exists():
        return load_key_ring(path)
    directory = path.parent
    if not directory.is_dir():
        if data_dir is None or os.path.abspath(directory) != os.path.abspath(data_dir):
            raise KeyError_(
                f"{path}: the directory {directory} does not exist; correct [erasure] key_file, or create "
                f"the directory (mode 0700) first — only the data directory ({data_dir}) is created on its own"
                if data_dir is not None else
                f"{path}: the directory {directory} does not exist; correct [erasure] key_file")
        make_private_directory(directory)
    key = new_key()
    try:
        _write_key_file(path, (key,), exclusive=True)
    except FileExistsError:  # another guard on this directory made it a moment ago: use that one
        return load_key_ring(path)
    return KeyRing(path, [key])


def rotate(ring: KeyRing) -> KeyRing:
    """Add a new primary key; old keys stay so existing tombstones keep matching."""
    keys = ring.keys + (new_key(),)
    _write_key_file(ring.path, keys)
    return KeyRing(ring.path, list(keys))


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _made_with(counts: Mapping[str, int]) -> str:
    """``key k1`` or ``keys k1 (2), k2 (1)``."""
    if len(counts) == 1:
        return f"key {next(iter(counts))}"
    return "keys " + ", ".join(f"{key_id} ({number})" for key_id, number in sorted(counts.items()))


async def check_key_file(path: Path, ring: KeyRing | None, store: "ErasureStore") -> list[str]:
    """Refuse a key file (``ring`` None: not found) that lacks, or holds a different secret
    for, a key something in the store was made with. Returns the ids of remembered keys it
    lacks that nothing was made with: they may be forgotten (open_key_ring).

    Audit pseudonyms count as made with every lacking key: a pseudonym does not say which key
    made it, and without that key a person's records can no longer be found (a subject access
    request) nor erased by address — while the lost key may still exist elsewhere (the file at
    a mistyped path), so the records would stay linkable to the person by whoever holds it.
    """
    remembered = await store.key_checks()
    held = {} if ring is None else {key.id: key for key in ring.keys}
    lacking = sorted(key_id for key_id in remembered if key_id not in held)
    wrong = sorted(key_id for key_id, check in remembered.items()
                   if key_id in held and not hmac.compare_digest(held[key_id].check_value, check))
    if ring is not None and not lacking and not wrong:
        return []
    tombstones = await store.tombstone_counts()
    if wrong:
        key_id = wrong[0]
        raise KeyError_(
            f"{path}: key {key_id!r} is not the key the store remembers under that id (the store has "
            f"{_count(tombstones.get(key_id, 0), 'tombstone')} made with it); restore the original key file "
            "from backup")
    if ring is None:
        # Not found: every tombstone and every pseudonym was made with a key this guard lacks,
        # remembered or not (a store older than remembering keys at open).
        if tombstones:
            raise KeyError_(
                f"{path}: erasure key file not found, but the store has "
                f"{_count(sum(tombstones.values()), 'tombstone')} made with {_made_with(tombstones)}; restore the "
                "key file from backup, or set [erasure] key_file to where it is (erasures would no longer be "
                "enforced)")
        records = await store.pseudonymized_audit_records()
        if records:
            remembered_ids = f" (the store remembers {', '.join(lacking)})" if lacking else ""
            raise KeyError_(
                f"{path}: erasure key file not found; the store has 0 tombstones, but "
                f"{_count(records, 'audit record')} with recipients named by pseudonyms made with an erasure key "
                f"that is not available now{remembered_ids}, and without it those records can no longer be found or "
                "erased by address; restore the key file from backup, or set [erasure] key_file to where it is")
        return lacking
    made = {key_id: tombstones[key_id] for key_id in lacking if tombstones.get(key_id)}
    if made:
        raise KeyError_(
            f"{path}: the store has {_count(sum(made.values()), 'tombstone')} made with {_made_with(made)}, "
            "which this key file does not hold; restore the key file from backup (erasures would no longer "
            "be enforced)")
    records = await store.pseudonymized_audit_records()
    if records:
        raise KeyError_(
            f"{path}: this key file does not hold {'key' if len(lacking) == 1 else 'keys'} "
            f"{', '.join(lacking)}, which the store remembers; no tombstone was made with "
            f"{'it' if len(lacking) == 1 else 'them'}, but {_count(records, 'audit record')} with recipients named by "
            "pseudonyms, and those made with a key this file lacks could no longer be found or erased by "
            "address; restore the key file from backup")
    return lacking


async def open_key_ring(path: Path, store: "ErasureStore", data_dir: Path, *, may_replace: bool) -> KeyRing:
    """The key ring for a store: created on first use, and refused when it cannot stand in for
    a key the store depends on (check_key_file).

    A remembered key that nothing was made with and that the key file lacks is forgotten, with
    a warning, when ``may_replace`` (the guard's start and ``init``, which create the store
    too); admin commands refuse instead, as they never create a store: an admin host with
    another ``[erasure] key_file`` must not swap the key under a running guard."""
    ring = load_key_ring(path) if path.exists() else None
    unused = await check_key_file(path, ring, store)
    if unused:
        keys = f"{'key' if len(unused) == 1 else 'keys'} {', '.join(unused)}"
        it = "it" if len(unused) == 1 else "them"
        found = (f"erasure key file not found; the store remembers {keys}" if ring is None
                 else f"this key file does not hold {keys}, which the store remembers")
        found += f", but {'it' if len(unused) == 1 else 'they'} made no tombstone and no audit pseudonym"
        if not may_replace:
            raise KeyError_(
                f"{path}: {found}; start the guard with this config (smtp-guard serve, or smtp-guard init) to "
                f"forget {it}, or set [erasure] key_file to where the key file is")
        if not await store.forget_keys(unused):
            # Something was made with one of them since the check (another process): refuse.
            await check_key_file(path, ring, store)
            raise KeyError_(f"{path}: the store started using {keys} while this guard opened it; start again")
        log.warning("%s: %s; forgetting %s%s", path, found, it,
                    "; generating a new key (back the new key file up)" if ring is None else "")
    if ring is None:
        ring = create_key_ring(path, data_dir)
    # Remember every key at open, not only when it makes a tombstone: a key file replaced
    # after the key pseudonymized audit records must be a loud error, never a silent new key.
    remembered = await store.key_checks()
    for key in ring.keys:
        if key.id not in remembered:
            await store.remember_key(key.id, key.check_value, key.created_at)
    return ring

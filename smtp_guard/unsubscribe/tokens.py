"""Unsubscribe tokens: who unsubscribes from which stream, sealed so that nobody can read the
address out of a link or make a link for someone else.

A token is ChaCha20-Poly1305 (an AEAD: the Poly1305 tag authenticates the token the way an HMAC
would, and the cipher hides the address) over ``expiry | stream | address``. The sealing key is
derived from the erasure key ring's secrets (HKDF), so there is no second secret to create,
back up and rotate: after ``smtp-guard erase rotate-key`` new links use the new key and the
links already sent keep working, because every key of the ring is tried.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
import time
from dataclasses import dataclass
from typing import Callable, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..erasure.keys import KeyRing

_VERSION = b"\x01"
_CONTEXT = b"smtp-guard unsubscribe token v1"
_NONCE = 12
MAX_STREAM = 200  # bytes of the stream id kept in a token (it only labels the audit record)

Failure = Literal["malformed", "forged", "expired"]


class InvalidToken(Exception):
    """A token that does not open: ``reason`` is malformed, forged (altered, or not ours) or expired."""

    def __init__(self, reason: Failure) -> None:
        super().__init__(reason)
        self.reason: Failure = reason


@dataclass(frozen=True)
class Unsubscribe:
    address: str  # the recipient's normalized matching key
    stream: str
    expires_at: float


def _aead(secret: bytes) -> ChaCha20Poly1305:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_CONTEXT).derive(secret)
    return ChaCha20Poly1305(key)


class UnsubscribeTokens:
    def __init__(self, ring: KeyRing, lifetime: float, clock: Callable[[], float] = time.time) -> None:
        self._seal = _aead(ring.primary.secret)
        self._open = [_aead(key.secret) for key in reversed(ring.keys)]  # newest first
        self._lifetime = lifetime
        self._clock = clock

    def issue(self, address: str, stream: str) -> str:
        expires = int(self._clock() + self._lifetime)
        stream_bytes = stream.encode("utf-8")[:MAX_STREAM]
        payload = struct.pack(">IB", expires, len(stream_bytes)) + stream_bytes + address.encode("utf-8")
        nonce = os.urandom(_NONCE)
        sealed = _VERSION + nonce + self._seal.encrypt(nonce, payload, _CONTEXT)
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")

    def open(self, token: str) -> Unsubscribe:
        try:
            sealed = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise InvalidToken("malformed") from None
        if len(sealed) < 1 + _NONCE + 16 + 5 or sealed[:1] != _VERSION:
            raise InvalidToken("malformed")
        nonce, ciphertext = sealed[1:1 + _NONCE], sealed[1 + _NONCE:]
        for aead in self._open:
            try:
                payload = aead.decrypt(nonce, ciphertext, _CONTEXT)
                break
            except InvalidTag:
                continue
        else:
            raise InvalidToken("forged")
        expires, length = struct.unpack(">IB", payload[:5])
        try:
            stream = payload[5:5 + length].decode("utf-8", "replace")
            address = payload[5 + length:].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidToken("malformed") from None
        if expires <= self._clock():
            raise InvalidToken("expired")
        return Unsubscribe(address, stream, float(expires))

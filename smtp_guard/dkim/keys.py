"""DKIM keys: generated and read as standard PEM (what ``openssl genpkey`` writes too), handed
to dkimpy in the forms it takes, and published as the DNS TXT record a verifier looks up.

RSA keys must be at least 1024 bits (RFC 8301: verifiers ignore smaller ones); 2048 is what
``keygen`` makes and what Gmail expects. Ed25519 (RFC 8463) is small and fast but not yet
verified everywhere, so it is signed beside an RSA key, never instead of one.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

Algorithm = Literal["rsa", "ed25519"]
MIN_RSA_BITS = 1024


class DKIMKeyError(Exception):
    """A key file that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: Algorithm
    private: bytes = b""  # as dkimpy takes it: PKCS#1 PEM (RSA) or the base64 seed (Ed25519)
    public: str = ""  # the TXT record's p= value: base64 SubjectPublicKeyInfo (RSA) or raw key (Ed25519)
    bits: int = 0  # RSA modulus size; 256 for Ed25519

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def signature_algorithm(self) -> bytes:
        return b"rsa-sha256" if self.algorithm == "rsa" else b"ed25519-sha256"

    def txt_record(self) -> str:
        return f"v=DKIM1; k={self.algorithm}; p={self.public}"


def generate(algorithm: Algorithm, bits: int = 2048) -> bytes:
    """A new private key as PKCS#8 PEM."""
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits) if algorithm == "rsa" \
        else ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private(path: Path, pem: bytes) -> None:
    """Create ``path`` with mode 0600 (never an existing file: a key is not overwritten by accident)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(pem)


def from_pem(pem: bytes, domain: str, selector: str, where: str) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        raise DKIMKeyError(f"{where}: not an unencrypted PEM private key ({error}); make one with "
                           f"`smtp-guard dkim keygen {domain} {selector}`") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise DKIMKeyError(f"{where}: a {key.key_size}-bit RSA key; verifiers ignore keys under "
                               f"{MIN_RSA_BITS} bits (RFC 8301): make a 2048-bit one")
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return SigningKey(domain, selector, "rsa", private, base64.b64encode(public).decode(), key.key_size)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return SigningKey(domain, selector, "ed25519", base64.b64encode(seed), base64.b64encode(public).decode(), 256)
    raise DKIMKeyError(f"{where}: a {type(key).__name__}; DKIM signs with RSA or Ed25519 keys only")


def load(path: str | Path, domain: str, selector: str) -> SigningKey:
    where = f"[dkim] key_file {path} ({selector}._domainkey.{domain})"
    try:
        pem = Path(path).read_bytes()
    except OSError as error:
        raise DKIMKeyError(f"{where}: cannot read it ({error.strerror or error})") from None
    return from_pem(pem, domain, selector, where)


def zone_lines(key: SigningKey) -> str:
    """The record as a zone file line, the text split into DNS's 255-byte strings."""
    text = key.txt_record()
    strings = " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))
    return f"{key.dns_name}. IN TXT ( {strings} )"

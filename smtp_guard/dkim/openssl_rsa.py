"""RSA signatures for dkimpy through OpenSSL (``cryptography``) instead of Python integers.

dkimpy computes RSA with CPython's ``pow``: about 9 ms per RSA-2048 signature, which would cap
a guard that signs at ~100 messages per second and stall every other session meanwhile.
OpenSSL makes the identical signature (PKCS#1 v1.5 is deterministic: a test holds the two
byte-equal) in a fraction of that time.

dkimpy has no hook for the RSA primitive, so ``install`` replaces the one function its signer
calls, ``dkim.RSASSA_PKCS1_v1_5_sign``, with one that uses OpenSSL for the keys registered here
and hands every other key to dkimpy's own code unchanged. Verification is untouched.
"""

from __future__ import annotations

from typing import Any, Callable

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

_PUREPYTHON: Callable[[Any, dict[str, int]], bytes] = dkim.RSASSA_PKCS1_v1_5_sign
_KEYS: dict[int, rsa.RSAPrivateKey] = {}  # modulus -> OpenSSL key
_HASHES = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}


def register(pkcs1_pem: bytes) -> None:
    """Sign with OpenSSL whenever dkimpy signs with this key (the PEM handed to ``dkim.sign``)."""
    key = serialization.load_pem_private_key(pkcs1_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    _KEYS[key.private_numbers().public_numbers.n] = key
    install()


def install() -> None:
    dkim.RSASSA_PKCS1_v1_5_sign = _sign


def _sign(digest: Any, private_key: dict[str, int]) -> bytes:
    key = _KEYS.get(private_key["modulus"])
    algorithm = _HASHES.get(digest.name.lower())
    if key is None or algorithm is None:
        return _PUREPYTHON(digest, private_key)
    return key.sign(digest.digest(), padding.PKCS1v15(), Prehashed(algorithm))

"""The DKIM check: does DNS publish, at ``selector._domainkey.domain``, the public half of each
configured key (RFC 6376 section 3.6.1), in a record a verifier accepts?"""

from __future__ import annotations

import base64
import binascii
from typing import Sequence

from cryptography.hazmat.primitives import serialization

from ..config import DKIMKeyConfig
from ..dkim import keys
from ..dkim.fields import txt_tags
from .lookup import DNS, DNSFailure
from .report import Finding, Status


async def check_dkim(dns: DNS, domain: str, signing_domain: str | None,
                     configured: Sequence[DKIMKeyConfig]) -> list[Finding]:
    """One finding per key the guard signs ``domain``'s mail with (the keys of
    ``signing_domain``, the most specific configured domain at or above it)."""
    if not configured:
        return [Finding(
            "dkim", Status.WARN, domain,
            f"no [[dkim.keys]] for {domain} or a parent domain: the guard does not sign its mail",
            fix=f"make a key with `smtp-guard dkim keygen {domain} SELECTOR`, add it to the config as a "
                f"[[dkim.keys]] table, and publish the TXT record it prints; without a DKIM signature DMARC "
                f"can pass only through SPF")]
    return [await _check_key(dns, key) for key in configured]


async def _check_key(dns: DNS, key: DKIMKeyConfig) -> Finding:
    name = f"{key.selector}._domainkey.{key.domain}"
    try:
        signing = keys.load(key.key_file, key.domain, key.selector)
    except keys.DKIMKeyError as error:
        return Finding("dkim", Status.FAIL, name, f"cannot use the key file: {error}",
                       fix=f"fix [[dkim.keys]] key_file for {key.domain} selector {key.selector}")
    publish = keys.zone_lines(signing)
    facts = {"selector": key.selector, "domain": key.domain, "algorithm": signing.algorithm, "bits": signing.bits}
    try:
        records = await dns.txt(name)
    except DNSFailure as error:
        return Finding("dkim", Status.FAIL, name, f"could not look up the DKIM record: {error}",
                       fix="check [dns] servers (or /etc/resolv.conf) and run doctor again", data=facts)
    if not records:
        return Finding("dkim", Status.FAIL, name, f"no DKIM record at {name}: receivers cannot verify the signatures",
                       fix="publish this TXT record (your DNS provider may want only the quoted text)",
                       publish=publish, data=facts)
    if len(records) > 1:
        return Finding("dkim", Status.FAIL, name,
                       f"{len(records)} TXT records at {name}: verifiers pick one at random (RFC 6376 3.6.2.2)",
                       fix="keep exactly one record there", publish=publish,
                       data={**facts, "published": records})
    problem, status = _record_problem(records[0], signing)
    facts = {**facts, "published": records[0]}
    if problem:
        return Finding("dkim", status, name, problem, fix="" if status is Status.WARN else "replace the record",
                       publish="" if status is Status.WARN else publish, data=facts)
    size = f", {signing.bits} bits" if signing.algorithm == "rsa" else ""
    return Finding("dkim", Status.OK, name, f"publishes the configured {signing.algorithm} key{size}", data=facts)


def _record_problem(text: str, signing: keys.SigningKey) -> tuple[str, Status]:
    """What is wrong with a published key record ("" when nothing is), and how bad it is."""
    tags = txt_tags(text)
    if "v" in tags and (tags["v"] != "DKIM1" or not text.lstrip().startswith("v=")):
        return "the record's v= must be \"DKIM1\" and come first (RFC 6376 3.6.1)", Status.FAIL
    if "p" not in tags:
        return "the record has no p= tag (not a DKIM key record)", Status.FAIL
    if not tags["p"]:
        return "the key is revoked (empty p=): signatures with this selector fail", Status.FAIL
    published_algorithm = tags.get("k", "rsa")
    if published_algorithm != signing.algorithm:
        return (f"the record says k={published_algorithm}, the configured key is {signing.algorithm}",
                Status.FAIL)
    if "h" in tags and "sha256" not in tags["h"].split(":"):
        return f"h={tags['h']} excludes sha256, the hash the guard signs with", Status.FAIL
    if "s" in tags and not {"email", "*"} & set(tags["s"].split(":")):
        return f"s={tags['s']} does not allow email", Status.FAIL
    if not _same_key(tags["p"], signing):
        return "the record publishes a different key than the configured key file", Status.FAIL
    if "y" in tags.get("t", "").split(":"):
        return ("the record is in testing mode (t=y): receivers treat failing signatures as unsigned; "
                "remove t=y once signing works", Status.WARN)
    return "", Status.OK


def _same_key(published: str, signing: keys.SigningKey) -> bool:
    if published == signing.public:
        return True
    if signing.algorithm != "rsa":
        return False
    # The same RSA key may be published in another DER encoding (PKCS#1 RSAPublicKey).
    try:
        der = base64.b64decode(published, validate=True)
        configured = serialization.load_der_public_key(base64.b64decode(signing.public))
        found = _rsa_public(der)
    except (binascii.Error, ValueError):
        return False
    return found is not None and found == configured.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _rsa_public(der: bytes) -> bytes | None:
    """A published RSA key (SubjectPublicKeyInfo or PKCS#1) as SubjectPublicKeyInfo DER."""
    for loader in (serialization.load_der_public_key,
                   lambda data: serialization.load_pem_public_key(
                       b"-----BEGIN RSA PUBLIC KEY-----\n" + base64.encodebytes(data) + b"-----END RSA PUBLIC KEY-----\n")):
        try:
            key = loader(der)
        except (ValueError, TypeError):
            continue
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return None

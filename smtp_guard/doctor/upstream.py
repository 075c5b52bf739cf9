"""The upstream check: does ``[upstream] host:port`` accept a connection, speak SMTP, offer
STARTTLS (or TLS from the first byte with ``tls = "implicit"``), and present a certificate
that is valid for the host name (against the system CAs, or ``[upstream] ca_file``) and does
not expire within 14 days?

The certificate is always verified here, as ``relay/pool.py`` does with ``tls = "starttls"``
or ``"implicit"`` and ``tls_verify = true``; when the guard does not verify it (opportunistic
TLS, ``tls_verify = false``, ``tls = "none"``), a bad certificate is a warning, since mail
still flows, only without knowing who receives it.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from datetime import datetime, timezone

import aiosmtplib
from cryptography import x509

from ..config import UpstreamConfig
from .report import Finding, Status, UpstreamReport

EXPIRY_WARNING_DAYS = 14
_FIX_CERTIFICATE = ("give the upstream a certificate for {host} from a CA the guard trusts (the system's), or set "
                    "[upstream] ca_file to the CA that issued it")


async def check_upstream(config: UpstreamConfig, now: datetime | None = None) -> UpstreamReport:
    if config.mode == "sandbox":
        return UpstreamReport("", 0, config.tls, (Finding(
            "upstream", Status.SKIP, "sandbox", "[upstream] mode = \"sandbox\": mail is captured locally and "
            "nothing is relayed, so the upstream checks are skipped"),))
    findings = [await _connect(config)]
    if findings[0].status is Status.OK:
        findings += await _smtp(config, now or datetime.now(timezone.utc))
    return UpstreamReport(config.host, config.port, config.tls, tuple(findings))


def _subject(config: UpstreamConfig) -> str:
    return f"{config.host}:{config.port}"


async def _connect(config: UpstreamConfig) -> Finding:
    try:
        async with asyncio.timeout(config.connect_timeout):
            _, writer = await asyncio.open_connection(config.host, config.port)
    except TimeoutError:
        return Finding("upstream.connect", Status.FAIL, _subject(config),
                       f"no TCP connection within {config.connect_timeout:g}s ([upstream] connect_timeout)",
                       fix="check [upstream] host and port, that the upstream runs, and that no firewall drops the "
                           "connection")
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)  # not "Connect call failed (...)"
        return Finding("upstream.connect", Status.FAIL, _subject(config), f"cannot connect: {reason}",
                       fix="check [upstream] host and port and that the upstream runs")
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return Finding("upstream.connect", Status.OK, _subject(config), "accepts TCP connections")


async def _smtp(config: UpstreamConfig, now: datetime) -> list[Finding]:
    subject = _subject(config)
    verifying = ssl.create_default_context(cafile=config.ca_file or None)
    guard_verifies = config.tls in ("starttls", "implicit") and config.tls_verify
    client = aiosmtplib.SMTP(hostname=config.host, port=config.port, use_tls=config.tls == "implicit",
                             start_tls=False, tls_context=verifying, timeout=config.connect_timeout,
                             local_hostname=config.helo_name or None)
    findings: list[Finding] = []
    try:
        try:
            await client.connect()
            await client.ehlo()
        except Exception as error:
            if (verify_error := _verify_error(error)) is not None:
                return [_bad_certificate(config, verify_error, guard_verifies)]
            return [Finding("upstream.smtp", Status.FAIL, subject, f"no SMTP session: {_describe(error)}",
                            fix="check that [upstream] port is the upstream's SMTP port"
                                + (" and that it speaks TLS from the first byte (tls = \"implicit\")"
                                   if config.tls == "implicit" else ""))]
        findings.append(Finding("upstream.smtp", Status.OK, subject, "answers EHLO"))
        if config.tls == "implicit":
            findings.append(Finding("upstream.tls", Status.OK, subject, "speaks TLS from the first byte (tls = implicit)"))
        else:
            offered = client.supports_extension("starttls")
            findings.append(_starttls_offer(config, offered))
            if not offered:
                return findings
            try:
                await client.starttls(server_hostname=config.host, tls_context=verifying)
            except Exception as error:
                if (verify_error := _verify_error(error)) is not None:
                    return [*findings, _bad_certificate(config, verify_error, guard_verifies)]
                return [*findings, Finding("upstream.tls", Status.FAIL if config.tls == "starttls" else Status.WARN,
                                           subject, f"STARTTLS failed: {_describe(error)}",
                                           fix="check the upstream's TLS configuration")]
        ssl_object = client.get_transport_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            findings.append(_certificate(config, x509.load_der_x509_certificate(der), now))
        return findings
    finally:
        try:
            await client.quit()
        except Exception:
            client.close()


def _starttls_offer(config: UpstreamConfig, offered: bool) -> Finding:
    subject = _subject(config)
    if offered and config.tls == "none":
        return Finding("upstream.starttls", Status.WARN, subject, "offers STARTTLS, but [upstream] tls = \"none\": "
                       "the guard relays in plaintext", fix="set [upstream] tls = \"starttls\"")
    if offered:
        return Finding("upstream.starttls", Status.OK, subject, "offers STARTTLS")
    if config.tls == "starttls":
        return Finding("upstream.starttls", Status.FAIL, subject, "does not offer STARTTLS, but [upstream] tls = "
                       "\"starttls\" requires it: every message is deferred",
                       fix="enable STARTTLS on the upstream, or set [upstream] tls to \"opportunistic\" or \"none\"")
    return Finding("upstream.starttls", Status.WARN, subject, "does not offer STARTTLS: mail travels to the "
                   "upstream in plaintext", fix="enable STARTTLS on the upstream (fine as it is on a loopback or "
                   "private link)")


def _certificate(config: UpstreamConfig, certificate: x509.Certificate, now: datetime) -> Finding:
    expires = certificate.not_valid_after_utc
    days = (expires - now).total_seconds() / 86400
    data = {"not_after": expires.isoformat(), "days_left": int(days), "issuer": certificate.issuer.rfc4514_string(),
            "subject": certificate.subject.rfc4514_string()}
    if days < EXPIRY_WARNING_DAYS:
        return Finding("upstream.certificate", Status.WARN, _subject(config),
                       f"the certificate expires in {max(days, 0):.1f} days ({expires:%Y-%m-%d %H:%M} UTC): then TLS "
                       f"to the upstream fails", fix="renew the upstream's certificate", data=data)
    return Finding("upstream.certificate", Status.OK, _subject(config),
                   f"certificate valid for {config.host} until {expires:%Y-%m-%d} ({int(days)} days), issued by "
                   f"{certificate.issuer.rfc4514_string()}", data=data)


def _bad_certificate(config: UpstreamConfig, error: ssl.SSLCertVerificationError, guard_verifies: bool) -> Finding:
    reason = error.verify_message or str(error)
    if guard_verifies:
        consequence = "the guard cannot relay (every message is deferred)"
    else:
        consequence = (f"the guard does not verify it (tls = \"{config.tls}\", tls_verify = "
                       f"{'true' if config.tls_verify else 'false'}), so mail flows, but to whoever answers")
    return Finding("upstream.certificate", Status.FAIL if guard_verifies else Status.WARN, _subject(config),
                   f"the certificate does not verify for {config.host}: {reason}; {consequence}",
                   fix=_FIX_CERTIFICATE.format(host=config.host), data={"verify_message": reason})


def _verify_error(error: BaseException | None) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error behind ``error`` (aiosmtplib may wrap it)."""
    seen = 0
    while error is not None and seen < 5:
        if isinstance(error, ssl.SSLCertVerificationError):
            return error
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def _describe(error: BaseException) -> str:
    if isinstance(error, aiosmtplib.SMTPResponseException):
        return f"{error.code} {error.message}"
    return str(error) or type(error).__name__

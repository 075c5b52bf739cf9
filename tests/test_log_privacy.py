"""Log lines name no address unless the operator asks ([logging] plaintext_addresses).

End to end: a real guard on loopback relaying to the sink, logging through the handler
``configure_logging`` installs (as ``smtp-guard serve`` does) at DEBUG — aiosmtpd's own
``mail.log`` included, which logs every command line and every DATA line — with a delivered,
a suppressed, an erased, an upstream-refused and an internationalized recipient. Then the
filter alone, on the inputs a regular expression gets wrong.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
import sys
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest

from smtp_guard import replies
from smtp_guard.addresses import AddressNormalizer
from smtp_guard.app import Guard
from smtp_guard.audit_model import AuditFilter
from smtp_guard.config import AddressConfig, LoggingConfig
from smtp_guard.erasure.keys import KeyRing, create_key_ring
from smtp_guard.erasure.model import Tombstone
from smtp_guard.erasure.pseudonyms import Pseudonymizer
from smtp_guard.logs import PLAINTEXT_WARNING, WITHHELD, PseudonymFilter, configure_logging

from conftest import make_config, wait_until, store_toml
from erasure_support import SENDER, cli, cli_config_for, cli_json, contains_any, mail, rcpt_reply, refuses
from sink import Sink
from smtp_client import send

DELIVERED = "ann@example.com"
SUPPRESSED = "gone@example.net"
ERASED = "jane@example.com"
UNKNOWN = "nouser@example.org"  # the upstream refuses it
IDN = "jörg@bücher.example"
RECIPIENTS = [DELIVERED, SUPPRESSED, ERASED.upper(), UNKNOWN, IDN]
# Every spelling of every address that must not reach the log: as sent, as normalized, the
# A-label form, UTF-8 escaped in a bytes repr, and the bare local parts with their "@".
SPELLINGS = [
    SENDER, DELIVERED, SUPPRESSED, ERASED, UNKNOWN, IDN, "jörg@xn--bcher-kva.example",
    str(IDN.encode())[2:-1], "news@", "ann@", "gone@", "jane@", "nouser@", "jörg@", r"j\xc3\xb6rg@",
]
PSEUDONYM = re.compile(r"\b(?:h:[0-9a-f]{16}|erased:\d+)")


@contextmanager
def captured_logs(**options: Any) -> Iterator[tuple[io.StringIO, PseudonymFilter | None]]:
    """Logging configured as ``smtp-guard serve`` configures it, into a string, at DEBUG, with
    aiosmtpd's per-command ``mail.log`` lines let through as well (the worst case)."""
    root, mail_log = logging.getLogger(), logging.getLogger("mail.log")
    saved = root.handlers[:], root.level, mail_log.level
    stream = io.StringIO()
    try:
        pseudonyms = configure_logging(LoggingConfig(level="debug", **options), stream)
        mail_log.setLevel(logging.DEBUG)
        yield stream, pseudonyms
    finally:
        root.handlers[:], _, _ = saved
        root.setLevel(saved[1])
        mail_log.setLevel(saved[2])


@asynccontextmanager
async def guard_logging_through(tmp_path: Path, sink: Sink, pseudonyms: PseudonymFilter | None) -> AsyncIterator[Guard]:
    """A Guard relaying to ``sink``, started as ``serve`` starts it (handed the log filter)."""
    guard = Guard(make_config(tmp_path, sink.port), log_pseudonyms=pseudonyms)
    try:
        await guard.start()
        yield guard
    finally:
        await guard.stop()


async def audit_pseudonym(guard: Guard, address: str) -> str:
    """The recipient as the audit trail recorded it, found by its address."""
    await guard.enforcement.audit.flush()
    records = await guard.backends.audit.query(AuditFilter(recipient=address))
    assert records, f"no audit record for {address}"
    assert len({r.recipient for r in records}) == 1
    return records[0].recipient


# --- end to end ----------------------------------------------------------------------------------

@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_no_address_in_any_log_line_and_each_is_the_audit_pseudonym(tmp_path, sink, log_format):
    """With the default settings no spelling of any sender or recipient reaches the log, and
    each recipient appears under the pseudonym its audit records carry — ``erased:<id>`` for
    the erased one — so ``smtp-guard audit list --recipient`` finds the records a line is about."""
    sink.permfail_rcpt.add(UNKNOWN)
    with captured_logs(format=log_format) as (stream, pseudonyms):
        assert pseudonyms is not None
        async with guard_logging_through(tmp_path, sink, pseudonyms) as guard:
            config_file = cli_config_for(tmp_path, guard)
            await cli(config_file, "suppress", "add", SUPPRESSED, "--list", "unsubscribed")
            receipt, = await cli_json(config_file, "erase", ERASED, "--ref", "DSR-2026-0042")
            await wait_until(lambda: refuses(guard, ERASED), what="the guard to enforce the erasure")
            await wait_until(lambda: refuses(guard, SUPPRESSED, replies.SUPPRESSED),
                             what="the guard to enforce the suppression")

            start = len(stream.getvalue())
            outcome = await send(guard.smtp_address, SENDER, RECIPIENTS, mail(to=", ".join(RECIPIENTS)))
            assert outcome.rcpt[ERASED.upper()] == str(replies.ERASED)
            assert outcome.rcpt[SUPPRESSED] == str(replies.SUPPRESSED)
            assert outcome.data is not None and outcome.data.startswith("250")
            assert sorted(sink.delivered_to()) == sorted([DELIVERED, IDN])
            await wait_until(lambda: "outcome=" in stream.getvalue()[start:], what="the outcome line")

            expected = {address: await audit_pseudonym(guard, address) for address in
                        (DELIVERED, SUPPRESSED, UNKNOWN, IDN)}
            sender = guard.backends.audit.pseudonymizer.pseudonym(SENDER)
        text = stream.getvalue()

    assert not contains_any(text, SPELLINGS), contains_any(text, SPELLINGS)
    assert all(p.startswith("h:") for p in expected.values())
    erased = f"erased:{receipt['tombstone_id']}"

    # aiosmtpd logs each RCPT ("recip: …"), in the guard and again in the sink: exactly the
    # audit trail's pseudonyms of this transaction's recipients, and no other.
    transaction = text[start:]
    named = set(PSEUDONYM.findall(" ".join(re.findall(r"recip: (\S+)", transaction))))
    assert named == {*expected.values(), erased}
    # ... and its raw command lines, where UTF-8 shows escaped in a bytes repr, say the same.
    assert set(re.findall(r">> b'RCPT TO:<([^>]+)>", transaction)) == named
    assert f"from=<{sender}>" in transaction  # the guard's outcome line
    assert f"sender: {sender}" in transaction
    if log_format == "json":
        assert all(json.loads(line)["message"] for line in text.splitlines())

    # From a log line to the audit trail: the pseudonym is what `audit list --recipient` takes.
    config_file = tmp_path / "smtp-guard.toml"
    for address, pseudonym in expected.items():
        records = await cli_json(config_file, "audit", "list", "--recipient", pseudonym)
        assert records and {r["recipient"] for r in records} == {pseudonym}, address
    records = await cli_json(config_file, "audit", "list", "--recipient", erased)
    assert records and {r["recipient"] for r in records} == {erased}


async def test_plaintext_addresses_are_logged_and_the_start_warns(tmp_path, sink):
    """``plaintext_addresses = true``: addresses as they are, and one warning at start that
    says what it costs."""
    with captured_logs(plaintext_addresses=True) as (stream, pseudonyms):
        assert pseudonyms is None
        async with guard_logging_through(tmp_path, sink, pseudonyms) as guard:
            outcome = await send(guard.smtp_address, SENDER, [DELIVERED, IDN], mail(to=DELIVERED))
            assert outcome.data is not None and outcome.data.startswith("250")
            await wait_until(lambda: "outcome=" in stream.getvalue(), what="the outcome line")
        text = stream.getvalue()

    assert f"from=<{SENDER}>" in text
    assert f"recip: {DELIVERED}" in text and f"recip: {IDN}" in text
    assert "recip: h:" not in text and "from=<h:" not in text
    warnings = [line for line in text.splitlines() if PLAINTEXT_WARNING in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0]
    assert "BREAKS THE ERASURE GUARANTEE" in PLAINTEXT_WARNING


async def test_a_probe_before_and_after_erasure_is_logged_under_the_new_name(tmp_path, sink):
    """The same address is ``h:…`` while it is live and ``erased:<id>`` from the moment the
    running guard knows of its erasure."""
    with captured_logs() as (stream, pseudonyms):
        async with guard_logging_through(tmp_path, sink, pseudonyms) as guard:
            assert (await rcpt_reply(guard, ERASED)).startswith("250")
            live = guard.backends.audit.pseudonymizer.pseudonym(ERASED)
            assert f"recip: {live}" in stream.getvalue()
            receipt, = await cli_json(cli_config_for(tmp_path, guard), "erase", ERASED, "--ref", "DSR-1")
            await wait_until(lambda: refuses(guard, ERASED), what="the guard to enforce the erasure")
            assert f"recip: erased:{receipt['tombstone_id']}" in stream.getvalue()
    assert ERASED not in stream.getvalue()


async def test_serve_logs_pseudonyms_from_its_first_message(tmp_path, sink):
    """``smtp-guard serve`` as a process, its stderr as journald would get it: the wiring in
    serve_forever hands the pseudonymizer to the log filter before the first mail is taken."""
    config_file = tmp_path / "guard.toml"
    config_file.write_text(
        f'[smtp]\nlisten = "127.0.0.1:0"\nhostname = "guard.test"\n\n[metrics]\nlisten = "127.0.0.1:0"\n\n'
        f'[store]\n{store_toml(tmp_path / "data" / "guard.sqlite3")}\n'
        f'[upstream]\nmode = "smtp"\nhost = "127.0.0.1"\nport = {sink.port}\n\n[logging]\nlevel = "debug"\n')
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from smtp_guard.cli.main import main; main()", "serve", "--config", str(config_file),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=stderr)
    try:
        def listening() -> tuple[str, int] | None:
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", stderr_path.read_text("utf-8"))
            if process.returncode is not None:
                raise AssertionError(stderr_path.read_text("utf-8"))
            return ("127.0.0.1", int(found.group(1))) if found else None

        address = await wait_until(listening, timeout=20, what="smtp-guard serve to listen")
        outcome = await send(address, SENDER, [DELIVERED, IDN], mail(to=DELIVERED))
        assert outcome.data is not None and outcome.data.startswith("250")
        await wait_until(lambda: "outcome=" in stderr_path.read_text("utf-8"), what="the outcome line")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 20)
    text = stderr_path.read_text("utf-8")
    assert "smtp-guard stopped" in text
    assert not contains_any(text, SPELLINGS), contains_any(text, SPELLINGS)
    assert re.search(r"from=<h:[0-9a-f]{16}> relayed=2 ", text)
    assert WITHHELD not in text


# --- the filter alone ----------------------------------------------------------------------------

@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return create_key_ring(tmp_path / "erasure.key")


@pytest.fixture
def pseudonymizer(ring: KeyRing) -> Pseudonymizer:
    tombstone = Tombstone(7, b"", ring.primary.id, "DSR-7", 0.0)
    normalizer = AddressNormalizer(AddressConfig())
    erased_token = Pseudonymizer(normalizer, lambda: ring).token("erased@example.com")
    return Pseudonymizer(normalizer, lambda: ring, lambda token: tombstone if token == erased_token else None)


@contextmanager
def logged(pseudonymizer: Pseudonymizer | None, log_format: str = "text") -> Iterator[io.StringIO]:
    with captured_logs(format=log_format) as (stream, pseudonyms):
        assert pseudonyms is not None
        if pseudonymizer is not None:
            pseudonyms.use(pseudonymizer)
        yield stream


LOG = logging.getLogger("smtp_guard.test")


def test_before_the_key_ring_is_loaded_addresses_are_withheld() -> None:
    with logged(None) as stream:
        LOG.info("txn=1 from=<%s> to %s", "jane@example.com", '"jane doe"@[192.0.2.1]')
    assert stream.getvalue().rstrip().endswith(f"txn=1 from=<{WITHHELD}> to {WITHHELD}")


@pytest.mark.parametrize(("spelling", "same_as"), [
    ("jörg@bücher.example", "jörg@bücher.example"),
    ("JÖRG@xn--bcher-kva.example", "jörg@bücher.example"),  # A-label and case: one person
    ("Jane+news@Example.COM", "jane@example.com"),
    ('"jane"@example.com', "jane@example.com"),  # quoting that is not needed (RFC 5321 4.1.2)
    ('"jane doe"@example.com', '"jane doe"@example.com'),
    ('"a\\"b"@example.com', '"a\\"b"@example.com'),
    ("postmaster@[192.0.2.1]", "postmaster@[192.0.2.1]"),
    ("root@localhost", "root@localhost"),
    ("ann@пример.рф", "ann@пример.рф"),
])
def test_each_spelling_becomes_the_pseudonym_of_its_address(pseudonymizer, spelling, same_as) -> None:
    with logged(pseudonymizer) as stream:
        LOG.warning("550 5.1.1 <%s>: unknown user", spelling)
    expected = pseudonymizer.pseudonym(same_as)
    assert stream.getvalue().rstrip().endswith(f"550 5.1.1 <{expected}>: unknown user")
    assert spelling not in stream.getvalue() and "@" not in stream.getvalue()


def test_utf8_escaped_in_a_bytes_repr_gets_the_pseudonym_of_the_address(pseudonymizer) -> None:
    with logged(pseudonymizer) as stream:
        LOG.info("%r >> %r", ("127.0.0.1", 5000), "RCPT TO:<jörg@bücher.example>".encode())
    expected = pseudonymizer.pseudonym("jörg@bücher.example")
    assert stream.getvalue().rstrip().endswith(f">> b'RCPT TO:<{expected}>'")


def test_an_erased_address_is_its_erasure(pseudonymizer) -> None:
    with logged(pseudonymizer) as stream:
        LOG.info("to=<%s> and <%s>", "Erased@Example.com", "erased+x@example.com")
    assert stream.getvalue().rstrip().endswith("to=<erased:7> and <erased:7>")


def test_exception_text_and_traceback_source_lines_are_redacted(pseudonymizer) -> None:
    def refuse(recipient: str) -> None:
        raise ValueError(f"550 5.1.1 <{recipient}>: unknown user")

    with logged(pseudonymizer) as stream:
        try:
            try:
                refuse("jane@example.com")
            except ValueError as error:
                raise RuntimeError("relay to bob@example.org failed") from error
        except RuntimeError:
            LOG.exception("hold release failed for carol@example.net")
    text = stream.getvalue()
    assert "Traceback" in text and "ValueError" in text and 'refuse("' in text  # the traceback is there
    assert not contains_any(text, ["jane@", "bob@", "carol@", "@example"])
    assert pseudonymizer.pseudonym("jane@example.com") in text
    assert pseudonymizer.pseudonym("bob@example.org") in text


def test_stack_info_is_redacted(pseudonymizer) -> None:
    with logged(pseudonymizer) as stream:
        LOG.info("to %s", "jane@example.com", stack_info=True)
    assert "Stack (most recent call last)" in stream.getvalue()
    assert "jane@" not in stream.getvalue()


def test_json_fields_and_exception_are_redacted(pseudonymizer) -> None:
    with logged(pseudonymizer, "json") as stream:
        try:
            raise KeyError("jane@example.com")
        except KeyError:
            LOG.error("relay failed", exc_info=True, extra={"fields": {
                "rcpt": "jane@example.com", "cc": ["bob@example.org", ("carol@example.net",)],
                "jane@example.com": "as a key", "size": 12, "held": False, "error": ValueError("<ann@example.com>"),
            }})
    entry = json.loads(stream.getvalue())
    jane, bob = pseudonymizer.pseudonym("jane@example.com"), pseudonymizer.pseudonym("bob@example.org")
    assert entry["rcpt"] == jane and entry["cc"] == [bob, [pseudonymizer.pseudonym("carol@example.net")]]
    assert entry[jane] == "as a key" and entry["size"] == 12 and entry["held"] is False
    assert entry["error"] == f"<{pseudonymizer.pseudonym('ann@example.com')}>"
    assert "KeyError" in entry["exception"] and jane in entry["exception"]
    assert "@" not in stream.getvalue()


def test_text_without_addresses_is_unchanged(pseudonymizer) -> None:
    line = "txn=3f2a client=127.0.0.1 from=<> relayed=1 size=12 outcome=relayed reply='250 2.0.0 OK' @retry x @ y"
    with logged(pseudonymizer) as stream:
        LOG.info("%s", line)
    assert stream.getvalue().rstrip().endswith(line)


def test_arguments_that_do_not_fit_the_format_are_redacted_not_printed(pseudonymizer, capsys) -> None:
    with logged(pseudonymizer) as stream:
        LOG.info("%d recipients", "jane@example.com")
    assert "jane@" not in stream.getvalue() + capsys.readouterr().err
    assert pseudonymizer.pseudonym("jane@example.com") in stream.getvalue()


def test_a_failing_pseudonymizer_withholds_the_address_and_never_breaks_the_caller(ring) -> None:
    def broken_ring() -> KeyRing:
        raise OSError("key file unreadable")

    with logged(Pseudonymizer(AddressNormalizer(AddressConfig()), broken_ring)) as stream:
        LOG.info("to <%s>", "jane@example.com")
    assert stream.getvalue().rstrip().endswith(f"to <{WITHHELD}>")

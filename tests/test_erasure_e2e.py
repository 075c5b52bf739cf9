"""Erasure end to end (docs/design.md, first incident; "Erasure is verifiable").

Real loopback SMTP, real SQLite files (or PostgreSQL in that run), the real CLI: a running
guard with traffic history for an address (audit decisions, suppression entries, held mail, sandbox captures), then
``smtp-guard erase``. Afterwards no byte of any file in the data directory spells the
address, the running guard refuses it in every spelling while its co-recipients are
delivered, the attempt is reported as evidence, and the receipts name no address.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sqlite3

import aiohttp
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from smtp_guard import replies
from smtp_guard.addresses import key_hash
from smtp_guard.app import Guard, open_admin_context
from smtp_guard.audit_model import AuditFilter
from smtp_guard.config import Config
from smtp_guard.services import erasure, propagation

from conftest import ON_POSTGRESQL, wait_until
from erasure_support import (
    HOLD_LISTS,
    SENDER,
    accepts,
    cli,
    cli_config_for,
    cli_json,
    contains_any,
    data_files,
    mail,
    occurrences,
    refuses,
    write_cli_config,
)
from smtp_client import send

OTHER = "bob@example.org"
HELD_OTHER = "carol@example.org"

GMAIL = pytest.param(
    "Jane.Doe@gmail.com",
    ["Jane.Doe@gmail.com", "JANE.DOE+news@googlemail.com", "j.anedoe+x@GMAIL.com"],
    ["Jane.Doe@gmail.com", "JANE.DOE@GMAIL.COM", "jane.doe+news@googlemail.com", "janedoe@gmail.com",
     "jane.doe@googlemail.com", "janedoe@googlemail.com", "j.anedoe+x@gmail.com", "jane.doe@", "janedoe@",
     "j.anedoe"],
    id="gmail",
)
IDN = pytest.param(
    "jane@bücher.example",
    ["jane@bücher.example", "Jane+x@BÜCHER.example", "JANE@xn--bcher-kva.example"],
    ["jane@bücher.example", "jane@BÜCHER.example", "JANE@BÜCHER.EXAMPLE", "jane+x@bücher.example",
     "jane@xn--bcher-kva.example", "jane+x@xn--bcher-kva.example", "@bücher.example", "@BÜCHER.example",
     "@xn--bcher-kva.example"],
    id="idn",
)
PLAIN_SPELLINGS = ["jane@example.com", "JANE@EXAMPLE.COM", "jane+x@example.com", "Jane@Example.com", "jane@"]


def on_list(guard: Guard, address: str) -> str | None:
    return guard.enforcement.index.lookup_address(key_hash(guard.backends.normalizer.key(address)))


async def scrape(guard: Guard) -> dict[str, float]:
    assert guard.metrics_address is not None
    host, port = guard.metrics_address
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{host}:{port}/metrics") as response:
            assert response.status == 200
            text = await response.text()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if not sample.labels}


def audit_rows(config: Config) -> list[tuple[object, ...]]:
    """The audit table exactly as stored, read with a separate connection."""
    query = "SELECT time, kind, verdict, rule, reason, txn_id, client, sender, recipient, actor FROM audit"
    if config.store.is_postgresql:
        with psycopg.connect(config.store.url) as pg:
            return list(pg.execute(query).fetchall())
    with contextlib.closing(sqlite3.connect(config.store.path)) as connection:
        return connection.execute(query).fetchall()


# --- 1. no copy left anywhere ----------------------------------------------------------------------

@pytest.mark.parametrize(("address", "variants", "spellings"), [GMAIL, IDN])
async def test_erase_leaves_no_copy_in_any_file_of_the_data_directory(start_guard, sink, tmp_path, address,
                                                                      variants, spellings):
    """Suppressed, mailed, held (alone and with someone else) and captured in the sandbox —
    after ``erase`` no file under the data directory holds any spelling of the address, verify
    says so, the shared hold keeps its other recipient and the solo hold is gone."""
    guard = await start_guard(lists=HOLD_LISTS)
    sandbox = await start_guard(lists=HOLD_LISTS, upstream={"mode": "sandbox"})
    config_file = cli_config_for(tmp_path, guard)
    data_dir = guard.config.store.data_dir
    maildir = data_dir / "sandbox" / "new"

    # The sandbox captures one message to the address and one to someone else only.
    captured = await send(sandbox.smtp_address, SENDER, [variants[0], OTHER], mail(to=variants[0]))
    assert captured.data == str(replies.SANDBOX_CAPTURED)
    assert (await send(sandbox.smtp_address, SENDER, [OTHER], mail(to=OTHER, subject="Other"))).data \
        == str(replies.SANDBOX_CAPTURED)
    assert len(list(maildir.iterdir())) == 2

    # Mailed through the real upstream: decisions in the audit trail. (An A-label spelling:
    # the SMTP upstream client cannot relay a U-label recipient yet, see relay/pool.py.)
    ascii_variant = next(v for v in variants if v.isascii())
    relayed = await send(guard.smtp_address, SENDER, [ascii_variant, OTHER], mail(to=ascii_variant, subject="First"))
    assert relayed.data is not None and relayed.data.startswith("250")
    assert sink.delivered_to() == [ascii_variant, OTHER]

    # Put on the hold list by the CLI: one message held for it and carol, one for it alone.
    await cli(config_file, "suppress", "add", address, HELD_OTHER, "--list", "manual", "--reason", "review")
    await wait_until(lambda: on_list(guard, address) == "manual" and on_list(guard, HELD_OTHER) == "manual",
                     what="the running guard to load the hold-list entries")
    shared = await send(guard.smtp_address, SENDER, [variants[1], HELD_OTHER, OTHER],
                        mail(to="undisclosed-recipients:;", subject="Shared"))
    assert shared.rcpt == {variants[1]: str(replies.RECIPIENT_OK), HELD_OTHER: str(replies.RECIPIENT_OK),
                           OTHER: shared.rcpt[OTHER]}
    assert shared.data is not None and shared.data.startswith("250")
    solo = await send(guard.smtp_address, SENDER, [variants[2]], mail(to=variants[2], subject="Solo"))
    assert solo.data == str(replies.QUEUED_HELD)
    holds = {frozenset(r.address for r in m.recipients): m.id for m in await guard.backends.holds.list()}
    shared_id, solo_id = holds[frozenset({variants[1], HELD_OTHER})], holds[frozenset({variants[2]})]

    # And unsubscribed (a reject list, ahead of manual): later mail is refused.
    await cli(config_file, "suppress", "add", variants[1], "--list", "unsubscribed")
    await wait_until(lambda: refuses(guard, variants[0], replies.SUPPRESSED),
                     what="the running guard to enforce the unsubscription")
    refused = await send(guard.smtp_address, SENDER, [variants[2], OTHER], mail(to=OTHER, subject="Third"))
    assert refused.rcpt[variants[2]] == str(replies.SUPPRESSED)
    await guard.enforcement.audit.flush()
    await sandbox.enforcement.audit.flush()

    # The grep does find the address before the erasure (in the store and the sandbox).
    before = occurrences(data_dir, spellings)
    if not ON_POSTGRESQL:  # (a PostgreSQL store's bytes are not in the data directory: verify reads its tables)
        assert {path for path, _ in before} & {"guard.sqlite3", "guard.sqlite3-wal"}, before
    assert any(path.startswith("sandbox/") for path, _ in before), before

    unproven = await cli(config_file, "erase", "verify", address, exit_code=1)
    assert "NOT ENFORCED" in unproven.output and "COPIES FOUND" in unproven.output
    assert f": {variants[1]}\n" in unproven.output  # the held recipient, as the client spelled it

    result = await cli(config_file, "erase", address, "--ref", "DSR-2026-0042")
    assert "Erased under DSR-2026-0042" in result.output
    assert not contains_any(result.output, spellings)

    files = data_files(data_dir)
    assert data_dir / "erasure.key" in files and (ON_POSTGRESQL or data_dir / "guard.sqlite3" in files)
    assert occurrences(data_dir, spellings) == []

    verified = await cli(config_file, "erase", "verify", address)
    assert "ENFORCED" in verified.output and "NO COPIES" in verified.output, verified.output

    # The shared hold lost the erased recipient and still holds carol; the solo hold is gone.
    shared_message = await guard.backends.holds.get(shared_id)
    assert shared_message is not None
    assert {r.address: r.state for r in shared_message.recipients} == {HELD_OTHER: "held"}
    assert await guard.backends.holds.get(solo_id) is None
    shown = await cli(config_file, "hold", "show", shared_id)
    assert HELD_OTHER in shown.output and not contains_any(shown.output, spellings)
    listed = await cli(config_file, "hold", "list")
    assert shared_id in listed.output and solo_id not in listed.output

    # Only the sandbox capture that involved the address was shredded.
    assert len(list(maildir.iterdir())) == 1
    # Both running guards refuse it now (the sandbox one too: same store).
    for running in (guard, sandbox):
        await wait_until(lambda: refuses(running, variants[1]), what="the running guard to enforce the erasure")


async def test_held_message_still_addressed_to_others_is_reported_by_verify(start_guard, sink, tmp_path):
    """A held message for someone else that *mentions* the erased address keeps its bytes (its
    recipient must not lose mail); verify finds that copy, exits 1 and says what to do."""
    guard = await start_guard(lists=HOLD_LISTS)
    config_file = cli_config_for(tmp_path, guard)
    await cli(config_file, "suppress", "add", HELD_OTHER, "--list", "manual")
    await wait_until(lambda: on_list(guard, HELD_OTHER) == "manual", what="the hold-list entry")
    outcome = await send(guard.smtp_address, SENDER, [HELD_OTHER], mail(to=f"{HELD_OTHER}, Jane@Example.com"))
    assert outcome.data == str(replies.QUEUED_HELD)

    await cli(config_file, "erase", "jane@example.com", "--ref", "DSR-7")
    verified = await cli(config_file, "erase", "verify", "jane@example.com", exit_code=1)
    assert "ENFORCED" in verified.output
    assert "COPIES FOUND: 2 plaintext occurrence(s)" in verified.output  # its To: header and body
    assert "Jane@Example.com" in verified.output and "smtp-guard hold list" in verified.output


async def test_verify_finds_the_address_packed_inside_sqlite_rows(start_guard, sink, tmp_path):
    """SQLite stores column values back to back ("addressjane@example.commanual"): verify
    must still see a suppression entry and a held recipient in the database and its WAL."""
    guard = await start_guard(lists=HOLD_LISTS)
    config_file = cli_config_for(tmp_path, guard)
    await cli(config_file, "suppress", "add", "jane@example.com", "--list", "manual")
    await wait_until(lambda: on_list(guard, "jane@example.com") == "manual", what="the hold-list entry")
    held = await send(guard.smtp_address, SENDER, ["Jane+x@Example.com"], mail(to="undisclosed-recipients:;"))
    assert held.data == str(replies.QUEUED_HELD)

    verified = await cli(config_file, "erase", "verify", "jane@example.com", exit_code=1)
    assert "COPIES FOUND" in verified.output
    found = {line.rsplit(": ", 1)[1] for line in verified.output.splitlines() if " at byte " in line}
    assert found == {"jane@example.com", "Jane+x@Example.com"}
    assert not [line for line in verified.output.splitlines() if " at byte " in line and "sandbox" in line]

    await cli(config_file, "erase", "jane@example.com", "--ref", "DSR-8")
    verified = await cli(config_file, "erase", "verify", "JANE@example.com")
    assert "ENFORCED" in verified.output and "NO COPIES" in verified.output


# --- 2. enforcement and evidence ---------------------------------------------------------------------

async def test_erased_address_refused_in_every_spelling_and_reported(start_guard, sink, tmp_path):
    guard = await start_guard()
    config_file = cli_config_for(tmp_path, guard)
    assert await accepts(guard, "jane@example.com")

    receipt, = await cli_json(config_file, "erase", "jane@example.com", "--ref", "DSR-2026-0042")
    await wait_until(lambda: refuses(guard, "JANE+x@Example.com"),
                     what="the running guard to enforce the erasure within reload_interval")
    before = (await scrape(guard))["smtp_guard_erasure_attempts_total"]

    outcome = await send(guard.smtp_address, SENDER,
                         ["JANE+x@Example.com", OTHER, "jane@EXAMPLE.com", "carol@example.net"],
                         mail(to="undisclosed-recipients:;", campaign="spring-sale"))
    assert outcome.rcpt == {
        "JANE+x@Example.com": str(replies.ERASED), OTHER: outcome.rcpt[OTHER],
        "jane@EXAMPLE.com": str(replies.ERASED), "carol@example.net": outcome.rcpt["carol@example.net"],
    }
    assert outcome.data is not None and outcome.data.startswith("250")
    assert sink.delivered_to() == [OTHER, "carol@example.net"]

    after = (await scrape(guard))["smtp_guard_erasure_attempts_total"]
    assert after == before + 2

    result = await cli(config_file, "erase", "attempts", "--json")
    attempts = [a for a in json.loads(result.stdout) if a["stream"] == "spring-sale"]
    assert len(attempts) == 2
    for attempt in attempts:
        assert attempt["client"] == "127.0.0.1"
        assert attempt["sender"] == SENDER
        assert attempt["reference"] == "DSR-2026-0042"
        assert attempt["tombstone_id"] == receipt["tombstone_id"]
    assert len({a["txn_id"] for a in attempts}) == 1
    assert not contains_any(result.stdout, PLAIN_SPELLINGS)
    table = await cli(config_file, "erase", "attempts", "--ref", "DSR-2026-0042")
    assert "spring-sale" in table.output and not contains_any(table.output, PLAIN_SPELLINGS)


# --- 3. receipts ------------------------------------------------------------------------------------

async def test_receipts_name_what_was_purged_and_never_the_address(start_guard, sink, tmp_path):
    guard = await start_guard(lists=HOLD_LISTS)
    config_file = cli_config_for(tmp_path, guard)
    await cli(config_file, "suppress", "add", "jane@example.com", "--list", "manual")
    await wait_until(lambda: on_list(guard, "jane@example.com") == "manual", what="the hold-list entry")
    mixed = await send(guard.smtp_address, SENDER, ["Jane+a@example.com", OTHER], mail(to=OTHER))
    assert mixed.rcpt["Jane+a@example.com"] == str(replies.RECIPIENT_OK)
    assert mixed.data is not None and mixed.data.startswith("250")
    assert sink.delivered_to() == [OTHER]
    solo = await send(guard.smtp_address, SENDER, ["jane@Example.com"], mail(to="jane@Example.com"))
    assert solo.data == str(replies.QUEUED_HELD)
    await cli(config_file, "suppress", "add", "jane@example.com", "--list", "unsubscribed")
    await wait_until(lambda: refuses(guard, "jane@example.com", replies.SUPPRESSED), what="the unsubscription")
    await guard.enforcement.audit.flush()

    erased = await cli(config_file, "erase", "jane@example.com", "--ref", "DSR-2026-0042", "--json")
    assert not contains_any(erased.stdout, PLAIN_SPELLINGS)
    receipt, = json.loads(erased.stdout)
    purged = {(p["store"], p["what"]): p["count"] for p in receipt["purged"]}
    assert purged[("suppressions", "entries")] == 2
    assert purged[("suppression_change_log", "rows")] >= 1
    assert purged[("hold_queue", "recipients")] == 2
    assert purged[("hold_queue", "messages_deleted")] == 2
    assert purged[("audit", "pseudonymized_records")] >= 5  # two admin adds, two holds, one reject
    assert purged[("sandbox", "files")] == 0
    assert receipt["reference"] == "DSR-2026-0042"
    assert isinstance(receipt["tombstone_id"], int)
    if ON_POSTGRESQL:  # what PostgreSQL may still hold, for the operator to act on
        assert set(receipt["storage"]) == {"vacuum", "wal", "backups", "replicas"}
        assert "archived WAL" in receipt["storage"]["wal"]
    else:
        assert receipt["storage"]["wal"] == "checkpointed and truncated"

    listed = await cli(config_file, "erase", "receipts", "--json")
    assert [r["receipt"] for r in json.loads(listed.stdout)] == [receipt["receipt"]]
    assert not contains_any(listed.stdout, PLAIN_SPELLINGS)
    shown = await cli(config_file, "erase", "receipt", receipt["receipt"])
    assert json.loads(shown.stdout) == receipt
    table = await cli(config_file, "erase", "receipts")
    assert receipt["receipt"] in table.output and "DSR-2026-0042" in table.output
    missing = await cli(config_file, "erase", "receipt", "0000000000000000", exit_code=1)
    assert "smtp-guard erase receipts" in missing.output

    # Erasing again is idempotent: same tombstone, a new receipt with nothing left to purge.
    again, = await cli_json(config_file, "erase", "JANE@example.com", "--ref", "DSR-2026-0042")
    assert again["tombstone_id"] == receipt["tombstone_id"]
    assert all(p["count"] == 0 for p in again["purged"])


# --- 4. erasure by token -------------------------------------------------------------------------------

async def test_erase_by_token_without_the_address(start_guard, sink, tmp_path):
    """The privacy team computes the token elsewhere (a fresh data dir); the guard's operator
    erases with the token alone: enforced by the running guard, and the entries purged."""
    elsewhere = write_cli_config(tmp_path / "privacy-team" / "smtp-guard.toml",
                                 tmp_path / "privacy-team" / "data" / "guard.sqlite3")
    printed = await cli(elsewhere, "erase", "token", "Jane.Doe+promo@GoogleMail.com")
    token = printed.output.split()[0]
    assert token == hashlib.sha256(b"janedoe@gmail.com").hexdigest()

    guard = await start_guard(lists=HOLD_LISTS)
    config_file = cli_config_for(tmp_path, guard)
    await cli(config_file, "suppress", "add", "jane.doe@gmail.com", "--list", "manual")
    await wait_until(lambda: on_list(guard, "janedoe@gmail.com") == "manual", what="the hold-list entry")
    held = await send(guard.smtp_address, SENDER, ["Jane.Doe@gmail.com"], mail(to=OTHER))
    assert held.data == str(replies.QUEUED_HELD)
    await cli(config_file, "suppress", "add", "JaneDoe+x@gmail.com", "--list", "unsubscribed")
    await wait_until(lambda: refuses(guard, "jane.doe@gmail.com", replies.SUPPRESSED), what="the unsubscription")
    await guard.enforcement.audit.flush()

    receipt, = await cli_json(config_file, "erase", "--token", token.upper(), "--ref", "DSR-2026-0043")
    purged = {(p["store"], p["what"]): p["count"] for p in receipt["purged"]}
    assert purged[("suppressions", "entries")] == 2
    assert purged[("hold_queue", "messages_deleted")] == 1
    assert purged[("audit", "pseudonymized_records")] >= 3

    for spelling in ("jane.doe@googlemail.com", "JANEDOE+news@gmail.com", "j.a.n.e.doe@gmail.com"):
        await wait_until(lambda: refuses(guard, spelling), what=f"the guard to refuse {spelling}")
    assert await accepts(guard, "jane.doe2@gmail.com")
    listed = await cli(config_file, "suppress", "list")
    assert "janedoe" not in listed.output
    assert occurrences(guard.config.store.data_dir, ["janedoe@", "jane.doe@", "JaneDoe+x@gmail.com"]) == []
    verified = await cli(config_file, "erase", "verify", "jane.doe@gmail.com")
    assert "ENFORCED" in verified.output and "NO COPIES" in verified.output


async def test_erase_rejects_what_is_neither_address_nor_token(start_guard, sink, tmp_path):
    guard = await start_guard()
    config_file = cli_config_for(tmp_path, guard)
    result = await cli(config_file, "erase", "not-an-address", "jane@example.com", "--ref", "DSR-9",
                       exit_code=1)
    assert "neither an address nor a 64-hex erasure token" in result.output
    assert "1 entry not erased" in result.output
    await wait_until(lambda: refuses(guard, "jane@example.com"), what="the good entry to be erased anyway")
    no_ref = await cli(config_file, "erase", "jane@example.com", "--ref", " ", exit_code=2)
    assert "needs a reference" in no_ref.output


# --- 6. audit minimization --------------------------------------------------------------------------

async def test_audit_trail_holds_pseudonyms_only_and_erase_replaces_them(start_guard, sink, tmp_path):
    guard = await start_guard(lists=HOLD_LISTS)
    config_file = cli_config_for(tmp_path, guard)
    recipients = ["jane@example.com", OTHER, "gone@example.net", "nouser@example.org", "held@example.org"]
    sink.permfail_rcpt.add("nouser@example.org")
    await cli(config_file, "suppress", "add", "gone@example.net", "--list", "unsubscribed")
    await cli(config_file, "suppress", "add", "held@example.org", "--list", "manual")
    await wait_until(lambda: refuses(guard, "gone@example.net", replies.SUPPRESSED), what="the unsubscription")
    await wait_until(lambda: on_list(guard, "held@example.org") == "manual", what="the hold-list entry")
    outcome = await send(guard.smtp_address, SENDER, ["Jane+a@Example.com", *recipients[1:]], mail(to=OTHER))
    assert outcome.rcpt["nouser@example.org"].startswith("550")
    assert outcome.data is not None and outcome.data.startswith("250")
    hold_id = (await guard.backends.holds.list())[0].id
    await cli(config_file, "hold", "release", hold_id)
    await wait_until(lambda: "held@example.org" in sink.delivered_to(), what="the release worker")
    await wait_until(lambda: guard.enforcement.audit.flush(), what="the audit flush")

    rows = audit_rows(guard.config)
    assert {row[1] for row in rows} >= {"decision", "admin", "delivery"}
    locals_ = [r.split("@")[0] for r in recipients]
    for row in rows:
        recipient = row[8]
        assert re.fullmatch(r"(h:[0-9a-f]{16})?", str(recipient)), row
        text = "|".join(str(value) for value in row if value != SENDER).lower()
        assert not [name for name in locals_ if f"{name}@" in text or f"{name}+" in text], row

    found = json.loads((await cli(config_file, "audit", "list", "--recipient", "JANE@example.com",
                                                "--json")).stdout)
    assert [r["verdict"] for r in found] == ["pass"]
    pseudonym = found[0]["recipient"]
    assert pseudonym.startswith("h:")

    receipt, = await cli_json(config_file, "erase", "jane@example.com", "--ref", "DSR-2026-0044")
    after = json.loads((await cli(config_file, "audit", "list", "--recipient", "jane@example.com",
                                                "--json")).stdout)
    assert after == []
    rows = audit_rows(guard.config)
    erased_label = f"erased:{receipt['tombstone_id']}"
    assert sum(1 for row in rows if row[8] == erased_label) == 1
    assert not [row for row in rows if pseudonym in "|".join(map(str, row))]
    # Other people's records keep their pseudonyms and stay findable.
    others = json.loads((await cli(config_file, "audit", "list", "--recipient", "gone@example.net",
                                                 "--json")).stdout)
    assert {"suppress.add", "reject"} <= {r["verdict"] for r in others}


async def test_records_a_running_guard_writes_after_the_erasure_carry_no_pseudonym(start_guard, sink, tmp_path):
    guard = await start_guard()
    config_file = cli_config_for(tmp_path, guard)
    # --wait: exit 3 unless the guard confirmed it, and it confirms only after its audit sweep.
    await cli(config_file, "erase", "jane@example.com", "--ref", "DSR-2026-0045", "--wait")
    assert await refuses(guard, "jane@example.com")  # in force when the command returns
    await guard.enforcement.audit.flush()
    assert json.loads((await cli(config_file, "audit", "list", "--recipient", "jane@example.com",
                                 "--json")).stdout) == []


async def test_a_guard_confirms_an_erasure_only_once_its_audit_records_are_swept(start_guard, sink):
    """A record the guard wrote under the person's pseudonym after the purge, but before it
    learned of the tombstone, is rewritten to ``erased:<id>`` before the guard confirms: when
    ``erase`` returns, the audit trail names the person by no pseudonym."""
    guard = await start_guard(store={"reload_interval": 60})  # only the change generation brings news
    async with open_admin_context(guard.config, actor="cli:ann") as ctx:
        [receipt] = await erasure.erase(ctx, [erasure.target_from_text(ctx, "jane@example.com")], "DSR-2026-0046")
        # Purged and tombstoned, not yet announced: the guard still accepts and audits the person.
        assert await accepts(guard, "jane@example.com")
        await guard.enforcement.audit.flush()
        [early] = await guard.backends.audit.query(AuditFilter(recipient="jane@example.com"))
        assert early.recipient.startswith("h:")
        result = await propagation.in_force(ctx.changes, guard.config.store.confirm_timeout)
    assert result.is_confirmed
    assert await guard.backends.audit.query(AuditFilter(recipient="jane@example.com")) == []
    [swept] = await guard.backends.audit.query(AuditFilter(recipient=f"erased:{receipt.tombstone_id}"))
    assert (swept.time, swept.verdict) == (early.time, early.verdict)

"""Several guard instances on one PostgreSQL store (docs/design.md, "Scale"), in every run.

Two ``Guard``s in one test, each with its own SMTP listener, share one database as two
instances behind a load balancer would: a change made through one instance's CLI is in force
on the other when the command returns; a held recipient is delivered once although both run
release workers. Then the operator's side: ``store migrate``, ``store copy`` from SQLite,
a wrong password at start, and the database going away and coming back mid-run.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import psycopg
import pytest
from psycopg import errors as pg_errors

from smtp_guard import replies
from smtp_guard.app import Guard
from smtp_guard.startup import StartupError
from smtp_guard.store.base import StoreBusy, StoreError, StoreFull
from smtp_guard.store.postgres.db import store_error
from smtp_guard.suppression_model import SuppressionEntry

from conftest import postgres_server, wait_until
from erasure_support import SENDER, accepts, cli, mail, refuses, write_cli_config
from postgres_server import PASSWORD_ROLE, PostgresServer, binaries
from sink import Sink
from smtp_client import message, send

Start = Callable[..., Awaitable[Guard]]
HOLD_LISTS = {"manual": {"action": "hold"}}


def store_for(tmp_path: Path, url: str | None = None, **settings: Any) -> dict[str, Any]:
    """``[store]`` overrides putting a guard on a PostgreSQL database (a fresh one by default),
    with its local files (the erasure key they share) in ``tmp_path/data``."""
    if url is None:
        url = postgres_server().database_for(f"{tmp_path}/instances")
    return {"url": url, "directory": str(tmp_path / "data"), **settings}


async def two_instances(start_guard: Start, tmp_path: Path, **overrides: Any) -> tuple[Guard, Guard]:
    store = store_for(tmp_path)
    first = await start_guard(store=store, **overrides)
    second = await start_guard(store=store, **overrides)
    assert first.smtp_address != second.smtp_address
    return first, second


async def test_a_suppression_added_through_one_instance_is_enforced_by_the_other(start_guard: Start,
                                                                                  tmp_path: Path) -> None:
    first, second = await two_instances(start_guard, tmp_path)
    config_file = write_cli_config(tmp_path / "a.toml", first.config)
    assert await accepts(second, "gone@example.com")
    result = await cli(config_file, "suppress", "add", "gone@example.com", "--list", "unsubscribed")
    assert "In force on 2 running guards." in result.stderr
    # No wait: the command returned, so both instances enforce it now.
    assert await refuses(second, "gone@example.com", replies.SUPPRESSED)
    assert await refuses(first, "gone@example.com", replies.SUPPRESSED)


async def test_an_erasure_through_one_instance_is_enforced_by_the_other_and_verified(
        start_guard: Start, sink: Sink, tmp_path: Path) -> None:
    first, second = await two_instances(start_guard, tmp_path, lists=HOLD_LISTS)
    await send(second.smtp_address, SENDER, ["jane@example.com"], mail("jane@example.com"))
    await first.backends.suppressions.add([SuppressionEntry("address", "jane@example.com", "manual")])
    config_file = write_cli_config(tmp_path / "a.toml", first.config)

    result = await cli(config_file, "erase", "jane@example.com", "--ref", "DSR-7")
    assert "In force on 2 running guards." in result.stderr
    assert "wal:" in result.output and "backups:" in result.output  # the receipt says what may remain
    assert await refuses(second, "jane@example.com")
    verified = await cli(config_file, "erase", "verify", "jane@example.com")
    assert "ENFORCED" in verified.output and "NO COPIES" in verified.output, verified.output
    assert f"nor any table of {first.config.store.location}" in verified.output


async def test_erase_verify_finds_a_copy_in_any_table(start_guard: Start, tmp_path: Path) -> None:
    guard = await start_guard(store=store_for(tmp_path))
    config_file = write_cli_config(tmp_path / "a.toml", guard.config)
    await cli(config_file, "erase", "jane@example.com", "--ref", "DSR-8")
    with psycopg.connect(guard.config.store.url, autocommit=True) as connection:
        connection.execute("INSERT INTO baselines VALUES ('Jane@Example.com', 1, 1, 0)")
    verified = await cli(config_file, "erase", "verify", "jane@example.com", exit_code=1)
    assert "COPIES FOUND: 1" in verified.output
    assert "postgresql:baselines.sender row (0,1) at byte 0: Jane@Example.com" in verified.output


async def test_a_release_is_delivered_once_although_both_instances_run_release_workers(
        start_guard: Start, sink: Sink, tmp_path: Path) -> None:
    first, second = await two_instances(start_guard, tmp_path, lists=HOLD_LISTS)
    recipients = [f"held{i}@example.com" for i in range(20)]
    config_file = write_cli_config(tmp_path / "a.toml", first.config)
    added = await cli(config_file, "suppress", "add", *recipients, "--list", "manual")
    assert "In force on 2 running guards." in added.stderr
    outcome = await send(first.smtp_address, SENDER, recipients[:10], message())
    assert outcome.data == str(replies.QUEUED_HELD)
    outcome = await send(second.smtp_address, SENDER, recipients[10:], message())
    assert outcome.data == str(replies.QUEUED_HELD)

    for held in await first.backends.holds.list():
        await cli(config_file, "hold", "release", held.id)

    await wait_until(lambda: len(sink.delivered_to()) >= len(recipients), timeout=20,
                     what="every released recipient to be delivered")
    await asyncio.sleep(1.0)  # both workers poll every 0.1 s: time for a second delivery to show up
    assert sorted(sink.delivered_to()) == sorted(recipients)


async def test_a_copied_sqlite_store_enforces_the_same(start_guard: Start, tmp_path: Path) -> None:
    sqlite_dir = tmp_path / "sqlite"
    config_file = tmp_path / "sqlite.toml"  # a SQLite store in every run, whatever the suite's engine
    config_file.write_text(f'[store]\npath = "{sqlite_dir / "guard.sqlite3"}"\n')
    await cli(config_file, "init")
    await cli(config_file, "suppress", "add", "gone@example.com", "@bounced.example", "--list", "manual")
    await cli(config_file, "erase", "jane@example.com", "--ref", "DSR-9")

    url = postgres_server().create_database("copy_target")
    copied = await cli(config_file, "store", "copy", "--from", f"sqlite://{sqlite_dir / 'guard.sqlite3'}",
                       "--to", url)
    assert "  suppressions: 2 rows" in copied.output and "  tombstones: 1 row" in copied.output
    again = await cli(config_file, "store", "copy", "--from", str(sqlite_dir / "guard.sqlite3"), "--to", url,
                      exit_code=1)
    assert "is not empty: suppressions (2 rows)" in again.output

    guard = await start_guard(store={"url": url, "directory": str(sqlite_dir)})
    assert await refuses(guard, "gone@example.com", replies.SUPPRESSED)
    assert await refuses(guard, "x@bounced.example", replies.SUPPRESSED)
    assert await refuses(guard, "jane@example.com")
    assert await accepts(guard, "other@example.com")


async def test_store_migrate_says_what_it_did(tmp_path: Path) -> None:
    url = postgres_server().create_database("migrate_target")
    config_file = tmp_path / "guard.toml"
    config_file.write_text(f'[store]\nurl = "{url}"\ndirectory = "{tmp_path / "data"}"\n')
    missing = await cli(config_file, "suppress", "list", exit_code=1)
    assert "has no smtp-guard schema" in missing.output and "smtp-guard store migrate" in missing.output
    first = await cli(config_file, "store", "migrate")
    assert first.output.startswith(f"PostgreSQL store at {url}: schema version 0 -> 1; applied 1 migration:\n  1: ")
    second = await cli(config_file, "store", "migrate")
    assert second.output == f"PostgreSQL store at {url}: schema version 1, up to date; nothing to do.\n"
    await cli(config_file, "suppress", "list")


async def test_a_wrong_password_stops_the_start_in_one_line_without_the_password(start_guard: Start,
                                                                                 tmp_path: Path) -> None:
    server = postgres_server()
    server.admin(f"DROP ROLE IF EXISTS {PASSWORD_ROLE}")
    server.admin(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD 'right-secret'")
    url = server.url(server.database_for(f"{tmp_path}/pw").rsplit("/", 1)[1], PASSWORD_ROLE, "wrong-secret")
    with pytest.raises(StartupError) as failure:
        await start_guard(store=store_for(tmp_path, url))
    text = str(failure.value)
    assert "\n" not in text and "wrong-secret" not in text
    assert text.startswith(f"[store] url postgresql://{PASSWORD_ROLE}:***@127.0.0.1:{server.port}/")
    assert "password authentication failed" in text


async def test_a_refused_connection_stops_the_start_naming_the_setting(start_guard: Start, tmp_path: Path) -> None:
    server = postgres_server()
    url = f"postgresql://postgres@127.0.0.1:{server.port + 1 if server.port < 65535 else 1}/nothing"
    with pytest.raises(StartupError, match=r"^\[store\] url postgresql://postgres@127\.0\.0\.1:\d+/nothing: "):
        await start_guard(store=store_for(tmp_path, url, busy_timeout="1s"))


@pytest.fixture
def own_server() -> Any:
    """A PostgreSQL cluster of this test's own, to stop and start."""
    bin_dir = binaries()
    if bin_dir is None:
        postgres_server()  # fails or skips with the reason
    assert bin_dir is not None
    server = PostgresServer(bin_dir)
    server.start()
    try:
        yield server
    finally:
        server.remove()


async def test_postgresql_stopped_mid_run_gives_451_then_the_guard_resumes(
        own_server: PostgresServer, start_guard: Start, sink: Sink, tmp_path: Path) -> None:
    # own_server first: it is stopped after the guard.
    url = own_server.create_database("guard")
    guard = await start_guard(store=store_for(tmp_path, url, busy_timeout="1s"), lists=HOLD_LISTS)
    await guard.backends.suppressions.add([SuppressionEntry("address", "held@example.com", "manual")])
    await guard.enforcement.reloader.refresh()
    assert (await send(guard.smtp_address, SENDER, ["held@example.com"], message())).data == str(replies.QUEUED_HELD)

    await asyncio.to_thread(own_server.stop)
    for _ in range(2):
        outcome = await send(guard.smtp_address, SENDER, ["held@example.com"], message())
        assert outcome.data == str(replies.STORE_UNAVAILABLE)  # never 250: nothing was stored
    await wait_until(lambda: not guard.ready, timeout=15, what="/readyz to report the store down")

    await asyncio.to_thread(own_server.start)
    started = time.monotonic()

    async def held_again() -> bool:
        outcome = await send(guard.smtp_address, SENDER, ["held@example.com"], message())
        return outcome.data == str(replies.QUEUED_HELD)

    await wait_until(held_again, timeout=30, interval=0.2, what="the guard to hold mail again")
    assert time.monotonic() - started < 30
    await wait_until(lambda: guard.ready, timeout=15, what="/readyz to report ready again")
    assert len(await guard.backends.holds.list()) == 2


async def test_the_password_may_come_from_a_pgpass_file(start_guard: Start, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The config names no password; libpq finds it in the file PGPASSFILE names (~/.pgpass)."""
    server = postgres_server()
    server.admin(f"DROP ROLE IF EXISTS {PASSWORD_ROLE}")
    server.admin(f"CREATE ROLE {PASSWORD_ROLE} LOGIN SUPERUSER PASSWORD 'from-pgpass'")
    database = server.database_for(f"{tmp_path}/pgpass").rsplit("/", 1)[1]
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{server.port}:{database}:{PASSWORD_ROLE}:from-pgpass\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    guard = await start_guard(store=store_for(tmp_path, server.url(database, PASSWORD_ROLE)))
    assert guard.ready or await wait_until(lambda: guard.ready, what="the guard to be ready")


def test_driver_errors_become_store_errors_without_the_password() -> None:
    url = "postgresql://guard:s3cret@db.internal/smtpguard"
    full = store_error(pg_errors.DiskFull("could not extend file: No space left on device"), url)
    assert isinstance(full, StoreFull)
    busy = store_error(pg_errors.LockNotAvailable("canceling statement due to lock timeout"), url)
    assert isinstance(busy, StoreBusy)
    lost = store_error(psycopg.OperationalError("connection to guard:s3cret@db.internal lost"), url)
    assert type(lost) is StoreError and "s3cret" not in str(lost)


async def test_the_store_metrics_count_calls_and_connections(start_guard: Start, tmp_path: Path) -> None:
    guard = await start_guard(store=store_for(tmp_path))
    await guard.backends.holds.stats()
    registry = guard.metrics.registry
    assert registry.get_sample_value("smtp_guard_store_query_duration_seconds_count", {"kind": "statement"})
    assert registry.get_sample_value("smtp_guard_store_pool_connections", {"state": "idle"}) is not None
    assert registry.get_sample_value("smtp_guard_store_pool_connections", {"state": "in_use"}) is not None


async def test_an_erasure_whose_vacuum_was_skipped_gives_no_receipt(start_guard: Start, tmp_path: Path) -> None:
    """A role that may write the tables but not VACUUM them (not their owner): PostgreSQL only
    warns and skips; the erasure then fails loudly instead of issuing a receipt that claims it."""
    guard = await start_guard(store=store_for(tmp_path))
    server = postgres_server()
    database = guard.config.store.url.rsplit("/", 1)[1]
    with psycopg.connect(guard.config.store.url, autocommit=True) as connection:
        connection.execute("DROP ROLE IF EXISTS guard_writer")
        connection.execute("CREATE ROLE guard_writer LOGIN")
        connection.execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO guard_writer")
    config_file = write_cli_config(tmp_path / "writer.toml", guard.config)
    config_file.write_text(config_file.read_text().replace(guard.config.store.url,
                                                           server.url(database, "guard_writer")))
    failed = await cli(config_file, "erase", "jane@example.com", "--ref", "DSR-10", exit_code=1)
    assert "VACUUM did not run on every purged table" in failed.output
    assert await guard.backends.erasure.receipts() == []

"""Shared fixtures: real peers on loopback, port 0, started and stopped by each test.

* ``sink`` — the fault-injecting aiosmtpd upstream (tests/sink.py);
* ``start_guard`` — ``await start_guard(**overrides)`` runs a Guard relaying to ``sink``;
* ``tls`` — a throwaway CA and server certificate (trustme), as files and SSL contexts;
* ``postfix_sink`` — Postfix's own ``smtp-sink``, for a second, independent upstream;
* ``redis_server`` — Debian's redis-server on a loopback high port (tests/redis_server.py);
* ``wait_until`` and ``make_config`` — also importable (``from conftest import wait_until``).

The store: SQLite files by default; with ``SMTP_GUARD_TEST_STORE=postgresql`` every test that
uses a store through ``make_config``, ``start_guard`` or ``store_toml`` runs on PostgreSQL
instead (one server per session, tests/postgres_server.py; a database of its own standing in
for each SQLite path). Tests of SQLite itself (files, modes, WAL, locks) are marked
``sqlite_only`` and skipped in that run. ``.ci/run`` runs the suite once per engine.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import pwd
import shutil
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Mapping

import pytest
import trustme

from smtp_guard.app import Guard
from smtp_guard.config import Config, build_config
from smtp_guard.store.sqlite.db import Database

from postgres_server import PostgresServer, binaries
from local_tools import free_port, installed, stop_process

TEST_STORE = os.environ.get("SMTP_GUARD_TEST_STORE", "sqlite")
if TEST_STORE not in ("sqlite", "postgresql"):
    raise RuntimeError(f"SMTP_GUARD_TEST_STORE={TEST_STORE!r}: write sqlite or postgresql")
ON_POSTGRESQL = TEST_STORE == "postgresql"
sqlite_only = pytest.mark.skipif(ON_POSTGRESQL, reason="tests the SQLite store itself (files, WAL, locks)")

STOP_LIMIT = 60.0  # seconds a test guard may take to stop (shutdown_grace is 30 s by default)

from sink import Sink

SMTP_SINK_PATHS = ("/usr/sbin/smtp-sink", "/usr/bin/smtp-sink")


# --- helpers -----------------------------------------------------------------------------------

async def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01,
                     what: str = "") -> Any:
    """Poll ``predicate`` (sync, or returning an awaitable) until it is truthy; return its value.

    Tests wait for a condition, never for a fixed time: fast when things work, and a clear
    failure naming the condition when they do not.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base``: tables merge, other values replace."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_postgres: PostgresServer | None = None


def postgres_server() -> PostgresServer:
    """The session's PostgreSQL server, started on first use (stopped at the session's end)."""
    global _postgres
    if _postgres is None:
        bin_dir = binaries()
        if bin_dir is None:
            reason = "the PostgreSQL server is not installed (apt-get install postgresql; .ci/run does this)"
            if os.environ.get("CI") or ON_POSTGRESQL:
                pytest.fail(f"{reason}, and this run needs it")
            pytest.skip(reason)
        server = PostgresServer(bin_dir)
        server.start()
        _postgres = server
    return _postgres


# SMTP_GUARD_TEST_LOOP=uvloop runs every in-process test on uvloop, the loop `smtp-guard serve`
# uses by default ([smtp] event_loop = "auto"); CI's PostgreSQL pass does (.ci/run). Guards the
# tests start as processes pick their loop from their config either way.
TEST_LOOP = os.environ.get("SMTP_GUARD_TEST_LOOP", "asyncio")


if TEST_LOOP == "uvloop":
    def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
        import uvloop
        return {"uvloop": uvloop.new_event_loop}
elif TEST_LOOP != "asyncio":
    raise pytest.UsageError(f"SMTP_GUARD_TEST_LOOP={TEST_LOOP!r}: use uvloop or asyncio")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _postgres is not None:
        _postgres.remove()


def store_settings(path: Path | str) -> dict[str, Any]:
    """``[store]`` settings for the store a test keeps at SQLite ``path``: that file, or in a
    PostgreSQL run a database of its own for that path, with the guard's files (erasure key,
    sandbox) in the same directory the file would be in."""
    if ON_POSTGRESQL:
        return {"url": postgres_server().database_for(str(path)), "directory": str(Path(path).parent)}
    return {"path": str(path)}


def store_toml(path: Path | str) -> str:
    """The same as lines for a ``[store]`` table of a config file (no header)."""
    return "".join(f'{key} = "{value}"\n' for key, value in store_settings(path).items())


def store_toml_of(config: Config) -> str:
    """``[store]`` lines naming the store a running guard's config uses."""
    if config.store.is_postgresql:
        return f'url = "{config.store.url}"\ndirectory = "{config.store.directory}"\n'
    return f'path = "{config.store.path}"\n'


def make_config(tmp_path: Path, upstream_port: int, **overrides: Any) -> Config:
    """A test Config: every listener on loopback port 0, fast intervals, store in ``tmp_path``,
    relaying to 127.0.0.1:``upstream_port``. Overrides are TOML-shaped and merge deeply::

        make_config(tmp_path, sink.port, smtp={"max_recipients": 2}, upstream={"tls": "starttls"})
    """
    data = {
        "smtp": {"listen": "127.0.0.1:0", "hostname": "guard.test"},
        "metrics": {"listen": "127.0.0.1:0"},
        "store": {"path": str(tmp_path / "data" / "guard.sqlite3"), "reload_interval": 0.1},
        "hold": {"poll_interval": 0.1},
        "audit": {"flush_interval": 0.1},
        "upstream": {"mode": "smtp", "host": "127.0.0.1", "port": upstream_port},
    }
    merged = _merge(data, overrides)
    # The test's store path, or its PostgreSQL stand-in; a url the test gives stays as it is.
    store = dict(merged["store"])
    path = store.pop("path")
    merged["store"] = store if "url" in store else {**store, **store_settings(path)}
    if merged["upstream"].get("mode") == "sandbox":  # a host beside the sandbox is refused
        merged["upstream"] = {k: v for k, v in merged["upstream"].items() if k not in ("host", "port")}
    return build_config(merged, "test")


def mode(path: Path) -> int:
    """A file's permission bits, e.g. 0o600."""
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0: whatever mode a file or directory ends up with, the code under test chose it."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def process_running(pid: int) -> bool:
    """Alive and not a zombie (an orphan is reaped by init, a child of ours by us)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """A real SQLite store file in ``tmp_path``, migrated and open."""
    async with Database(tmp_path / "guard.sqlite3") as database:
        yield database


@dataclass
class EngineStore:
    """The stores of one test store on this run's engine, and ``rows(sql)`` to read its tables
    as they are (a plain SELECT, the same on both engines)."""

    suppressions: Any
    holds: Any
    audit: Any
    breakers: Any
    erasure: Any
    changes: Any
    rows: Callable[[str], Awaitable[list[tuple[Any, ...]]]]


@asynccontextmanager
async def open_engine_store(path: Path, clock: Callable[[], float] = time.time,
                            busy_timeout: float = 5.0) -> AsyncIterator[EngineStore]:
    """The store at SQLite ``path`` — or, in a PostgreSQL run, its stand-in database — open,
    with ``clock`` in the stores that take one."""
    if ON_POSTGRESQL:
        from smtp_guard.store.postgres import audit, breakers, changes, db as postgres, erasure, holds, suppressions

        database = postgres.PostgresDatabase(postgres_server().database_for(str(path)), busy_timeout=busy_timeout)
        await database.open(migrate_schema=True)
        try:
            yield EngineStore(suppressions.PostgresSuppressionStore(database, clock), holds.PostgresHoldStore(database, clock),
                              audit.PostgresAuditStore(database), breakers.PostgresBreakerStore(database),
                              erasure.PostgresErasureStore(database), changes.PostgresChangeStore(database),
                              database.fetchall)
        finally:
            await database.close()
        return
    from smtp_guard.store.sqlite import audit as s_audit, breakers as s_breakers, changes as s_changes
    from smtp_guard.store.sqlite import erasure as s_erasure, holds as s_holds, suppressions as s_suppressions

    async with Database(path, busy_timeout) as sqlite:
        async def rows(sql: str) -> list[tuple[Any, ...]]:
            return [tuple(row) for row in await sqlite.fetchall(sql)]

        yield EngineStore(s_suppressions.SQLiteSuppressionStore(sqlite, clock), s_holds.SQLiteHoldStore(sqlite, clock),
                          s_audit.SQLiteAuditStore(sqlite), s_breakers.SQLiteBreakerStore(sqlite),
                          s_erasure.SQLiteErasureStore(sqlite), s_changes.SQLiteChangeStore(sqlite), rows)


class ManualClock:
    """A clock that moves only when the test moves it (inject it where code takes ``clock``)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., Awaitable[Any]]:
    return wait_until


@pytest.fixture(name="make_config")
def make_config_fixture() -> Callable[..., Config]:
    return make_config


# --- the upstream sink and the guard -----------------------------------------------------------

@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    """A fresh fault-injecting upstream for each test (faults are set on it by the test)."""
    async with Sink() as running:
        yield running


@asynccontextmanager
async def running_guard(tmp_path: Path, upstream_port: int, clock: Callable[[], float] = time.time,
                        **overrides: Any) -> AsyncIterator[Guard]:
    """A Guard on the test store in ``tmp_path/data``, stopped on the way out (for tests that
    stop and start guards on one store themselves, e.g. across a restart)."""
    guard = Guard(make_config(tmp_path, upstream_port, **overrides), clock=clock)
    try:
        await guard.start()
        yield guard
    finally:
        await guard.stop()


@pytest.fixture
async def start_guard(tmp_path: Path, sink: Sink) -> AsyncIterator[Callable[..., Awaitable[Guard]]]:
    """``guard = await start_guard(clock=..., **overrides)``: a running Guard relaying to ``sink``.

    Every guard started is stopped at teardown (stopping one twice is harmless). Guards
    started in one test share ``tmp_path/data`` unless given ``store={"path": ...}``.
    """
    started: list[Guard] = []

    async def start(clock: Callable[[], float] = time.time, **overrides: Any) -> Guard:
        guard = Guard(make_config(tmp_path, sink.port, **overrides), clock=clock)
        started.append(guard)
        await guard.start()
        return guard

    yield start
    for guard in reversed(started):
        try:
            async with asyncio.timeout(STOP_LIMIT):
                await guard.stop()
        except TimeoutError:
            # Say what the shutdown was waiting for, then fail: a guard that cannot stop is a bug.
            for task in asyncio.all_tasks():
                task.print_stack(file=sys.stderr)
            raise AssertionError(f"guard.stop() did not finish within {STOP_LIMIT}s (task stacks above)") from None


@pytest.fixture
async def start_admin(start_guard: Callable[..., Awaitable[Guard]]) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``admin = await start_admin(admin={...}, **overrides)``: a Guard with its admin listener on
    loopback and an HTTP client (tests/admin_client.py); the client closes at teardown."""
    from admin_client import AdminAPI, admin_overrides

    import aiohttp

    sessions: list[aiohttp.ClientSession] = []

    async def start(admin: Mapping[str, Any] | None = None, **overrides: Any) -> AdminAPI:
        guard = await start_guard(admin=admin_overrides(**(admin or {})), **overrides)
        http = aiohttp.ClientSession()
        sessions.append(http)
        return AdminAPI(guard, http)

    yield start
    for http in sessions:
        await http.close()


# --- TLS ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TLSFiles:
    """A throwaway CA and one server certificate (for localhost, 127.0.0.1, *.test names)."""

    ca: trustme.CA
    ca_file: Path
    cert_file: Path  # server certificate chain, PEM
    key_file: Path  # its private key, PEM
    client_context: ssl.SSLContext = field(repr=False)  # trusts only the CA

    def server_context(self) -> ssl.SSLContext:
        """A new server-side context with the certificate loaded (for a Sink or a listener)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


@pytest.fixture
def tls(tmp_path: Path) -> TLSFiles:
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1", "guard.test", "sink.test")
    directory = tmp_path / "tls"
    directory.mkdir()
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    client_context = ssl.create_default_context(cafile=str(ca_file))
    return TLSFiles(ca, ca_file, cert_file, key_file, client_context)


# --- Postfix smtp-sink -------------------------------------------------------------------------

@dataclass(frozen=True)
class PostfixMessage:
    """One transaction from smtp-sink's dump. smtp-sink stores text lines; ``content`` has
    CRLF line endings restored and is otherwise what the client sent (dot-unstuffed)."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes


@dataclass(frozen=True)
class PostfixSink:
    host: str
    port: int
    dump_file: Path

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def messages(self) -> list[PostfixMessage]:
        """Parse the dump file (``-D``, records separated by the ``-S`` marker line)."""
        if not self.dump_file.exists():
            return []
        return [_parse_dump_record(record) for record in self.dump_file.read_bytes().split(_DUMP_MARKER)[1:]]

    def delivered_to(self) -> list[str]:
        return [rcpt for message in self.messages() for rcpt in message.rcpt_tos]


_DUMP_MARKER = b"\x01\n"


def _envelope_address(args: bytes) -> str:
    """``<a@b.test> SIZE=12`` -> ``a@b.test``."""
    return args.split(b">", 1)[0].lstrip(b"<").decode("utf-8", "surrogateescape")


def _parse_dump_record(record: bytes) -> PostfixMessage:
    lines = record.split(b"\n")
    mail_from, rcpt_tos, index = "", [], 0
    while not lines[index].startswith(b"Received: "):
        name, _, value = lines[index].partition(b": ")
        if name == b"X-Mail-Args":
            mail_from = _envelope_address(value)
        elif name == b"X-Rcpt-Args":
            rcpt_tos.append(_envelope_address(value))
        index += 1
    index += 1
    while lines[index].startswith(b"\t"):  # the Received header's continuation lines
        index += 1
    body = lines[index:-2]  # smtp-sink appends an empty line after each message
    return PostfixMessage(mail_from, rcpt_tos, b"".join(line + b"\r\n" for line in body))


def _smtp_sink_binary() -> str:
    return installed(SMTP_SINK_PATHS, "smtp-sink", "postfix")


@pytest.fixture
async def postfix_sink(tmp_path: Path) -> AsyncIterator[PostfixSink]:
    """Postfix's ``smtp-sink`` on a free loopback port, dumping every transaction to a file.

    smtp-sink refuses to run as root without ``-u``; as root it runs as ``nobody``, which
    cannot reach pytest's private tmp_path, so its dump directory is then a fresh directory
    in the system temp dir owned by nobody (removed at teardown).
    """
    binary = _smtp_sink_binary()
    command = [binary]
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        dump_dir = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
        os.chown(dump_dir, nobody.pw_uid, nobody.pw_gid)
        command += ["-u", "nobody"]
    else:
        dump_dir = tmp_path / "smtp-sink"
        dump_dir.mkdir()
    port = free_port()
    running = PostfixSink("127.0.0.1", port, dump_dir / "dump")
    command += ["-D", str(running.dump_file), "-S", r"\001\n", "-h", "smtp-sink.test", f"127.0.0.1:{port}", "64"]
    stderr_path = tmp_path / "smtp-sink.stderr"
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        async def is_listening() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"smtp-sink exited with {process.returncode}: {stderr_path.read_text()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            writer.close()
            await writer.wait_closed()
            return True

        await wait_until(is_listening, what=f"smtp-sink listening on 127.0.0.1:{port}")
        yield running
    finally:
        stop_process(process, timeout=5)
        if os.geteuid() == 0:
            shutil.rmtree(dump_dir, ignore_errors=True)


def create_store(config_file: Path) -> None:
    """Create the store a config names, as the guard's first start would (``smtp-guard init``):
    admin commands never create one."""
    from click.testing import CliRunner

    from smtp_guard.cli.main import main

    result = CliRunner().invoke(main, ["init", "--config", str(config_file)], env={"SMTP_GUARD_CONFIG": None})
    assert result.exit_code == 0, result.output


# --- DNS ---------------------------------------------------------------------------------------

@pytest.fixture
def dns_server() -> Iterator[Callable[..., Any]]:
    """``server = dns_server(Zone(txt=..., mx=..., a=...))``: dnsmasq on loopback serving exactly
    that zone (tests/dns_server.py); stopped at teardown. ``server.address`` goes into
    ``[dns] servers``."""
    from dns_server import DNSServer, Zone

    started: list[DNSServer] = []

    def start(zone: Zone | None = None) -> DNSServer:
        server = DNSServer(zone or Zone()).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# --- Redis -------------------------------------------------------------------------------------

@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A running redis-server of this test's own (tests/redis_server.py): ``redis_server.url``
    goes into ``[counters] url``; stopped at teardown."""
    from redis_server import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()

"""A real PostgreSQL server for the tests: Debian's binaries, our own cluster in a temporary
directory, on a free loopback port, started once per test session; a fresh database per
test (``database_for``).

initdb refuses to run as root, so as root the cluster belongs to ``nobody`` (runuser) and
lives in a directory of its own in the system temp dir. ``fsync=off``: the tests never pull
the plug, and every commit would otherwise wait for the disk.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from local_tools import free_port

SUPERUSER = "postgres"
PASSWORD_ROLE = "guard_with_password"


def binaries() -> Path | None:
    """The newest installed server's bin directory (/usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """One cluster: ``start()``, ``stop()`` (and start again: the fault tests do), ``url(db)``."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="smtp-guard-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._owner = "nobody" if os.geteuid() == 0 else None
        if self._owner is not None:
            user = pwd.getpwnam(self._owner)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-locale",
                  "--no-sync")
        # Every role logs in without a password, except PASSWORD_ROLE: the tests of a wrong one.
        hba = self.data / "pg_hba.conf"
        hba.write_text(f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        self._databases: set[str] = set()

    def _run(self, program: str, *arguments: str) -> None:
        command = [str(self.bin_dir / program), *arguments]
        if self._owner is not None:
            command = ["runuser", "-u", self._owner, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, cwd=self.root)
        if result.returncode != 0:
            raise RuntimeError(f"{program} failed ({result.returncode}): {result.stderr or result.stdout}")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=on -c full_page_writes=off -c max_connections=500 "
                   "-c shared_buffers=32MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w",
                  "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", user: str = SUPERUSER, password: str | None = None) -> str:
        secret = f":{password}" if password is not None else ""
        return f"postgresql://{user}{secret}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(sql)  # type: ignore[arg-type]

    def create_database(self, name: str) -> str:
        """A new, empty database (dropped first if a previous run left one); its URL."""
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.admin(f'CREATE DATABASE "{name}"')
        self._databases.add(name)
        return self.url(name)

    def database_for(self, key: str) -> str:
        """The database standing in for one SQLite store path: created empty on first use in
        this session, the same one after (two guards of one test share a store by path)."""
        name = "t_" + hashlib.sha256(key.encode()).hexdigest()[:24]
        if name not in self._databases:
            return self.create_database(name)
        return self.url(name)

    def drop(self, key: str) -> None:
        name = "t_" + hashlib.sha256(key.encode()).hexdigest()[:24]
        if name in self._databases:
            self._databases.discard(name)
            self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

"""The systems a benchmark runs side by side on loopback, shared by ``relay_vs_postfix.py`` and
``fair_peer.py``: Postfix's ``smtp-sink`` as the common upstream, a private Postfix instance
(after-queue, or before-queue with ``smtpd_proxy_filter``), and ``smtp-guard serve`` from this
checkout; plus what is measured about a process tree (CPU including reaped children, RSS/PSS).

Every class here starts real processes; each has a ``stop()`` that the caller runs in a
``finally``. Importing this module puts the checkout first on ``sys.path`` (via ``checkout``).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

from checkout import REPO

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
POSTFIX = "/usr/sbin/postfix"
SENDER = "from@bench.test"
RECIPIENT = "to@bench.test"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- small helpers -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def require(path: str, package: str) -> str:
    if not os.access(path, os.X_OK):
        found = shutil.which(os.path.basename(path))
        if not found:
            sys.exit(f"{path} not found: install {package} (apt-get install {package})")
        return found
    return path




def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; everything after its ")" is fixed.
    return text[text.rindex(")") + 2:].split()


def _process_table() -> dict[int, list[str]]:
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                stats[int(entry)] = fields
    return stats


def _tree(root: int, stats: dict[int, list[str]]) -> list[int]:
    parents = {pid: int(fields[1]) for pid, fields in stats.items()}  # ppid

    def in_tree(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = parents.get(pid, 0)
        return False

    return [pid for pid in stats if in_tree(pid)]


def tree_pids(root: int) -> list[int]:
    """``root`` and its live descendants."""
    return _tree(root, _process_table())


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user+system) used so far by ``root``, its live descendants, and every
    descendant that already exited and was reaped (the kernel adds those to the parent's
    cutime/cstime). A Postfix daemon that exits mid-run is therefore still counted once its
    parent, master(8), has reaped it."""
    stats = _process_table()
    total = 0
    for pid in _tree(root, stats):
        fields = stats[pid]
        # utime stime cutime cstime are fields 14-17 (1-based) -> 11..14 after the name
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / CLOCK_TICKS


def tree_memory_kib(root: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB summed over ``root`` and its live descendants, from
    ``/proc/PID/smaps_rollup`` (root needed for other users' processes). RSS counts a shared
    page once per process that maps it; PSS divides it among them, so summed PSS is what the
    tree really occupies."""
    rss = pss = 0
    for pid in tree_pids(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:  # exited meanwhile
            continue
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss, pss


# --- the common upstream -------------------------------------------------------------------------

class SinkDump:
    """Postfix smtp-sink dumping every transaction (-D) to a file; counts recipients that
    arrived (``X-Rcpt-Args`` lines) incrementally."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sink-", dir=workdir))
        self.dump = self.dir / "dump"
        self._offset = 0
        self._tail = b""
        self.recipients = 0
        self.messages = 0
        command = [binary]
        if os.geteuid() == 0:  # smtp-sink refuses to keep root privileges
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
            command += ["-u", "nobody"]
        command += ["-D", str(self.dump), "-S", r"\001\n", "-h", "sink.bench.test", f"127.0.0.1:{self.port}", "256"]
        self._stderr = open(workdir / "smtp-sink.stderr", "wb")
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=self._stderr)
        wait_for(lambda: self._alive() and port_open(self.port), 10, f"smtp-sink on 127.0.0.1:{self.port}")

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"smtp-sink exited with {self.process.returncode}")
        return True

    def poll(self) -> int:
        """Read what was appended since the last call; returns the recipient count so far."""
        try:
            with open(self.dump, "rb") as dump:
                dump.seek(self._offset)
                data = dump.read()
        except FileNotFoundError:
            return self.recipients
        self._offset += len(data)
        data = self._tail + data
        cut = data.rfind(b"\n") + 1
        complete, self._tail = data[:cut], data[cut:]
        self.recipients += complete.count(b"\nX-Rcpt-Args:") + complete.startswith(b"X-Rcpt-Args:")
        self.messages += complete.count(b"\x01\n")
        return self.recipients

    def reset(self) -> None:
        """Empty the dump file between measurements (smtp-sink appends, so this is safe while no
        transaction is in flight); the counters keep counting."""
        self.poll()
        if self.dump.exists():
            os.truncate(self.dump, 0)
        self._offset = 0

    def stop(self) -> None:
        stop_process(self.process)
        self._stderr.close()


def stop_all(parts, workdir: Path, keep: bool) -> None:
    """Stop every peer a benchmark started (later ones first; one failure does not stop the
    rest), then remove the work directory unless asked to keep it."""
    for part in parts:
        if part is None:
            continue
        try:
            part.stop()
        except Exception as error:  # keep stopping the others
            print(f"could not stop {part}: {error}", file=sys.stderr)
    if keep:
        print(f"kept {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- Postfix, from a private config directory ----------------------------------------------------

class PostfixInstance:
    QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

    def __init__(self, binary: str, workdir: Path, sink_port: int, concurrency: int, *, name: str = "postfix",
                 main_cf: str = "", smtpd_options: tuple[str, ...] = ()) -> None:
        """``main_cf``: extra main.cf lines; ``smtpd_options``: ``-o name=value`` arguments of
        the smtpd service in master.cf (e.g. ``smtpd_proxy_filter=...`` for before-queue)."""
        self.binary = binary
        self.port = free_port()
        self.root = workdir / name
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.maillog = self.root / "maillog"
        for directory in (self.config_dir, self.queue_dir, self.data_dir):
            directory.mkdir(parents=True)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        # Postfix daemons run as mail_owner and must traverse to their queue and data dirs.
        for directory in (workdir, self.root):
            directory.chmod(0o755)
        (self.config_dir / "main.cf").write_text(textwrap.dedent(f"""\
            # Throwaway Postfix for bench/: loopback only, relays everything
            # to the benchmark's smtp-sink, never delivers locally.
            compatibility_level = 3.6
            queue_directory = {self.queue_dir}
            data_directory = {self.data_dir}
            mail_owner = postfix
            setgid_group = postdrop
            myhostname = postfix.bench.test
            mydomain = bench.test
            myorigin = $myhostname
            inet_interfaces = 127.0.0.1
            inet_protocols = ipv4
            mydestination =
            local_recipient_maps =
            local_transport = error:local delivery is disabled in this benchmark
            alias_maps =
            alias_database =
            mynetworks = 127.0.0.0/8
            smtpd_relay_restrictions = permit_mynetworks, reject
            relayhost = [127.0.0.1]:{sink_port}
            # No DNS anywhere (the guard does none either): no reverse lookup of the client,
            # the relay host is an address literal.
            smtpd_peername_lookup = no
            smtp_host_lookup = native
            # Allow as many parallel deliveries to the sink as client sessions (guard: same).
            default_destination_concurrency_limit = {max(20, concurrency)}
            default_process_limit = {max(100, 2 * concurrency + 10)}
            smtpd_client_connection_count_limit = 0
            maillog_file = {self.maillog}
            maillog_file_prefixes = {self.root}
            biff = no
            """) + textwrap.dedent(main_cf))
        options = "".join(f" -o {option}" for option in smtpd_options)
        # chroot off (column 5 "n"): nothing in the temp dir is set up as a chroot jail.
        (self.config_dir / "master.cf").write_text(textwrap.dedent(f"""\
            127.0.0.1:{self.port} inet n - n - - smtpd{options}
            cleanup   unix  n - n - 0 cleanup
            qmgr      unix  n - n 300 1 qmgr
            rewrite   unix  - - n - - trivial-rewrite
            bounce    unix  - - n - 0 bounce
            defer     unix  - - n - 0 bounce
            trace     unix  - - n - 0 bounce
            verify    unix  - - n - 1 verify
            flush     unix  n - n 1000? 0 flush
            proxymap  unix  - - n - - proxymap
            smtp      unix  - - n - - smtp
            relay     unix  - - n - - smtp
            showq     unix  n - n - - showq
            error     unix  - - n - - error
            retry     unix  - - n - - error
            discard   unix  - - n - - discard
            anvil     unix  - - n - 1 anvil
            scache    unix  - - n - 1 scache
            postlog   unix-dgram n - n - 1 postlogd
            """))
        self.started = False

    def _postfix(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, "-c", str(self.config_dir), *args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)

    def _fail(self, what: str, result: subprocess.CompletedProcess) -> None:
        log = self.maillog.read_text()[-2000:] if self.maillog.exists() else ""
        raise RuntimeError(f"postfix -c {self.config_dir} {what} failed ({result.returncode}): "
                           f"{result.stdout}{result.stderr}\n{log}")

    def start(self) -> None:
        for step in (("set-permissions",), ("check",)):
            result = self._postfix(*step)
            if result.returncode != 0:
                self._fail(" ".join(step), result)
        result = self._postfix("start")
        self.started = True  # stop() is harmless if start failed half-way
        if result.returncode != 0:
            self._fail("start", result)
        wait_for(lambda: port_open(self.port), 20, f"Postfix smtpd on 127.0.0.1:{self.port}")

    @property
    def master_pid(self) -> int:
        return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])

    def queued(self) -> int:
        """Messages still in the queue (any state), cheap enough to poll."""
        count = 0
        for name in self.QUEUES:
            for _, _, files in os.walk(self.queue_dir / name):
                count += len(files)
        return count

    def deferred(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.queue_dir / "deferred"))

    def stop(self) -> None:
        if not self.started:
            return
        result = self._postfix("stop")
        if result.returncode != 0:
            # Last resort: the master of *this* instance only, by its pid file.
            try:
                os.kill(self.master_pid, signal.SIGTERM)
            except (OSError, ValueError):
                pass
        self.started = False


# --- smtp-guard ----------------------------------------------------------------------------------

async def preload_suppressions(store_path: Path, count: int) -> None:
    from smtp_guard.store.sqlite.db import Database
    from smtp_guard.store.sqlite.suppressions import SQLiteSuppressionStore
    from smtp_guard.suppression_model import SuppressionEntry

    async with Database(store_path) as db:
        store = SQLiteSuppressionStore(db)
        batch = 50_000
        for start in range(0, count, batch):
            entries = [SuppressionEntry("address", f"user{i:08d}@suppressed.bench.test", "unsubscribed",
                                        source="bench") for i in range(start, min(count, start + batch))]
            await store.add(entries, bulk=True)


def toml_sections(sections: dict[str, dict[str, object]]) -> str:
    """A TOML document from ``{section: {key: value}}`` (str, int, float and bool values)."""
    def value(item: object) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, (int, float)):
            return repr(item)
        return '"' + str(item).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "\n".join(f"[{name}]\n" + "".join(f"{key} = {value(item)}\n" for key, item in keys.items())
                     for name, keys in sections.items())


GUARD_COMMAND = [sys.executable, "-c", "import sys; sys.argv[0] = 'smtp-guard'; "
                 "from smtp_guard.cli.main import main; sys.exit(main())"]
"""``smtp-guard``, run as the console script does, from this checkout (see ``guard_env``)."""


def guard_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


class GuardProcess:
    """``smtp-guard serve`` on loopback relaying to ``sink_port`` in mode smtp, with
    ``suppressions`` addresses bulk-loaded into its store first. ``settings`` adds or overrides
    config keys per section (``{"logging": {"level": "warning"}}``); everything else is the
    shipped default. ``store_template``: copy this already-filled store instead of filling one."""

    def __init__(self, workdir: Path, sink_port: int, suppressions: int,
                 settings: dict[str, dict[str, object]] | None = None, *, name: str = "guard",
                 store_template: Path | None = None) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.dir = workdir / name
        self.dir.mkdir()
        self.store = self.dir / "guard.sqlite3"
        self.config = self.dir / "smtp-guard.toml"
        self.suppressions = suppressions
        self.store_template = store_template
        sections: dict[str, dict[str, object]] = {
            "smtp": {"listen": f"127.0.0.1:{self.port}", "hostname": f"{name}.bench.test"},
            "upstream": {"mode": "smtp", "host": "127.0.0.1", "port": sink_port},
            "store": {"path": str(self.store)},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
        }
        for section, keys in (settings or {}).items():
            sections.setdefault(section, {}).update(keys)
        self.config.write_text(f"# Written by bench/ ({Path(sys.argv[0]).name})\n" + toml_sections(sections))
        self.process: subprocess.Popen | None = None
        self.load_seconds = 0.0

    def config_error(self) -> str | None:
        """What ``smtp-guard config check`` says is wrong with this config, or None if valid."""
        result = subprocess.run([*GUARD_COMMAND, "config", "check", "--config", str(self.config)],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                                cwd=self.dir, env=guard_env())
        return None if result.returncode == 0 else (result.stderr or result.stdout).strip()[-500:]

    def start(self) -> None:
        started = time.monotonic()
        if self.store_template is not None:
            shutil.copyfile(self.store_template, self.store)
        else:
            asyncio.run(preload_suppressions(self.store, self.suppressions))
        self.load_seconds = time.monotonic() - started
        self._stderr = open(self.dir / "stderr.log", "wb")
        self.process = subprocess.Popen([*GUARD_COMMAND, "serve", "--config", str(self.config)],
                                        stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=subprocess.STDOUT,
                                        cwd=self.dir, env=guard_env())

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"smtp-guard exited with {self.process.returncode}: "
                                   f"{(self.dir / 'stderr.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1) as reply:
                    return reply.status == 200
            except (OSError, urllib.error.URLError):
                return False

        wait_for(ready, 60, f"smtp-guard /readyz on 127.0.0.1:{self.metrics_port}")

    def metric_lines(self, prefix: str) -> list[str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        return [line for line in text.splitlines() if line.startswith(prefix)]

    def stderr_tail(self) -> str:
        return (self.dir / "stderr.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=40)  # shutdown_grace is 30 s by default
            self._stderr.close()



"""A real DNS server on loopback for tests: Debian's dnsmasq, started per test on a high port
with exactly the records the test gives, and nothing else.

Names under ``local`` domains (".test" by default) that the test did not define are answered
NXDOMAIN, as a real authoritative server would; anything else is REFUSED (no upstream).
``[dns] servers = [server.address]`` points the guard at it; ``server.queries()`` lists the
queries it received (dnsmasq's own query log), so a test can prove a lookup did or did not
go out.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Sequence

import dns.exception
import dns.message
import dns.query
import dns.rdatatype

from local_tools import installed, stop_process

DNSMASQ_PATHS = ("/usr/sbin/dnsmasq", "/usr/bin/dnsmasq")


def dnsmasq_path() -> str:
    return installed(DNSMASQ_PATHS, "dnsmasq", "dnsmasq-base")


def txt_strings(text: str) -> list[str]:
    """One TXT record's text as the <=255-byte strings DNS carries (a 2048-bit DKIM key is longer)."""
    return [text[i:i + 255] for i in range(0, len(text), 255)] or [""]


@dataclass
class Zone:
    txt: dict[str, list[str]] = field(default_factory=dict)  # name -> TXT records (each one text)
    mx: list[tuple[str, str, int]] = field(default_factory=list)  # (domain, exchange, preference); "." = null MX
    a: dict[str, str] = field(default_factory=dict)  # name -> IPv4 or IPv6 address
    local: Sequence[str] = ("test",)  # undefined names under these get NXDOMAIN

    def conf(self) -> str:
        """dnsmasq's config file text (its parser, unlike its command line, reads quoted text,
        so a TXT record may hold commas, as DMARC's rua= lists do)."""
        lines = [f"local=/{domain}/" for domain in self.local]
        for name, records in self.txt.items():
            for text in records:
                quoted = ",".join('"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"'
                                  for part in txt_strings(text))
                lines.append(f"txt-record={name},{quoted}")
        lines += [f"mx-host={domain},{exchange},{preference}" for domain, exchange, preference in self.mx]
        lines += [f"host-record={name},{address}" for name, address in self.a.items()]
        return "\n".join(lines) + "\n"


class DNSServer:
    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr = ""
        self._conf = ""
        self._log = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "DNSServer":
        for _ in range(5):  # a free port can be taken between the probe and dnsmasq's bind
            self.port = _free_udp_port()
            with tempfile.NamedTemporaryFile("w", prefix="dnsmasq-", suffix=".conf", delete=False) as conf:
                conf.write(self.zone.conf())
            self._conf = conf.name
            self._log = conf.name.removesuffix(".conf") + ".log"
            self._process = subprocess.Popen(
                [dnsmasq_path(), "--keep-in-foreground", f"--port={self.port}", "--listen-address=127.0.0.1",
                 "--bind-interfaces", "--no-resolv", "--no-hosts", f"--conf-file={self._conf}", "--pid-file=",
                 "--cache-size=0", f"--user={_user()}", f"--log-facility={self._log}", "--log-queries"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                answers = self._answers()
            except BaseException:
                self.stop()  # and its stderr pipe closed: nothing left for the garbage collector
                raise
            if answers:
                return self
            self.stop()
        raise AssertionError(f"dnsmasq did not start: {self._stderr}")

    def _answers(self) -> bool:
        deadline = time.monotonic() + 5
        query = dns.message.make_query("probe.invalid.", dns.rdatatype.A)
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                self._stderr = (self._process.stderr.read() if self._process.stderr else b"").decode(errors="replace")
                return False
            try:
                dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.2)
                return True
            # BadResponse: the answer to an earlier probe that timed out, arriving late on a
            # new probe's socket that got the same ephemeral port. dnsmasq is up; ask again.
            except (dns.exception.Timeout, dns.query.BadResponse, OSError):
                continue
        return False

    def queries(self) -> list[tuple[str, str]]:
        """(type, name) of every query received since the start, in order (the start-up probe left out)."""
        if not self._log or not os.path.exists(self._log):
            return []
        with open(self._log, encoding="utf-8", errors="replace") as log:
            found = [(m.group(1), m.group(2)) for m in _QUERY_LINE.finditer(log.read())]
        return [(rdtype, name) for rdtype, name in found if name != "probe.invalid"]

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process, timeout=5)
            if self._process.stderr:
                self._process.stderr.close()
            self._process = None
        if self._conf:
            os.unlink(self._conf)
            self._conf = ""
        if self._log and os.path.exists(self._log):
            os.unlink(self._log)

    def __enter__(self) -> "DNSServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SilentDNSServer:
    """A UDP port that takes queries and never answers: a resolver's timeout, for real."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._socket.close()


# dnsmasq --log-queries: "Nov 29 03:48:45 dnsmasq[13327]: query[MX] shop.test from 127.0.0.1"
_QUERY_LINE = re.compile(r"\]: query\[([A-Z0-9]+)\] (\S+) from ")


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name

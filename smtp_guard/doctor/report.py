"""What ``doctor`` found: findings grouped by domain (and the upstream), as text for a person
and as JSON for a machine.

The JSON keys are stable (scripts and monitoring read them): ``status`` ("ok", "warn", "fail"),
``counts``, ``domains`` (each: ``domain``, ``status``, ``checks``), ``upstream`` (``host``,
``port``, ``tls``, ``status``, ``checks``); each check has ``check`` (an id such as "dkim" or
"spf.upstream"), ``status`` ("ok", "warn", "fail", "skip"), ``subject`` (the DNS name or
host:port looked at), ``message``, ``fix`` and ``publish`` ("" when there is nothing to do)
and ``data`` (the facts behind it).
"""

from __future__ import annotations

import enum
import textwrap
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"  # works, but weaker than it should be, or soon broken
    FAIL = "fail"  # broken (or could not be checked): mail is refused, unauthenticated or spoofable
    SKIP = "skip"  # not applicable (a sandbox upstream, a check that needs one that failed)


_SEVERITY = {Status.SKIP: 0, Status.OK: 1, Status.WARN: 2, Status.FAIL: 3}


@dataclass(frozen=True)
class Finding:
    check: str  # stable id: dkim, spf, spf.upstream, spf.lookups, dmarc, dmarc.policy, ...
    status: Status
    subject: str  # what was looked at: a DNS name, host:port
    message: str  # one line, what is so
    fix: str = ""  # what to do about it
    publish: str = ""  # the exact DNS record(s) to publish, as zone file lines
    data: Mapping[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"check": self.check, "status": self.status.value, "subject": self.subject, "message": self.message,
                "fix": self.fix, "publish": self.publish, "data": dict(self.data)}


def worst(findings: Sequence[Finding]) -> Status:
    """The section's status: its worst finding (skipped ones count as OK)."""
    status = max((f.status for f in findings), key=_SEVERITY.__getitem__, default=Status.OK)
    return Status.OK if status is Status.SKIP else status


@dataclass(frozen=True)
class DomainReport:
    domain: str
    findings: tuple[Finding, ...]

    @property
    def status(self) -> Status:
        return worst(self.findings)


@dataclass(frozen=True)
class UpstreamReport:
    host: str
    port: int
    tls: str
    findings: tuple[Finding, ...]

    @property
    def status(self) -> Status:
        return worst(self.findings)


@dataclass(frozen=True)
class Report:
    domains: tuple[DomainReport, ...]
    upstream: UpstreamReport
    notes: tuple[str, ...] = ()  # said once, above everything (e.g. no domain configured)

    @property
    def findings(self) -> list[Finding]:
        return [f for d in self.domains for f in d.findings] + list(self.upstream.findings)

    @property
    def status(self) -> Status:
        return worst(self.findings)

    def counts(self) -> dict[str, int]:
        found = self.findings
        return {status.value: sum(1 for f in found if f.status is status) for status in Status}

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "counts": self.counts(),
            "notes": list(self.notes),
            "domains": [{"domain": d.domain, "status": d.status.value, "checks": [f.as_json() for f in d.findings]}
                        for d in self.domains],
            "upstream": {"host": self.upstream.host, "port": self.upstream.port, "tls": self.upstream.tls,
                         "status": self.upstream.status.value,
                         "checks": [f.as_json() for f in self.upstream.findings]},
        }

    def as_text(self) -> str:
        lines = [*self.notes, *([""] if self.notes else [])]
        width = max((len(f.check) for f in self.findings), default=0)
        for domain in self.domains:
            lines += [domain.domain, *_finding_lines(domain.findings, width), ""]
        up = self.upstream
        title = f"upstream {up.host}:{up.port} (tls {up.tls})" if up.host else "upstream"
        lines += [title, *_finding_lines(up.findings, width), ""]
        counts = self.counts()
        summary = ", ".join(f"{counts[s.value]} {s.name}" for s in (Status.FAIL, Status.WARN, Status.OK, Status.SKIP)
                            if counts[s.value])
        lines.append(f"{summary}." if summary else "Nothing checked.")
        return "\n".join(lines) + "\n"


def _finding_lines(findings: Sequence[Finding], width: int) -> list[str]:
    lines = []
    for finding in findings:
        lines.append(f"  {finding.status.name:<5} {finding.check:<{width}}  {finding.message}")
        indent = " " * 8
        if finding.fix:
            lines += textwrap.wrap(f"fix: {finding.fix}", 100, initial_indent=indent, subsequent_indent=indent + "     ")
        if finding.publish:
            lines.append(f"{indent}publish:")
            lines += [f"{indent}  {line}" for line in finding.publish.splitlines()]
    return lines


def txt_record(name: str, text: str) -> str:
    """A TXT record as a zone file line, the text split into DNS's 255-byte strings."""
    strings = " ".join('"' + text[i:i + 255].replace("\\", "\\\\").replace('"', '\\"') + '"'
                       for i in range(0, len(text), 255)) or '""'
    return f"{name}. IN TXT {strings}"

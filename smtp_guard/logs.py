"""Logging setup: text or JSON lines, optional address redaction, aiosmtpd's chatter silenced.

aiosmtpd logs every recipient at INFO on ``mail.log`` (DESIGN.md, "Known traps"); that logger
is capped at WARNING so addresses only appear in lines the guard writes, and those pass the
redaction filter when ``[logging] redact_addresses`` is on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time

from .config import LoggingConfig

_ADDRESS = re.compile(r"[^\s<>\"'(),;:@]+@([A-Za-z0-9.-]+\.[A-Za-z]{2,}|\[[0-9A-Fa-f:.]+\])")


def redact(text: str) -> str:
    """Replace each address by a short stable hash and its domain: ``<h:1a2b3c4d>@example.com``.

    The hash lets an operator correlate lines about one recipient without the log holding it.
    """
    def _one(match: re.Match[str]) -> str:
        local = match.group(0).rsplit("@", 1)[0]
        digest = hashlib.blake2b(local.lower().encode(), digest_size=4).hexdigest()
        return f"<h:{digest}>@{match.group(1)}"

    return _ADDRESS.sub(_one, text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg = redact(message)
        record.args = None
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(config: LoggingConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if not config.plaintext_addresses:
        handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    logging.getLogger("mail.log").setLevel(logging.WARNING)

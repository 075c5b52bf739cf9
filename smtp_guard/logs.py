"""Logging setup: text or JSON lines, and no address in them unless the operator asks.

An erasure purges an address from every store the guard has; a log line that names it would
survive the erasure in journald or a log pipeline, out of the guard's reach. So by default
every record, from any logger (aiosmtpd's, asyncio's and the libraries' included), passes a
``PseudonymFilter`` on the one handler ``configure_logging`` installs: each address in the
message, the exception text, the stack and the JSON ``fields`` becomes the audit trail's keyed
pseudonym for it (``h:1a2b3c4d5e6f7a8b``, or ``erased:<id>`` once erased), so a log line and
``smtp-guard audit list --recipient h:…`` lead to each other. Until the key ring is loaded
(the first lines of start-up) an address is written as ``[address]``: the pseudonym needs the
key, and plaintext is never the fallback.

``[logging] plaintext_addresses = true`` turns the filter off and says once, at start, that
this breaks the erasure guarantee.

aiosmtpd logs every recipient at INFO on ``mail.log``; that logger is capped at WARNING
because one line per RCPT is noise next to the guard's own outcome line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import IO, Any

from .config import LoggingConfig
from .erasure.pseudonyms import Pseudonymizer, replace_addresses

log = logging.getLogger(__name__)

WITHHELD = "[address]"

PLAINTEXT_WARNING = ("[logging] plaintext_addresses = true: log lines carry addresses in plaintext, which "
                     "BREAKS THE ERASURE GUARANTEE (an erased address survives wherever these logs go); "
                     "set it to false to log the audit trail's pseudonyms instead")


class PseudonymFilter(logging.Filter):
    """Rewrites each record so that it names no address: pseudonyms once ``use`` has been given
    the audit trail's pseudonymizer, ``[address]`` before that.

    It sits on a handler (not a logger), so it sees records propagated from every logger. It
    never raises: a filter's exception would escape into the code that logged, and an address
    it cannot pseudonymize is withheld instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pseudonymizer: Pseudonymizer | None = None

    def use(self, pseudonymizer: Pseudonymizer) -> None:
        """From now on, write each address as the pseudonym the audit trail uses for it."""
        self._pseudonymizer = pseudonymizer

    def redact(self, text: str) -> str:
        """``text`` with every address replaced by its pseudonym (or ``[address]``)."""
        return replace_addresses(text, self._pseudonym)

    def _pseudonym(self, address: str) -> str:
        if self._pseudonymizer is None:
            return WITHHELD
        try:
            return self._pseudonymizer.pseudonym(_unescaped(address))
        except Exception:
            return WITHHELD

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # logging itself would print the raw arguments to stderr ("--- Logging error ---").
            message = f"{record.msg} (arguments that did not fit: {record.args!r})"
        record.msg, record.args = self.redact(message), None
        if record.exc_info:
            # Rendered here, redacted, and the live exception dropped, so that no formatter
            # renders the plaintext traceback again.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = self._redact_value(fields)
        return True

    def _redact_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {self._redact_value(k): self._redact_value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._redact_value(v) for v in value]
        if value is None or isinstance(value, (bool, int, float)):
            return value
        return self.redact(str(value))


def _unescaped(address: str) -> str:
    """An address shown inside a bytes repr (``j\\xc3\\xb6rg@…``, as aiosmtpd logs command lines)
    as the text it stands for, so that it gets the same pseudonym as its decoded spelling."""
    if "\\x" not in address:
        return address
    try:
        return re.sub(r"\\x([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), address).encode("latin-1").decode()
    except UnicodeError:
        return address


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
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(config: LoggingConfig, stream: IO[str] | None = None) -> PseudonymFilter | None:
    """Send every record to ``stream`` (stderr) as text or JSON lines. Returns the filter that
    keeps addresses out of them — hand it the pseudonymizer once the key ring is loaded — or
    None when ``plaintext_addresses`` is on (then a warning says what that costs)."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if config.format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pseudonyms = None if config.plaintext_addresses else PseudonymFilter()
    if pseudonyms is not None:
        handler.addFilter(pseudonyms)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    if pseudonyms is None:
        log.warning(PLAINTEXT_WARNING)
    return pseudonyms

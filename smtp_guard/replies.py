"""Every SMTP reply smtp-guard sends, with its RFC 3463 enhanced status code.

Nothing else in the code base formats a reply: handlers return these values, so a test can
assert a reply exactly and a single table keeps code class and enhanced class in step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}" if self.enhanced else f"{self.code} {self.text}"

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def with_text(self, text: str) -> "Reply":
        return Reply(self.code, self.enhanced, text)


def upstream_reply(code: int, message: str) -> Reply:
    """The upstream's own reply, passed through with its class (4xx stays 4xx, 5xx stays 5xx).

    Multi-line replies are folded to one line; the enhanced code, if the upstream sent one,
    stays at the front of the text.
    """
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    parts = (lines[0] if lines else "").split(" ", 1)
    if len(parts[0].split(".")) == 3 and parts[0][0] in "245" and parts[0][0] == str(code)[0]:
        # RFC 2034: every line of a multi-line reply repeats the code; it is said once here.
        repeated = parts[0] + " "
        rest = [parts[1] if len(parts) > 1 else ""] + [line.removeprefix(repeated) for line in lines[1:]]
        return Reply(code, parts[0], " ".join(line for line in rest if line))
    text = " ".join(lines) or "upstream reply"
    enhanced = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "")
    return Reply(code, enhanced, text)


# --- success -----------------------------------------------------------------------------------
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
DUPLICATE_RECIPIENT = Reply(250, "2.1.5", "Recipient OK (duplicate, delivered once)")
QUEUED_HELD = Reply(250, "2.0.0", "Message accepted and held for review")
QUEUED_PACED = Reply(250, "2.0.0", "Message accepted; delivery paced by a rate limit")
ACCEPTED_NOT_RELAYED = Reply(250, "2.0.0", "Message accepted")
SANDBOX_CAPTURED = Reply(250, "2.0.0", "Message captured by the sandbox upstream (not delivered)")

# --- recipient decisions -----------------------------------------------------------------------
SUPPRESSED = Reply(550, "5.7.1", "Recipient is on a suppression list")
ERASED = Reply(550, "5.7.1", "Recipient address was erased at its owner's request; delete it from your lists")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
RATE_LIMITED = Reply(451, "4.7.1", "Rate limit exceeded, try again later")
PACED = Reply(250, "2.1.5", "Recipient OK (queued, released at the allowed rate)")
DEFERRED = Reply(451, "4.7.1", "Deferred by policy, try again later")
REFUSED = Reply(550, "5.7.1", "Refused by policy")
BREAKER_DEFERRED = Reply(451, "4.7.1", "Stream paused by the volume breaker pending review, try again later")
STREAM_CANCELLED = Reply(550, "5.7.1", "This mailing was cancelled by an administrator")
HELD_FOR_REVIEW = Reply(250, "2.1.5", "Recipient OK (held for review)")
# The recipient domain check ([recipient_domains]): the domain cannot receive mail (RFC 5321
# section 5.1, RFC 7505), so the address is a bad destination (X.1.2); DNS trouble is a routing
# problem of ours (X.4.3), never a reason to refuse.
DOMAIN_NULL_MX = Reply(550, "5.1.2", "Recipient domain accepts no mail (it publishes a null MX)")
DOMAIN_NOT_FOUND = Reply(550, "5.1.2", "Recipient domain does not exist")
DOMAIN_NO_MAIL_SERVER = Reply(550, "5.1.2", "Recipient domain has no mail server (no MX or address record)")
DOMAIN_LOOKUP_FAILED = Reply(451, "4.4.3", "Recipient domain could not be looked up in DNS, try again later")


def rate_limited(rule_name: str) -> Reply:
    """451 4.7.1 naming the rate-limit rule (a configured name: lower-case letters, digits, '-'
    and '_'), so the platform's operator can tell which limit its mail ran into."""
    return RATE_LIMITED.with_text(f"Rate limit {rule_name} exceeded, try again later")


# --- access ------------------------------------------------------------------------------------
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
STARTTLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
TOO_MANY_SESSIONS = Reply(421, "4.7.0", "Too many concurrent sessions, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
# A PROXY protocol header from an address not in [smtp] proxy_protocol_from: the connection is
# closed (a client must not choose the address the guard believes).
PROXY_REFUSED = Reply(554, "5.7.0", "PROXY protocol header not accepted from this address")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
DATA_TIMEOUT = Reply(421, "4.4.2", "Timeout waiting for message data, closing connection")
SESSION_TIMEOUT = Reply(421, "4.4.2", "Session time limit reached, closing connection")
# Password guessing (RFC 4954 section 6 codes): the session ends after too many failures, and a
# client address with too many recent failures is refused AUTH without a password check.
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TOO_MANY_FAILURES = Reply(421, "4.7.0", "Too many failed authentication attempts, closing connection")
AUTH_THROTTLED = Reply(454, "4.7.0", "Too many failed authentication attempts from your address, try again later")

# --- syntax and limits -------------------------------------------------------------------------
BAD_SENDER = Reply(553, "5.1.7", "Sender address is not valid")
# RFC 6531 3.4, 3.7.1: a non-ASCII address only in a transaction that asked for SMTPUTF8, and
# only to an upstream that offers it.
NON_ASCII_SENDER = Reply(553, "5.6.7", "Non-ASCII sender address needs MAIL FROM ... SMTPUTF8 (RFC 6531)")
NON_ASCII_RECIPIENT = Reply(553, "5.6.7", "Non-ASCII recipient address needs MAIL FROM ... SMTPUTF8 (RFC 6531)")
UPSTREAM_NO_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address not accepted: the upstream mail server does "
                                          "not offer SMTPUTF8")
BAD_RECIPIENT = Reply(553, "5.1.3", "Recipient address is not valid")
# addresses.routes_elsewhere: an upstream could route it past the suppression lists.
ROUTED_RECIPIENT = Reply(553, "5.1.3", "Recipient local part with %, ! or a quoted @ is not relayed "
                                       "(an upstream may route it to another address)")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long (RFC 5321 4.5.3.1.6)")
# A command line must end in CRLF and hold neither CR, LF nor NUL elsewhere (RFC 5321 2.3.8):
# what follows a bare LF may be an injected command, so no part of such a line is executed.
BAD_COMMAND_LINE = Reply(500, "5.5.2", "Command line contains a bare CR, bare LF or NUL; send CRLF line endings")
BARE_LINE_ENDING = Reply(554, "5.6.0", "Message contains a bare CR or LF; send CRLF line endings")
NUL_IN_MESSAGE = Reply(554, "5.6.0", "Message contains a NUL byte")

# --- temporary failures (the platform must retry) ----------------------------------------------
UPSTREAM_UNAVAILABLE = Reply(451, "4.4.1", "Upstream mail server unavailable, try again later")
UPSTREAM_TIMEOUT = Reply(451, "4.4.2", "Upstream mail server timed out, try again later")
UPSTREAM_LOST = Reply(451, "4.4.2", "Connection to upstream lost, try again later")
UPSTREAM_BUSY = Reply(451, "4.4.5", "All upstream connections busy, try again later")
# A 1xx-3xx where the command has its own success reply (250 to DATA instead of 354, 354 to the
# final dot): the upstream is out of step, and what it did with the message is unknown.
UPSTREAM_OUT_OF_PROTOCOL = Reply(451, "4.5.0", "Upstream mail server answered out of protocol, try again later")
# The store stayed locked past [store] busy_timeout, or could not be written at all.
STORE_UNAVAILABLE = Reply(451, "4.3.0", "Message store unavailable, try again later")
# The disk holding the hold queue or the sandbox is full: RFC 3463 4.3.1, RFC 5321 452.
STORE_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, try again later")
# Mail to [unsubscribe] mailto: the unsubscribe is stored and in force, or why not.
UNSUBSCRIBED = Reply(250, "2.0.0", "Unsubscribed: no more of this mail will be sent to this address")
UNSUBSCRIBE_INVALID = Reply(550, "5.7.1", "Not a valid unsubscribe request (the link is altered, expired or not ours)")
UNSUBSCRIBE_UNAVAILABLE = Reply(451, "4.3.0", "Unsubscribe could not be stored, try again later")
# [dkim] asked for a signature and it could not be made: never relay that mail unsigned.
DKIM_SIGNING_FAILED = Reply(451, "4.3.0", "Could not DKIM-sign the message, not relayed unsigned; try again later")
# A policy that raised: fail closed and temporary (Postfix smtpd_policy_service_default_action).
POLICY_FAILED = Reply(451, "4.3.5", "Policy check failed, try again later")
# [counters] url: the shared rate counters (Redis) cannot be reached, so no rate limit can be
# checked; mail is not let through uncounted unless [counters] on_error = "allow".
COUNTERS_UNAVAILABLE = Reply(451, "4.3.0", "Rate limit counters unavailable, try again later")
UPSTREAM_CHANGED = Reply(451, "4.4.0", "Upstream refused a recipient it had accepted, try again later")

# --- aiosmtpd's own replies ---------------------------------------------------------------------
# RFC 2034: once ENHANCEDSTATUSCODES is advertised, every reply carries an enhanced code except
# the greeting and the reply to HELO/EHLO (GuardSMTP.push leaves those alone). RFC 3463 has no
# class 3, so the intermediate replies have none either: 354 (as in Postfix and Sendmail) and
# AUTH's 334 challenges, whose text is base64 (RFC 4954 section 4). aiosmtpd formats the
# replies below itself; the SMTP front rewrites them (matched by prefix, first match wins).
COMMAND_LINE_TOO_LONG = Reply(500, "5.5.2", "Command line too long")
COMMAND_NOT_RECOGNIZED = Reply(500, "5.5.2", "Command not recognized")
OK = Reply(250, "2.0.0", "OK")
BYE = Reply(221, "2.0.0", "Bye")
SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error")


def _syntax(usage: str) -> Reply:
    return Reply(501, "5.5.4", f"Syntax: {usage}")


AIOSMTPD_REWRITES: tuple[tuple[str, Reply], ...] = (
    # Whole lines and limits.
    ("552 Error: Too much mail data", MESSAGE_TOO_BIG),
    ("552 Error: message size exceeds", MESSAGE_TOO_BIG),
    ("500 Line too long", LINE_TOO_LONG),
    ("500 Command line too long", COMMAND_LINE_TOO_LONG),
    ("500 Error: bad syntax", SYNTAX_ERROR),
    ("500 Error: strict ASCII mode", SYNTAX_ERROR),
    ("500 Error: command ", COMMAND_NOT_RECOGNIZED),  # also AUTH after HELO (no ESMTP, no AUTH)
    # handle_exception itself failed: fail closed and temporary, and no exception text.
    ("500 Error: (", INTERNAL_ERROR),
    ("500 Error: Cannot describe error", INTERNAL_ERROR),
    # Command syntax (RFC 3463 X.5.4: invalid command arguments).
    ("501 Syntax: HELO", _syntax("HELO hostname")),
    ("501 Syntax: EHLO", _syntax("EHLO hostname")),
    ("501 Syntax: MAIL", _syntax("MAIL FROM:<address> [parameters]")),
    ("501 Syntax: RCPT", _syntax("RCPT TO:<address> [parameters]")),
    ("501 Syntax: VRFY", _syntax("VRFY <address>")),
    ("501 Syntax: DATA", _syntax("DATA")),
    ("501 Syntax: RSET", _syntax("RSET")),
    ("501 Syntax: QUIT", _syntax("QUIT")),
    ("501 Syntax: STARTTLS", _syntax("STARTTLS")),
    ("501 Not enough value", _syntax("AUTH mechanism [initial-response]")),
    ("501 Too many values", _syntax("AUTH mechanism [initial-response]")),
    ("501 Error: BODY", Reply(501, "5.5.4", "BODY can only be one of 7BIT, 8BITMIME")),
    ("501 Error: SMTPUTF8 takes no arguments", Reply(501, "5.5.4", "SMTPUTF8 takes no arguments")),
    ("501 Error: SMTPUTF8 disabled", Reply(501, "5.5.4", "SMTPUTF8 disabled")),
    ("553 5.1.3 Error: malformed address", Reply(553, "5.1.3", "Malformed address")),
    ("555 ", Reply(555, "5.5.4", "Parameters not recognized or not implemented")),
    # Commands out of sequence (RFC 3463 X.5.1: invalid command).
    ("503 Error: need MAIL command", NEED_MAIL),
    ("503 Error: need RCPT command", Reply(503, "5.5.1", "Need RCPT command")),
    ("503 Error: nested MAIL command", Reply(503, "5.5.1", "Nested MAIL command")),
    ("503 Error: send HELO first", Reply(503, "5.5.1", "Send HELO or EHLO first")),
    ("503 Error: send EHLO first", Reply(503, "5.5.1", "Send EHLO first")),
    ("503 Already authenticated", Reply(503, "5.5.1", "Already authenticated")),
    # Commands the guard does not offer.
    ("502 EXPN not implemented", Reply(502, "5.5.1", "EXPN not implemented")),
    ("502 Could not VRFY", Reply(502, "5.5.4", "Could not VRFY the address")),
    # RFC 5321 3.5.3's own text; 2.0.0 (not 2.1.5 "destination address valid"): nothing was checked.
    ("252 Cannot VRFY", Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")),
    ("454 TLS not available", Reply(454, "4.7.0", "TLS not available")),
    ("220 Ready to start TLS", Reply(220, "2.0.0", "Ready to start TLS")),
    # Security.
    ("530 5.7.0 Authentication required", AUTH_REQUIRED),
    ("530 Must issue a STARTTLS command first", STARTTLS_REQUIRED),
    ("554 Command refused due to lack of security", Reply(554, "5.7.0", "Command refused due to lack of security")),
    # Success.
    ("250 OK", OK),
    ("221 Bye", BYE),
)

# Replies whose text the client needs (HELP lists the commands) keep it; only the code is added.
AIOSMTPD_ENHANCED_CODES: tuple[tuple[str, str], ...] = (
    ("250 Syntax: ", "2.0.0"),
    ("250 Supported commands: ", "2.0.0"),
    ("501 Supported commands: ", "5.5.4"),  # HELP for a command that does not exist
)


def _by_start(rewrites: tuple[tuple[str, Reply], ...]) -> dict[str, tuple[tuple[str, Reply], ...]]:
    """The rewrites grouped by their first four characters (code and separator), in table
    order: a reply is only compared with the few prefixes it can start with (every reply the
    guard sends passes here, and the whole table was 3 % of the CPU per message)."""
    groups: dict[str, list[tuple[str, Reply]]] = {}
    for prefix, reply in rewrites:
        assert len(prefix) >= 4, prefix
        groups.setdefault(prefix[:4], []).append((prefix, reply))
    return {start: tuple(group) for start, group in groups.items()}


_REWRITES_BY_START = _by_start(AIOSMTPD_REWRITES)
_HAS_ENHANCED_CODE = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
_GENERIC = {"2": "2.0.0", "4": "4.0.0", "5": "5.0.0"}


def rewrite_aiosmtpd_reply(status: str) -> str:
    """aiosmtpd's reply ``status`` with an enhanced code: the guard's own reply for it, or its
    text with the code inserted. Any other reply that already has one passes unchanged; one
    the tables do not know gets the generic code of its class (X.0.0), so none goes without."""
    for prefix, reply in _REWRITES_BY_START.get(status[:4], ()):
        if status.startswith(prefix):
            return str(reply)
    if _HAS_ENHANCED_CODE.match(status):
        return status
    for prefix, enhanced in AIOSMTPD_ENHANCED_CODES:
        if status.startswith(prefix):
            return f"{status[:4]}{enhanced} {status[4:]}"
    if len(status) >= 4 and status[:3].isdigit() and status[3] in " -" and status[0] in _GENERIC:
        return f"{status[:4]}{_GENERIC[status[0]]} {status[4:]}"
    return status

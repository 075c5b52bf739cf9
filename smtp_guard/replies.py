"""Every SMTP reply smtp-guard sends, with its RFC 3463 enhanced status code.

Nothing else in the code base formats a reply: handlers return these values, so a test can
assert a reply exactly and a single table keeps code class and enhanced class in step.
"""

from __future__ import annotations

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
    text = " ".join(line.strip() for line in message.splitlines() if line.strip()) or "upstream reply"
    parts = text.split(" ", 1)
    if len(parts[0].split(".")) == 3 and parts[0][0] in "245" and parts[0][0] == str(code)[0]:
        return Reply(code, parts[0], parts[1] if len(parts) > 1 else "")
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
BAD_RECIPIENT = Reply(553, "5.1.3", "Recipient address is not valid")
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
# The store stayed locked past [store] busy_timeout, or could not be written at all.
STORE_UNAVAILABLE = Reply(451, "4.3.0", "Message store unavailable, try again later")
# The disk holding the hold queue or the sandbox is full: RFC 3463 4.3.1, RFC 5321 452.
STORE_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, try again later")
# A policy that raised: fail closed and temporary (Postfix smtpd_policy_service_default_action).
POLICY_FAILED = Reply(451, "4.3.5", "Policy check failed, try again later")
UPSTREAM_CHANGED = Reply(451, "4.4.0", "Upstream refused a recipient it had accepted, try again later")

# The policy and relay replies above are the guard's; aiosmtpd formats a few of its own. The
# SMTP front rewrites these (matched by prefix) so the client always gets an enhanced code.
AIOSMTPD_REWRITES: tuple[tuple[str, Reply], ...] = (
    ("552 Error: Too much mail data", MESSAGE_TOO_BIG),
    ("552 Error: message size exceeds", MESSAGE_TOO_BIG),
    ("500 Line too long", LINE_TOO_LONG),
    ("500 Command line too long", Reply(500, "5.5.2", "Command line too long")),
    ("500 Error: bad syntax", Reply(500, "5.5.2", "Syntax error")),
    ("553 5.1.3 Error: malformed address", Reply(553, "5.1.3", "Malformed address")),
    ("503 Error: need MAIL command", NEED_MAIL),
    ("503 Error: need RCPT command", Reply(503, "5.5.1", "Need RCPT command")),
    ("503 Error: nested MAIL command", Reply(503, "5.5.1", "Nested MAIL command")),
    ("503 Error: send HELO first", Reply(503, "5.5.1", "Send HELO or EHLO first")),
    ("530 5.7.0 Authentication required", AUTH_REQUIRED),
    ("530 Must issue a STARTTLS command first", STARTTLS_REQUIRED),
    ("554 Command refused due to lack of security", Reply(554, "5.7.0", "Command refused due to lack of security")),
    ("555 ", Reply(555, "5.5.4", "Parameters not recognized or not implemented")),
    ("501 Syntax: MAIL", Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")),
    ("501 Syntax: RCPT", Reply(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")),
    ("503 Already authenticated", Reply(503, "5.5.1", "Already authenticated")),
    ("501 Not enough value", Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")),
    ("501 Too many values", Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")),
)


def rewrite_aiosmtpd_reply(status: str) -> str:
    for prefix, reply in AIOSMTPD_REWRITES:
        if status.startswith(prefix):
            return str(reply)
    return status

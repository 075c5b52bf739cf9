"""The SMTP listener: aiosmtpd's protocol with the guard's limits, replies and shutdown.

``GuardSMTP`` subclasses aiosmtpd's ``SMTP`` only where aiosmtpd has no hook:
* session accounting and the concurrent-session limit (connection_made/lost);
* ending the guard's transaction when aiosmtpd's ends without DATA (RSET, new EHLO,
  disconnect), so its upstream session goes back to the pool;
* rewriting aiosmtpd's own fixed replies to ones with enhanced status codes;
* command lines checked before aiosmtpd parses them (``CommandLineReader``);
* three clocks instead of aiosmtpd's one: ``idle_timeout`` between a reply and the next
  command, ``data_timeout`` between two reads inside DATA, ``session_timeout`` for the whole
  session (a DATA in progress included) — each a 421 4.4.2 instead of a silent close;
* AUTH failures counted per session and per client address (``AuthThrottle``);
* the PROXY protocol from the load balancers in ``[smtp] proxy_protocol_from`` only
  (``smtp/proxy.py``): aiosmtpd reads the header for those, and a connection from anywhere
  else that starts with one is refused before aiosmtpd sees a byte of it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import re
import socket
import ssl
import time
import types
from typing import Any, Awaitable, Callable

from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import SMTP, AuthResult, Session, _AuthMechAttr, syntax

from .. import replies
from ..addresses import PLAIN_ADDRESS
from ..config import SMTPConfig
from ..metrics import Metrics
from .access import AccessControl
from .auth import Authenticator, AuthThrottle
from .handler import GuardHandler
from .proxy import ProxyProtocol, client_ip, starts_with_header
from .transaction import Transaction

log = logging.getLogger("smtp_guard.smtp")

# ``<local@domain>`` with a dot-atom local part (RFC 5321 4.1.2) and a domain of LDH labels,
# then the parameters: the path nearly every client sends. What the stdlib parser aiosmtpd
# uses makes of exactly these is the text between the brackets, unchanged.
_PLAIN_PATH = re.compile(f"<({PLAIN_ADDRESS})>")

# Seconds a session's timer may fire before its deadline and still count as run out.
TIMER_SLACK = 0.005

# Seconds shutdown waits for ended transactions to return their upstream session, and for
# deliveries whose client left to finish.
CLEANUP_GRACE = 10.0


class SessionRegistry:
    """Open sessions, for the concurrency limit and graceful shutdown."""

    def __init__(self, metrics: Metrics) -> None:
        self.sessions: set["GuardSMTP"] = set()
        self._metrics = metrics
        self.accepting = True
        self._changed = asyncio.Event()
        # Transaction ends (upstream session back to the pool, erasure evidence written) and
        # deliveries whose client left run as tasks; shutdown waits for them.
        self.cleanups: set[asyncio.Task[Any]] = set()

    def add(self, session: "GuardSMTP") -> None:
        self.sessions.add(session)
        self._metrics.sessions_active.set(len(self.sessions))

    def remove(self, session: "GuardSMTP") -> None:
        self.sessions.discard(session)
        self._metrics.sessions_active.set(len(self.sessions))
        self._changed.set()

    async def wait_changed(self) -> None:
        self._changed.clear()
        await self._changed.wait()


class CommandLineReader:
    """aiosmtpd's stream reader, with every command line checked before aiosmtpd parses it.

    aiosmtpd reads a command up to the first LF, so ``MAIL FROM:<a@x>\nRCPT TO:<b@evil>\r\n``
    runs as two commands: what a buggy or hostile platform meant as one line smuggles in a
    second (Postfix refuses bare newlines since 3.9, ``smtpd_forbid_bare_newline``). Here a
    line ending in a bare LF, every further piece of it up to the CRLF that ends it, and a
    line with a CR or NUL anywhere before its CRLF are each answered by ``refuse`` and never
    handed to aiosmtpd.

    One refusal per LF-terminated piece, not one per CRLF-terminated line: the reader cannot
    tell whether ``EHLO x\n`` is a whole line from a client that ends every line in a bare LF
    or the first piece of a longer one, and only a reply per piece answers every line of such
    a client instead of leaving it waiting for a CRLF that may never come. A client that
    embedded LFs in one CRLF line gets more replies than it sent lines; none of the pieces ran.

    A line longer than the stream limit is discarded here too (aiosmtpd's own discarding
    cannot see how the line ended): it is refused with ``Command line too long``, and if it
    ended in a bare LF, what follows is still a piece of a broken line.

    aiosmtpd reads DATA lines with ``readuntil(b"\r\n")``: those pass unchecked (the transaction
    refuses or normalizes bare CR/LF in the content, ``[smtp] bare_line_endings``), and come in
    runs of whole lines (``_data_lines``).
    """

    def __init__(self, reader: asyncio.StreamReader, refuse: Callable[[replies.Reply], Awaitable[None]],
                 before_command: Callable[[], Awaitable[None]], data_run: int) -> None:
        self._reader = reader
        self._refuse = refuse
        self._before_command = before_command
        self._in_broken_line = False  # the last piece read ended in a bare LF
        self._data_run = data_run  # at most this many bytes per DATA read: aiosmtpd's line length limit

    # aiosmtpd swaps the transport and drops buffered plaintext at STARTTLS (RFC 3207 4.2).
    @property
    def _transport(self) -> Any:
        return self._reader._transport  # type: ignore[attr-defined]

    @_transport.setter
    def _transport(self, transport: Any) -> None:
        self._reader._transport = transport  # type: ignore[attr-defined]

    @property
    def _buffer(self) -> bytearray:
        return self._reader._buffer  # type: ignore[attr-defined,no-any-return]

    async def read(self, n: int = -1) -> bytes:
        return await self._reader.read(n)

    async def readexactly(self, n: int) -> bytes:
        # Only aiosmtpd's PROXY header reader uses it (smtp/proxy.py), before the greeting.
        return await self._reader.readexactly(n)

    async def readline(self) -> bytes:
        # Only AUTH reads a line this way (the client's answer to a 334 challenge). A broken
        # or too-long line becomes one that is not base64, so aiosmtpd answers it with its one
        # "501 5.5.2 Can't decode base64" and the exchange fails. (StreamReader.readline
        # would drop a too-long line's start and raise, leaving its tail to run as a command.)
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as error:
            line = error.partial  # the connection ended mid-line, as StreamReader.readline
        except asyncio.LimitOverrunError as error:
            self._in_broken_line = await self._discard_long_line(error.consumed) != b"\r\n"
            return b"\x00\r\n"
        return line if self._is_clean(line) else b"\x00\r\n"

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        if separator == b"\r\n":
            return await self._data_lines()
        if separator != b"\n":
            return await self._reader.readuntil(separator)
        while True:
            try:
                line = await self._reader.readuntil(separator)
            except asyncio.LimitOverrunError as error:
                ending = await self._discard_long_line(error.consumed)
                self._in_broken_line = ending != b"\r\n"
                await self._refuse(replies.COMMAND_LINE_TOO_LONG)
                continue
            if self._is_clean(line):
                await self._before_command()
                return line
            await self._refuse(replies.BAD_COMMAND_LINE)

    async def _data_lines(self) -> bytes:
        """The next DATA line, and with it the whole lines after it that are already received,
        up to ``data_run`` bytes: aiosmtpd's DATA loop then runs once per run instead of once
        per line (a line of a 5 kB message cost more in that loop than everything the guard
        decides about it).

        aiosmtpd takes a run for one line, so a run never holds a line that starts with a dot
        after its first: such a line (a transparency dot, RFC 5321 4.5.2, or the final ``.``)
        starts the next run, and aiosmtpd removes the dot, counts the line against the message
        size limit and recognizes the end of DATA exactly as it does line by line. A run is no
        longer than aiosmtpd's line length limit, so no line in it is either."""
        line = await self._reader.readuntil(b"\r\n")
        buffer = self._buffer
        room = self._data_run - len(line)
        if line == b".\r\n" or room < 2 or buffer[:1] == b".":
            return line
        dotted = buffer.find(b"\r\n.", 0, room + 1)  # the first line within reach that starts with a dot
        end = dotted + 2 if dotted != -1 else buffer.rfind(b"\r\n", 0, room) + 2
        if end <= 1:  # not one whole line more within reach
            return line
        return line + await self._reader.read(end)  # already received: returns at once, exactly ``end`` bytes

    async def _discard_long_line(self, consumed: int) -> bytes:
        """Read and drop a line past the stream limit, up to its first LF; return its last two
        bytes, which say whether it ended in CRLF or in a bare LF."""
        ending = (await self._reader.read(consumed))[-2:]
        while True:
            try:
                return (ending + await self._reader.readuntil(b"\n"))[-2:]
            except asyncio.LimitOverrunError as error:
                ending = (ending + await self._reader.read(error.consumed))[-2:]

    def _is_clean(self, line: bytes) -> bool:
        continues_broken_line = self._in_broken_line
        self._in_broken_line = not line.endswith(b"\r\n")
        return not (continues_broken_line or self._in_broken_line or b"\r" in line[:-2] or b"\x00" in line)


class GuardSession(Session):
    """aiosmtpd's session without its deprecated ``login_data``.

    aiosmtpd 1.4 still assigns ``session.login_data`` on every successful AUTH, and the
    attribute logs "Session.login_data is deprecated" at WARNING on ``mail.log`` each time it
    is touched. The guard reads ``auth_data`` (the user name its authenticator returns); the
    assignment is dropped here so no deprecated code path runs.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        # The client's address from a listed load balancer's PROXY header (smtp/proxy.py).
        self.proxied_ip: str | None = None

    @property
    def login_data(self) -> None:
        return None

    @login_data.setter
    def login_data(self, value: Any) -> None:
        pass


class SessionSetup:
    """What aiosmtpd's ``SMTP.__init__`` works out, worked out once per listener.

    aiosmtpd 1.4.6 builds its command and AUTH tables in every ``SMTP()`` — one per connection —
    with ``dir()`` and ``inspect.getmembers`` (which reads every attribute of the protocol and
    the handler), inspects the EHLO hook's signature and, without a hostname, calls
    ``socket.getfqdn()``: ~12 % of the guard's CPU with one message per connection (profile in
    bench/README.md, "Hot path"). Here ``SMTP.__init__`` runs once, on a prototype that never
    sees a connection; each connection copies its settings and binds the tables to itself.
    aiosmtpd's own per-connection state (the stream reader, timers, session) is created fresh.

    ``GuardSMTP.from_setup`` refuses to run if the prototype holds anything this copy does not
    know how to rebind, so an aiosmtpd upgrade that adds per-instance state fails loudly (and
    tests/test_front_setup.py compares a copied protocol with one aiosmtpd built itself).
    """

    # Tables of methods bound to the protocol: rebound to each connection's protocol.
    _BOUND_TABLES = ("_smtp_methods", "_auth_methods")

    def __init__(self, handler: GuardHandler, **smtp_kwargs: Any) -> None:
        if not smtp_kwargs.get("hostname"):
            smtp_kwargs["hostname"] = socket.getfqdn()  # once, not per connection
        prototype = GuardSMTP.__new__(GuardSMTP)
        SMTP.__init__(prototype, handler, **smtp_kwargs)
        loop = prototype.loop
        # StreamReaderProtocol's own state (reader, writer, closed future): fresh per connection.
        own = set(vars(asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), lambda r, w: None, loop=loop)))
        self.loop = loop
        self.attributes = {k: v for k, v in vars(prototype).items()
                           if k not in own and k not in self._BOUND_TABLES}
        for name, value in self.attributes.items():
            if _refers_to(value, prototype):
                raise RuntimeError(f"aiosmtpd's SMTP.{name} is bound to its instance; SessionSetup cannot share it")
            if isinstance(value, (dict, list, set)) and name != "_handle_hooks":
                # Mutable per-session state would be shared between sessions.
                raise RuntimeError(f"aiosmtpd's SMTP.{name} is mutable; SessionSetup cannot share it")
        self.smtp_methods = {name: method.__func__ for name, method in prototype._smtp_methods.items()}
        self.auth_methods: dict[str, tuple[Any, bool]] = {
            name: (getattr(impl.method, "__func__") if impl.is_builtin else impl.method, impl.is_builtin)
            for name, impl in prototype._auth_methods.items()}

    def apply(self, smtp: "GuardSMTP") -> None:
        """Give a new protocol aiosmtpd's state, as ``SMTP.__init__`` would have."""
        asyncio.StreamReaderProtocol.__init__(
            smtp, asyncio.StreamReader(loop=self.loop, limit=smtp.line_length_limit),
            client_connected_cb=smtp._cb_client_connected, loop=self.loop)
        smtp.__dict__.update(self.attributes)
        smtp._smtp_methods = {name: types.MethodType(func, smtp) for name, func in self.smtp_methods.items()}
        smtp._auth_methods = {name: _AuthMechAttr(types.MethodType(func, smtp) if builtin else func, builtin)
                              for name, (func, builtin) in self.auth_methods.items()}
        # aiosmtpd keeps command_size_limits on the class, shared by every session, and clears
        # it in every SMTP(): one session's EHLO raised (and the next connection reset) the MAIL
        # limit of all. Each session gets its own.
        smtp.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)


def _refers_to(value: Any, instance: object) -> bool:
    if getattr(value, "__self__", None) is instance:
        return True
    if isinstance(value, dict):
        return any(_refers_to(v, instance) for v in value.values())
    if isinstance(value, tuple):
        return any(_refers_to(v, instance) for v in value)
    return False


class GuardSMTP(SMTP):
    def __init__(self, handler: GuardHandler, registry: SessionRegistry, config: SMTPConfig,
                 metrics: Metrics, allow_plaintext_auth_on_loopback: bool, auth_throttle: AuthThrottle,
                 setup: SessionSetup | None = None, proxy: ProxyProtocol | None = None, **kwargs: Any) -> None:
        if setup is None:
            super().__init__(handler, **kwargs)
        else:
            setup.apply(self)
        self._registry = registry
        self._guard_config = config
        self._guard_metrics = metrics
        self._plaintext_auth_on_loopback = allow_plaintext_auth_on_loopback
        self._auth_throttle = auth_throttle
        self._auth_failures = 0
        self._session_deadline = float("inf")
        self._timer_ends_session = False  # the pending timeout is session_timeout's
        self._deadline = float("inf")  # when the client's current wait runs out (loop time)
        self._timer_at: float | None = None  # when the armed timer fires; None: none armed
        self.in_data = False  # inside the DATA command, from the command to its reply
        self._in_command = False  # a command line was read and its final reply not yet written
        self._reading_data = False  # between the 354 and the final dot: data_timeout applies
        self._answering_hello = False  # inside HELO/EHLO: their 250 lines carry no enhanced code
        self._continuation_lines: list[bytes] = []  # of a multi-line reply, until its last line
        self._proxy = proxy
        self._proxy_awaited = False  # a listed load balancer's connection: its header not taken yet
        # The first bytes of any other connection, until they tell whether it starts with a
        # PROXY header (None: they told, it does not).
        self._first_bytes: bytes | None = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first:
            self._session_deadline = self.loop.time() + self._guard_config.session_timeout
        super().connection_made(transport)
        if not first:
            return  # the STARTTLS upgrade of an existing session
        peer = transport.get_extra_info("peername")
        peer_ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if self._proxy is not None and self._proxy.is_trusted(peer_ip):
            # aiosmtpd reads the header before its greeting; until then nothing is known of
            # the client, not even whether it is on loopback.
            self._proxy_timeout = self._proxy.timeout
            self._proxy_awaited = True
            self._first_bytes = None
        elif self._plaintext_auth_on_loopback and AccessControl.is_loopback(peer_ip):
            self._auth_require_tls = False
        reason = None
        if not self._registry.accepting:
            reason, reply = "shutting_down", replies.SHUTTING_DOWN
        elif len(self._registry.sessions) >= self._guard_config.max_sessions:
            reason, reply = "max_sessions", replies.TOO_MANY_SESSIONS
        if reason is not None:
            self._guard_metrics.sessions_refused.labels(reason).inc()
            self._proxy_awaited = False  # refused for a reason of its own, header or not
            transport.write(f"{reply}\r\n".encode())  # type: ignore[attr-defined]
            transport.close()
            return
        self._registry.add(self)

    def _cb_client_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        checked = CommandLineReader(reader, self._refuse_command_line, self._check_session_deadline,
                                    self.line_length_limit)
        super()._cb_client_connected(checked, writer)  # type: ignore[arg-type]

    async def _refuse_command_line(self, reply: replies.Reply) -> None:
        await self.push(str(reply))

    async def _check_session_deadline(self) -> None:
        """Before each command: past ``session_timeout`` the session ends, however busy it is."""
        self._in_command = True
        if self.loop.time() < self._session_deadline:
            return
        self._close_with(replies.SESSION_TIMEOUT)
        # connection_lost cancels aiosmtpd's session task, which is waiting here.
        await self.loop.create_future()

    def data_received(self, data: bytes) -> None:
        if self._first_bytes is not None:
            data = self._first_bytes + data
            header = starts_with_header(data)
            if header is None:
                self._first_bytes = data  # a beginning of one: wait for the rest
                return
            self._first_bytes = None
            if header:
                self._refuse_proxy_header()
                return
        if self._reading_data:
            self._reset_timeout(self._guard_config.data_timeout)
        super().data_received(data)

    def _refuse_proxy_header(self) -> None:
        self._guard_metrics.proxy_headers.labels("untrusted").inc()
        log.warning("PROXY protocol header from %s, which is not in [smtp] proxy_protocol_from: refused, "
                    "connection closed", client_ip(self.session))
        self._close_with(replies.PROXY_REFUSED)

    def _take_proxy_header(self, header: ProxyData) -> bool:
        """aiosmtpd's PROXY hook, for a listed load balancer's valid header: take the client's
        address from it. False closes the connection."""
        assert self._proxy is not None and isinstance(self.session, GuardSession)
        self._proxy_awaited = False
        client = self._proxy.client_of(header)
        if client is None:
            self._guard_metrics.proxy_headers.labels("invalid").inc()
            log.warning("PROXY header from load balancer %s names a client that is not a TCP/IP one; closing",
                        client_ip(self.session))
            return False
        if not client:
            self._guard_metrics.proxy_headers.labels("local").inc()
            return True  # the balancer's own connection: its address is the client's
        self._guard_metrics.proxy_headers.labels("accepted").inc()
        self.session.proxied_ip = client
        if self._plaintext_auth_on_loopback and AccessControl.is_loopback(client):
            self._auth_require_tls = False
        return True

    def connection_lost(self, error: Exception | None) -> None:
        if self._proxy_awaited:
            # A listed balancer's connection that never gave a valid header (none, malformed,
            # or too late): aiosmtpd closed it.
            self._guard_metrics.proxy_headers.labels("invalid").inc()
            log.warning("connection from load balancer %s closed without a valid PROXY header",
                        client_ip(self.session))
            self._proxy_awaited = False
        self._end_transaction(self.envelope)
        self._registry.remove(self)
        super().connection_lost(error)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The path of MAIL/RCPT and what follows it, as aiosmtpd's ``_getaddr`` returns them.

        aiosmtpd runs the stdlib ``email`` header parser on every path (and defines a class per
        call): 8 % of the guard's CPU per message. A plain ``<local@domain>`` is split here with
        the same result; any other spelling still goes through aiosmtpd. Neither validates:
        ``addresses.parse_mailbox`` does, in the handler, and what it accepted is what is relayed.
        """
        match = _PLAIN_PATH.match(arg)
        if match is None or (self.local_part_limit and match.group(1).rfind("@") > self.local_part_limit):
            return super()._getaddr(arg)
        rest = arg[match.end():]
        if rest[:1] in (" ", "\t"):
            rest = rest.lstrip()  # the stdlib parser eats folding white space after the ">" ...
        if rest.startswith("("):
            return super()._getaddr(arg)  # ... and comments, which are left to it
        return match.group(1), rest

    def _getparams(self, params: Any) -> dict[str, str | bool] | None:
        """MAIL and RCPT parameters as aiosmtpd reads them, except that a SIZE with anything but
        ASCII digits counts as no number. aiosmtpd takes every Unicode digit (``SIZE=²``) for
        one, then fails in ``int()``: a 451 and an ERROR traceback in the log per command, for
        any client to repeat. Given no number, aiosmtpd answers 501 as for ``SIZE=abc``."""
        result: dict[str, str | bool] | None = super()._getparams(params)
        size = None if result is None else result.get("SIZE")
        if result is not None and isinstance(size, str) and not (size.isascii() and size.isdigit()):
            result["SIZE"] = True
        return result

    def _create_session(self) -> Session:
        return GuardSession(self.loop)

    def _create_envelope(self) -> Any:
        # Called by aiosmtpd on every reset (EHLO, RSET, after DATA): the old transaction ends.
        self._end_transaction(getattr(self, "envelope", None))
        return super()._create_envelope()

    def _end_transaction(self, envelope: Any) -> None:
        txn: Transaction | None = getattr(envelope, "guard_txn", None)
        if txn is None:
            return
        if txn.delivery is not None:
            if txn.delivery.done():
                return
            # The client left after its final dot, before the reply: the delivery goes on (the
            # upstream may have the message already) and ends the transaction; shutdown waits
            # for it like for any cleanup. The client never got a 250 and will likely send the
            # message again (RFC 1047).
            log.warning("txn=%s client=%s disconnected before the reply to its DATA; finishing the delivery",
                        txn.txn_id, txn.client)
            task: asyncio.Task[Any] = txn.delivery
            task.add_done_callback(functools.partial(_log_delivery_failure, txn.txn_id))
        elif txn.needs_cleanup:
            task = self.loop.create_task(txn.end())
        else:
            return
        self._registry.cleanups.add(task)
        task.add_done_callback(self._registry.cleanups.discard)

    async def push(self, status: Any) -> None:
        if isinstance(status, str) and self._takes_enhanced_code(status):
            status = replies.rewrite_aiosmtpd_reply(status)
        if isinstance(status, str) and status[3:4] == "-" and status[:3].isdigit():
            # A line of a multi-line reply (EHLO's keywords): aiosmtpd writes and drains each
            # line on its own, one send() per line. They go out together with the last one.
            self._continuation_lines.append(status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") + b"\r\n")
            return
        reading_data = str(status).startswith("354")
        if self._continuation_lines:
            lines, self._continuation_lines = self._continuation_lines, []
            if isinstance(status, str):
                status = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
            status = b"".join(lines) + status
        await super().push(status)
        self._in_command = False
        # The client's turn: after 354 it owes message data (data_timeout between reads, see
        # data_received), after any other reply its next command (idle_timeout).
        self._reading_data = reading_data
        if self.transport is not None:
            self._reset_timeout(self._guard_config.data_timeout if self._reading_data else None)

    def _takes_enhanced_code(self, status: str) -> bool:
        """RFC 2034: every reply but the greeting and the reply to HELO/EHLO, whose 250 lines
        are the hostname and the EHLO keywords."""
        if self._answering_hello and status.startswith("250"):
            return False
        return status != f"220 {self.hostname} {self.__ident__}"

    # Each smtp_* override repeats aiosmtpd's @syntax: HELP lists only commands that have one.
    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        self._answering_hello = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._answering_hello = False

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self._answering_hello = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._answering_hello = False

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        if command == "PROXY":  # the listener's business, not the handler's
            return self._take_proxy_header(args[0])
        if command == "DATA":
            # The final dot is in: from here the guard is working, not the client, and the
            # upstream's own timeouts bound that work. The clock restarts with the reply.
            self._reading_data = False
            self._disarm_timer()
        return await super()._call_handler_hook(command, *args)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        self.in_data = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self.in_data = False

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        await super().smtp_AUTH(arg)
        if self._auth_failures >= self._guard_config.auth.max_failures_per_session:
            # The reply (421) is out; the connection goes with it.
            if self.transport is not None:
                self.transport.close()

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        # Every credential check passes here (PLAIN and LOGIN, initial response or challenge).
        client = client_ip(self.session)
        if self._auth_throttle.is_throttled(client):
            outcome, result = "throttled", AuthResult(success=False, handled=False,
                                                      message=str(replies.AUTH_THROTTLED))
        else:
            result = super()._authenticate(mechanism, auth_data)
            if result.success:
                return result
            outcome = "invalid"
            self._auth_throttle.record_failure(client)
        self._guard_metrics.auth_failures.labels(outcome).inc()
        self._auth_failures += 1
        log.info("AUTH %s failed for client %s (%s, %d in this session)", mechanism, client, outcome,
                 self._auth_failures)
        if self._auth_failures >= self._guard_config.auth.max_failures_per_session:
            return AuthResult(success=False, handled=False, message=str(replies.AUTH_TOO_MANY_FAILURES))
        return result

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd's one timer, cut short by the end of the session: session_timeout caps the
        # whole session, a DATA in progress included (a client trickling a byte per read
        # would otherwise keep it open for ever). Only the guard's own work after the final
        # dot runs without a timer (see _call_handler_hook); the next command is checked.
        #
        # This runs for every command, every reply and every read inside DATA. aiosmtpd
        # cancels and re-creates its timer each time (3 % of the CPU per message); here a
        # deadline moving later only moves ``_deadline``, and the armed timer, when it fires
        # early, re-arms itself for it. Only a deadline moving earlier re-arms at once.
        wait = duration or self._timeout_duration
        now = self.loop.time()
        remaining = self._session_deadline - now
        self._timer_ends_session = remaining <= wait
        self._deadline = now + max(0.0, min(wait, remaining))
        if self._timer_at is None or self._deadline < self._timer_at:
            self._arm_timer(self._deadline)

    def _arm_timer(self, when: float) -> None:
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._timer_at = when
        self._timeout_handle = self.loop.call_at(when, self._timeout_cb)

    def _disarm_timer(self) -> None:
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._timer_at = None

    def _timeout_cb(self) -> None:
        self._timer_at = None
        # The loop may run a timer up to its clock resolution early (1 ms on uvloop): only a
        # deadline further away than that was really pushed back.
        if self._deadline - self.loop.time() > TIMER_SLACK:
            self._arm_timer(self._deadline)
            return
        if self._timer_ends_session:
            reply = replies.SESSION_TIMEOUT
        else:
            reply = replies.DATA_TIMEOUT if self._reading_data else replies.IDLE_TIMEOUT
        self._close_with(reply)

    def _close_with(self, reply: replies.Reply) -> None:
        """Say why (a 421), then close; connection_lost cleans up."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(f"{reply}\r\n".encode())  # type: ignore[attr-defined]
            self.transport.close()

    def close_idle(self) -> None:
        """Shutdown: tell a session between transactions to go away (421) and close it."""
        self._close_with(replies.SHUTTING_DOWN)

    @property
    def is_idle(self) -> bool:
        """Waiting for the client's next command, outside DATA and with no upstream transaction
        open: safe to close. (A command still being answered, such as a first RCPT waiting for
        the upstream, is not idle: cutting it would lose the reply the client is owed.)"""
        if self.in_data or self._in_command:
            return False
        envelope = self.envelope
        return envelope is None or getattr(envelope, "guard_txn", None) is None or not getattr(envelope, "rcpt_tos", None)


def _log_delivery_failure(txn_id: str, delivery: asyncio.Task[Any]) -> None:
    # With its caller cancelled, asyncio.shield marks the delivery's exception as retrieved:
    # without this, a delivery that failed after its client left would fail silently.
    if not delivery.cancelled() and (error := delivery.exception()) is not None:
        log.error("txn=%s internal error in the delivery of a message whose client left", txn_id, exc_info=error)


class SMTPServer:
    """Listening socket plus the sessions it spawned, with a time-limited graceful shutdown."""

    def __init__(self, handler: GuardHandler, config: SMTPConfig, metrics: Metrics,
                 tls_context: ssl.SSLContext | None, authenticator: Authenticator | None,
                 clock: Callable[[], float] = time.time) -> None:
        self._handler = handler
        self._config = config
        self._metrics = metrics
        self._tls = tls_context
        self._authenticator = authenticator
        # One throttle for every session: failures are counted per client address.
        self.auth_throttle = AuthThrottle(config.auth.max_failures_per_client, config.auth.failure_window, clock)
        self.registry = SessionRegistry(metrics)
        self._proxy = ProxyProtocol(config.proxy_networks(), config.proxy_protocol_timeout) \
            if config.proxy_protocol_from else None
        self._server: asyncio.base_events.Server | None = None

    def _smtp_kwargs(self) -> dict[str, Any]:
        """aiosmtpd's ``SMTP`` arguments, the same for every session."""
        config = self._config
        return dict(
            hostname=config.hostname or None,
            ident=config.banner,  # aiosmtpd's default names itself: "Python SMTP 1.4.6"
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=self._tls,
            require_starttls=config.tls.require,
            timeout=config.idle_timeout,
            authenticator=self._authenticator,
            auth_required=False,  # allowed networks relay without AUTH; the handler decides
            auth_require_tls=True,
        )

    def _factory(self) -> Callable[[], GuardSMTP]:
        config = self._config
        setup = SessionSetup(self._handler, **self._smtp_kwargs())

        def make() -> GuardSMTP:
            return GuardSMTP(
                self._handler, self.registry, config, self._metrics,
                allow_plaintext_auth_on_loopback=config.auth.allow_plaintext_on_loopback,
                auth_throttle=self.auth_throttle, setup=setup, proxy=self._proxy)
        return make

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Several worker processes bind the same port; the kernel spreads connections over them.
        self._server = await loop.create_server(self._factory(), self._config.listen.host, self._config.listen.port,
                                                reuse_port=self._config.workers > 1)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None and self._server.sockets
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def stop(self, grace: float) -> None:
        """Stop accepting; close idle sessions at once; give sessions in a transaction up to
        ``grace`` seconds to finish; then cut the rest (a cut client never got its 250)."""
        self.registry.accepting = False
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.registry.sessions:
            for session in list(self.registry.sessions):
                if session.is_idle:
                    session.close_idle()
            remaining = deadline - loop.time()
            if remaining <= 0 or not self.registry.sessions:
                break
            try:
                async with asyncio.timeout(min(remaining, 0.2)):
                    await self.registry.wait_changed()
            except TimeoutError:
                pass
        for session in list(self.registry.sessions):
            if session.transport is not None:
                log.warning("closing session still busy after %.0fs shutdown grace", grace)
                session.transport.close()
        if self.registry.cleanups:
            await asyncio.wait(set(self.registry.cleanups), timeout=CLEANUP_GRACE)
        if self._server is not None:
            await self._server.wait_closed()

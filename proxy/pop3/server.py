"""The POP3 pre-auth protocol core, sans-IO: client bytes in, events and reply bytes out.

`Pop3Core` speaks the AUTHORIZATION state of POP3 (RFC 1939) with the extensions a legacy client
needs to log in: CAPA and response codes (RFC 2449, RFC 3206), STLS (RFC 2595), USER/PASS, and
AUTH PLAIN / LOGIN with and without an initial response (RFC 5034), plus the bare `AUTH` listing
that RFC 1734-era clients (Outlook) send. It never touches a socket, a clock or the
Authenticator: the frontend moves bytes, carries out the events (proxy.events) and feeds results
back through `auth_failed`, `auth_succeeded`, `tls_started` and `login_timeout`.

Every input is bounded (Pop3Limits). Secrets are never put into replies, events other than
Authenticate, or exception texts.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.auth.decision import Refusal
from proxy.core import PreAuthCore, State, reply_text
from proxy.events import Authenticate, Close, Event, Failed, Send, StartTLS
from proxy.linebuffer import LineBuffer, TooLong
from proxy.sasl import (
    MAX_FIELD,
    MECHANISMS,
    Credentials,
    SaslExchange,
    Step,
    StepResult,
    is_valid_login,
    server_mechanism,
)

CRLF = b"\r\n"

# --- Limits ----------------------------------------------------------------------------------

# Command line: 512 octets, CRLF included. RFC 2449 §4 caps commands at 255 octets, but USER and
# PASS must carry a 255-octet login (RFC 4616's field limit, sasl.MAX_FIELD) plus the keyword;
# Dovecot's pop3-login notes "spec says 512 would be enough" (and accepted 1024), nginx holds a
# POP3 command in one page.
MAX_LINE = 512

# AUTH command line and SASL response lines: 4096 octets, CRLF included. RFC 5034 §4 keeps an
# AUTH with initial response within 255 octets (the client leaves the response out otherwise) and
# sets no bound on continuation lines; the longest valid PLAIN response is 1024 base64
# characters. Dovecot's login processes read a SASL response into a 4096-octet buffer
# (LOGIN_MAX_INBUF_SIZE).
MAX_AUTH_LINE = 4096

# Commands before login: 50, then -ERR and close. A real client needs fewer than ten (CAPA, STLS,
# CAPA, USER, PASS, a retry); Postfix counts up to 100 junk commands (smtpd_junk_command_limit);
# the IMAP and SMTP cores use 50.
MAX_COMMANDS = 50

# Failed logins per connection: 3, then close. As the IMAP and SMTP cores (Stalwart's
# auth.max-failures example, Dovecot's login limits); the frontend delays each failure too.
MAX_FAILURES = 3

# Protocol errors (-ERR for bad commands) per connection: 5, then close. nginx's mail max_errors
# default (5, against the ALPACA cross-protocol attack, CVE-2021-3618); Dovecot's pop3-login
# closed after 10 bad commands (CLIENT_MAX_BAD_COMMANDS).
MAX_ERRORS = 5

# Input a client pipelines behind its PASS or AUTH while the Authenticator works (RFC 2449
# PIPELINING): 16384 octets, then -ERR and close. nginx holds such input in one page (4k|8k);
# the IMAP and SMTP cores allow 16384.
MAX_PENDING = 16384


@dataclass(frozen=True)
class Pop3Limits:
    """Bounds on what a client may make the core hold or do before login (see the constants)."""

    max_line: int = MAX_LINE  # command line octets, CRLF included
    max_auth_line: int = MAX_AUTH_LINE  # AUTH line and SASL response octets, CRLF included
    max_commands: int = MAX_COMMANDS  # command and response lines before login, then close
    max_failures: int = MAX_FAILURES  # failed logins, then close
    max_errors: int = MAX_ERRORS  # protocol errors, then close
    max_pending: int = MAX_PENDING  # input held while a login is being decided, then close

    def __post_init__(self) -> None:
        for name in ("max_line", "max_auth_line", "max_commands", "max_failures", "max_errors",
                     "max_pending"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Pop3Limits.{name} must be a positive integer, not {value!r}")
        if self.max_auth_line < self.max_line:
            raise ValueError("Pop3Limits.max_auth_line must be at least max_line")

    @property
    def max_buffered(self) -> int:
        """The most the core ever holds between two calls: a partial line, or pending input."""
        return max(self.max_auth_line, self.max_pending)


_AUTH_FAILED = "-ERR [AUTH] Authentication failed."
_PLAINTEXT_DISALLOWED = ("-ERR [AUTH] Plaintext authentication disallowed on non-secure "
                         "(SSL/TLS) connections.")

# Replies to an auth_failed Refusal (DESIGN.md "Decisions and replies"; RFC 2449 §8.1.2 [SYS/TEMP],
# RFC 3206 §4 [AUTH]).
REFUSAL_REPLIES: dict[Refusal, tuple[str, str]] = {
    Refusal.CREDENTIALS: ("-ERR [AUTH]", "Authentication failed."),
    Refusal.EXPIRED: ("-ERR [AUTH]", "Authentication failed."),
    Refusal.FORBIDDEN: ("-ERR [AUTH]", "Authentication failed."),
    Refusal.PRIVACY: ("-ERR [AUTH]", "Plaintext authentication disallowed on non-secure "
                                     "(SSL/TLS) connections."),
    Refusal.TEMPORARY: ("-ERR [SYS/TEMP]", "Temporary authentication failure, try again later."),
    Refusal.LIMIT: ("-ERR [SYS/TEMP]", "Too many login attempts, try again later."),
}

# AUTHORIZATION-state commands of RFC 1939 §7 and RFC 2449 that make sense only after login.
_TRANSACTION = frozenset({"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "LAST"})




def _has_controls(line: bytes) -> bool:
    return any(b < 0x20 and b != 0x09 or b == 0x7F for b in line)




class Pop3Core(PreAuthCore):
    """The AUTHORIZATION state of one POP3 connection (h11-style, no I/O)."""

    _State = State

    def __init__(
        self,
        *,
        tls_active: bool,
        starttls_available: bool,
        plaintext_auth: bool,
        limits: Pop3Limits = Pop3Limits(),
        hostname: str = "apppass",
    ) -> None:
        if not (hostname.isascii() and hostname.isprintable() and hostname.strip() == hostname
                and hostname):
            raise ValueError(f"hostname must be printable ASCII, not {hostname!r}")
        self.tls_active = tls_active
        self.starttls_available = starttls_available
        self.plaintext_auth = plaintext_auth
        self.limits = limits
        self.hostname = hostname
        self.commands = 0  # command and SASL response lines before login
        self.failures = 0  # failed logins
        self.errors = 0  # protocol errors
        self._lines = LineBuffer(limits.max_auth_line)
        self._state = State.COMMAND
        self._user: bytes | None = None  # the name of an accepted USER, until PASS
        self._sasl: SaslExchange | None = None

    # -- what the frontend calls --------------------------------------------------------------

    def capabilities(self) -> list[str]:
        """The pre-auth CAPA list (RFC 2449 §6; RFC 2595 §4 STLS; RFC 5034 §5 SASL)."""
        caps: list[str] = []
        if self.plaintext_allowed:
            caps += ["USER", "SASL " + " ".join(MECHANISMS)]
        if self.starttls_available and not self.tls_active:
            caps.append("STLS")
        caps += ["RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "IMPLEMENTATION apppass"]
        return caps

    def greeting(self) -> list[Event]:
        return [_send(f"+OK {self.hostname} ready.")]

    # -- PreAuthCore hooks ---------------------------------------------------------------------

    def _overflow(self, events: list[Event]) -> None:
        events.append(_send("-ERR Too much input before login completed."))
        self._close("pending input too large", events)

    def _forget_before_tls(self) -> None:
        """Forget the AUTHORIZATION state so far (RFC 2595 §4)."""
        self._user = None

    def _refused(self, refusal: Refusal, text: str | None, events: list[Event]) -> None:
        code, default = REFUSAL_REPLIES[refusal]
        human = (reply_text(text).strip() if text else "") or default
        self._failure(f"{code} {human}", events)

    def _success(self) -> Event:
        return _send("+OK Logged in.")

    def login_timeout(self) -> list[Event]:
        """The frontend's clock says the time to log in is over.

        RFC 1939 §3: when the autologout timer expires the server closes the connection "without
        ... sending any response to the client". So: Close only.
        """
        if self._state in (State.CLOSED, State.LOGGED_IN):
            return []
        events: list[Event] = []
        self._close("login timeout", events)
        return events

    # -- the parsing loop ---------------------------------------------------------------------

    def _run(self) -> list[Event]:
        events: list[Event] = []
        while self._state in (State.COMMAND, State.SASL):
            line = self._lines.next_line()
            if line is None:
                break
            self.commands += 1
            if self.commands > self.limits.max_commands:
                events.append(_send("-ERR Too many commands."))
                self._close("too many commands", events)
                break
            if self._state is State.SASL:
                self._on_sasl_line(line, events)
            elif isinstance(line, TooLong):
                self._error("-ERR Command line too long.", events, "line too long")
            else:
                self._on_command_line(line, events)
        return events

    def _on_command_line(self, line: bytes, events: list[Event]) -> None:
        keyword, _, args = line.partition(b" ")
        keyword = keyword.upper()
        if keyword != b"AUTH" and len(line) + 2 > self.limits.max_line:
            self._error("-ERR Command line too long.", events, "line too long")
        elif _has_controls(line):
            self._error("-ERR Invalid characters in command.", events,
                        "control characters in command")
        else:
            name = keyword.decode("latin-1")
            if name != "PASS":
                # RFC 1939 §7: after USER the client may issue PASS (or QUIT); anything else
                # forgets the name, so a stray line cannot pair an old USER with a later PASS.
                self._user = None
            handler = _COMMANDS.get(name)
            if handler is not None:
                handler(self, args, events)
            elif name in _TRANSACTION:
                self._error("-ERR Not logged in.", events, "transaction command before login")
            else:
                self._error("-ERR Unknown command.", events, "unknown command")

    # -- commands -----------------------------------------------------------------------------

    def _cmd_capa(self, args: bytes, events: list[Event]) -> None:
        lines = ["+OK Capability list follows", *self.capabilities(), "."]
        events.append(Send("".join(f"{line}\r\n" for line in lines).encode("ascii")))

    def _cmd_quit(self, args: bytes, events: list[Event]) -> None:
        events.append(_send("+OK Logging out."))
        self._close("client quit", events)

    def _cmd_stls(self, args: bytes, events: list[Event]) -> None:
        if self.tls_active:
            self._error("-ERR Command not permitted when TLS active", events, "STLS under TLS")
        elif not self.starttls_available:
            self._error("-ERR STLS not available.", events, "STLS not available")
        else:
            events.append(_send("+OK Begin TLS negotiation"))
            events.append(StartTLS())
            # CVE-2011-0411: whatever was pipelined behind STLS is plaintext injection.
            self._lines.clear()
            self._user = None
            self._state = State.STARTING_TLS

    def _cmd_user(self, args: bytes, events: list[Event]) -> None:
        if not self.plaintext_allowed:
            self._error(_PLAINTEXT_DISALLOWED, events, "plaintext authentication without TLS")
        elif not args:
            self._error("-ERR Syntax: USER name", events, "USER without a name")
        else:
            # RFC 1939 §7: a name may contain spaces; it is taken as sent and checked at PASS,
            # so USER answers the same for every name.
            self._user = args
            events.append(_send("+OK"))

    def _cmd_pass(self, args: bytes, events: list[Event]) -> None:
        user, self._user = self._user, None
        if user is None:
            self._error("-ERR No username given.", events, "PASS without USER")
            return
        # RFC 1939 §7: the password is the rest of the line, spaces included.
        try:
            login, secret = user.decode("utf-8"), args.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse_here(events, "USER or PASS is not UTF-8")
            return
        if not is_valid_login(login):
            self._refuse_here(events, "invalid login name")
        elif len(args) > MAX_FIELD:
            self._refuse_here(events, "password too long")
        else:
            self._state = State.AUTHENTICATING
            events.append(Authenticate(Credentials(login, secret), "USER"))

    def _cmd_apop(self, args: bytes, events: list[Event]) -> None:
        self._error("-ERR APOP is not supported.", events, "APOP")

    def _cmd_auth(self, args: bytes, events: list[Event]) -> None:
        words = args.split()
        if not words:
            # The RFC 1734-era listing (Outlook, Thunderbird probe it): mechanisms, then ".".
            names = list(MECHANISMS) if self.plaintext_allowed else []
            text = "".join(f"{line}\r\n" for line in ["+OK", *names, "."])
            events.append(Send(text.encode("ascii")))
            return
        if len(words) > 2:
            self._error("-ERR Syntax: AUTH mechanism [initial-response]", events,
                        "bad AUTH syntax")
            return
        name = words[0]
        mechanism = server_mechanism(name.decode("ascii")) if name.isascii() else None
        if mechanism is None:
            self._error("-ERR Unsupported authentication mechanism.", events,
                        "unknown SASL mechanism")
            return
        if not self.plaintext_allowed:
            self._error(_PLAINTEXT_DISALLOWED, events, "plaintext authentication without TLS")
            return
        self._sasl = SaslExchange(mechanism)
        initial = words[1].decode("latin-1") if len(words) == 2 else None
        self._sasl_result(self._sasl.start(initial), events)

    def _on_sasl_line(self, line: bytes | TooLong, events: list[Event]) -> None:
        assert self._sasl is not None
        if isinstance(line, TooLong):
            self._end_sasl()
            self._error("-ERR Authentication response too long.", events, "SASL response too long")
        else:
            self._sasl_result(self._sasl.respond(line), events)

    def _sasl_result(self, result: StepResult, events: list[Event]) -> None:
        """Turn one step of the shared SASL exchange into POP3's reply (RFC 5034 §4)."""
        assert self._sasl is not None
        mechanism = self._sasl.name
        if result.step is Step.CHALLENGE:
            self._state = State.SASL
            events.append(_send(f"+ {result.challenge}"))  # "+" SP base64 (may be empty)
            return
        self._end_sasl()
        if result.step is Step.DONE:
            self._state = State.AUTHENTICATING
            events.append(Authenticate(result.credentials, mechanism))
        elif result.step is Step.CANCELLED:  # the server MUST reject the AUTH with -ERR
            self._error("-ERR Authentication cancelled.", events, "SASL exchange cancelled")
        elif result.step is Step.BAD_BASE64:
            self._error("-ERR Invalid base64 data.", events, "invalid base64")
        else:
            self._refuse_here(events, result.detail)

    def _end_sasl(self) -> None:
        self._sasl = None
        self._state = State.COMMAND

    # -- replies and counters -----------------------------------------------------------------

    def _refuse_here(self, events: list[Event], reason: str) -> None:
        """Credentials the core refuses itself (no Authenticate): -ERR [AUTH] and Failed."""
        self._failure(_AUTH_FAILED, events, reason)

    def _failure(self, reply: str, events: list[Event], reason: str | None = None) -> None:
        """A failed login; after max_failures the connection closes (POP3 has no unsolicited
        replies, so the failure's own -ERR is the last word)."""
        events.append(_send(reply))
        if reason is not None:
            events.append(Failed(reason))
        self.failures += 1
        if self.failures >= self.limits.max_failures:
            self._close("too many failed logins", events)

    def _error(self, reply: str, events: list[Event], reason: str) -> None:
        """A protocol error: -ERR and a Failed event; after max_errors the connection closes."""
        events.append(_send(reply))
        events.append(Failed(reason))
        self.errors += 1
        if self.errors >= self.limits.max_errors:
            self._close("too many errors", events)

    def _close(self, reason: str, events: list[Event]) -> None:
        events.append(Close(reason))
        self._state = State.CLOSED
        self._sasl = None
        self._user = None
        self._lines.clear()


_COMMANDS = {
    "CAPA": Pop3Core._cmd_capa,
    "QUIT": Pop3Core._cmd_quit,
    "STLS": Pop3Core._cmd_stls,
    "USER": Pop3Core._cmd_user,
    "PASS": Pop3Core._cmd_pass,
    "APOP": Pop3Core._cmd_apop,
    "AUTH": Pop3Core._cmd_auth,
}


def _send(text: str) -> Send:
    return Send(text.encode("ascii") + CRLF)

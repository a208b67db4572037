"""The SMTP pre-auth protocol core, sans-IO, and the post-login command watch.

`SmtpCore` speaks the part of SMTP (RFC 5321) a submission client needs before it is
authenticated: EHLO/HELO, STARTTLS (RFC 3207), AUTH PLAIN and LOGIN with and without an initial
response (RFC 4954), with enhanced status codes (RFC 3463) and pipelining (RFC 2920). It never
touches a socket, a clock or the Authenticator: the frontend moves bytes, carries out the events
(proxy.events) and feeds results back through `auth_failed`, `auth_succeeded`, `tls_started` and
`login_timeout`.

`SmtpCommandWatch` sits in the relay after login. It follows the client's stream (command lines,
DATA content, BDAT chunks) and the upstream's replies, refuses XCLIENT, XFORWARD, STARTTLS and
role reversal from the client (the proxy's trust with the upstream is not the client's to use),
and puts its own refusals into the reply stream in the right place.

Every input is bounded (SmtpLimits, SmtpWatchLimits). Secrets are never put into replies, events
other than Authenticate, or exception texts.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy.auth.decision import Refusal
from proxy.core import PreAuthCore, State, reply_text
from proxy.events import Authenticate, Close, Event, Failed, Send, StartTLS
from proxy.linebuffer import LineBuffer, TooLong
from proxy.sasl import (
    MECHANISMS,
    SaslExchange,
    Step,
    StepResult,
    server_mechanism,
)

CRLF = b"\r\n"

# --- Limits ----------------------------------------------------------------------------------

# Command line: 512 octets, CRLF included (RFC 5321 §4.5.3.1.4). Before login a client sends
# only EHLO/HELO, STARTTLS, AUTH, NOOP, RSET, QUIT, none of which needs more; Postfix accepts
# up to line_length_limit (2048) but nothing legitimate here comes near 512.
MAX_LINE = 512

# AUTH command line and SASL response lines: 12288 octets, CRLF included (RFC 4954 §4: the AUTH
# line limit is raised to 12288 so that an initial response fits). The longest valid PLAIN
# response is 1024 base64 characters (three fields of at most 255 octets, sasl.MAX_FIELD).
MAX_AUTH_LINE = 12288

# Commands before login: 50, then 421. A real client needs fewer than ten (EHLO, STARTTLS, EHLO,
# AUTH and its responses, a retry); Postfix counts up to 100 junk commands
# (smtpd_junk_command_limit) before it starts counting them as errors; the IMAP core uses 50.
MAX_COMMANDS = 50

# Failed authentications per connection: 3, then 421. As the IMAP core (Stalwart's
# auth.max-failures example, Dovecot's login limits); the frontend delays each failure too.
MAX_FAILURES = 3

# Protocol errors (5xx syntax and sequence replies) per connection: 5, then 421. nginx's mail
# max_errors default (5, added against the ALPACA cross-protocol attack, CVE-2021-3618); Postfix
# uses smtpd_soft_error_limit 10 and smtpd_hard_error_limit 20.
MAX_ERRORS = 5

# Input a client pipelines behind its AUTH while the Authenticator works: 16384 octets, then
# 421. RFC 4954 §4 lets AUTH PLAIN with an initial response be followed in the same pipelined
# group (RFC 2920) by MAIL, RCPT… and DATA: a few dozen envelope lines. nginx holds such input in
# smtp_client_buffer (one page, 4k|8k); the IMAP core allows 16384.
MAX_PENDING = 16384

# EHLO keywords learned from the upstream that the proxy never passes on: it answers AUTH and
# STARTTLS itself, and XCLIENT/XFORWARD are the proxy's trust with the upstream, not the client's.
WITHHELD_EXTENSIONS = frozenset({"AUTH", "STARTTLS", "XCLIENT", "XFORWARD"})

# Commands a client may never use through the proxy: XCLIENT/XFORWARD (DESIGN: a peer proxy that
# splices after XCLIENT lets any user become any other; Postfix answers an unauthorised client
# "550 5.7.0 Error: insufficient authorization").
PROXY_ONLY_COMMANDS = frozenset({"XCLIENT", "XFORWARD"})


@dataclass(frozen=True)
class SmtpLimits:
    """Bounds on what a client may make the core hold or do before login (see the constants)."""

    max_line: int = MAX_LINE  # command line octets, CRLF included
    max_auth_line: int = MAX_AUTH_LINE  # AUTH line and SASL response octets, CRLF included
    max_commands: int = MAX_COMMANDS  # command and response lines before login, then 421 + Close
    max_failures: int = MAX_FAILURES  # failed authentications, then 421 + Close
    max_errors: int = MAX_ERRORS  # protocol errors, then 421 + Close
    max_pending: int = MAX_PENDING  # input held while a login is being decided, then 421 + Close

    def __post_init__(self) -> None:
        for name in ("max_line", "max_auth_line", "max_commands", "max_failures", "max_errors",
                     "max_pending"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SmtpLimits.{name} must be a positive integer, not {value!r}")
        if self.max_auth_line < self.max_line:
            raise ValueError("SmtpLimits.max_auth_line must be at least max_line")

    @property
    def max_buffered(self) -> int:
        """The most the core ever holds between two calls: a partial line, or pending input."""
        return max(self.max_auth_line, self.max_pending)


# Replies to an auth_failed Refusal (DESIGN.md "Decisions and replies"; RFC 4954 §6, RFC 3463).
REFUSAL_REPLIES: dict[Refusal, tuple[str, str]] = {
    Refusal.CREDENTIALS: ("535 5.7.8", "Authentication credentials invalid"),
    Refusal.EXPIRED: ("535 5.7.8", "Authentication credentials invalid"),
    Refusal.FORBIDDEN: ("535 5.7.8", "Authentication credentials invalid"),
    Refusal.PRIVACY: ("538 5.7.11", "Encryption required for requested authentication mechanism"),
    Refusal.TEMPORARY: ("454 4.7.0", "Temporary authentication failure"),
    Refusal.LIMIT: ("421 4.7.0", "Too many failed authentications"),
}

_BAD_CREDENTIALS = "535 5.7.8 Authentication credentials invalid"
_ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required for requested authentication mechanism"




def _has_controls(line: bytes) -> bool:
    return any(b < 0x20 and b != 0x09 or b == 0x7F for b in line)


def _is_token(value: bytes) -> bool:
    """A printable-ASCII word: what a HELO name, a mechanism or a hostname may be."""
    return bool(value) and all(0x21 <= b <= 0x7E for b in value)


# --- The pre-auth core -----------------------------------------------------------------------




class SmtpCore(PreAuthCore):
    """The not-authenticated part of one SMTP submission connection (h11-style, no I/O)."""

    _State = State

    def __init__(
        self,
        *,
        tls_active: bool,
        starttls_available: bool,
        plaintext_auth: bool,
        limits: SmtpLimits = SmtpLimits(),
        hostname: str = "apppass",
        extensions: Sequence[str] = (),
    ) -> None:
        if not (hostname.isascii() and _is_token(hostname.encode("ascii"))):
            raise ValueError(f"hostname must be a printable ASCII word, not {hostname!r}")
        self.tls_active = tls_active
        self.starttls_available = starttls_available
        self.plaintext_auth = plaintext_auth
        self.limits = limits
        self.hostname = hostname
        self.extensions = _upstream_extensions(extensions)
        # The client's EHLO/HELO argument (its first word) and whether it said EHLO, for the
        # upstream login (XCLIENT HELO=, or the proxy's own EHLO). Client-controlled; reset by
        # STARTTLS (RFC 3207 §4.2).
        self.helo_name: str | None = None
        self.esmtp = False
        self.commands = 0  # command and SASL response lines before login
        self.failures = 0  # failed authentications
        self.errors = 0  # protocol errors
        self._lines = LineBuffer(limits.max_auth_line)
        self._state = State.COMMAND
        self._skip = 0  # octets of a refused BDAT chunk still to drop
        self._sasl: SaslExchange | None = None

    # -- what the frontend calls --------------------------------------------------------------

    def ehlo_keywords(self) -> list[str]:
        """The EHLO keywords offered now: the upstream's, STARTTLS before TLS, AUTH if allowed."""
        keywords = list(self.extensions)
        if self.starttls_available and not self.tls_active:
            keywords.append("STARTTLS")
        if self.plaintext_allowed:
            keywords.append("AUTH " + " ".join(MECHANISMS))
        return keywords

    def greeting(self) -> list[Event]:
        return [_send(f"220 {self.hostname} ESMTP")]

    # -- PreAuthCore hooks ---------------------------------------------------------------------

    def _overflow(self, events: list[Event]) -> None:
        self._shutdown("4.7.0", "Error: too much pipelined input", events, "pending input too large")

    def _forget_before_tls(self) -> None:
        """Forget the client's EHLO (RFC 3207 §4.2): it must say EHLO again over TLS."""
        self.helo_name = None
        self.esmtp = False

    def _refused(self, refusal: Refusal, text: str | None, events: list[Event]) -> None:
        code, default = REFUSAL_REPLIES[refusal]
        human = (reply_text(text).strip() if text else "") or default
        if refusal is Refusal.LIMIT:
            events.append(_send(f"421 4.7.0 {self.hostname} {human}"))
            self._close("too many attempts", events)
            return
        self._failure(f"{code} {human}", events)

    def _success(self) -> Event:
        return _send("235 2.7.0 Authentication successful")

    def login_timeout(self) -> list[Event]:
        """The frontend's clock says the time to log in is over (Postfix's wording)."""
        if self._state in (State.CLOSED, State.LOGGED_IN):
            return []
        events: list[Event] = []
        if self._state is State.STARTING_TLS:
            # Mid-handshake: a plaintext reply would only corrupt it.
            self._close("login timeout", events)
        else:
            self._shutdown("4.4.2", "Error: timeout exceeded", events, "login timeout")
        return events

    # -- the parsing loop ---------------------------------------------------------------------

    def _run(self) -> list[Event]:
        events: list[Event] = []
        lines = self._lines
        while self._state in (State.COMMAND, State.SASL):
            if self._skip:
                step = min(self._skip, lines.buffered)
                if not step:
                    break
                lines.take_bytes(step)
                self._skip -= step
                continue
            line = lines.next_line()
            if line is None:
                break
            self.commands += 1
            if self.commands > self.limits.max_commands:
                self._shutdown("4.7.0", "Error: too many commands", events, "too many commands")
                break
            if self._state is State.SASL:
                self._on_sasl_line(line, events)
            elif isinstance(line, TooLong):
                self._error("500 5.5.2 Error: line too long", events, "line too long")
            else:
                self._on_command_line(line, events)
        return events

    def _on_command_line(self, line: bytes, events: list[Event]) -> None:
        words = line.split(None, 1)
        verb = words[0].upper() if words else b""
        args = words[1].strip() if len(words) > 1 else b""
        if verb != b"AUTH" and len(line) + 2 > self.limits.max_line:
            self._error("500 5.5.2 Error: line too long", events, "line too long")
        elif _has_controls(line):
            self._error("500 5.5.2 Error: bad syntax", events, "control characters in command")
        else:
            handler = _COMMANDS.get(verb.decode("latin-1"))
            if handler is None:
                self._error("500 5.5.2 Error: command not recognized", events, "unknown command")
            else:
                handler(self, args, events)

    # -- commands -----------------------------------------------------------------------------

    def _cmd_ehlo(self, args: bytes, events: list[Event]) -> None:
        self._hello(args, events, esmtp=True)

    def _cmd_helo(self, args: bytes, events: list[Event]) -> None:
        self._hello(args, events, esmtp=False)

    def _hello(self, args: bytes, events: list[Event], *, esmtp: bool) -> None:
        name = args.split()[0] if args else b""
        verb = "EHLO" if esmtp else "HELO"
        if not _is_token(name) or len(name) > 255:
            self._error(f"501 5.5.4 Syntax: {verb} hostname", events, f"bad {verb} argument")
            return
        self.helo_name = name.decode("ascii")
        self.esmtp = esmtp
        if not esmtp:
            events.append(_send(f"250 {self.hostname}"))
            return
        lines = [self.hostname, *self.ehlo_keywords()]
        text = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
        events.append(Send(text.encode("ascii")))

    def _cmd_starttls(self, args: bytes, events: list[Event]) -> None:
        if args:
            self._error("501 5.5.4 Syntax: STARTTLS", events, "STARTTLS with arguments")
        elif self.tls_active:
            self._error("503 5.5.1 Error: TLS already active", events, "STARTTLS under TLS")
        elif not self.starttls_available:
            self._error("502 5.5.1 Error: command not implemented", events,
                        "STARTTLS not available")
        else:
            events.append(_send("220 2.0.0 Ready to start TLS"))
            events.append(StartTLS())
            # CVE-2011-0411: whatever was pipelined behind STARTTLS is plaintext injection.
            self._lines.clear()
            self._state = State.STARTING_TLS

    def _cmd_auth(self, args: bytes, events: list[Event]) -> None:
        words = args.split()
        if self.helo_name is None:
            self._error("503 5.5.1 Error: send HELO/EHLO first", events, "AUTH before EHLO")
            return
        if not words or len(words) > 2:
            self._error("501 5.5.4 Syntax: AUTH mechanism [initial-response]", events,
                        "bad AUTH syntax")
            return
        name = words[0]
        mechanism = server_mechanism(name.decode("ascii")) if name.isascii() else None
        if mechanism is None:
            self._error("504 5.5.4 Unrecognized authentication type", events,
                        "unknown SASL mechanism")
            return
        if not self.plaintext_allowed:
            self._error(_ENCRYPTION_REQUIRED, events, "plaintext authentication without TLS")
            return
        self._sasl = SaslExchange(mechanism)
        initial = words[1].decode("latin-1") if len(words) == 2 else None
        self._sasl_result(self._sasl.start(initial), events)

    def _on_sasl_line(self, line: bytes | TooLong, events: list[Event]) -> None:
        assert self._sasl is not None
        if isinstance(line, TooLong):
            self._end_sasl()
            self._error("500 5.5.6 Authentication exchange line is too long", events,
                        "SASL response too long")
        else:
            self._sasl_result(self._sasl.respond(line), events)

    def _sasl_result(self, result: StepResult, events: list[Event]) -> None:
        """Turn one step of the shared SASL exchange into SMTP's reply (RFC 4954 §4)."""
        assert self._sasl is not None
        mechanism = self._sasl.name
        if result.step is Step.CHALLENGE:
            self._state = State.SASL
            events.append(_send(f"334 {result.challenge}"))
            return
        self._end_sasl()
        if result.step is Step.DONE:
            self._state = State.AUTHENTICATING
            events.append(Authenticate(result.credentials, mechanism))
        elif result.step is Step.CANCELLED:
            self._error("501 5.7.0 Authentication cancelled", events, "SASL exchange cancelled")
        elif result.step is Step.BAD_BASE64:
            self._error("501 5.5.2 Invalid base64 data", events, "invalid base64")
        else:
            self._refuse_here(events, result.detail)

    def _end_sasl(self) -> None:
        self._sasl = None
        self._state = State.COMMAND

    def _cmd_rset(self, args: bytes, events: list[Event]) -> None:
        if args:
            self._error("501 5.5.4 Syntax: RSET", events, "RSET with arguments")
        else:
            events.append(_send("250 2.0.0 Ok"))

    def _cmd_noop(self, args: bytes, events: list[Event]) -> None:
        events.append(_send("250 2.0.0 Ok"))  # RFC 5321 §4.1.1.9: a parameter may be given

    def _cmd_quit(self, args: bytes, events: list[Event]) -> None:
        events.append(_send("221 2.0.0 Bye"))
        self._close("client quit", events)

    def _cmd_vrfy(self, args: bytes, events: list[Event]) -> None:
        if not args:
            self._error("501 5.5.4 Syntax: VRFY address", events, "VRFY without argument")
        else:  # RFC 5321 §3.5.3: neither confirm nor deny, before login least of all
            events.append(_send("252 2.0.0 Cannot VRFY user, but will accept message and "
                                "attempt delivery"))

    def _cmd_help(self, args: bytes, events: list[Event]) -> None:
        events.append(_send("214 2.0.0 Commands: EHLO HELO STARTTLS AUTH NOOP RSET QUIT"))

    def _cmd_mail(self, args: bytes, events: list[Event]) -> None:
        # RFC 4954 §6: 530 5.7.0 for any command refused before authentication.
        self._error("530 5.7.0 Authentication required", events, "mail command before login")

    def _cmd_bdat(self, args: bytes, events: list[Event]) -> None:
        words = args.split()
        if words and words[0].isdigit() and len(words[0]) <= 20:
            # RFC 3030 §2: the chunk follows the command whatever the reply; drop it unread.
            self._skip = int(words[0])
            self._error("530 5.7.0 Authentication required", events, "mail command before login")
        else:
            # Without a chunk size there is no telling where the chunk ends.
            self._error("501 5.5.4 Syntax: BDAT count [LAST]", events, "bad BDAT syntax")
            if self._state is not State.CLOSED:
                self._shutdown("4.5.0", "Error: out of step with BDAT", events,
                               "unparsable BDAT before login")

    def _cmd_proxy_only(self, args: bytes, events: list[Event]) -> None:
        self._error("550 5.7.0 Error: insufficient authorization", events,
                    "XCLIENT/XFORWARD from a client")

    def _cmd_not_implemented(self, args: bytes, events: list[Event]) -> None:
        self._error("502 5.5.1 Error: command not implemented", events, "command not implemented")

    # -- replies and counters -----------------------------------------------------------------

    def _refuse_here(self, events: list[Event], reason: str) -> None:
        """Credentials the core refuses itself (no Authenticate): 535 and a Failed event."""
        self._failure(_BAD_CREDENTIALS, events, reason)

    def _failure(self, reply: str, events: list[Event], reason: str | None = None) -> None:
        events.append(_send(reply))
        if reason is not None:
            events.append(Failed(reason))
        self.failures += 1
        if self.failures >= self.limits.max_failures:
            self._shutdown("4.7.0", "Error: too many failed authentications", events,
                           "too many failed authentications")

    def _error(self, reply: str, events: list[Event], reason: str) -> None:
        """A protocol error: the reply and a Failed event, and 421 after max_errors."""
        events.append(_send(reply))
        events.append(Failed(reason))
        self.errors += 1
        if self.errors >= self.limits.max_errors:
            self._shutdown("4.7.0", "Error: too many errors", events, "too many errors")

    def _shutdown(self, enhanced: str, text: str, events: list[Event], reason: str) -> None:
        """421 <domain> …, then Close (RFC 5321 §3.8: the server may close with 421 any time)."""
        events.append(_send(f"421 {enhanced} {self.hostname} {text}"))
        self._close(reason, events)

    def _close(self, reason: str, events: list[Event]) -> None:
        events.append(Close(reason))
        self._state = State.CLOSED
        self._sasl = None
        self._skip = 0
        self._lines.clear()


_COMMANDS = {
    "EHLO": SmtpCore._cmd_ehlo,
    "HELO": SmtpCore._cmd_helo,
    "STARTTLS": SmtpCore._cmd_starttls,
    "AUTH": SmtpCore._cmd_auth,
    "RSET": SmtpCore._cmd_rset,
    "NOOP": SmtpCore._cmd_noop,
    "QUIT": SmtpCore._cmd_quit,
    "VRFY": SmtpCore._cmd_vrfy,
    "HELP": SmtpCore._cmd_help,
    "MAIL": SmtpCore._cmd_mail,
    "RCPT": SmtpCore._cmd_mail,
    "DATA": SmtpCore._cmd_mail,
    "BDAT": SmtpCore._cmd_bdat,
    "XCLIENT": SmtpCore._cmd_proxy_only,
    "XFORWARD": SmtpCore._cmd_proxy_only,
    "EXPN": SmtpCore._cmd_not_implemented,
    "ETRN": SmtpCore._cmd_not_implemented,
    "TURN": SmtpCore._cmd_not_implemented,
    "ATRN": SmtpCore._cmd_not_implemented,
}


def _send(text: str) -> Send:
    return Send(text.encode("ascii") + CRLF)


def _upstream_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    """The upstream's EHLO keywords the proxy passes on (not WITHHELD_EXTENSIONS), deduplicated."""
    if isinstance(extensions, str):
        raise TypeError("extensions must be a sequence of EHLO lines, not one string")
    kept: list[str] = []
    seen: set[str] = set()
    for ext in extensions:
        line = " ".join(ext.split())
        if not line or not all(" " <= c <= "~" for c in ext):
            raise ValueError(f"not an EHLO keyword line: {ext!r}")
        keyword = line.split(" ", 1)[0].split("=", 1)[0].upper()
        if keyword in WITHHELD_EXTENSIONS or keyword in seen:
            continue
        seen.add(keyword)
        kept.append(line)
    return tuple(kept)


# --- The post-login command watch ------------------------------------------------------------

# Command line relayed after login: 2048 octets, CRLF included: Postfix's line_length_limit, above
# RFC 5321's 512 plus the parameters of SIZE, DSN (RFC 3461) and SMTPUTF8 addresses. A longer line
# is refused here, never passed on, so no upstream can split it into two commands.
RELAY_MAX_LINE = 2048

# Client input held while the upstream answers DATA: 65536 octets, then close. RFC 2920 §3.1
# makes DATA the last command of a pipelined group: a client sends nothing more until 354, so
# only a misbehaving client fills this; the relay should stop reading while `waiting` is true.
RELAY_MAX_HELD = 65536

# Commands awaiting the upstream's reply: 10000, then close. Ten times Postfix's
# smtpd_recipient_limit (1000), so a fully pipelined transaction never reaches it.
RELAY_MAX_OUTSTANDING = 10000

# Largest BDAT chunk passed through: 2**31 - 1 octets. An upstream that cannot represent a chunk
# size refuses the command and might read the chunk as commands; a larger size is refused here.
RELAY_MAX_CHUNK = 2**31 - 1

# Commands refused after login, with the reply the client gets instead of the upstream's.
REFUSED_AFTER_LOGIN: dict[str, bytes] = {
    "XCLIENT": b"550 5.7.0 Error: XCLIENT not permitted\r\n",
    "XFORWARD": b"550 5.7.0 Error: XFORWARD not permitted\r\n",
    # TLS negotiated between client and upstream through the relay would hide every later
    # command from the watch.
    "STARTTLS": b"503 5.5.1 Error: STARTTLS not permitted after authentication\r\n",
    # Role reversal (RFC 821 TURN, RFC 2645 ATRN) would turn the streams around.
    "TURN": b"502 5.5.1 Error: TURN not permitted\r\n",
    "ATRN": b"502 5.5.1 Error: ATRN not permitted\r\n",
}

_LINE_TOO_LONG = b"500 5.5.2 Error: line too long\r\n"
_BARE_CR_OR_NUL = b"500 5.5.2 Error: bare <CR> or <NUL> in command\r\n"
_BAD_BDAT = b"501 5.5.4 Syntax: BDAT count [LAST]\r\n"
# Postfix 3.9 (smtpd_forbid_bare_newline) answers a bare <LF> so, and disconnects.
_AMBIGUOUS_END = b"521 5.5.2 Error: bare <CR> or <LF> at end of data\r\n"

_BDAT = re.compile(rb"BDAT ([0-9]{1,10})( LAST)?", re.IGNORECASE)
_DOT_AFTER_BREAK = re.compile(rb"[\r\n]\.")


@dataclass(frozen=True)
class SmtpWatchLimits:
    max_line: int = RELAY_MAX_LINE
    max_held: int = RELAY_MAX_HELD
    max_outstanding: int = RELAY_MAX_OUTSTANDING
    max_chunk: int = RELAY_MAX_CHUNK

    def __post_init__(self) -> None:
        for name in ("max_line", "max_held", "max_outstanding", "max_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SmtpWatchLimits.{name} must be a positive integer, "
                                 f"not {value!r}")


@dataclass(frozen=True)
class Relayed:
    """What the relay does with one call's input: bytes for each side, in order."""

    to_upstream: bytes = b""
    to_client: bytes = b""
    refused: tuple[str, ...] = ()  # commands refused in this call (verbs), for the audit log
    close: str | None = None  # close both sides after writing: the streams cannot stay in step


@dataclass
class _Out:
    to_upstream: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    refused: list[str] = field(default_factory=list)
    close: str | None = None

    def result(self) -> Relayed:
        return Relayed(bytes(self.to_upstream), bytes(self.to_client), tuple(self.refused),
                       self.close)


class _Mode(enum.Enum):
    COMMAND = "command"  # client lines are commands
    WAITING = "waiting"  # DATA sent: client input held until the upstream's reply to it
    DATA = "data"  # message content, up to CRLF.CRLF
    CHUNK = "chunk"  # a BDAT chunk's octets
    CLOSED = "closed"


class _Expect(enum.Enum):
    REPLY = "reply"  # the upstream's reply to a relayed command
    DATA_REPLY = "data-reply"  # … to DATA: 354 starts message content


class SmtpCommandWatch:
    """Follows a logged-in SMTP session in both directions; refuses REFUSED_AFTER_LOGIN.

    Feed client bytes to `client_data` and upstream bytes to `upstream_data`, in the order they
    arrive, and write out what each returns. Command lines are relayed one by one (with CRLF
    line ends); message content (DATA up to CRLF.CRLF, BDAT chunks) is relayed as it comes and
    never looked into, except for where it ends. A refused command is not relayed: its reply goes
    to the client after the upstream's replies to the commands before it (RFC 2920 keeps replies
    in order), so a pipelining client stays in step.

    Where upstream implementations disagree on where message content ends (a lone dot between
    bare CR or LF line ends: SMTP smuggling), the watch cannot know what the upstream will read
    as commands, so it closes the session instead of guessing.
    """

    def __init__(self, *, chunking: bool = True, limits: SmtpWatchLimits = SmtpWatchLimits()):
        self.chunking = chunking  # the upstream offered CHUNKING: BDAT carries a chunk
        self.limits = limits
        self._mode = _Mode.COMMAND
        self._lines = LineBuffer(limits.max_line)
        self._queue: deque[_Expect | bytes] = deque()  # replies due to the client, in order
        self._outstanding = 0  # _Expect entries in the queue
        self._held = bytearray()  # client input while WAITING
        self._chunk_left = 0
        self._data_tail = CRLF  # the last two octets of content relayed (CRLF at the start)
        self._data_held = b""  # a possible end of data, not yet relayed
        self._reply_head = b""  # the first octets of the upstream's current reply line

    @property
    def closed(self) -> bool:
        return self._mode is _Mode.CLOSED

    @property
    def waiting(self) -> bool:
        """The client's input is held until the upstream answers DATA: stop reading the client."""
        return self._mode is _Mode.WAITING

    @property
    def buffered(self) -> int:
        return self._lines.buffered + len(self._held) + len(self._data_held)

    def client_data(self, data: bytes) -> Relayed:
        out = _Out()
        if self._mode is not _Mode.CLOSED:
            self._feed_client(data, out)
        return out.result()

    def upstream_data(self, data: bytes) -> Relayed:
        out = _Out()
        if self._mode is _Mode.CLOSED:
            return out.result()
        start = pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                self._reply_head = (self._reply_head + data[pos:pos + 4])[:4]
                break
            head = (self._reply_head + data[pos:end])[:4]
            self._reply_head = b""
            pos = end + 1
            if head[3:4] == b"-":
                continue  # RFC 5321 §4.2.1: a continuation line of a multiline reply
            out.to_client += data[start:pos]
            start = pos
            self._reply_done(head[:3], out)
            if self._mode is _Mode.CLOSED:
                return out.result()
        out.to_client += data[start:]
        return out.result()

    # -- the client's stream ------------------------------------------------------------------

    def _feed_client(self, data: bytes, out: _Out) -> None:
        while True:
            mode = self._mode
            if mode is _Mode.COMMAND:
                self._lines.feed(data)
                data = self._commands(out)
                if self._mode is _Mode.COMMAND:
                    return
            elif mode is _Mode.WAITING:
                self._held += data
                if len(self._held) > self.limits.max_held:
                    self._close("client sent too much before the reply to DATA", out)
                return
            elif mode is _Mode.DATA:
                rest = self._content(data, out)
                if rest is None:
                    return
                self._expect(_Expect.REPLY, out)
                self._mode = _Mode.COMMAND
                data = rest
            elif mode is _Mode.CHUNK:
                chunk = data[:self._chunk_left]
                out.to_upstream += chunk
                self._chunk_left -= len(chunk)
                data = data[len(chunk):]
                if self._chunk_left:
                    return
                self._mode = _Mode.COMMAND
            else:
                return
            if self._mode is _Mode.CLOSED:
                return

    def _commands(self, out: _Out) -> bytes:
        """Relay or refuse complete command lines; return the raw input after a DATA or BDAT."""
        while self._mode is _Mode.COMMAND:
            line = self._lines.next_line()
            if line is None:
                return b""
            if isinstance(line, TooLong):
                self._local(_LINE_TOO_LONG, out)
                continue
            if b"\r" in line or b"\x00" in line:
                # An upstream might end a line at a bare CR or cut it at NUL: never relay one.
                self._local(_BARE_CR_OR_NUL, out)
                continue
            words = line.split(None, 1)
            verb = words[0].upper().decode("latin-1") if words else ""
            if verb in REFUSED_AFTER_LOGIN:
                out.refused.append(verb)
                self._local(REFUSED_AFTER_LOGIN[verb], out)
            elif verb == "DATA":
                out.to_upstream += line + CRLF
                self._expect(_Expect.DATA_REPLY, out)
                self._mode = _Mode.WAITING
            elif verb == "BDAT" and self.chunking:
                match = _BDAT.fullmatch(line.strip(b" \t"))
                size = int(match.group(1)) if match else -1
                if not 0 <= size <= self.limits.max_chunk:
                    self._local(_BAD_BDAT, out)
                    continue
                out.to_upstream += line + CRLF
                self._expect(_Expect.REPLY, out)
                self._chunk_left = size
                self._mode = _Mode.CHUNK
            else:
                out.to_upstream += line + CRLF
                self._expect(_Expect.REPLY, out)
        if self._mode is _Mode.CLOSED:
            return b""
        return self._lines.clear()

    def _content(self, data: bytes, out: _Out) -> bytes | None:
        """Relay message content; return the input after CRLF.CRLF, or None until it comes.

        Looks only at a dot right after a line break. CRLF "." CRLF ends the content; a dot
        between line breaks where either is a bare CR or LF is ambiguous (RFC 5321 §4.1.1.4
        requires CRLF, but upstreams differ), and closes the session before it is relayed.
        """
        window = self._data_tail + self._data_held + data  # the tail was relayed already
        base = len(self._data_tail)
        self._data_held = b""
        pos = 1
        while True:
            match = _DOT_AFTER_BREAK.search(window, pos)
            if match is None:
                out.to_upstream += window[base:]
                self._data_tail = window[-2:]
                return None
            brk = match.start()  # the line break before the dot; window[brk - 1] exists
            after = window[brk + 2:brk + 4]
            if after[:1] not in (b"\r", b"\n"):
                if after:
                    pos = brk + 1  # ".." (dot-stuffing) or ".text": content
                    continue
            if after in (b"", b"\r"):  # a possible end: wait for the next octets
                out.to_upstream += window[base:brk + 1]
                self._data_tail = window[brk - 1:brk + 1]
                self._data_held = window[brk + 1:]
                return None
            if window[brk - 1:brk + 4] == b"\r\n.\r\n":
                out.to_upstream += window[base:brk + 4]
                self._data_tail = CRLF
                return window[brk + 4:]
            if brk > base:
                out.to_upstream += window[base:brk]
            out.to_client += _AMBIGUOUS_END
            self._close("bare CR or LF around the end of message data", out)
            return None

    # -- replies ------------------------------------------------------------------------------

    def _expect(self, what: _Expect, out: _Out) -> None:
        self._queue.append(what)
        self._outstanding += 1
        if self._outstanding > self.limits.max_outstanding:
            self._close("too many commands awaiting replies", out)

    def _local(self, reply: bytes, out: _Out) -> None:
        """A reply of the proxy's own, in its place among the upstream's."""
        if self._queue:
            self._queue.append(reply)
        else:
            out.to_client += reply

    def _reply_done(self, code: bytes, out: _Out) -> None:
        """The upstream finished one reply: release what follows it."""
        if not self._queue:
            return  # unsolicited, such as 421 before the upstream closes
        expected = self._queue.popleft()
        assert isinstance(expected, _Expect)
        self._outstanding -= 1
        if expected is _Expect.DATA_REPLY:
            if code == b"354":
                self._mode = _Mode.DATA
                self._data_tail = CRLF
                self._data_held = b""
            else:
                self._mode = _Mode.COMMAND
        elif code == b"354":
            self._close("upstream asked for message content outside DATA", out)
            return
        self._flush(out)
        if expected is _Expect.DATA_REPLY:
            held = bytes(self._held)
            self._held.clear()
            self._feed_client(held, out)

    def _flush(self, out: _Out) -> None:
        while self._queue and isinstance(self._queue[0], bytes):
            out.to_client += self._queue.popleft()

    def _close(self, reason: str, out: _Out) -> None:
        out.close = reason
        self._mode = _Mode.CLOSED
        self._queue.clear()
        self._held.clear()
        self._lines.clear()
        self._data_held = b""

"""The pre-auth life every protocol core shares, sans-IO: states, limits, counters, the SASL step.

A connection is read as commands until it presents credentials; while the login is decided its
input is held; then the relay takes over (or the client tries again, up to a limit). STARTTLS
forgets everything said in the clear. What differs per protocol is data: the words of each reply
(`Words`, keyed by `Say`), the reply to each refusal, and the commands it knows.

`PreAuthCore` holds what all three cores share; `LineCore` adds the command-line loop of POP3 and
SMTP (IMAP parses tags and literals itself, proxy/imap/server.py).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from proxy.auth.decision import Refusal
from proxy.commands import Authenticate, Close, Command, Failed, Hello, Send
from proxy.linebuffer import LineBuffer, TooLong
from proxy.sasl import Credentials, SaslExchange, Step, StepResult, is_valid_login, server_mechanism

CRLF = b"\r\n"

# --- Limits shared by the three protocols -----------------------------------------------------

# Commands before login: 50, then the protocol's farewell. A real client needs fewer than ten
# (CAPABILITY/CAPA/EHLO, STARTTLS, again, the login and a retry or two); Postfix counts up to 100
# junk commands (smtpd_junk_command_limit), and nothing a client may do here is more than junk.
MAX_COMMANDS = 50

# Failed logins per connection: 3, then the farewell (`auth.max_failures` in apppass.yaml).
# Stalwart's auth.max-failures example and Dovecot's login limits use 3; OpenSSH's MaxAuthTries
# (6) is the lenient end. The frontend also delays each failure (`auth.failure_delay`).
MAX_FAILURES = 3

# Protocol errors (BAD, -ERR for bad commands, 5xx syntax replies) per connection: 5, then the
# farewell. nginx's mail max_errors default (5, added against the ALPACA cross-protocol attack,
# CVE-2021-3618); Dovecot's imap-login closes after 3, Postfix uses smtpd_soft_error_limit 10.
MAX_ERRORS = 5

# Input a client pipelines behind its login while the Authenticator works: 16384 octets, then the
# farewell. RFC 2920 / RFC 2449 let a client pipeline behind AUTH; nginx holds such input in one
# page (imap/pop3/smtp_client_buffer, 4k|8k), Dovecot's login process in a few KiB.
MAX_PENDING = 16384


@dataclass(frozen=True)
class Limits:
    """Bounds on what a client may make a core hold or do before login (see the constants)."""

    max_line: int  # command line octets, CRLF included
    max_commands: int = MAX_COMMANDS  # commands (and SASL response lines) before login
    max_failures: int = MAX_FAILURES  # failed logins, then the farewell
    max_errors: int = MAX_ERRORS  # protocol errors, then the farewell
    max_pending: int = MAX_PENDING  # input held while a login is decided, then the farewell

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"{type(self).__name__}.{f.name} must be a positive integer, not {value!r}"
                )


@dataclass(frozen=True)
class LineLimits(Limits):
    """POP3 and SMTP: plain command lines, and longer lines for AUTH and its responses."""

    max_auth_line: int = 4096  # AUTH line and SASL response octets, CRLF included

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_auth_line < self.max_line:
            raise ValueError(f"{type(self).__name__}.max_auth_line must be at least max_line")

    @property
    def max_buffered(self) -> int:
        """The most the core ever holds between two calls: a partial line, or pending input."""
        return max(self.max_auth_line, self.max_pending)


# --- States and words ----------------------------------------------------------------------------


class State(enum.Enum):
    COMMAND = "command"  # reading command lines
    LITERAL = "literal"  # IMAP: reading the octets of an accepted literal
    SKIP = "skip"  # dropping octets the client sends anyway (a refused literal, a BDAT chunk)
    DISCARD = "discard"  # IMAP: dropping the rest of a refused command's line
    SASL = "sasl"  # inside AUTH / AUTHENTICATE: lines are base64 responses
    AUTHENTICATING = "authenticating"  # Authenticate out; input is held, not parsed
    STARTING_TLS = "starting-tls"  # StartTLS out; plaintext input is discarded
    LOGGED_IN = "logged-in"  # done; input goes to take_pending()
    CLOSED = "closed"  # Close out; input is ignored


class Count(enum.Enum):
    """What a reply does besides being sent."""

    NOTHING = "nothing"  # just the reply
    NOTE = "note"  # a Failed command for the audit log, nothing counted
    ERROR = "error"  # a protocol error: counts toward max_errors
    FAILURE = "failure"  # a failed login: counts toward max_failures
    CLOSE = "close"  # the last word: the connection closes after it


class Say(enum.Enum):
    """The situations every core words in its own protocol (its `WORDS`)."""

    CHALLENGE = "challenge"  # a SASL challenge ({challenge})
    LINE_TOO_LONG = "line too long"
    CONTROLS = "control characters in command"
    UNKNOWN_COMMAND = "unknown command"
    AUTH_SYNTAX = "bad AUTH syntax"
    UNKNOWN_MECHANISM = "unknown SASL mechanism"
    PLAINTEXT_DISALLOWED = "plaintext authentication without TLS"
    SASL_TOO_LONG = "SASL response too long"
    SASL_CANCELLED = "SASL exchange cancelled"
    BAD_BASE64 = "invalid base64"
    MALFORMED_SASL = "malformed SASL response"
    AUTHZID_REFUSED = "PLAIN authzid differs from authcid"
    BAD_CREDENTIALS = "credentials refused before lookup"
    TOO_MANY_COMMANDS = "too many commands"
    TOO_MANY_FAILURES = "too many failed logins"
    TOO_MANY_ERRORS = "too many errors"
    OVERFLOW = "pending input too large"
    LOGIN_TIMEOUT = "login timeout"
    TOO_MANY_CONNECTIONS = "too many connections"  # instead of the greeting (proxy/limits.py)
    SHUTTING_DOWN = "shutting down"  # the proxy drains: a connection not logging in is closed


@dataclass(frozen=True)
class Reply:
    """One reply's wording: `text` may use {tag} (IMAP), {host} and {challenge}; "" says nothing."""

    text: str
    counts: Count = Count.ERROR


Words = Mapping[Say, Reply]


def printable(text: str) -> str:
    """Text from elsewhere (the upstream's capabilities, a configured greeting) made safe for a
    reply line: printable ASCII only, so that it can never split or end the line."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if " " <= c <= "~" else "?" for c in text)


# --- The shared core ----------------------------------------------------------------------------


class PreAuthCore:
    """The not-authenticated life of one connection; a protocol core subclasses it."""

    WORDS: ClassVar[Words]
    REFUSALS: ClassVar[Mapping[Refusal, Reply]]  # the reply to each auth_failed refusal

    def __init__(
        self,
        *,
        tls_active: bool,
        starttls_available: bool,
        plaintext_auth: bool,
        limits: Limits,
        line_limit: int,
        hostname: str = "apppass",
    ) -> None:
        self.tls_active = tls_active
        self.starttls_available = starttls_available
        self.plaintext_auth = plaintext_auth
        self.limits = limits
        self.hostname = hostname
        self.commands = 0  # commands and SASL response lines before login
        self.failures = 0  # failed logins
        self.errors = 0  # protocol errors
        self._lines = LineBuffer(line_limit)
        self._state = State.COMMAND
        self._sasl: SaslExchange | None = None
        self._skip = 0  # octets still to drop in State.SKIP
        self._tag = ""  # IMAP: the tag of the command being answered

    # -- what the frontend calls -----------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state.value

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED

    @property
    def plaintext_allowed(self) -> bool:
        return self.plaintext_auth or self.tls_active

    @property
    def buffered(self) -> int:
        """Octets of client input the core holds now."""
        return self._lines.buffered

    def greeting(self) -> list[Command]:
        raise NotImplementedError

    def shutting_down(self) -> list[Command]:
        """The proxy is draining (SIGTERM): unless a login is being decided (it may finish),
        say so and close. The frontend calls it once; a login in progress ends on its own."""
        out: list[Command] = []
        if self._state not in (State.AUTHENTICATING, State.LOGGED_IN, State.CLOSED):
            if self._state is State.STARTING_TLS:
                self._close(Say.SHUTTING_DOWN.value, out)
            else:
                self._say(Say.SHUTTING_DOWN, out)
        return out

    def overloaded(self) -> list[Command]:
        """Instead of the greeting: a connection cap is reached, say so and close."""
        out: list[Command] = []
        self._say(Say.TOO_MANY_CONNECTIONS, out)
        return out

    def receive_data(self, data: bytes) -> list[Command]:
        """Client bytes in; replies and requests out."""
        if self._state in (State.CLOSED, State.STARTING_TLS):
            # After STARTTLS only the TLS layer's output may follow, and it arrives after
            # tls_started(): anything else is plaintext injected before the handshake.
            return []
        self._lines.feed(data)
        waiting = self._state in (State.AUTHENTICATING, State.LOGGED_IN)
        out: list[Command] = [] if waiting else self._run()
        if (
            self._state in (State.AUTHENTICATING, State.LOGGED_IN)
            and self._lines.buffered > self.limits.max_pending
        ):
            self._say(Say.OVERFLOW, out)
        return out

    def tls_started(self) -> None:
        """The transport now speaks TLS (call it right after startTLS): what the client said in
        the clear is forgotten, capabilities drop STARTTLS and offer authentication."""
        self.tls_active = True
        self._forget_before_tls()
        if self._state is State.STARTING_TLS:
            self._lines.clear()
            self._state = State.COMMAND

    def login_timeout(self) -> list[Command]:
        """The frontend's clock says the time to log in is over."""
        out: list[Command] = []
        if self._state is State.STARTING_TLS:
            self._close(Say.LOGIN_TIMEOUT.value, out)  # a plaintext reply would break the handshake
        elif self._state not in (State.CLOSED, State.LOGGED_IN):
            self._say(Say.LOGIN_TIMEOUT, out)
        return out

    def auth_failed(self, refusal: Refusal) -> list[Command]:
        """The Authenticator (or the upstream login) refused: reply, then go on parsing."""
        if self._state is State.CLOSED:
            return []
        if self._state is not State.AUTHENTICATING:
            raise RuntimeError("auth_failed() without an outstanding Authenticate")
        out: list[Command] = []
        self._state = State.COMMAND
        self._reply(self.REFUSALS[Refusal(refusal)], out, None)
        if self._state is not State.CLOSED:
            out += self._run()
        return out

    def auth_succeeded(self, capabilities: str = "") -> list[Command]:
        """The login succeeded, upstream too: the success reply, and the relay takes over.
        `capabilities` are the upstream's after login (IMAP puts them into its tagged OK)."""
        if self._state is State.CLOSED:
            return []
        if self._state is not State.AUTHENTICATING:
            raise RuntimeError("auth_succeeded() without an outstanding Authenticate")
        self._state = State.LOGGED_IN
        return [self._success(capabilities)]

    def take_pending(self) -> bytes:
        """After auth_succeeded: the raw bytes the client sent after its login command, for the
        upstream. Nothing once the connection is closed."""
        if self._state is State.CLOSED:
            return b""
        if self._state is not State.LOGGED_IN:
            raise RuntimeError("take_pending() before auth_succeeded()")
        return self._lines.clear()

    # -- what each protocol supplies -------------------------------------------------------------

    def _run(self) -> list[Command]:
        """Parse what is buffered while in a parsing state."""
        raise NotImplementedError

    def _success(self, capabilities: str) -> Command:
        raise NotImplementedError

    def _forget_before_tls(self) -> None:
        """Drop state the client set up in the clear (RFC 3207 §4.2, RFC 2595 §4)."""

    def _hello(self) -> Hello | None:
        """What the upstream login should repeat of the client's introduction (SMTP)."""
        return None

    def _reset(self) -> None:
        """Forget protocol state when the connection closes."""

    # -- replies and counters --------------------------------------------------------------------

    def _say(self, what: Say, out: list[Command], reason: str | None = None, **values: str) -> None:
        """Reply with this protocol's words for `what`, and count it as they say."""
        self._reply(self.WORDS[what], out, reason or what.value, **values)

    def _reply(self, reply: Reply, out: list[Command], reason: str | None, **values: str) -> None:
        if reply.text:
            out.append(self._send(reply.text.format(tag=self._tag, host=self.hostname, **values)))
        if reply.counts is Count.CLOSE:
            self._close(reason or "login refused", out)
        elif reply.counts is Count.FAILURE:
            self._count_failure(out, reason)
        elif reply.counts is not Count.NOTHING:
            self._count_error(out, reason or "error", counts=reply.counts is Count.ERROR)

    def _count_failure(self, out: list[Command], reason: str | None) -> None:
        """A failed login (a refusal from the Authenticator is audited there, so no Failed)."""
        if reason is not None:
            out.append(Failed(reason))
        self.failures += 1
        if self.failures >= self.limits.max_failures:
            self._say(Say.TOO_MANY_FAILURES, out)

    def _count_error(self, out: list[Command], reason: str, *, counts: bool = True) -> None:
        out.append(Failed(reason))
        if counts:
            self.errors += 1
            if self.errors >= self.limits.max_errors:
                self._say(Say.TOO_MANY_ERRORS, out)

    def _error(self, line: str, out: list[Command], reason: str) -> None:
        """A protocol error whose reply line is built by the caller (it names the command)."""
        out.append(self._send(line))
        self._count_error(out, reason)

    def _send(self, text: str) -> Send:
        return Send(text.encode("ascii") + CRLF)

    def _close(self, reason: str, out: list[Command]) -> None:
        out.append(Close(reason))
        self._state = State.CLOSED
        self._sasl = None
        self._skip = 0
        self._lines.clear()
        self._reset()

    def _skip_bytes(self) -> bool:
        """In State.SKIP: drop what is buffered of the octets to skip; True when all are gone."""
        step = min(self._skip, self._lines.buffered)
        if step:
            self._lines.take_bytes(step)
            self._skip -= step
        return not self._skip

    # -- authentication --------------------------------------------------------------------------

    def _start_sasl(self, name: str, initial: str | None, out: list[Command]) -> None:
        """AUTH / AUTHENTICATE with a mechanism and an optional initial response."""
        mechanism = server_mechanism(name) if name.isascii() else None
        if mechanism is None:
            self._say(Say.UNKNOWN_MECHANISM, out)
        elif not self.plaintext_allowed:
            self._say(Say.PLAINTEXT_DISALLOWED, out)
        else:
            self._sasl = SaslExchange(mechanism)
            self._sasl_step(self._sasl.start(initial), out)

    def _on_sasl_line(self, line: bytes | TooLong, out: list[Command]) -> None:
        assert self._sasl is not None
        if isinstance(line, TooLong):
            self._end_sasl()
            self._say(Say.SASL_TOO_LONG, out)
        else:
            self._sasl_step(self._sasl.respond(line), out)

    def _sasl_step(self, result: StepResult, out: list[Command]) -> None:
        """Turn one step of the shared SASL exchange into this protocol's reply."""
        exchange = self._sasl
        assert exchange is not None
        if result.step is Step.CHALLENGE:
            self._state = State.SASL
            self._say(Say.CHALLENGE, out, challenge=result.challenge)
            return
        self._end_sasl()
        if result.step is Step.DONE:
            assert result.credentials is not None
            self._authenticate(result.credentials, exchange.name, out)
        else:
            self._say(_SASL_OUTCOMES[result.step], out, result.detail or None)

    def _end_sasl(self) -> None:
        self._sasl = None
        self._state = State.COMMAND

    def _authenticate(self, credentials: Credentials, mechanism: str, out: list[Command]) -> None:
        """Credentials are complete: hand them to the frontend, or refuse an invalid name."""
        if not is_valid_login(credentials.login):
            self._say(Say.BAD_CREDENTIALS, out, "invalid login name")
            return
        self._state = State.AUTHENTICATING
        out.append(Authenticate(credentials, mechanism, self._hello()))


_SASL_OUTCOMES = {
    Step.CANCELLED: Say.SASL_CANCELLED,
    Step.BAD_BASE64: Say.BAD_BASE64,
    Step.MALFORMED: Say.MALFORMED_SASL,
    Step.AUTHZID_REFUSED: Say.AUTHZID_REFUSED,
    Step.INVALID_LOGIN: Say.BAD_CREDENTIALS,
}


def has_controls(line: bytes) -> bool:
    """CR, LF, NUL and other controls (TAB allowed) in a command line."""
    return any((b < 0x20 and b != 0x09) or b == 0x7F for b in line)


# A command's handler: (core, arguments, commands out). The core is the subclass that declares
# the table, which a ClassVar on the base cannot name: hence Any.
Handler = Callable[[Any, bytes, list[Command]], None]


class LineCore(PreAuthCore):
    """POP3 and SMTP: one command per line, AUTH with the SASL exchange on following lines."""

    COMMANDS: ClassVar[Mapping[str, Handler]]  # verb -> handler(core, args, out)
    limits: LineLimits

    def __init__(self, *, limits: LineLimits, **kwargs) -> None:
        super().__init__(limits=limits, line_limit=limits.max_auth_line, **kwargs)

    def _run(self) -> list[Command]:
        out: list[Command] = []
        while self._state in (State.COMMAND, State.SASL, State.SKIP):
            if self._state is State.SKIP:
                if not self._skip_bytes():
                    break
                self._state = State.COMMAND
                continue
            line = self._lines.next_line()
            if line is None:
                break
            self.commands += 1
            if self.commands > self.limits.max_commands:
                self._say(Say.TOO_MANY_COMMANDS, out)
                break
            if self._state is State.SASL:
                self._on_sasl_line(line, out)
            elif isinstance(line, TooLong):
                self._say(Say.LINE_TOO_LONG, out)
            else:
                self._on_command_line(line, out)
        return out

    def _split(self, line: bytes) -> tuple[bytes, bytes]:
        """(verb, arguments) of a command line."""
        words = line.split(None, 1)
        return (words[0] if words else b""), (words[1].strip() if len(words) > 1 else b"")

    def _on_command_line(self, line: bytes, out: list[Command]) -> None:
        verb, args = self._split(line)
        verb = verb.upper()
        if verb != b"AUTH" and len(line) + 2 > self.limits.max_line:
            self._say(Say.LINE_TOO_LONG, out)
        elif has_controls(line):
            self._say(Say.CONTROLS, out)
        else:
            self._dispatch(verb.decode("latin-1"), args, out)

    def _dispatch(self, verb: str, args: bytes, out: list[Command]) -> None:
        handler = self.COMMANDS.get(verb)
        if handler is None:
            self._say(Say.UNKNOWN_COMMAND, out)
        else:
            handler(self, args, out)

    def _auth(self, words: list[bytes], out: list[Command]) -> None:
        """AUTH mechanism [initial-response] (RFC 4954 §4, RFC 5034 §4)."""
        if not 1 <= len(words) <= 2:
            self._say(Say.AUTH_SYNTAX, out)
            return
        initial = words[1].decode("latin-1") if len(words) == 2 else None
        self._start_sasl(words[0].decode("latin-1"), initial, out)

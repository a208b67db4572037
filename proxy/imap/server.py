"""The IMAP pre-auth protocol core, sans-IO: client bytes in, events and reply bytes out.

`ImapCore` speaks the not-authenticated state of RFC 9051 / RFC 3501 with the extensions a
legacy client needs to log in: CAPABILITY, NOOP, LOGOUT, ID (RFC 2971), STARTTLS, LOGIN with
atoms, quoted strings and literals (LITERAL+, RFC 7888), and AUTHENTICATE PLAIN / LOGIN with
SASL-IR (RFC 4959). It never touches a socket, a clock or the Authenticator: the frontend moves
bytes, carries out the events (proxy.events) and feeds results back through `auth_failed`,
`auth_succeeded`, `tls_started` and `login_timeout`.

Every input is bounded (ImapLimits): line length, literal size, the octets of one command,
input pipelined behind a login, number of commands, failed logins and BAD replies.
Secrets are never put into replies, events other than Authenticate, or exception texts.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from proxy.auth.decision import Refusal
from proxy.core import PreAuthCore
from proxy.events import Authenticate, Close, Event, Failed, Send, StartTLS
from proxy.linebuffer import LineBuffer, TooLong
from proxy.sasl import Credentials, SaslExchange, Step, StepResult, is_valid_login, server_mechanism

CRLF = b"\r\n"

# --- Limits ----------------------------------------------------------------------------------

# Pre-auth command line: 8192 octets, CRLF included. Dovecot's imap-login parses pre-auth
# commands with the same bound (MAX_IMAP_LINE 8192); RFC 7162 §4 asks clients to keep command
# lines to about 8192 octets, RFC 2683 §3.2.1.5 to 1000. The quoted and atom parts of one
# command, across all its lines, share this bound too (Dovecot bounds "all parameters of a
# command" by its login input buffer).
MAX_LINE = 8192

# One literal before login: 1024 octets. A login name is at most 255 characters (sasl.MAX_FIELD,
# after RFC 4616 §2), so at most 1020 octets of UTF-8; an app password is 16 characters; RFC 2971
# §3.3 caps an ID value at 1024 octets. A command's literals together may add at most
# 2 × MAX_LITERAL octets to it (LOGIN with both arguments as literals).
MAX_LITERAL = 1024

# Commands before login: 50, then BYE. A real client needs fewer than ten (CAPABILITY, ID,
# STARTTLS, CAPABILITY, AUTHENTICATE and a retry or two); Postfix closes an SMTP session after
# 100 junk commands (smtpd_junk_command_limit), and nothing a client may do here is more than junk.
MAX_COMMANDS = 50

# Failed logins per connection: 3, then BYE. As Stalwart's imap.auth.max-failures example and
# Dovecot's imap-login bad-command limit (CLIENT_MAX_BAD_COMMANDS 3); OpenSSH's MaxAuthTries
# default (6) is the lenient end. The frontend delays each failure as well.
MAX_FAILURES = 3

# BAD replies per connection: 5, then BYE. nginx's mail max_errors default (5, added for the
# ALPACA cross-protocol attack, CVE-2021-3618); Dovecot's imap-login closes after 3.
MAX_BAD = 5

# Input a client pipelines behind its login command while the Authenticator works: 16384 octets
# (two full command lines), then BYE. nginx holds such input in imap_client_buffer (one page,
# 4k|8k, by default) and Dovecot's login process in its few-KiB input buffer.
MAX_PENDING = 2 * MAX_LINE

# RFC 2971 §3.3: at most 30 field-value pairs; fields at most 30 octets, values at most 1024.
ID_MAX_PAIRS = 30
ID_MAX_FIELD = 30
ID_MAX_VALUE = 1024

# Literals one command may carry: LOGIN's two arguments; ID's fields and values.
_MAX_LITERALS = {"LOGIN": 2, "ID": 2 * ID_MAX_PAIRS}

SERVER_ID = '("name" "apppass")'


@dataclass(frozen=True)
class ImapLimits:
    """Bounds on what a client may make the core hold or do before login (see the constants)."""

    max_line: int = MAX_LINE  # pre-auth command line octets, CRLF included
    max_literal: int = MAX_LITERAL  # one LOGIN/ID literal
    max_commands: int = MAX_COMMANDS  # commands before login, then BYE + Close
    max_failures: int = MAX_FAILURES  # failed logins per connection, then BYE + Close
    max_bad: int = MAX_BAD  # BAD replies per connection, then BYE + Close
    max_pending: int = MAX_PENDING  # input held while a login is being decided, then BYE + Close

    def __post_init__(self) -> None:
        for name in ("max_line", "max_literal", "max_commands", "max_failures", "max_bad",
                     "max_pending"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ImapLimits.{name} must be a positive integer, not {value!r}")

    @property
    def max_command(self) -> int:
        """Octets of one whole command: its lines plus its literals."""
        return self.max_line + 2 * self.max_literal

    @property
    def max_buffered(self) -> int:
        """The most the core ever holds between two calls: a partial command and raw input."""
        return self.max_command + max(self.max_line, self.max_literal, self.max_pending)


# Reply to an auth_failed Refusal (DESIGN.md "Decisions and replies"; RFC 5530 response codes).
REFUSAL_REPLIES: dict[Refusal, tuple[str, str]] = {
    Refusal.CREDENTIALS: ("AUTHENTICATIONFAILED", "Authentication failed."),
    Refusal.EXPIRED: ("EXPIRED", "This app password has expired or is used up."),
    Refusal.FORBIDDEN: ("AUTHORIZATIONFAILED", "This app password may not be used here."),
    Refusal.PRIVACY: ("PRIVACYREQUIRED", "Plaintext authentication is not allowed without TLS."),
    Refusal.TEMPORARY: ("UNAVAILABLE", "Temporary authentication failure, try again later."),
    Refusal.LIMIT: ("UNAVAILABLE", "Too many login attempts, try again later."),
}


# --- Tokens ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Atom:
    value: bytes


@dataclass(frozen=True)
class _String:
    """A quoted string or a literal, already unescaped."""

    value: bytes


class _Paren(enum.Enum):
    OPEN = "("
    CLOSE = ")"


_Token = _Atom | _String | _Paren

# ATOM-CHAR (RFC 9051 §9), leniently: also list-wildcards and "]", which clients put in
# unquoted passwords; never SP, CTL, 8-bit, "(", ")", "{", DQUOTE or "\".
_ATOM = frozenset(b for b in range(0x21, 0x7F) if b not in b'(){"\\')
# tag = 1*<any ASTRING-CHAR except "+"> (RFC 9051 §9): no list-wildcards either.
_TAG = frozenset(b for b in _ATOM if b not in b"%*+")

# A literal's announcement at the very end of a line: {n} or {n+}, after SP, "(" or nothing.
_LITERAL_MARKER = re.compile(rb"(?:(?<=[ (])|\A)\{([0-9]{1,20})(\+?)\}\Z")


@dataclass(frozen=True)
class _Marker:
    start: int  # where "{" is in the line
    size: int
    synchronizing: bool


def _find_marker(line: bytes) -> _Marker | None:
    m = _LITERAL_MARKER.search(line)
    if m is None:
        return None
    return _Marker(m.start(), int(m.group(1)), not m.group(2))


def _tokenize(data: bytes) -> list[_Token] | str:
    """Atoms, quoted strings and parentheses of one line (its literal marker removed), or an
    error text. Quoted strings allow exactly the escapes \\" and \\\\ (RFC 9051 §9)."""
    tokens: list[_Token] = []
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b == 0x20:
            i += 1
        elif b == 0x28:
            tokens.append(_Paren.OPEN)
            i += 1
        elif b == 0x29:
            tokens.append(_Paren.CLOSE)
            i += 1
        elif b == 0x22:
            out = bytearray()
            i += 1
            while True:
                if i >= n:
                    return "Unterminated quoted string"
                c = data[i]
                if c == 0x22:
                    i += 1
                    break
                if c == 0x5C:
                    if i + 1 < n and data[i + 1] in (0x22, 0x5C):
                        out.append(data[i + 1])
                        i += 2
                        continue
                    return "Invalid escape in quoted string"
                if c in (0x0D, 0x0A):
                    return "Invalid character in quoted string"
                out.append(c)
                i += 1
            tokens.append(_String(bytes(out)))
        elif b in _ATOM:
            j = i
            while j < n and data[j] in _ATOM:
                j += 1
            tokens.append(_Atom(data[i:j]))
            i = j
        else:
            return "Invalid character in command"
    return tokens


def _is_nil(token: _Token) -> bool:
    return isinstance(token, _Atom) and token.value.upper() == b"NIL"


def _has_controls(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _parse_id(args: list[_Token]) -> dict[str, str | None] | None:
    """ID parameters (RFC 2971): NIL, or a list of string/nstring pairs within its bounds.
    Anything else, or a field or value with CR, LF or NUL, gives None (ignored, never BAD)."""
    if len(args) == 1 and _is_nil(args[0]):
        return None
    if len(args) < 2 or args[0] is not _Paren.OPEN or args[-1] is not _Paren.CLOSE:
        return None
    inner = args[1:-1]
    if len(inner) % 2 or len(inner) // 2 > ID_MAX_PAIRS:
        return None
    params: dict[str, str | None] = {}
    for key, value in zip(inner[::2], inner[1::2]):
        if not isinstance(key, _String) or not 0 < len(key.value) <= ID_MAX_FIELD:
            return None
        try:
            name = key.value.decode("utf-8")
            if _is_nil(value):
                text = None
            elif isinstance(value, _String) and len(value.value) <= ID_MAX_VALUE:
                text = value.value.decode("utf-8")
            else:
                return None
        except UnicodeDecodeError:
            return None
        if _has_controls(name) or (text is not None and any(c in text for c in "\r\n\0")):
            return None
        params[name] = text
    return params


_CONTROLS = {c: " " for c in [*range(0x20), 0x7F]}


def _clean(text: str) -> str:
    """Text safe to put into a reply line: no CR, LF or other controls."""
    return text.translate(_CONTROLS)


# --- The core --------------------------------------------------------------------------------


class _State(enum.Enum):
    COMMAND = "command"  # reading command lines (a new command or the rest of self._cmd)
    LITERAL = "literal"  # reading the octets of an accepted literal
    SKIP_LITERAL = "skip-literal"  # dropping a refused non-synchronizing literal
    DISCARD = "discard"  # dropping the rest of a refused command's line
    SASL = "sasl"  # AUTHENTICATE: waiting for the client's response line
    AUTHENTICATING = "authenticating"  # Authenticate event out; input is held, not parsed
    STARTING_TLS = "starting-tls"  # StartTLS event out; plaintext input is discarded
    LOGGED_IN = "logged-in"  # done; input goes to take_pending()
    CLOSED = "closed"  # Close event out; input is ignored


@dataclass
class _Command:
    """A command whose lines and literals are still arriving."""

    tag: str
    name: str
    args: list[_Token] = field(default_factory=list)
    octets: int = 0
    literals: int = 0


class ImapCore(PreAuthCore):
    """The not-authenticated state of one IMAP connection (h11-style, no I/O)."""

    _State = _State

    def __init__(
        self,
        *,
        tls_active: bool,
        starttls_available: bool,
        plaintext_auth: bool,
        limits: ImapLimits = ImapLimits(),
        greeting_text: str = "apppass ready.",
    ) -> None:
        self.tls_active = tls_active
        self.starttls_available = starttls_available
        self.plaintext_auth = plaintext_auth
        self.limits = limits
        self.greeting_text = _clean(greeting_text)
        # Parameters of the client's last ID command, for forwarding upstream; None if it sent
        # none, NIL, or invalid ones. Client-controlled: the upstream login must not trust
        # fields such as x-originating-ip from it. Reset by STARTTLS.
        self.client_id: dict[str, str | None] | None = None
        self.commands = 0  # commands received before login
        self.failures = 0  # failed logins
        self.bad = 0  # BAD replies
        self._lines = LineBuffer(limits.max_line)
        self._state = _State.COMMAND
        self._cmd: _Command | None = None
        self._literal_size = 0
        self._skip = 0
        self._sasl: SaslExchange | None = None
        self._sasl_tag = ""
        self._auth_tag = ""

    # -- what the frontend calls --------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Octets of client input the core holds now (raw input plus a partial command)."""
        return self._lines.buffered + (self._cmd.octets if self._cmd is not None else 0)

    def capabilities(self) -> str:
        """The pre-auth CAPABILITY list (RFC 9051 §6.2.3: LOGINDISABLED without TLS)."""
        caps = ["IMAP4rev1", "SASL-IR", "LITERAL+", "ID"]
        if self.starttls_available and not self.tls_active:
            caps.append("STARTTLS")
        if self.plaintext_allowed:
            caps += ["AUTH=PLAIN", "AUTH=LOGIN"]
        else:
            caps.append("LOGINDISABLED")
        return " ".join(caps)

    def greeting(self) -> list[Event]:
        return [_send(f"* OK [CAPABILITY {self.capabilities()}] {self.greeting_text}")]

    # -- PreAuthCore hooks ---------------------------------------------------------------------

    def _overflow(self, events: list[Event]) -> None:
        self._bye("Too much input before login completed", events, "pending input too large")

    def _refused(self, refusal: Refusal, text: str | None, events: list[Event]) -> None:
        code, default = REFUSAL_REPLIES[refusal]
        human = _clean(text).strip() if text else default
        self._refuse(self._auth_tag, f"[{code}] {human or default}", events)

    def _success(self, capabilities: str) -> Event:
        """Tagged OK with the upstream's capabilities (RFC 9051 §7.1: CAPABILITY response code)."""
        caps = " ".join(_clean(capabilities).split())
        code = f"[CAPABILITY {caps}] " if caps else ""
        return _send(f"{self._auth_tag} OK {code}Logged in")

    def login_timeout(self) -> list[Event]:
        """The frontend's clock says the time to log in is over."""
        if self._state in (_State.CLOSED, _State.LOGGED_IN):
            return []
        events: list[Event] = []
        self._bye("Login timed out", events, "login timeout")
        return events

    # -- the parsing loop ---------------------------------------------------------------------

    def _run(self) -> list[Event]:
        events: list[Event] = []
        lines = self._lines
        while True:
            state = self._state
            if state is _State.COMMAND:
                line = lines.next_line()
                if line is None:
                    break
                self._on_command_line(line, events)
            elif state is _State.LITERAL:
                data = lines.take_bytes(self._literal_size)
                if data is None:
                    break
                assert self._cmd is not None
                self._cmd.args.append(_String(data))
                self._state = _State.COMMAND
            elif state is _State.SKIP_LITERAL:
                step = min(self._skip, lines.buffered)
                if step:
                    lines.take_bytes(step)
                    self._skip -= step
                if self._skip:
                    break
                self._state = _State.DISCARD
            elif state is _State.DISCARD:
                line = lines.next_line()
                if line is None:
                    break
                marker = _find_marker(line) if isinstance(line, bytes) else None
                if marker is not None and not marker.synchronizing:
                    self._skip_literal(marker.size)
                else:
                    self._state = _State.COMMAND
            elif state is _State.SASL:
                line = lines.next_line()
                if line is None:
                    break
                self._on_sasl_line(line, events)
            else:
                break
        return events

    def _on_command_line(self, line: bytes | TooLong, events: list[Event]) -> None:
        if isinstance(line, TooLong):
            tag = self._cmd.tag if self._cmd is not None else "*"
            self._cmd = None
            self._bad(tag, "Command line too long", events, "line too long")
        elif self._cmd is None:
            self._start_command(line, events)
        else:
            self._continue_command(line, events)

    def _start_command(self, line: bytes, events: list[Event]) -> None:
        self.commands += 1
        if self.commands > self.limits.max_commands:
            self._bye("Too many commands before login", events, "too many commands")
            return
        if not line:
            return  # an empty line: nothing to answer, but it counts
        marker = _find_marker(line)
        body = line[: marker.start] if marker else line
        parts = body.split(b" ", 2)
        if not parts[0] or any(b not in _TAG for b in parts[0]):
            self._refuse_command("*", "", marker, "Invalid tag", events)
            return
        tag = parts[0].decode("ascii")
        if len(parts) < 2 or not parts[1] or any(b not in _ATOM for b in parts[1]):
            self._refuse_command(tag, "", marker, "Missing or invalid command name", events)
            return
        name = parts[1].decode("ascii").upper()
        if name == "LOGIN" and not self.plaintext_allowed:
            self._refuse_plaintext(tag, events)
            self._drop_literal(marker)
            return
        if marker is not None and name not in _MAX_LITERALS:
            text = ("Unexpected literal" if name in _COMMANDS
                    else "Unknown command or not allowed before login")
            self._refuse_command(tag, name, marker, text, events)
            return
        tokens = _tokenize(parts[2] if len(parts) > 2 else b"")
        if isinstance(tokens, str):
            self._refuse_command(tag, name, marker, tokens, events)
            return
        self._cmd = _Command(tag, name, tokens, octets=len(line))
        self._command_line_done(marker, events)

    def _continue_command(self, line: bytes, events: list[Event]) -> None:
        cmd = self._cmd
        assert cmd is not None
        marker = _find_marker(line)
        cmd.octets += len(line)
        if cmd.octets > self.limits.max_command:
            self._cmd = None
            self._refuse_command(cmd.tag, cmd.name, marker, "[TOOBIG] Command too long", events)
            return
        tokens = _tokenize(line[: marker.start] if marker else line)
        if isinstance(tokens, str):
            self._cmd = None
            self._refuse_command(cmd.tag, cmd.name, marker, tokens, events)
            return
        cmd.args += tokens
        self._command_line_done(marker, events)

    def _command_line_done(self, marker: _Marker | None, events: list[Event]) -> None:
        cmd = self._cmd
        assert cmd is not None
        if marker is None:
            self._cmd = None
            self._execute(cmd, events)
            return
        limits = self.limits
        if marker.size > limits.max_literal or cmd.octets + marker.size > limits.max_command:
            self._cmd = None
            self._refuse_command(cmd.tag, cmd.name, marker, "[TOOBIG] Literal too big", events)
            return
        if cmd.literals >= _MAX_LITERALS[cmd.name]:
            self._cmd = None
            self._refuse_command(cmd.tag, cmd.name, marker, "Too many literals", events)
            return
        cmd.literals += 1
        cmd.octets += marker.size
        self._literal_size = marker.size
        self._state = _State.LITERAL
        if marker.synchronizing:
            events.append(_send("+ Ready for literal data"))

    def _refuse_command(self, tag: str, name: str, marker: _Marker | None, text: str,
                        events: list[Event]) -> None:
        """Answer a command that cannot be carried out, without reading its literal: ID is
        answered OK whatever its parameters (RFC 2971); anything else gets BAD."""
        if name == "ID":
            self.client_id = None
            self._reply_id(tag, events)
        else:
            self._bad(tag, text, events, text.removeprefix("[TOOBIG] ").lower())
        self._drop_literal(marker)

    def _drop_literal(self, marker: _Marker | None) -> None:
        """A refused {n} is never sent (no continuation); a refused {n+} comes anyway and is
        skipped, without holding it, with the rest of its command line."""
        if marker is None or self._state is _State.CLOSED:
            return
        if marker.synchronizing:
            self._state = _State.COMMAND
        else:
            self._skip_literal(marker.size)

    def _skip_literal(self, size: int) -> None:
        self._skip = size
        self._state = _State.SKIP_LITERAL

    # -- commands -----------------------------------------------------------------------------

    def _execute(self, cmd: _Command, events: list[Event]) -> None:
        handler = _COMMANDS.get(cmd.name)
        if handler is None:
            self._bad(cmd.tag, "Unknown command or not allowed before login", events,
                      f"command {cmd.name[:32]} before login")
            return
        handler(self, cmd, events)

    def _cmd_capability(self, cmd: _Command, events: list[Event]) -> None:
        if cmd.args:
            self._bad(cmd.tag, "CAPABILITY takes no arguments", events, "bad arguments")
            return
        events.append(_send(f"* CAPABILITY {self.capabilities()}"))
        events.append(_send(f"{cmd.tag} OK CAPABILITY completed"))

    def _cmd_noop(self, cmd: _Command, events: list[Event]) -> None:
        if cmd.args:
            self._bad(cmd.tag, "NOOP takes no arguments", events, "bad arguments")
            return
        events.append(_send(f"{cmd.tag} OK NOOP completed"))

    def _cmd_logout(self, cmd: _Command, events: list[Event]) -> None:
        if cmd.args:
            self._bad(cmd.tag, "LOGOUT takes no arguments", events, "bad arguments")
            return
        events.append(_send("* BYE Logging out"))
        events.append(_send(f"{cmd.tag} OK LOGOUT completed"))
        self._close("logout", events)

    def _cmd_id(self, cmd: _Command, events: list[Event]) -> None:
        self.client_id = _parse_id(cmd.args)
        self._reply_id(cmd.tag, events)

    def _reply_id(self, tag: str, events: list[Event]) -> None:
        events.append(_send(f"* ID {SERVER_ID}"))
        events.append(_send(f"{tag} OK ID completed"))

    def _cmd_starttls(self, cmd: _Command, events: list[Event]) -> None:
        if cmd.args:
            self._bad(cmd.tag, "STARTTLS takes no arguments", events, "bad arguments")
        elif self.tls_active:
            self._bad(cmd.tag, "TLS is already active", events, "STARTTLS with TLS active")
        elif not self.starttls_available:
            self._bad(cmd.tag, "STARTTLS is not available here", events, "STARTTLS unavailable")
        else:
            events.append(_send(f"{cmd.tag} OK Begin TLS negotiation now"))
            events.append(StartTLS())
            # CVE-2011-0411: whatever the client pipelined after STARTTLS is dropped, and so is
            # what it told us in the clear.
            self._lines.clear()
            self.client_id = None
            self._state = _State.STARTING_TLS

    def _cmd_login(self, cmd: _Command, events: list[Event]) -> None:
        values = [a.value for a in cmd.args if isinstance(a, (_Atom, _String))]
        if len(cmd.args) != 2 or len(values) != 2:
            self._bad(cmd.tag, "LOGIN expects a user name and a password", events, "bad arguments")
            return
        try:
            login, secret = (v.decode("utf-8") for v in values)
        except UnicodeDecodeError:
            self._refuse_login(cmd.tag, events, "login or password is not UTF-8")
            return
        self._present(cmd.tag, Credentials(login, secret), "LOGIN", "LOGIN", events)

    def _cmd_authenticate(self, cmd: _Command, events: list[Event]) -> None:
        atoms = [a.value.decode("ascii") for a in cmd.args if isinstance(a, _Atom)]
        if not 1 <= len(cmd.args) <= 2 or len(atoms) != len(cmd.args):
            self._bad(cmd.tag, "AUTHENTICATE expects a mechanism and an optional initial "
                      "response", events, "bad arguments")
            return
        mechanism = server_mechanism(atoms[0])
        if mechanism is None:
            events.append(_send(f"{cmd.tag} NO Unsupported authentication mechanism"))
            return
        if not self.plaintext_allowed:
            self._refuse_plaintext(cmd.tag, events)
            return
        initial = atoms[1] if len(atoms) == 2 else None  # "=" is an empty one (RFC 4959)
        self._sasl = SaslExchange(mechanism)
        self._sasl_result(cmd.tag, self._sasl.start(initial), events)

    # -- authentication -----------------------------------------------------------------------

    def _sasl_result(self, tag: str, result: StepResult, events: list[Event]) -> None:
        """Turn one step of the shared SASL exchange into IMAP's reply (RFC 9051 §6.2.2)."""
        self._state = _State.COMMAND
        exchange, self._sasl = self._sasl, None
        assert exchange is not None
        if result.step is Step.CHALLENGE:
            self._sasl, self._sasl_tag = exchange, tag
            self._state = _State.SASL
            events.append(_send(f"+ {result.challenge}"))
        elif result.step is Step.DONE:
            self._present(tag, result.credentials, exchange.name, "AUTHENTICATE", events)
        elif result.step is Step.AUTHZID_REFUSED:
            events.append(Failed("SASL authzid differs from authcid"))
            self._refuse(tag, "[AUTHORIZATIONFAILED] Authorization identity refused", events)
        elif result.step is Step.INVALID_LOGIN:
            self._refuse_login(tag, events, result.detail)
        elif result.step is Step.CANCELLED:
            self._bad(tag, "Authentication cancelled", events, "authentication cancelled")
        else:
            self._bad(tag, "Invalid authentication data", events, f"SASL: {result.detail}")

    def _on_sasl_line(self, line: bytes | TooLong, events: list[Event]) -> None:
        tag = self._sasl_tag
        assert self._sasl is not None
        if isinstance(line, TooLong):
            self._state, self._sasl = _State.COMMAND, None
            self._bad(tag, "Authentication response too long", events, "line too long")
        else:
            self._sasl_result(tag, self._sasl.respond(line), events)

    def _present(self, tag: str, credentials: Credentials, mechanism: str, command: str,
                 events: list[Event]) -> None:
        if not is_valid_login(credentials.login):
            self._refuse_login(tag, events, "invalid login name")
            return
        self._auth_tag = tag
        self._state = _State.AUTHENTICATING
        events.append(Authenticate(credentials, mechanism, tag, {"command": command}))

    def _refuse_login(self, tag: str, events: list[Event], reason: str) -> None:
        """Refused before any lookup; the reply is the same as for bad credentials."""
        code, text = REFUSAL_REPLIES[Refusal.CREDENTIALS]
        events.append(Failed(reason))
        self._refuse(tag, f"[{code}] {text}", events)

    def _refuse_plaintext(self, tag: str, events: list[Event]) -> None:
        code, text = REFUSAL_REPLIES[Refusal.PRIVACY]
        events.append(_send(f"{tag} NO [{code}] {text}"))
        events.append(Failed("plaintext authentication without TLS"))

    # -- replies that count -------------------------------------------------------------------

    def _refuse(self, tag: str, text: str, events: list[Event]) -> None:
        """A failed login: NO, and BYE after max_failures."""
        events.append(_send(f"{tag} NO {text}"))
        self.failures += 1
        if self.failures >= self.limits.max_failures:
            self._bye("Too many invalid authentication attempts", events, "too many failed logins")

    def _bad(self, tag: str, text: str, events: list[Event], reason: str) -> None:
        """A protocol error: BAD and a Failed event, and BYE after max_bad."""
        events.append(_send(f"{tag} BAD {text}"))
        events.append(Failed(reason))
        self.bad += 1
        if self.bad >= self.limits.max_bad:
            self._bye("Too many invalid commands", events, "too many invalid commands")

    def _bye(self, text: str, events: list[Event], reason: str) -> None:
        events.append(_send(f"* BYE {text}"))
        self._close(reason, events)

    def _close(self, reason: str, events: list[Event]) -> None:
        events.append(Close(reason))
        self._state = _State.CLOSED
        self._cmd = None
        self._sasl = None
        self._lines.clear()


_COMMANDS = {
    "CAPABILITY": ImapCore._cmd_capability,
    "NOOP": ImapCore._cmd_noop,
    "LOGOUT": ImapCore._cmd_logout,
    "ID": ImapCore._cmd_id,
    "STARTTLS": ImapCore._cmd_starttls,
    "LOGIN": ImapCore._cmd_login,
    "AUTHENTICATE": ImapCore._cmd_authenticate,
}


def _send(text: str) -> Send:
    return Send(text.encode("utf-8") + CRLF)

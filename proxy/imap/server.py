"""The IMAP pre-auth protocol core, sans-IO: client bytes in, commands and reply bytes out.

`ImapCore` speaks the not-authenticated state of RFC 9051 / RFC 3501 with the extensions a
legacy client needs to log in: CAPABILITY, NOOP, LOGOUT, ID (RFC 2971), STARTTLS, LOGIN with
atoms, quoted strings and literals (LITERAL+, RFC 7888), and AUTHENTICATE PLAIN / LOGIN with
SASL-IR (RFC 4959). The shared pre-auth life (limits, counters, SASL) is proxy/core.py, the
tokens proxy/imap/syntax.py; this module reads tagged commands with their literals.

Every input is bounded (ImapLimits): line length, literal size, the octets of one command,
input pipelined behind a login, number of commands, failed logins and BAD replies.
Secrets are never put into replies, commands other than Authenticate, or exception texts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from proxy.auth.decision import Refusal
from proxy.commands import Command, StartTLS
from proxy.core import MAX_PENDING, Count, Limits, PreAuthCore, Reply, Say, State, printable
from proxy.imap.syntax import (
    ATOM_CHARS,
    ID_MAX_PAIRS,
    TAG_CHARS,
    Atom,
    Marker,
    String,
    Token,
    decided_by_apppass,
    find_marker,
    is_capability,
    parse_id,
    tokenize,
)
from proxy.linebuffer import TooLong
from proxy.sasl import Credentials

# Pre-auth command line: 8192 octets, CRLF included. Dovecot's imap-login parses pre-auth
# commands with the same bound (MAX_IMAP_LINE 8192); RFC 7162 §4 asks clients to keep command
# lines to about 8192 octets, RFC 2683 §3.2.1.5 to 1000. The quoted and atom parts of one
# command, across all its lines, share this bound too (Dovecot bounds "all parameters of a
# command" by its login input buffer).
MAX_LINE = 8192

# One literal before login: 1024 octets. A login name is at most 255 characters (sasl.MAX_FIELD,
# after RFC 4616 §2), so at most 1020 octets of UTF-8; an app password is 16 characters; RFC 2971
# §3.3 caps an ID value at 1024 octets. A command's literals together may add at most
# 2 * MAX_LITERAL octets to it (LOGIN with both arguments as literals).
MAX_LITERAL = 1024

# Literals one command may carry: LOGIN's two arguments; ID's fields and values.
_MAX_LITERALS = {"LOGIN": 2, "ID": 2 * ID_MAX_PAIRS}

SERVER_ID = '("name" "apppass")'


@dataclass(frozen=True)
class ImapLimits(Limits):
    """IMAP's bounds: the shared ones (proxy/core.py) and the size of a literal."""

    max_line: int = MAX_LINE
    max_literal: int = MAX_LITERAL  # one LOGIN/ID literal
    max_pending: int = 2 * MAX_LINE  # two full command lines (= core.MAX_PENDING)

    @property
    def max_command(self) -> int:
        """Octets of one whole command: its lines plus its literals."""
        return self.max_line + 2 * self.max_literal

    @property
    def max_buffered(self) -> int:
        """The most the core ever holds between two calls: a partial command and raw input."""
        return self.max_command + max(self.max_line, self.max_literal, self.max_pending)


assert ImapLimits().max_pending == MAX_PENDING

_FAILED = "{tag} NO [AUTHENTICATIONFAILED] Authentication failed."

WORDS: Mapping[Say, Reply] = {
    Say.CHALLENGE: Reply("+ {challenge}", Count.NOTHING),
    Say.LINE_TOO_LONG: Reply("{tag} BAD Command line too long"),
    Say.CONTROLS: Reply("{tag} BAD Invalid character in command"),
    Say.UNKNOWN_COMMAND: Reply("{tag} BAD Unknown command or not allowed before login"),
    Say.AUTH_SYNTAX: Reply(
        "{tag} BAD AUTHENTICATE expects a mechanism and an optional initial response"
    ),
    Say.UNKNOWN_MECHANISM: Reply("{tag} NO Unsupported authentication mechanism", Count.NOTE),
    Say.PLAINTEXT_DISALLOWED: Reply(
        "{tag} NO [PRIVACYREQUIRED] Plaintext authentication is not allowed without TLS.",
        Count.NOTE,
    ),
    Say.SASL_TOO_LONG: Reply("{tag} BAD Authentication response too long"),
    Say.SASL_CANCELLED: Reply("{tag} BAD Authentication cancelled"),
    Say.BAD_BASE64: Reply("{tag} BAD Invalid authentication data"),
    Say.MALFORMED_SASL: Reply("{tag} BAD Invalid authentication data"),
    Say.AUTHZID_REFUSED: Reply(
        "{tag} NO [AUTHORIZATIONFAILED] Authorization identity refused", Count.FAILURE
    ),
    Say.BAD_CREDENTIALS: Reply(_FAILED, Count.FAILURE),
    Say.TOO_MANY_COMMANDS: Reply("* BYE Too many commands before login", Count.CLOSE),
    Say.TOO_MANY_FAILURES: Reply("* BYE Too many invalid authentication attempts", Count.CLOSE),
    Say.TOO_MANY_ERRORS: Reply("* BYE Too many invalid commands", Count.CLOSE),
    Say.OVERFLOW: Reply("* BYE Too much input before login completed", Count.CLOSE),
    Say.LOGIN_TIMEOUT: Reply("* BYE Login timed out", Count.CLOSE),
    # RFC 9051 §7.1.5: BYE may be the greeting of a server that will not serve the client.
    Say.SHUTTING_DOWN: Reply("* BYE apppass is shutting down, try again later", Count.CLOSE),
    Say.TOO_MANY_CONNECTIONS: Reply(
        "* BYE [UNAVAILABLE] Too many connections, try again later", Count.CLOSE
    ),
}

# Replies to an auth_failed Refusal (RFC 5530 response codes).
REFUSALS: Mapping[Refusal, Reply] = {
    Refusal.CREDENTIALS: Reply(_FAILED, Count.FAILURE),
    Refusal.EXPIRED: Reply(
        "{tag} NO [EXPIRED] This app password has expired or is used up.", Count.FAILURE
    ),
    Refusal.FORBIDDEN: Reply(
        "{tag} NO [AUTHORIZATIONFAILED] This app password may not be used here.", Count.FAILURE
    ),
    Refusal.PRIVACY: Reply(
        "{tag} NO [PRIVACYREQUIRED] Plaintext authentication is not allowed without TLS.",
        Count.FAILURE,
    ),
    Refusal.TEMPORARY: Reply(
        "{tag} NO [UNAVAILABLE] Temporary authentication failure, try again later.", Count.FAILURE
    ),
    Refusal.LIMIT: Reply(
        "{tag} NO [UNAVAILABLE] Too many login attempts, try again later.", Count.FAILURE
    ),
    Refusal.BUSY: Reply(
        "{tag} NO [UNAVAILABLE] Too many sessions for this account, try again later.\r\n"
        "* BYE Too many sessions for this account",
        Count.CLOSE,
    ),
}


# What apppass's pre-auth core speaks, listed before login whatever the upstream offers.
BASE_CAPABILITIES = ("IMAP4rev1", "SASL-IR", "LITERAL+", "ID")

# The upstream's capabilities listed before login: at most 2048 octets of names. Dovecot's
# pre-login list is about 100 octets, its whole list after login under 1 KiB; the bound keeps the
# greeting far below the 8192-octet lines clients read (RFC 7162 §4).
MAX_EXTRA_CAPABILITIES = 2048


def extra_capabilities(names: Iterable[str]) -> tuple[str, ...]:
    """What apppass passes on of an upstream's (or a listener's) capability list before login:
    valid names, each once, without those apppass decides or lists itself, within the bound."""
    seen = {name.upper() for name in BASE_CAPABILITIES}
    out: list[str] = []
    size = 0
    for name in names:
        if not is_capability(name) or decided_by_apppass(name) or name.upper() in seen:
            continue
        size += len(name) + 1
        if size > MAX_EXTRA_CAPABILITIES:
            break
        seen.add(name.upper())
        out.append(name)
    return tuple(out)


@dataclass
class _PendingCommand:
    """A command whose lines and literals are still arriving."""

    tag: str
    name: str
    args: list[Token] = field(default_factory=list)
    octets: int = 0
    literals: int = 0


# An IMAP command's handler: (core, the command with its arguments, commands out).
_Handler = Callable[["ImapCore", _PendingCommand, list[Command]], None]


class ImapCore(PreAuthCore):
    """The not-authenticated state of one IMAP connection (h11-style, no I/O)."""

    WORDS = WORDS
    REFUSALS = REFUSALS
    limits: ImapLimits

    def __init__(
        self,
        *,
        tls_active: bool,
        starttls_available: bool,
        plaintext_auth: bool,
        limits: ImapLimits | None = None,
        greeting_text: str = "apppass ready.",
        capabilities: Sequence[str] = (),
    ) -> None:
        limits = limits or ImapLimits()
        super().__init__(
            tls_active=tls_active,
            starttls_available=starttls_available,
            plaintext_auth=plaintext_auth,
            limits=limits,
            line_limit=limits.max_line,
        )
        self.greeting_text = printable(greeting_text)
        # What the upstream offers before login (IDLE, ENABLE…), as extra_capabilities() gives it.
        self.extra_capabilities = tuple(capabilities)
        # Parameters of the client's last ID command; None if it sent none, NIL, or invalid ones.
        # Client-controlled: nothing upstream may trust fields such as x-originating-ip from it.
        # Reset by STARTTLS.
        self.client_id: dict[str, str | None] | None = None
        self._cmd: _PendingCommand | None = None
        self._literal_size = 0

    @property
    def buffered(self) -> int:
        """Octets of client input the core holds now (raw input plus a partial command)."""
        return self._lines.buffered + (self._cmd.octets if self._cmd is not None else 0)

    def capabilities(self) -> str:
        """The pre-auth CAPABILITY list (RFC 9051 §6.2.3: LOGINDISABLED without TLS): apppass's
        own, the upstream's extras, then STARTTLS and the mechanisms where they apply."""
        caps = [*BASE_CAPABILITIES, *self.extra_capabilities]
        if self.starttls_available and not self.tls_active:
            caps.append("STARTTLS")
        if self.plaintext_allowed:
            caps += ["AUTH=PLAIN", "AUTH=LOGIN"]
        else:
            caps.append("LOGINDISABLED")
        return " ".join(caps)

    def greeting(self) -> list[Command]:
        return [self._send(f"* OK [CAPABILITY {self.capabilities()}] {self.greeting_text}")]

    # -- PreAuthCore hooks ---------------------------------------------------------------------

    def _forget_before_tls(self) -> None:
        self.client_id = None

    def _reset(self) -> None:
        self._cmd = None

    def _success(self, capabilities: str) -> Command:
        """Tagged OK with the upstream's capabilities (RFC 9051 §7.1: CAPABILITY response code)."""
        caps = " ".join(printable(capabilities).split())
        code = f"[CAPABILITY {caps}] " if caps else ""
        return self._send(f"{self._tag} OK {code}Logged in")

    # -- the parsing loop ---------------------------------------------------------------------

    def _run(self) -> list[Command]:
        out: list[Command] = []
        lines = self._lines
        while True:
            state = self._state
            if state is State.COMMAND:
                line = lines.next_line()
                if line is None:
                    break
                self._on_command_line(line, out)
            elif state is State.LITERAL:
                data = lines.take_bytes(self._literal_size)
                if data is None:
                    break
                assert self._cmd is not None
                self._cmd.args.append(String(data))
                self._state = State.COMMAND
            elif state is State.SKIP:
                if not self._skip_bytes():
                    break
                self._state = State.DISCARD
            elif state is State.DISCARD:
                line = lines.next_line()
                if line is None:
                    break
                marker = find_marker(line) if isinstance(line, bytes) else None
                if marker is not None and not marker.synchronizing:
                    self._skip_literal(marker.size)
                else:
                    self._state = State.COMMAND
            elif state is State.SASL:
                line = lines.next_line()
                if line is None:
                    break
                self._on_sasl_line(line, out)
            else:
                break
        return out

    def _on_command_line(self, line: bytes | TooLong, out: list[Command]) -> None:
        if isinstance(line, TooLong):
            self._tag = self._cmd.tag if self._cmd is not None else "*"
            self._cmd = None
            self._say(Say.LINE_TOO_LONG, out)
        elif self._cmd is None:
            self._start_command(line, out)
        else:
            self._continue_command(line, out)

    def _start_command(self, line: bytes, out: list[Command]) -> None:
        self.commands += 1
        if self.commands > self.limits.max_commands:
            self._say(Say.TOO_MANY_COMMANDS, out)
            return
        if not line:
            return  # an empty line: nothing to answer, but it counts
        marker = find_marker(line)
        body = line[: marker.start] if marker else line
        parts = body.split(b" ", 2)
        if not parts[0] or any(b not in TAG_CHARS for b in parts[0]):
            self._refuse_command("*", "", marker, "Invalid tag", out)
            return
        tag = parts[0].decode("ascii")
        if len(parts) < 2 or not parts[1] or any(b not in ATOM_CHARS for b in parts[1]):
            self._refuse_command(tag, "", marker, "Missing or invalid command name", out)
            return
        name = parts[1].decode("ascii").upper()
        if name == "LOGIN" and not self.plaintext_allowed:
            self._tag = tag
            self._say(Say.PLAINTEXT_DISALLOWED, out)
            self._drop_literal(marker)
            return
        if marker is not None and name not in _MAX_LITERALS:
            text = (
                "Unexpected literal"
                if name in self.COMMANDS
                else "Unknown command or not allowed before login"
            )
            self._refuse_command(tag, name, marker, text, out)
            return
        tokens = tokenize(parts[2] if len(parts) > 2 else b"")
        if isinstance(tokens, str):
            self._refuse_command(tag, name, marker, tokens, out)
            return
        self._cmd = _PendingCommand(tag, name, tokens, octets=len(line))
        self._command_line_done(marker, out)

    def _continue_command(self, line: bytes, out: list[Command]) -> None:
        cmd = self._cmd
        assert cmd is not None
        marker = find_marker(line)
        cmd.octets += len(line)
        if cmd.octets > self.limits.max_command:
            self._cmd = None
            self._refuse_command(cmd.tag, cmd.name, marker, "[TOOBIG] Command too long", out)
            return
        tokens = tokenize(line[: marker.start] if marker else line)
        if isinstance(tokens, str):
            self._cmd = None
            self._refuse_command(cmd.tag, cmd.name, marker, tokens, out)
            return
        cmd.args += tokens
        self._command_line_done(marker, out)

    def _command_line_done(self, marker: Marker | None, out: list[Command]) -> None:
        cmd = self._cmd
        assert cmd is not None
        if marker is None:
            self._cmd = None
            self._execute(cmd, out)
            return
        limits = self.limits
        if marker.size > limits.max_literal or cmd.octets + marker.size > limits.max_command:
            self._cmd = None
            self._refuse_command(cmd.tag, cmd.name, marker, "[TOOBIG] Literal too big", out)
            return
        if cmd.literals >= _MAX_LITERALS[cmd.name]:
            self._cmd = None
            self._refuse_command(cmd.tag, cmd.name, marker, "Too many literals", out)
            return
        cmd.literals += 1
        cmd.octets += marker.size
        self._literal_size = marker.size
        self._state = State.LITERAL
        if marker.synchronizing:
            out.append(self._send("+ Ready for literal data"))

    def _refuse_command(
        self, tag: str, name: str, marker: Marker | None, text: str, out: list[Command]
    ) -> None:
        """Answer a command that cannot be carried out, without reading its literal: ID is
        answered OK whatever its parameters (RFC 2971); anything else gets BAD."""
        if name == "ID":
            self.client_id = None
            self._reply_id(tag, out)
        else:
            self._error(f"{tag} BAD {text}", out, text.removeprefix("[TOOBIG] ").lower())
        self._drop_literal(marker)

    def _drop_literal(self, marker: Marker | None) -> None:
        """A refused {n} is never sent (no continuation); a refused {n+} comes anyway and is
        skipped, without holding it, with the rest of its command line."""
        if marker is None or self._state is State.CLOSED:
            return
        if marker.synchronizing:
            self._state = State.COMMAND
        else:
            self._skip_literal(marker.size)

    def _skip_literal(self, size: int) -> None:
        self._skip = size
        self._state = State.SKIP

    # -- commands -----------------------------------------------------------------------------

    def _execute(self, cmd: _PendingCommand, out: list[Command]) -> None:
        self._tag = cmd.tag
        handler = self.COMMANDS.get(cmd.name)
        if handler is None:
            self._say(Say.UNKNOWN_COMMAND, out, f"command {cmd.name[:32]} before login")
        elif cmd.args and cmd.name in _NO_ARGUMENTS:
            self._error(f"{cmd.tag} BAD {cmd.name} takes no arguments", out, "bad arguments")
        else:
            handler(self, cmd, out)

    def _cmd_capability(self, cmd: _PendingCommand, out: list[Command]) -> None:
        out.append(self._send(f"* CAPABILITY {self.capabilities()}"))
        out.append(self._send(f"{cmd.tag} OK CAPABILITY completed"))

    def _cmd_noop(self, cmd: _PendingCommand, out: list[Command]) -> None:
        out.append(self._send(f"{cmd.tag} OK NOOP completed"))

    def _cmd_logout(self, cmd: _PendingCommand, out: list[Command]) -> None:
        out.append(self._send("* BYE Logging out"))
        out.append(self._send(f"{cmd.tag} OK LOGOUT completed"))
        self._close("logout", out)

    def _cmd_id(self, cmd: _PendingCommand, out: list[Command]) -> None:
        self.client_id = parse_id(cmd.args)
        self._reply_id(cmd.tag, out)

    def _reply_id(self, tag: str, out: list[Command]) -> None:
        out.append(self._send(f"* ID {SERVER_ID}"))
        out.append(self._send(f"{tag} OK ID completed"))

    def _cmd_starttls(self, cmd: _PendingCommand, out: list[Command]) -> None:
        if self.tls_active:
            self._error(f"{cmd.tag} BAD TLS is already active", out, "STARTTLS with TLS active")
        elif not self.starttls_available:
            self._error(
                f"{cmd.tag} BAD STARTTLS is not available here", out, "STARTTLS unavailable"
            )
        else:
            out.append(self._send(f"{cmd.tag} OK Begin TLS negotiation now"))
            out.append(StartTLS())
            # CVE-2011-0411: whatever the client pipelined after STARTTLS is dropped, and so is
            # what it told us in the clear.
            self._lines.clear()
            self.client_id = None
            self._state = State.STARTING_TLS

    def _cmd_login(self, cmd: _PendingCommand, out: list[Command]) -> None:
        values = [a.value for a in cmd.args if isinstance(a, (Atom, String))]
        if len(cmd.args) != 2 or len(values) != 2:
            self._error(
                f"{cmd.tag} BAD LOGIN expects a user name and a password", out, "bad arguments"
            )
            return
        try:
            login, secret = (v.decode("utf-8") for v in values)
        except UnicodeDecodeError:
            self._say(Say.BAD_CREDENTIALS, out, "login or password is not UTF-8")
            return
        self._authenticate(Credentials(login, secret), "LOGIN", out)

    def _cmd_authenticate(self, cmd: _PendingCommand, out: list[Command]) -> None:
        atoms = [a.value.decode("ascii") for a in cmd.args if isinstance(a, Atom)]
        if not 1 <= len(cmd.args) <= 2 or len(atoms) != len(cmd.args):
            self._say(Say.AUTH_SYNTAX, out, "bad arguments")
            return
        initial = atoms[1] if len(atoms) == 2 else None  # "=" is an empty one (RFC 4959)
        self._start_sasl(atoms[0], initial, out)

    COMMANDS: ClassVar[Mapping[str, _Handler]] = {
        "CAPABILITY": _cmd_capability,
        "NOOP": _cmd_noop,
        "LOGOUT": _cmd_logout,
        "ID": _cmd_id,
        "STARTTLS": _cmd_starttls,
        "LOGIN": _cmd_login,
        "AUTHENTICATE": _cmd_authenticate,
    }


_NO_ARGUMENTS = frozenset({"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS"})

"""The POP3 pre-auth protocol core, sans-IO: client bytes in, commands and reply bytes out.

`Pop3Core` speaks the AUTHORIZATION state of POP3 (RFC 1939) with the extensions a legacy client
needs to log in: CAPA and response codes (RFC 2449, RFC 3206), STLS (RFC 2595), USER/PASS, and
AUTH PLAIN / LOGIN with and without an initial response (RFC 5034), plus the bare `AUTH` listing
that RFC 1734-era clients (Outlook) send. The shared pre-auth life (limits, counters, SASL) is
proxy/core.py; this module has POP3's commands and words.

Secrets are never put into replies, commands other than Authenticate, or exception texts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from proxy.auth.decision import Refusal
from proxy.commands import Command, Send, StartTLS
from proxy.core import Count, Handler, LineCore, LineLimits, Reply, Say, State
from proxy.sasl import MAX_FIELD, MECHANISMS, Credentials

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


def pop3_limits(**changes: int) -> LineLimits:
    """POP3's limits, with the shared ones changeable (`auth.max_failures` from the config)."""
    return LineLimits(**{"max_line": MAX_LINE, "max_auth_line": MAX_AUTH_LINE, **changes})


_AUTH_FAILED = "-ERR [AUTH] Authentication failed."
_PLAINTEXT_DISALLOWED = (
    "-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
)

WORDS: Mapping[Say, Reply] = {
    Say.CHALLENGE: Reply("+ {challenge}", Count.NOTHING),  # "+" SP base64 (may be empty)
    Say.LINE_TOO_LONG: Reply("-ERR Command line too long."),
    Say.CONTROLS: Reply("-ERR Invalid characters in command."),
    Say.UNKNOWN_COMMAND: Reply("-ERR Unknown command."),
    Say.AUTH_SYNTAX: Reply("-ERR Syntax: AUTH mechanism [initial-response]"),
    Say.UNKNOWN_MECHANISM: Reply("-ERR Unsupported authentication mechanism."),
    Say.PLAINTEXT_DISALLOWED: Reply(_PLAINTEXT_DISALLOWED),
    Say.SASL_TOO_LONG: Reply("-ERR Authentication response too long."),
    Say.SASL_CANCELLED: Reply("-ERR Authentication cancelled."),  # RFC 5034 §4: MUST be -ERR
    Say.BAD_BASE64: Reply("-ERR Invalid base64 data."),
    Say.MALFORMED_SASL: Reply(_AUTH_FAILED, Count.FAILURE),
    Say.AUTHZID_REFUSED: Reply(_AUTH_FAILED, Count.FAILURE),
    Say.BAD_CREDENTIALS: Reply(_AUTH_FAILED, Count.FAILURE),
    Say.TOO_MANY_COMMANDS: Reply("-ERR Too many commands.", Count.CLOSE),
    # POP3 has no unsolicited replies: after the failing command's own -ERR it just closes.
    Say.TOO_MANY_FAILURES: Reply("", Count.CLOSE),
    Say.TOO_MANY_ERRORS: Reply("", Count.CLOSE),
    Say.OVERFLOW: Reply("-ERR Too much input before login completed.", Count.CLOSE),
    # RFC 1939 §3: when the autologout timer expires the server closes the connection "without
    # ... sending any response to the client".
    Say.LOGIN_TIMEOUT: Reply("", Count.CLOSE),
    Say.SHUTTING_DOWN: Reply("", Count.CLOSE),  # no unsolicited replies in POP3
    Say.TOO_MANY_CONNECTIONS: Reply(
        "-ERR [SYS/TEMP] Too many connections, try again later.", Count.CLOSE
    ),
}

# Replies to an auth_failed Refusal (RFC 2449 §8.1.2 [SYS/TEMP], RFC 3206 §4 [AUTH]).
REFUSALS: Mapping[Refusal, Reply] = {
    Refusal.CREDENTIALS: Reply(_AUTH_FAILED, Count.FAILURE),
    Refusal.EXPIRED: Reply(_AUTH_FAILED, Count.FAILURE),
    Refusal.FORBIDDEN: Reply(_AUTH_FAILED, Count.FAILURE),
    Refusal.PRIVACY: Reply(_PLAINTEXT_DISALLOWED, Count.FAILURE),
    Refusal.TEMPORARY: Reply(
        "-ERR [SYS/TEMP] Temporary authentication failure, try again later.", Count.FAILURE
    ),
    Refusal.LIMIT: Reply(
        "-ERR [SYS/TEMP] Too many login attempts, try again later.", Count.FAILURE
    ),
    Refusal.BUSY: Reply(
        "-ERR [SYS/TEMP] Too many sessions for this account, try again later.", Count.CLOSE
    ),
}

# AUTHORIZATION-state commands of RFC 1939 §7 and RFC 2449 that make sense only after login.
_TRANSACTION = frozenset({"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "LAST"})


class Pop3Core(LineCore):
    """The AUTHORIZATION state of one POP3 connection (h11-style, no I/O)."""

    WORDS = WORDS
    REFUSALS = REFUSALS

    def __init__(
        self,
        *,
        tls_active: bool,
        starttls_available: bool,
        plaintext_auth: bool,
        limits: LineLimits | None = None,
        hostname: str = "apppass",
    ) -> None:
        if not (
            hostname.isascii()
            and hostname.isprintable()
            and hostname.strip() == hostname
            and hostname
        ):
            raise ValueError(f"hostname must be printable ASCII, not {hostname!r}")
        super().__init__(
            tls_active=tls_active,
            starttls_available=starttls_available,
            plaintext_auth=plaintext_auth,
            limits=limits or pop3_limits(),
            hostname=hostname,
        )
        self._user: bytes | None = None  # the name of an accepted USER, until PASS

    def capabilities(self) -> list[str]:
        """The pre-auth CAPA list (RFC 2449 §6; RFC 2595 §4 STLS; RFC 5034 §5 SASL)."""
        caps: list[str] = []
        if self.plaintext_allowed:
            caps += ["USER", "SASL " + " ".join(MECHANISMS)]
        if self.starttls_available and not self.tls_active:
            caps.append("STLS")
        caps += ["RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "IMPLEMENTATION apppass"]
        return caps

    def greeting(self) -> list[Command]:
        return [self._send(f"+OK {self.hostname} ready.")]

    # -- PreAuthCore hooks ---------------------------------------------------------------------

    def _forget_before_tls(self) -> None:
        """Forget the AUTHORIZATION state so far (RFC 2595 §4)."""
        self._user = None

    def _reset(self) -> None:
        self._user = None

    def _success(self, capabilities: str) -> Command:
        return self._send("+OK Logged in.")

    def _split(self, line: bytes) -> tuple[bytes, bytes]:
        # RFC 1939 §7: PASS takes the rest of the line, spaces included.
        verb, _, args = line.partition(b" ")
        return verb, args

    def _dispatch(self, verb: str, args: bytes, out: list[Command]) -> None:
        if verb != "PASS":
            # RFC 1939 §7: after USER the client may issue PASS (or QUIT); anything else forgets
            # the name, so a stray line cannot pair an old USER with a later PASS.
            self._user = None
        if verb in _TRANSACTION:
            self._error("-ERR Not logged in.", out, "transaction command before login")
        else:
            super()._dispatch(verb, args, out)

    # -- commands -----------------------------------------------------------------------------

    def _cmd_capa(self, args: bytes, out: list[Command]) -> None:
        lines = ["+OK Capability list follows", *self.capabilities(), "."]
        out.append(Send("".join(f"{line}\r\n" for line in lines).encode("ascii")))

    def _cmd_quit(self, args: bytes, out: list[Command]) -> None:
        out.append(self._send("+OK Logging out."))
        self._close("client quit", out)

    def _cmd_stls(self, args: bytes, out: list[Command]) -> None:
        if self.tls_active:
            self._error("-ERR Command not permitted when TLS active", out, "STLS under TLS")
        elif not self.starttls_available:
            self._error("-ERR STLS not available.", out, "STLS not available")
        else:
            out.append(self._send("+OK Begin TLS negotiation"))
            out.append(StartTLS())
            # CVE-2011-0411: whatever was pipelined behind STLS is plaintext injection.
            self._lines.clear()
            self._user = None
            self._state = State.STARTING_TLS

    def _cmd_user(self, args: bytes, out: list[Command]) -> None:
        if not self.plaintext_allowed:
            self._say(Say.PLAINTEXT_DISALLOWED, out)
        elif not args:
            self._error("-ERR Syntax: USER name", out, "USER without a name")
        else:
            # RFC 1939 §7: a name may contain spaces; it is taken as sent and checked at PASS,
            # so USER answers the same for every name.
            self._user = args
            out.append(self._send("+OK"))

    def _cmd_pass(self, args: bytes, out: list[Command]) -> None:
        user, self._user = self._user, None
        if user is None:
            self._error("-ERR No username given.", out, "PASS without USER")
            return
        try:
            login, secret = user.decode("utf-8"), args.decode("utf-8")
        except UnicodeDecodeError:
            self._say(Say.BAD_CREDENTIALS, out, "USER or PASS is not UTF-8")
            return
        if len(args) > MAX_FIELD:
            self._say(Say.BAD_CREDENTIALS, out, "password too long")
        else:
            self._authenticate(Credentials(login, secret), "USER", out)

    def _cmd_apop(self, args: bytes, out: list[Command]) -> None:
        self._error("-ERR APOP is not supported.", out, "APOP")

    def _cmd_auth(self, args: bytes, out: list[Command]) -> None:
        words = args.split()
        if not words:
            # The RFC 1734-era listing (Outlook, Thunderbird probe it): mechanisms, then ".".
            names = list(MECHANISMS) if self.plaintext_allowed else []
            out.append(
                Send("".join(f"{line}\r\n" for line in ["+OK", *names, "."]).encode("ascii"))
            )
        else:
            self._auth(words, out)

    COMMANDS: ClassVar[Mapping[str, Handler]] = {
        "CAPA": _cmd_capa,
        "QUIT": _cmd_quit,
        "STLS": _cmd_stls,
        "USER": _cmd_user,
        "PASS": _cmd_pass,
        "APOP": _cmd_apop,
        "AUTH": _cmd_auth,
    }

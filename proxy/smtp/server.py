"""The SMTP pre-auth protocol core, sans-IO: client bytes in, commands and reply bytes out.

`SmtpCore` speaks the part of SMTP (RFC 5321) a submission client needs before it is
authenticated: EHLO/HELO, STARTTLS (RFC 3207), AUTH PLAIN and LOGIN with and without an initial
response (RFC 4954), with enhanced status codes (RFC 3463) and pipelining (RFC 2920). The shared
pre-auth life (limits, counters, SASL) is proxy/core.py; this module has SMTP's commands and
words. After login, proxy/smtp/watch.py follows the session.

Secrets are never put into replies, commands other than Authenticate, or exception texts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from proxy.auth.decision import Refusal
from proxy.commands import Command, Hello, Send, StartTLS
from proxy.core import Count, Handler, LineCore, LineLimits, Reply, Say, State
from proxy.sasl import MECHANISMS

# Command line: 512 octets, CRLF included (RFC 5321 §4.5.3.1.4). Before login a client sends
# only EHLO/HELO, STARTTLS, AUTH, NOOP, RSET, QUIT, none of which needs more; Postfix accepts
# up to line_length_limit (2048) but nothing legitimate here comes near 512.
MAX_LINE = 512

# AUTH command line and SASL response lines: 12288 octets, CRLF included (RFC 4954 §4: the AUTH
# line limit is raised to 12288 so that an initial response fits). The longest valid PLAIN
# response is 1024 base64 characters (three fields of at most 255 octets, sasl.MAX_FIELD).
MAX_AUTH_LINE = 12288

# EHLO keywords learned from the upstream that the proxy never passes on: it answers AUTH and
# STARTTLS itself, and XCLIENT/XFORWARD are the proxy's trust with the upstream, not the client's.
WITHHELD_EXTENSIONS = frozenset({"AUTH", "STARTTLS", "XCLIENT", "XFORWARD"})


def smtp_limits(**changes: int) -> LineLimits:
    """SMTP's limits, with the shared ones changeable (`auth.max_failures` from the config)."""
    return LineLimits(**{"max_line": MAX_LINE, "max_auth_line": MAX_AUTH_LINE, **changes})


_BAD_CREDENTIALS = "535 5.7.8 Authentication credentials invalid"
_ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required for requested authentication mechanism"

# RFC 5321 §3.8: the server may close with 421 at any time; "421 <domain> text".
WORDS: Mapping[Say, Reply] = {
    Say.CHALLENGE: Reply("334 {challenge}", Count.NOTHING),
    Say.LINE_TOO_LONG: Reply("500 5.5.2 Error: line too long"),
    Say.CONTROLS: Reply("500 5.5.2 Error: bad syntax"),
    Say.UNKNOWN_COMMAND: Reply("500 5.5.2 Error: command not recognized"),
    Say.AUTH_SYNTAX: Reply("501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
    Say.UNKNOWN_MECHANISM: Reply("504 5.5.4 Unrecognized authentication type"),
    Say.PLAINTEXT_DISALLOWED: Reply(_ENCRYPTION_REQUIRED),
    Say.SASL_TOO_LONG: Reply("500 5.5.6 Authentication exchange line is too long"),
    Say.SASL_CANCELLED: Reply("501 5.7.0 Authentication cancelled"),
    Say.BAD_BASE64: Reply("501 5.5.2 Invalid base64 data"),
    Say.MALFORMED_SASL: Reply(_BAD_CREDENTIALS, Count.FAILURE),
    Say.AUTHZID_REFUSED: Reply(_BAD_CREDENTIALS, Count.FAILURE),
    Say.BAD_CREDENTIALS: Reply(_BAD_CREDENTIALS, Count.FAILURE),
    Say.TOO_MANY_COMMANDS: Reply("421 4.7.0 {host} Error: too many commands", Count.CLOSE),
    Say.TOO_MANY_FAILURES: Reply(
        "421 4.7.0 {host} Error: too many failed authentications", Count.CLOSE
    ),
    Say.TOO_MANY_ERRORS: Reply("421 4.7.0 {host} Error: too many errors", Count.CLOSE),
    Say.OVERFLOW: Reply("421 4.7.0 {host} Error: too much pipelined input", Count.CLOSE),
    Say.LOGIN_TIMEOUT: Reply("421 4.4.2 {host} Error: timeout exceeded", Count.CLOSE),  # Postfix's
    Say.TOO_MANY_CONNECTIONS: Reply("421 4.7.0 {host} Error: too many connections", Count.CLOSE),
    # RFC 3463 4.3.2: system not accepting network messages.
    Say.SHUTTING_DOWN: Reply("421 4.3.2 {host} Service shutting down", Count.CLOSE),
}

# Replies to an auth_failed Refusal (RFC 4954 §6, RFC 3463).
REFUSALS: Mapping[Refusal, Reply] = {
    Refusal.CREDENTIALS: Reply(_BAD_CREDENTIALS, Count.FAILURE),
    Refusal.EXPIRED: Reply(_BAD_CREDENTIALS, Count.FAILURE),
    Refusal.FORBIDDEN: Reply(_BAD_CREDENTIALS, Count.FAILURE),
    Refusal.PRIVACY: Reply(_ENCRYPTION_REQUIRED, Count.FAILURE),
    Refusal.TEMPORARY: Reply("454 4.7.0 Temporary authentication failure", Count.FAILURE),
    Refusal.LIMIT: Reply("421 4.7.0 {host} Too many failed authentications", Count.CLOSE),
    Refusal.BUSY: Reply("421 4.7.0 {host} Too many sessions for this account", Count.CLOSE),
}


def _is_token(value: bytes) -> bool:
    """A printable-ASCII word: what a HELO name, a mechanism or a hostname may be."""
    return bool(value) and all(0x21 <= b <= 0x7E for b in value)


class SmtpCore(LineCore):
    """The not-authenticated part of one SMTP submission connection (h11-style, no I/O)."""

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
        extensions: Sequence[str] = (),
    ) -> None:
        if not (hostname.isascii() and _is_token(hostname.encode("ascii"))):
            raise ValueError(f"hostname must be a printable ASCII word, not {hostname!r}")
        super().__init__(
            tls_active=tls_active,
            starttls_available=starttls_available,
            plaintext_auth=plaintext_auth,
            limits=limits or smtp_limits(),
            hostname=hostname,
        )
        self.extensions = upstream_extensions(extensions)
        # The client's EHLO/HELO argument (its first word) and whether it said EHLO, for the
        # upstream login (XCLIENT HELO=, or the proxy's own EHLO). Client-controlled; reset by
        # STARTTLS (RFC 3207 §4.2).
        self.helo_name: str | None = None
        self.esmtp = False

    def ehlo_keywords(self) -> list[str]:
        """The EHLO keywords offered now: the upstream's, STARTTLS before TLS, AUTH if allowed."""
        keywords = list(self.extensions)
        if self.starttls_available and not self.tls_active:
            keywords.append("STARTTLS")
        if self.plaintext_allowed:
            keywords.append("AUTH " + " ".join(MECHANISMS))
        return keywords

    def greeting(self) -> list[Command]:
        return [self._send(f"220 {self.hostname} ESMTP")]

    # -- PreAuthCore hooks ---------------------------------------------------------------------

    def _forget_before_tls(self) -> None:
        """Forget the client's EHLO (RFC 3207 §4.2): it must say EHLO again over TLS."""
        self.helo_name = None
        self.esmtp = False

    def _hello(self) -> Hello | None:
        return Hello(self.helo_name, self.esmtp) if self.helo_name else None

    def _success(self, capabilities: str) -> Command:
        return self._send("235 2.7.0 Authentication successful")

    # -- commands -----------------------------------------------------------------------------

    def _cmd_ehlo(self, args: bytes, out: list[Command]) -> None:
        self._greet(args, out, esmtp=True)

    def _cmd_helo(self, args: bytes, out: list[Command]) -> None:
        self._greet(args, out, esmtp=False)

    def _greet(self, args: bytes, out: list[Command], *, esmtp: bool) -> None:
        name = args.split()[0] if args else b""
        verb = "EHLO" if esmtp else "HELO"
        if not _is_token(name) or len(name) > 255:
            self._error(f"501 5.5.4 Syntax: {verb} hostname", out, f"bad {verb} argument")
            return
        self.helo_name = name.decode("ascii")
        self.esmtp = esmtp
        if not esmtp:
            out.append(self._send(f"250 {self.hostname}"))
            return
        lines = [self.hostname, *self.ehlo_keywords()]
        text = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
        out.append(Send(text.encode("ascii")))

    def _cmd_starttls(self, args: bytes, out: list[Command]) -> None:
        if args:
            self._error("501 5.5.4 Syntax: STARTTLS", out, "STARTTLS with arguments")
        elif self.tls_active:
            self._error("503 5.5.1 Error: TLS already active", out, "STARTTLS under TLS")
        elif not self.starttls_available:
            self._error("502 5.5.1 Error: command not implemented", out, "STARTTLS not available")
        else:
            out.append(self._send("220 2.0.0 Ready to start TLS"))
            out.append(StartTLS())
            # CVE-2011-0411: whatever was pipelined behind STARTTLS is plaintext injection.
            self._lines.clear()
            self._state = State.STARTING_TLS

    def _cmd_auth(self, args: bytes, out: list[Command]) -> None:
        if self.helo_name is None:
            self._error("503 5.5.1 Error: send HELO/EHLO first", out, "AUTH before EHLO")
        else:
            self._auth(args.split(), out)

    def _cmd_rset(self, args: bytes, out: list[Command]) -> None:
        if args:
            self._error("501 5.5.4 Syntax: RSET", out, "RSET with arguments")
        else:
            out.append(self._send("250 2.0.0 Ok"))

    def _cmd_noop(self, args: bytes, out: list[Command]) -> None:
        out.append(self._send("250 2.0.0 Ok"))  # RFC 5321 §4.1.1.9: a parameter may be given

    def _cmd_quit(self, args: bytes, out: list[Command]) -> None:
        out.append(self._send("221 2.0.0 Bye"))
        self._close("client quit", out)

    def _cmd_vrfy(self, args: bytes, out: list[Command]) -> None:
        if not args:
            self._error("501 5.5.4 Syntax: VRFY address", out, "VRFY without argument")
        else:  # RFC 5321 §3.5.3: neither confirm nor deny, before login least of all
            out.append(
                self._send(
                    "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
                )
            )

    def _cmd_help(self, args: bytes, out: list[Command]) -> None:
        out.append(self._send("214 2.0.0 Commands: EHLO HELO STARTTLS AUTH NOOP RSET QUIT"))

    def _cmd_mail(self, args: bytes, out: list[Command]) -> None:
        # RFC 4954 §6: 530 5.7.0 for any command refused before authentication.
        self._error("530 5.7.0 Authentication required", out, "mail command before login")

    def _cmd_bdat(self, args: bytes, out: list[Command]) -> None:
        words = args.split()
        if words and words[0].isdigit() and len(words[0]) <= 20:
            # RFC 3030 §2: the chunk follows the command whatever the reply; drop it unread.
            self._skip = int(words[0])
            self._state = State.SKIP
            self._error("530 5.7.0 Authentication required", out, "mail command before login")
        else:
            # Without a chunk size there is no telling where the chunk ends.
            self._error("501 5.5.4 Syntax: BDAT count [LAST]", out, "bad BDAT syntax")
            if self._state is not State.CLOSED:
                out.append(self._send(f"421 4.5.0 {self.hostname} Error: out of step with BDAT"))
                self._close("unparsable BDAT before login", out)

    def _cmd_proxy_only(self, args: bytes, out: list[Command]) -> None:
        # Postfix answers an unauthorised XCLIENT/XFORWARD so; they are the proxy's trust.
        self._error(
            "550 5.7.0 Error: insufficient authorization", out, "XCLIENT/XFORWARD from a client"
        )

    def _cmd_not_implemented(self, args: bytes, out: list[Command]) -> None:
        self._error("502 5.5.1 Error: command not implemented", out, "command not implemented")

    COMMANDS: ClassVar[Mapping[str, Handler]] = {
        "EHLO": _cmd_ehlo,
        "HELO": _cmd_helo,
        "STARTTLS": _cmd_starttls,
        "AUTH": _cmd_auth,
        "RSET": _cmd_rset,
        "NOOP": _cmd_noop,
        "QUIT": _cmd_quit,
        "VRFY": _cmd_vrfy,
        "HELP": _cmd_help,
        "MAIL": _cmd_mail,
        "RCPT": _cmd_mail,
        "DATA": _cmd_mail,
        "BDAT": _cmd_bdat,
        "XCLIENT": _cmd_proxy_only,
        "XFORWARD": _cmd_proxy_only,
        "EXPN": _cmd_not_implemented,
        "ETRN": _cmd_not_implemented,
        "TURN": _cmd_not_implemented,
        "ATRN": _cmd_not_implemented,
    }


def upstream_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
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

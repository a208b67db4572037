"""What a sans-IO protocol core asks its frontend to do: write, start TLS, authenticate, close.

A core never touches a socket, a clock or the Authenticator: it turns client bytes into these
commands, the frontend (proxy/frontend.py) carries them out and feeds the results back through
the core's methods (`auth_failed`, `auth_succeeded`, `tls_started`, `login_timeout`). Every field
is used: `Authenticate.mechanism` and `Close.reason` reach the audit log, and each `Failed`
becomes a `client_error` audit event.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.sasl import Credentials


@dataclass(frozen=True)
class Send:
    """Write these bytes to the client."""

    data: bytes


@dataclass(frozen=True)
class StartTLS:
    """Start the TLS handshake now (the OK/220/+OK reply went out in an earlier Send).

    The core has already discarded anything the client pipelined after the command
    (CVE-2011-0411): the frontend must not keep any of it either.
    """


@dataclass(frozen=True)
class Hello:
    """How an SMTP client introduced itself (EHLO or HELO), which the upstream login repeats."""

    name: str
    esmtp: bool


@dataclass(frozen=True)
class Authenticate:
    """The client presented credentials: ask the Authenticator, then call the core's
    `auth_succeeded(...)` or `auth_failed(refusal)`. Until then the core holds input."""

    credentials: Credentials
    mechanism: str  # "LOGIN" (IMAP LOGIN / SASL LOGIN), "PLAIN", "USER" (POP3 USER/PASS)
    hello: Hello | None = None  # SMTP only: the client's EHLO/HELO


@dataclass(frozen=True)
class Close:
    """Close the connection after writing what was sent before (LOGOUT, QUIT, BYE, limits)."""

    reason: str


@dataclass(frozen=True)
class Failed:
    """The client did something wrong (bad command, line too long, bad base64, a login refused
    by the core itself). The reply has already gone out in a Send."""

    reason: str


Command = Send | StartTLS | Authenticate | Close | Failed

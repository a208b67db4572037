"""Events that the sans-IO protocol cores (imap, pop3, smtp) hand to their Twisted frontends.

A core never touches a socket, a clock or the Authenticator: it turns client bytes into these
events, and the frontend carries them out (writes bytes, starts TLS, calls the Authenticator,
closes) and feeds results back through the core's methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.sasl import Credentials


@dataclass(frozen=True)
class Send:
    """Write these bytes to the client."""

    data: bytes


@dataclass(frozen=True)
class StartTLS:
    """Start the TLS handshake now (the OK/220/+OK reply was in an earlier Send).

    The core has already discarded anything the client pipelined after the command
    (CVE-2011-0411): the frontend must do the same with its own buffers.
    """


@dataclass(frozen=True)
class Authenticate:
    """The client presented credentials: ask the Authenticator, then call the core's
    `auth_succeeded(...)` or `auth_failed(refusal)`. Until then the core buffers input."""

    credentials: Credentials
    mechanism: str  # "LOGIN" (IMAP LOGIN command / SASL LOGIN), "PLAIN", "USER" (POP3 USER/PASS)
    tag: str = ""  # IMAP tag of the command, for logs
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Close:
    """Close the connection after writing whatever was sent before (LOGOUT, QUIT, BYE)."""

    reason: str


@dataclass(frozen=True)
class Failed:
    """A protocol error the frontend should count (bad command, line too long, bad base64).
    The reply to the client has already been emitted as a Send."""

    reason: str


Event = Send | StartTLS | Authenticate | Close | Failed

"""Attempts and decisions: the values passed between frontends and the Authenticator."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from proxy.codes.store import Reservation
from proxy.directory.account import Account
from proxy.protocols import MailProtocol


@dataclass(frozen=True)
class Attempt:
    """One login attempt as a frontend saw it."""

    protocol: MailProtocol
    login: str
    secret: str
    client_ip: str
    client_port: int = 0
    tls: bool = False
    listener: str = ""  # the listener's name, for the audit log
    session: str = ""  # the connection's id, for the audit log
    mechanism: str = ""  # how the client presented it (LOGIN, PLAIN, USER), for the audit log

    def __repr__(self) -> str:
        return (
            f"Attempt({self.protocol.value}, login={self.login!r}, secret=<hidden>, "
            f"client={self.client_ip}, tls={self.tls})"
        )


class Refusal(enum.StrEnum):
    """Why the client is refused, as far as the client may know (docs/architecture.md:
    Decisions and replies)."""

    CREDENTIALS = "credentials"  # bad credentials (also: unknown login, malformed code)
    EXPIRED = "expired"  # the code verified but is expired, used up or revoked
    FORBIDDEN = "forbidden"  # the code verified but policy, scope or network forbids it
    PRIVACY = "privacy"  # plaintext authentication is not allowed here
    TEMPORARY = "temporary"  # directory, store, hash pool or upstream trouble
    LIMIT = "limit"  # too many attempts
    BUSY = "busy"  # the account has limits.max_sessions_per_account sessions already


@dataclass(frozen=True)
class Grant:
    account: Account
    code_id: int
    code_label: str
    upstream_identity: str
    reservation: Reservation  # confirmed after the upstream login, or released

    ok = True


@dataclass(frozen=True)
class Denial:
    refusal: Refusal
    reason: str  # for the audit log and the portal only; the client sees the protocol's reply
    account: Account | None = None
    code_id: int | None = None

    ok = False


Decision = Grant | Denial

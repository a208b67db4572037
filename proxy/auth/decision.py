"""Attempts and decisions: the values passed between frontends and the Authenticator."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred

from proxy.codes.sending import SendingPolicy, SendingRules
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


class MessageCount(Protocol):
    """A code's messages in the store, as an SMTP session counts them (codes/store.py
    CodeMessages): a place under the daily cap held per message, then counted or given back."""

    def hold(self) -> Deferred[int | None]:
        """Hold a place for a message: the day held, None when the cap is reached (errback:
        the store is unavailable)."""

    def sent(self, day: int) -> None: ...

    def release(self, day: int) -> None: ...

    def refused(self, count: int) -> None:
        """Commands the sending policy refused, counted on the code."""


@dataclass(frozen=True)
class Sending:
    """A Grant's sending policy (SMTP): the code's rules resolved for this account, and its
    message count. None on a Grant whose code has no policy (nothing is watched or counted)."""

    rules: SendingRules
    messages: MessageCount


@dataclass(frozen=True)
class Grant:
    account: Account
    code_id: int
    code_label: str
    upstream_identity: str
    reservation: Reservation  # confirmed after the upstream login, or released
    sending: Sending | None = None  # the code's sending policy (proxy/codes/sending.py)
    # SMTP logins: the code's sending policy as it was at login; when it changes, the session
    # ends (proxy/sessions.py) and the device logs in again under the new one. None otherwise.
    sending_policy: SendingPolicy | None = None

    ok = True


@dataclass(frozen=True)
class Denial:
    refusal: Refusal
    reason: str  # for the audit log and the portal only; the client sees the protocol's reply
    account: Account | None = None
    code_id: int | None = None
    # The code verified but stopped working (revoked, expired, used up, disabled, superseded):
    # a device still set up with it. Counted on the code, never against the client's address.
    stale: bool = False

    ok = False


Decision = Grant | Denial

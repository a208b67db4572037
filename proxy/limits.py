"""Caps on connections: all of them, those not yet logged in per client address, and logged-in
sessions per account. Pure counting; the frontend asks before it greets and before it logs in
upstream, and tells when a connection ends.

Over a cap the client gets its protocol's temporary refusal and the connection closes, never an
unbounded queue (docs/architecture.md: Decisions and replies).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from proxy.auth.ratelimit import client_bucket

# All client connections at once: 10,000, what one process holds comfortably (about 7 KiB per
# idle plaintext session, 31 KiB with TLS; each also holds an upstream socket, so the process
# needs a file limit above 20,000: systemd/apppass.service sets LimitNOFILE). nginx's
# worker_connections and Dovecot's default_client_limit are the same kind of cap.
MAX_CONNECTIONS = 10_000

# Connections not yet logged in from one address (IPv6: its /64): 50. A client needs one or two
# while it logs in; Postfix's smtpd_client_connection_count_limit is 50 by default.
MAX_PREAUTH_PER_ADDRESS = 50

# Logged-in sessions of one account at once: 50. A desktop client keeps up to five IMAP
# connections per account (Thunderbird), a phone one or two, a printer one per scan; Dovecot's
# mail_max_userip_connections allows 10 per account and address.
MAX_SESSIONS_PER_ACCOUNT = 50


@dataclass(frozen=True)
class LimitSettings:
    """The `limits` section of apppass.yaml."""

    max_connections: int = MAX_CONNECTIONS
    max_preauth_per_address: int = MAX_PREAUTH_PER_ADDRESS
    max_sessions_per_account: int = MAX_SESSIONS_PER_ACCOUNT


def share_of(settings: LimitSettings, workers: int) -> LimitSettings:
    """One worker's part of each cap when `workers` processes share the listeners
    (serve.workers): the cap divided, rounded up, at least 1. The kernel spreads connections
    over the workers, so the total never passes the cap by more than the rounding, and a client
    may be refused a little early when its connections crowd into one worker (README: Security,
    limits; docs/architecture.md: Worker processes)."""
    if workers <= 1:
        return settings
    return LimitSettings(
        max_connections=-(-settings.max_connections // workers),
        max_preauth_per_address=-(-settings.max_preauth_per_address // workers),
        max_sessions_per_account=-(-settings.max_sessions_per_account // workers),
    )


@dataclass(frozen=True)
class Over:
    """A cap that was reached: its setting's name (a metric label) and a sentence (audit)."""

    cap: str
    text: str

    def __str__(self) -> str:
        return self.text


class ConnectionLimits:
    """Live counts against the caps. Each method that admits returns None, or the cap reached."""

    def __init__(self, settings: LimitSettings) -> None:
        self.settings = settings
        self.connections = 0
        self._preauth: Counter[str] = Counter()  # client bucket -> connections not logged in
        self._sessions: Counter[str] = Counter()  # account key -> logged-in sessions

    def connected(self, client_ip: str) -> Over | None:
        """A new connection; counted as not logged in unless refused."""
        bucket = client_bucket(client_ip)
        if self.connections >= self.settings.max_connections:
            return Over(
                "max_connections",
                f"the proxy has {self.connections} connections (limits.max_connections)",
            )
        if self._preauth[bucket] >= self.settings.max_preauth_per_address:
            return Over(
                "max_preauth_per_address",
                f"{bucket} has {self._preauth[bucket]} connections not logged in "
                "(limits.max_preauth_per_address)",
            )
        self.connections += 1
        self._preauth[bucket] += 1
        return None

    def logging_in(self, account_key: str) -> Over | None:
        """A login was granted; counted as a session of the account unless refused."""
        held = self._sessions[account_key]
        if held >= self.settings.max_sessions_per_account:
            return Over(
                "max_sessions_per_account",
                f"the account has {held} sessions (limits.max_sessions_per_account)",
            )
        self._sessions[account_key] += 1
        return None

    def logged_in(self, client_ip: str) -> None:
        """The connection is past its login: it no longer counts toward its address."""
        self._forget(self._preauth, client_bucket(client_ip))

    def session_ended(self, account_key: str) -> None:
        """A session counted by logging_in is over (or never started upstream)."""
        self._forget(self._sessions, account_key)

    def disconnected(self, client_ip: str, *, logged_in: bool) -> None:
        self.connections -= 1
        if not logged_in:
            self._forget(self._preauth, client_bucket(client_ip))

    def sessions(self, account_key: str) -> int:
        return self._sessions[account_key]

    @staticmethod
    def _forget(counts: Counter[str], key: str) -> None:
        counts[key] -= 1
        if counts[key] <= 0:
            del counts[key]

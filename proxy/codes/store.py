"""The code store: the record of a code, the operations every backend offers, and the
asynchronous wrapper the proxy uses (each call runs in the store's own thread pool)."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from proxy.addresses import in_networks
from proxy.fairqueue import FairQueue


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class State(enum.StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"
    EXPIRED = "expired"
    USED_UP = "used up"
    REVOKED = "revoked"


@dataclass(frozen=True)
class CodeRecord:
    id: int
    account_key: str
    account_login: str  # the login when created, for display only; codes belong to account_key
    label: str
    selector: str
    hash: str
    scopes: tuple[str, ...]
    networks: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    max_uses: int | None
    use_count: int
    last_used_at: datetime | None
    last_used_ip: str | None
    last_used_protocol: str | None
    failed_count: int
    last_failed_at: datetime | None
    disabled: bool
    revoked_at: datetime | None
    created_by: str

    def __repr__(self) -> str:
        return f"CodeRecord(id={self.id}, account={self.account_login!r}, label={self.label!r})"

    def state(self, now: datetime | None = None) -> State:
        now = now or utcnow()
        if self.revoked_at is not None:
            return State.REVOKED
        if self.expires_at is not None and self.expires_at <= now:
            return State.EXPIRED
        if self.max_uses is not None and self.use_count >= self.max_uses:
            return State.USED_UP
        if self.disabled:
            return State.DISABLED
        return State.ACTIVE


def ip_allowed(nets: tuple[str, ...] | list[str], ip: str) -> bool:
    """True if there are no networks, or `ip` lies in one of them."""
    return not nets or in_networks(ip, nets)


@dataclass(frozen=True)
class NewCode:
    """What `create` needs: everything but the counters."""

    account_key: str
    account_login: str
    label: str
    selector: str
    hash: str
    scopes: tuple[str, ...]
    networks: tuple[str, ...] = ()
    expires_at: datetime | None = None
    max_uses: int | None = None
    created_by: str = "cli"

    def __repr__(self) -> str:
        return f"NewCode(account={self.account_login!r}, label={self.label!r})"


class Claim(enum.StrEnum):
    """Why the claim after a good verification refused the code."""

    REVOKED = "revoked"
    DISABLED = "disabled"
    EXPIRED = "expired"
    USED_UP = "used up"
    SCOPE = "scope"
    NETWORK = "network"
    SUPERSEDED = "created before the account's last password change"
    GONE = "gone"


# How long a claim holds a place under max_uses while the upstream login runs: past the longest
# upstream login (connect_timeout 10 s + timeout 30 s by default, each at most minutes), so that
# a proxy that died between claim and confirm gives the place back by itself.
RESERVATION_SECONDS = 300


@dataclass(frozen=True)
class Reservation:
    """A login's hold on a code between the claim and the end of the upstream login: `confirm`
    counts the use, `release` gives it back (the upstream was down or refused), so a use is
    counted only for a session that really logged in. `token` is the place held under max_uses
    (None for a code without a use limit, which needs no place)."""

    code_id: int
    token: int | None = None


class CapReached(Exception):
    """The account already has `max_per_account` live codes."""


class StoreUnavailable(Exception):
    """The store could not answer (locked too long, disk, database down): a temporary failure."""


class CodeStore(Protocol):
    """Synchronous operations; safe to call from several threads at once."""

    def create(self, new: NewCode, cap: int, now: datetime | None = None) -> CodeRecord: ...
    def get(self, code_id: int) -> CodeRecord | None: ...
    def get_many(self, code_ids: list[int]) -> dict[int, CodeRecord]: ...
    def changes_since(self, last: int | None) -> tuple[int, list[int]]: ...
    def find(self, account_key: str, selector: str) -> CodeRecord | None: ...
    def selectors(self, account_key: str) -> set[str]: ...
    def list(
        self, account_key: str | None = None, include_inactive: bool = False
    ) -> list[CodeRecord]: ...
    def set_disabled(self, code_id: int, disabled: bool) -> bool: ...
    def revoke(self, code_id: int, now: datetime | None = None) -> bool: ...
    def revoke_all(self, account_key: str, now: datetime | None = None) -> int: ...
    def purge(self, older_than: datetime) -> int: ...
    def record_failure(self, code_id: int, ip: str, now: datetime | None = None) -> None: ...
    def claim(
        self,
        code_id: int,
        protocol: str,
        ip: str,
        not_before: datetime | None = None,
        now: datetime | None = None,
    ) -> Reservation | Claim: ...
    def confirm(
        self, reservation: Reservation, protocol: str, ip: str, now: datetime | None = None
    ) -> bool: ...
    def release(self, reservation: Reservation) -> None: ...
    def close(self) -> None: ...


class Rows(Protocol):
    """What a statement gave: a sqlite3.Cursor, or the PostgreSQL store's Result (rows read by
    position or column name; lastrowid after `INSERT … RETURNING id` on PostgreSQL)."""

    @property
    def rowcount(self) -> int: ...
    @property
    def lastrowid(self) -> int | None: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class SqlCodeStore(CodeStore, Protocol):
    """A store the proxy opens (codes/open.py): the codes, its schema, and SQL written once in
    SQLite's placeholder style (`?`, `:name`) that every store runs, for what else lives in the
    same database (the web records)."""

    def run(self, sql: str, params: Any = ()) -> Rows: ...
    def transaction(self, statements: list[tuple[str, Any]]) -> Sequence[Rows]: ...
    def version(self) -> int: ...
    def migrate(self) -> tuple[int, int]: ...


# Store calls that may wait for the store's thread: 1024, a client at most an eighth of them. A
# call takes well under a millisecond on SQLite, so that is under a second of backlog; a locked
# or slow database then refuses new logins at once (temporary) instead of queueing them.
STORE_QUEUE = 1024

# The store's own work (the session checks) is a client of its own.
INTERNAL = "apppass"


class AsyncCodeStore:
    """Runs a synchronous store's calls in a bounded, fair queue (proxy/fairqueue.py); every
    method returns a Deferred. `client` is the login's client bucket, for fairness.

    SQLite has one writer at a time, so its queue has one thread; a networked database may use
    more.
    """

    def __init__(self, store: CodeStore, reactor, threads_: int = 1) -> None:
        self.store = store
        self.queue = FairQueue("apppass-store", threads_, STORE_QUEUE)
        self.queue.start(reactor)

    def find(self, account_key: str, selector: str, client: str = INTERNAL):
        return self.queue.submit(client, self.store.find, account_key, selector)

    def claim(
        self,
        code_id: int,
        protocol: str,
        ip: str,
        not_before: datetime | None = None,
        client: str = INTERNAL,
    ):
        return self.queue.submit(client, self.store.claim, code_id, protocol, ip, not_before)

    def confirm(self, reservation: Reservation, protocol: str, ip: str, client: str = INTERNAL):
        return self.queue.submit(client, self.store.confirm, reservation, protocol, ip)

    def release(self, reservation: Reservation, client: str = INTERNAL):
        return self.queue.submit(client, self.store.release, reservation)

    def record_failure(self, code_id: int, ip: str, client: str = INTERNAL):
        return self.queue.submit(client, self.store.record_failure, code_id, ip)

    def get(self, code_id: int, client: str = INTERNAL):
        return self.queue.submit(client, self.store.get, code_id)

    def get_many(self, code_ids: list[int], client: str = INTERNAL):
        return self.queue.submit(client, self.store.get_many, code_ids)

    def changes_since(self, last: int | None, client: str = INTERNAL):
        return self.queue.submit(client, self.store.changes_since, last)

    def stop(self) -> None:
        self.queue.stop()
        self.store.close()

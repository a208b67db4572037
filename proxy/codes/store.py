"""The code store: the record of a code, the operations every backend offers, and the
asynchronous wrapper the proxy uses (each call runs in the store's own thread pool)."""

from __future__ import annotations

import builtins
import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from proxy.addresses import in_networks
from proxy.codes.sending import SendingPolicy
from proxy.fairqueue import FairQueue


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def day_of(moment: datetime) -> int:
    """The UTC day a moment falls on, as days since 1970-01-01 (a daily cap's day)."""
    return int(moment.timestamp()) // 86400


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
    # Tries with this code (its secret right) since it stopped working: revoked, expired, used
    # up, disabled or superseded. A device still set up with it; not an attack.
    stale_count: int = 0
    stale_since: datetime | None = None  # the first of them
    stale_last_at: datetime | None = None
    stale_last_ip: str | None = None
    # SMTP: senders, recipient domains, daily cap (proxy/codes/sending.py)
    sending: SendingPolicy = field(default_factory=SendingPolicy)
    send_refused_count: int = 0  # commands its sending policy refused
    last_send_refused_at: datetime | None = None
    custodian: str | None = None  # who else is told of its expiry (apppass notify)
    idle_disabled_at: datetime | None = None  # disabled by apppass notify for not being used
    enabled_at: datetime | None = None  # last enabled again: the idle clock restarts
    sent_today: int | None = None  # messages sent today (UTC) under its daily cap, when read

    def __repr__(self) -> str:
        return f"CodeRecord(id={self.id}, account={self.account_login!r}, label={self.label!r})"

    def still_retrying(self, now: datetime | None = None) -> str | None:
        """ "still retrying: 212 attempts since 2026-11-24 from 10.0.4.17" for a code that no
        longer works but a device keeps trying (someone should reconfigure it); else None."""
        if not self.stale_count or self.state(now) is State.ACTIVE:
            return None
        since = f" since {self.stale_since:%Y-%m-%d}" if self.stale_since else ""
        where = f" from {self.stale_last_ip}" if self.stale_last_ip else ""
        tries = "attempt" if self.stale_count == 1 else "attempts"
        return f"still retrying: {self.stale_count} {tries}{since}{where}"

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
    sending: SendingPolicy = field(default_factory=SendingPolicy)
    custodian: str | None = None

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


def refusal(rec: CodeRecord | None, held: int, protocol: str, now_ts: int, floor: int) -> Claim:
    """Why a claim was refused, from the code and its held places as the claim's own
    transaction saw them (read apart, a login confirmed or released in between would turn
    "used up" into another reason). Both stores use it."""
    if rec is None:
        return Claim.GONE
    if rec.revoked_at is not None:
        return Claim.REVOKED
    if rec.created_at < datetime.fromtimestamp(floor, UTC):
        return Claim.SUPERSEDED
    if rec.expires_at is not None and rec.expires_at <= datetime.fromtimestamp(now_ts, UTC):
        return Claim.EXPIRED
    if rec.max_uses is not None and rec.use_count + held >= rec.max_uses:
        return Claim.USED_UP
    if rec.disabled:
        return Claim.DISABLED
    if protocol not in rec.scopes:
        return Claim.SCOPE
    return Claim.NETWORK


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
    def set_disabled(self, code_id: int, disabled: bool, now: datetime | None = None) -> bool: ...
    def set_sending(self, code_id: int, sending: SendingPolicy) -> bool: ...
    def set_custodian(self, code_id: int, custodian: str | None) -> bool: ...
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
    # What proxy/codes/activity.py gives both stores: stale devices, messages per day, notices
    # and idle codes.
    def record_stale(self, code_id: int, ip: str, now: datetime | None = None) -> None: ...
    def hold_message(self, code_id: int, cap: int, now: datetime | None = None) -> int | None: ...
    def message_sent(self, code_id: int, day: int) -> None: ...
    def release_message(self, code_id: int, day: int) -> None: ...
    def record_send_refusals(
        self, code_id: int, count: int, now: datetime | None = None
    ) -> None: ...
    def sent_on(self, code_ids: builtins.list[int], day: int) -> dict[int, int]: ...
    def idle(
        self, unused_since: datetime, now: datetime | None = None
    ) -> builtins.list[CodeRecord]: ...
    def disable_idle(
        self, code_id: int, unused_since: datetime, now: datetime | None = None
    ) -> bool: ...
    def claim_notice(
        self, code_id: int, kind: str, ref: int, now: datetime | None = None
    ) -> bool: ...
    def notice_sent(
        self, code_id: int, kind: str, ref: int, now: datetime | None = None
    ) -> None: ...
    def drop_notice(self, code_id: int, kind: str, ref: int) -> None: ...
    def notices(self, code_id: int) -> builtins.list[tuple[str, int, datetime | None]]: ...
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

    def record_stale(self, code_id: int, ip: str, client: str = INTERNAL):
        return self.queue.submit(client, self.store.record_stale, code_id, ip)

    def hold_message(self, code_id: int, cap: int, client: str = INTERNAL):
        return self.queue.submit(client, self.store.hold_message, code_id, cap)

    def message_sent(self, code_id: int, day: int, client: str = INTERNAL):
        return self.queue.submit(client, self.store.message_sent, code_id, day)

    def release_message(self, code_id: int, day: int, client: str = INTERNAL):
        return self.queue.submit(client, self.store.release_message, code_id, day)

    def record_send_refusals(self, code_id: int, count: int, client: str = INTERNAL):
        return self.queue.submit(client, self.store.record_send_refusals, code_id, count)

    def get(self, code_id: int, client: str = INTERNAL):
        return self.queue.submit(client, self.store.get, code_id)

    def get_many(self, code_ids: list[int], client: str = INTERNAL):
        return self.queue.submit(client, self.store.get_many, code_ids)

    def changes_since(self, last: int | None, client: str = INTERNAL):
        return self.queue.submit(client, self.store.changes_since, last)

    def stop(self) -> None:
        self.queue.stop()
        self.store.close()


class CodeMessages:
    """One code's messages under its daily cap, for an SMTP session (auth/decision.py
    MessageCount): each call runs in the store's queue as the session's client. Counting what
    was sent or given back is best effort: a place not given back is free again the next day."""

    def __init__(self, store: AsyncCodeStore, code_id: int, cap: int | None, client: str) -> None:
        self.store = store
        self.code_id = code_id
        self.cap = cap
        self.client = client

    def hold(self):
        assert self.cap is not None  # a watch asks only under a cap
        return self.store.hold_message(self.code_id, self.cap, self.client)

    def sent(self, day: int) -> None:
        self.store.message_sent(self.code_id, day, self.client).addErrback(_ignored)

    def release(self, day: int) -> None:
        self.store.release_message(self.code_id, day, self.client).addErrback(_ignored)

    def refused(self, count: int) -> None:
        self.store.record_send_refusals(self.code_id, count, self.client).addErrback(_ignored)


def _ignored(_failure: Any) -> None:
    """A count that could not be written (store down, queue full) is lost, never an error."""

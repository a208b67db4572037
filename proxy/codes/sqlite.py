"""The embedded code store: one SQLite file in WAL mode, for a single proxy node."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import overload

from proxy.codes.activity import activity_fields
from proxy.codes.records import CodeRecords
from proxy.codes.sending import columns
from proxy.codes.sqlschema import MIGRATIONS
from proxy.codes.store import (
    RESERVATION_SECONDS,
    CapReached,
    Claim,
    CodeRecord,
    NewCode,
    Reservation,
    StoreUnavailable,
    ip_allowed,
    refusal,
    utcnow,
)

# What a claim re-checks of a code (named parameters: now, scope, ip, floor).
_USABLE = (
    "revoked_at IS NULL AND disabled = 0 AND (expires_at IS NULL OR expires_at > :now)"
    " AND instr(scopes, :scope) > 0 AND ip_allowed(networks, :ip) AND created_at >= :floor"
)
# Uses counted plus places held, against max_uses.
_UNDER_LIMIT = (
    "use_count + (SELECT count(*) FROM reservations r WHERE r.code_id = codes.id"
    " AND r.until > :now) < max_uses"
)

# A code and its places held now, to say why a claim was refused (named parameters: id, now).
_WHY = (
    "SELECT codes.*, (SELECT count(*) FROM reservations r WHERE r.code_id = codes.id"
    " AND r.until > :now) AS held FROM codes WHERE id = :id"
)

# Ids per query when reading many codes at once: SQLite allows 32,766 parameters since 3.32.
_BATCH = 500

# How long a writer waits for SQLite's lock before the attempt fails as temporary.
BUSY_TIMEOUT_MS = 5000


@overload
def _ts(moment: datetime) -> int: ...
@overload
def _ts(moment: datetime | None) -> int | None: ...
def _ts(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def _dt(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _record(row: sqlite3.Row) -> CodeRecord:
    return CodeRecord(
        id=row["id"],
        account_key=row["account_key"],
        account_login=row["account_login"],
        label=row["label"],
        selector=row["selector"],
        hash=row["hash"],
        scopes=tuple(s for s in row["scopes"].split(",") if s),
        networks=tuple(row["networks"].split()),
        created_at=datetime.fromtimestamp(row["created_at"], UTC),  # NOT NULL
        expires_at=_dt(row["expires_at"]),
        max_uses=row["max_uses"],
        use_count=row["use_count"],
        last_used_at=_dt(row["last_used_at"]),
        last_used_ip=row["last_used_ip"],
        last_used_protocol=row["last_used_protocol"],
        failed_count=row["failed_count"],
        last_failed_at=_dt(row["last_failed_at"]),
        disabled=bool(row["disabled"]),
        revoked_at=_dt(row["revoked_at"]),
        created_by=row["created_by"],
        **activity_fields(row),
    )


def _ip_allowed(networks: str, ip: str) -> int:
    return int(ip_allowed(networks.split(), ip))


class SqliteCodeStore(CodeRecords):
    """Thread-safe: each thread gets its own connection; SQLite serialises the writers."""

    row_record = staticmethod(_record)

    def __init__(self, path: Path | str, migrate: bool = True) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        if migrate:
            self.migrate()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if str(self.path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                conn = sqlite3.connect(
                    self.path,
                    timeout=BUSY_TIMEOUT_MS / 1000,
                    isolation_level=None,
                    check_same_thread=False,
                )
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"cannot open {self.path}: {exc}") from None
            conn.row_factory = sqlite3.Row
            conn.create_function("ip_allowed", 2, _ip_allowed, deterministic=True)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def run(self, sql: str, params=()) -> sqlite3.Cursor:
        """One statement; StoreUnavailable if SQLite fails (the web records use it too)."""
        try:
            return self._conn().execute(sql, params)
        except sqlite3.Error as exc:  # locked, read-only, disk full, not a database, corrupt
            raise StoreUnavailable(f"{self.path}: {exc}") from None

    def transaction(self, statements: list[tuple[str, dict | tuple]]) -> list[sqlite3.Cursor]:
        """Run statements as one write transaction; StoreUnavailable if it cannot commit."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            cursors = [conn.execute(sql, params) for sql, params in statements]
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreUnavailable(f"{self.path}: {exc}") from None
        return cursors

    # -- schema ----------------------------------------------------------------------------------

    def version(self) -> int:
        return self.run("PRAGMA user_version").fetchone()[0]

    def migrate(self) -> tuple[int, int]:
        """Bring the schema up to date; returns (from, to). Safe to run on every start."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            start = conn.execute("PRAGMA user_version").fetchone()[0]
            if start > len(MIGRATIONS):
                conn.execute("ROLLBACK")
                raise StoreUnavailable(
                    f"{self.path}: schema version {start} is newer than this apppass "
                    f"({len(MIGRATIONS)}); upgrade apppass"
                )
            for step in range(start, len(MIGRATIONS)):
                for statement in MIGRATIONS[step]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={len(MIGRATIONS)}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreUnavailable(f"{self.path}: migration failed: {exc}") from None
        return start, len(MIGRATIONS)

    # -- operations ------------------------------------------------------------------------------

    def create(self, new: NewCode, cap: int, now: datetime | None = None) -> CodeRecord:
        now = now or utcnow()
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            live = conn.execute(
                "SELECT count(*) FROM codes WHERE account_key = ? AND revoked_at IS NULL"
                " AND (expires_at IS NULL OR expires_at > ?)",
                (new.account_key, _ts(now)),
            ).fetchone()[0]
            if live >= cap:
                conn.execute("ROLLBACK")
                raise CapReached(
                    f"{new.account_login} already has {live} codes (codes.max_per_account is {cap})"
                )
            cur = conn.execute(
                "INSERT INTO codes (account_key, account_login, label, selector, hash, scopes,"
                " networks, created_at, expires_at, max_uses, created_by, mail_from,"
                " rcpt_domains, max_messages_per_day, custodian)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    new.account_key,
                    new.account_login,
                    new.label,
                    new.selector,
                    new.hash,
                    "," + ",".join(new.scopes) + ",",
                    " ".join(new.networks),
                    _ts(now),
                    _ts(new.expires_at),
                    new.max_uses,
                    new.created_by,
                    *columns(new.sending).values(),
                    new.custodian,
                ),
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreUnavailable(f"{self.path}: {exc}") from None
        code_id = cur.lastrowid
        assert code_id is not None  # set by the INSERT
        record = self.get(code_id)
        assert record is not None  # just committed
        return record

    def get_many(self, code_ids: list[int]) -> dict[int, CodeRecord]:
        """The records of these codes, by id (an id without a record is missing)."""
        found: dict[int, CodeRecord] = {}
        for start in range(0, len(code_ids), _BATCH):
            chunk = code_ids[start : start + _BATCH]
            marks = ",".join("?" * len(chunk))
            for row in self.run(f"SELECT * FROM codes WHERE id IN ({marks})", chunk):
                found[row["id"]] = _record(row)
        return found

    def claim(
        self,
        code_id: int,
        protocol: str,
        ip: str,
        not_before: datetime | None = None,
        now: datetime | None = None,
    ) -> Reservation | Claim:
        """Re-check everything that can change and hold the login's place; count nothing yet
        (confirm or release follows). A code without max_uses needs one read; with max_uses, one
        transaction checks and holds a place, so max_uses is never exceeded however many logins
        race, on one node or many. On refusal, a read says why."""
        now_ts = _ts(now or utcnow())
        floor = _ts(not_before) or 0
        args = {"id": code_id, "now": now_ts, "scope": f",{protocol},", "ip": ip, "floor": floor}
        row = self.run(f"SELECT max_uses FROM codes WHERE id = :id AND {_USABLE}", args).fetchone()
        if row is not None and row["max_uses"] is None:
            return Reservation(code_id)
        if row is None:  # not usable whatever the count: one read says why
            code = self.run(_WHY, args)
        else:
            _, held, code = self.transaction(
                [
                    ("DELETE FROM reservations WHERE code_id = :id AND until <= :now", args),
                    (
                        "INSERT INTO reservations (code_id, until)"
                        f" SELECT id, :until FROM codes WHERE id = :id AND {_USABLE}"
                        f" AND {_UNDER_LIMIT}",
                        {**args, "until": now_ts + RESERVATION_SECONDS},
                    ),
                    (_WHY, args),  # its one row is read inside the transaction
                ]
            )
            if held.rowcount == 1:
                assert held.lastrowid is not None  # set by the INSERT
                return Reservation(code_id, held.lastrowid)
        found = code.fetchone()
        if found is None:
            return Claim.GONE
        return refusal(_record(found), found["held"], protocol, now_ts, floor)

    def confirm(
        self, reservation: Reservation, protocol: str, ip: str, now: datetime | None = None
    ) -> bool:
        """The upstream login succeeded: count the use and say where from. False (nothing
        counted) if the code was revoked or disabled meanwhile: the session must not start."""
        args = {
            "id": reservation.code_id,
            "token": reservation.token,
            "now": _ts(now or utcnow()),
            "ip": ip,
            "protocol": protocol,
        }
        count = (
            "UPDATE codes SET use_count = use_count + 1, last_used_at = :now, last_used_ip = :ip,"
            " last_used_protocol = :protocol"
            " WHERE id = :id AND revoked_at IS NULL AND disabled = 0"
        )
        if reservation.token is None:
            return self.run(count, args).rowcount == 1
        counted, _ = self.transaction(
            [(count, args), ("DELETE FROM reservations WHERE id = :token", args)]
        )
        return counted.rowcount == 1

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()

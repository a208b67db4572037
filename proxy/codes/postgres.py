"""The shared code store: PostgreSQL (through psycopg 3 and its pool, proxy/codes/pgconn.py), for
several proxy nodes on one database, usually one the site already runs and replicates.

The same contract as the SQLite store (proxy/codes/sqlite.py; both pass
tests/support/store_contract.py). What differs is how the claim stays exact when logins race
on many nodes: one transaction, sent in one round trip, that first locks the code's row
(`SELECT … FOR UPDATE`), so a second claim of the same code waits for the first to commit and
then, its next statement taking a fresh snapshot (READ COMMITTED), counts the place the first
one took. The client address is checked in SQL (`inet <<= cidr`), so nothing is read, decided
in Python and written back.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from proxy.addresses import parse_ip
from proxy.codes.activity import activity_fields
from proxy.codes.pgconn import PgPool, Result, Row, execute
from proxy.codes.pgschema import MIGRATIONS, VERSION_TABLE
from proxy.codes.pgsettings import PostgresSettings
from proxy.codes.records import CodeRecords
from proxy.codes.sending import columns
from proxy.codes.store import (
    RESERVATION_SECONDS,
    CapReached,
    Claim,
    CodeRecord,
    NewCode,
    Reservation,
    StoreUnavailable,
    refusal,
    utcnow,
)

# Advisory lock keys (pg_advisory_xact_lock). Two-key form (space, hashtext(account key)):
# creating codes for one account, so the per-account cap holds across nodes as SQLite's single
# writer holds it on one. One-key form: migrating, so two nodes starting at once migrate once.
# The key spaces of the two forms do not overlap (PostgreSQL's documentation, "Advisory Locks").
_ACCOUNT_LOCK_SPACE = 0x61707070  # "appp"
_MIGRATION_LOCK = 0x6170707061737321  # "apppass!"

# What a claim re-checks of a code (named parameters: now, scope, ip, floor). `ip` is NULL when
# the client address is not an address: then only a code without networks matches.
_USABLE = (
    "revoked_at IS NULL AND disabled = 0 AND (expires_at IS NULL OR expires_at > :now)"
    " AND :scope = ANY(scopes)"
    " AND (cardinality(networks) = 0 OR CAST(:ip AS inet) <<= ANY(networks))"
    " AND created_at >= :floor"
)
# Places held that have not lapsed.
_HELD = "(SELECT count(*) FROM reservations r WHERE r.code_id = codes.id AND r.until > :now)"

# SQLite sorts text by its bytes; so does the "C" collation, whatever the database's locale.
_ORDER = ' ORDER BY account_login COLLATE "C", id'


def _ts(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def _dt(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _record(row: Row) -> CodeRecord:
    return CodeRecord(
        id=row["id"],
        account_key=row["account_key"],
        account_login=row["account_login"],
        label=row["label"],
        selector=row["selector"],
        hash=row["hash"],
        scopes=tuple(row["scopes"]),
        networks=tuple(str(n) for n in row["networks"]),
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


def _client(ip: str) -> str | None:
    """The client address as PostgreSQL's inet (`::ffff:10.1.2.3` as `10.1.2.3`, as the SQLite
    store's ip_allowed sees it), or None if it is not an address."""
    addr = parse_ip(ip)
    return None if addr is None else str(addr)


class PostgresCodeStore(CodeRecords):
    """Thread-safe: each call takes a connection from the pool for its duration."""

    row_record = staticmethod(_record)
    list_order = _ORDER

    def __init__(self, settings: PostgresSettings, migrate: bool = True) -> None:
        self.settings = settings
        self.pool = PgPool(settings)
        if migrate:
            try:
                self.migrate()
            except BaseException:
                self.pool.close()
                raise

    def run(self, sql: str, params: Any = ()) -> Result:
        """One statement in SQLite's style (`?` or `:name`), as SqliteCodeStore.run takes it;
        StoreUnavailable on any trouble."""
        return self.pool.run(sql, params)

    def transaction(self, statements: list[tuple[str, Any]]) -> list[Result]:
        """Statements (SQLite's style) as one transaction, in one round trip."""
        return self.pool.transaction(statements)

    # -- schema ----------------------------------------------------------------------------------

    def version(self) -> int:
        with self.pool.connection() as conn:
            return _version(conn)

    def migrate(self) -> tuple[int, int]:
        """Bring the schema up to date; returns (from, to). Safe on every start, on every node at
        once; needs no write (nor the right to create tables) when the schema is current."""
        with self.pool.connection() as conn, conn.transaction():
            execute(conn, "SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            start = _version(conn)
            if start > len(MIGRATIONS):
                raise StoreUnavailable(
                    f"postgresql: schema version {start} is newer than this apppass "
                    f"({len(MIGRATIONS)}); upgrade apppass"
                )
            if start == 0:
                conn.execute(VERSION_TABLE)
            for step in range(start, len(MIGRATIONS)):
                for statement in MIGRATIONS[step]:
                    conn.execute(statement)
                execute(
                    conn,
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (step + 1, int(time.time())),
                )
        return start, len(MIGRATIONS)

    # -- operations ------------------------------------------------------------------------------

    def create(self, new: NewCode, cap: int, now: datetime | None = None) -> CodeRecord:
        now_ts = _ts(now or utcnow())
        live_sql = (
            "SELECT count(*) FROM codes WHERE account_key = ? AND revoked_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > ?)"
        )
        with self.pool.connection() as conn, conn.transaction():
            execute(
                conn,
                "SELECT pg_advisory_xact_lock(?, hashtext(?))",
                (_ACCOUNT_LOCK_SPACE, new.account_key),
            )
            live = execute(conn, live_sql, (new.account_key, now_ts)).rows[0][0]
            if live >= cap:
                raise CapReached(
                    f"{new.account_login} already has {live} codes (codes.max_per_account is {cap})"
                )
            row = execute(
                conn,
                "INSERT INTO codes (account_key, account_login, label, selector, hash, scopes,"
                " networks, created_at, expires_at, max_uses, created_by, mail_from,"
                " rcpt_domains, max_messages_per_day, custodian)"
                " VALUES (?, ?, ?, ?, ?, CAST(? AS text[]), CAST(? AS cidr[]), ?, ?, ?, ?,"
                " ?, ?, ?, ?) RETURNING *",
                (
                    new.account_key,
                    new.account_login,
                    new.label,
                    new.selector,
                    new.hash,
                    list(new.scopes),
                    list(new.networks),
                    now_ts,
                    _ts(new.expires_at),
                    new.max_uses,
                    new.created_by,
                    *columns(new.sending).values(),
                    new.custodian,
                ),
            ).rows[0]
        return _record(row)

    def get_many(self, code_ids: list[int]) -> dict[int, CodeRecord]:
        """The records of these codes, by id (an id without a record is missing)."""
        if not code_ids:
            return {}
        rows = self.run("SELECT * FROM codes WHERE id = ANY(CAST(? AS bigint[]))", (code_ids,))
        return {row["id"]: _record(row) for row in rows}

    def claim(
        self,
        code_id: int,
        protocol: str,
        ip: str,
        not_before: datetime | None = None,
        now: datetime | None = None,
    ) -> Reservation | Claim:
        """Re-check everything that can change and hold the login's place; count nothing yet
        (confirm or release follows). One transaction in one round trip: lock the code's row if
        it is usable, drop lapsed holds, hold a place if one is free under max_uses, and read the
        code back (to say why, on refusal). Claims of the same code wait for each other, so
        max_uses is never exceeded however many logins race, on one node or many."""
        now_ts = _ts(now or utcnow())
        assert now_ts is not None
        floor = _ts(not_before) or 0
        args = {
            "id": code_id,
            "now": now_ts,
            "until": now_ts + RESERVATION_SECONDS,
            "scope": protocol,
            "ip": _client(ip),
            "floor": floor,
        }
        usable, _, held, code = self.transaction(
            [
                (f"SELECT max_uses FROM codes WHERE id = :id AND {_USABLE} FOR UPDATE", args),
                ("DELETE FROM reservations WHERE code_id = :id AND until <= :now", args),
                (
                    "INSERT INTO reservations (code_id, until) SELECT id, :until FROM codes"
                    f" WHERE id = :id AND max_uses IS NOT NULL AND {_USABLE}"
                    f" AND use_count + {_HELD} < max_uses RETURNING id",
                    args,
                ),
                (f"SELECT codes.*, {_HELD} AS held FROM codes WHERE id = :id", args),
            ]
        )
        found = usable.fetchone()
        if found is not None and found["max_uses"] is None:
            return Reservation(code_id)
        token = held.fetchone()
        if token is not None:
            return Reservation(code_id, token[0])
        row = code.fetchone()
        return refusal(
            _record(row) if row else None, row["held"] if row else 0, protocol, now_ts, floor
        )

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
        self.pool.close()


def _version(conn: Any) -> int:
    """The schema version (0 for an empty database)."""
    if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]

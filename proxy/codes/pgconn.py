"""Talking to PostgreSQL for the store (proxy/codes/postgres.py): a psycopg 3 connection pool
whose every failure is a StoreUnavailable, bounded in time, and SQL written as for SQLite.

- **SQLite's SQL style.** Statements take SQLite's placeholders (`?`, `:name`) and give back
  rows readable by position or by column name, like sqlite3.Row; `Result` reads like a
  sqlite3.Cursor (fetchone, fetchall, iteration, rowcount, lastrowid for `INSERT … RETURNING
  id`). So code written against the SQLite store's `run` (the web records) runs here too.
- **Bounded.** New connections: libpq's connect_timeout; a free one from the pool: the same;
  statements: statement_timeout on the server; and a server that cannot answer at all (frozen,
  or its host gone quiet while its kernel still acknowledges) is cut off by a watchdog that shuts
  the connection's socket down once the call has run past both.
- **Self-healing.** A broken connection is dropped by the pool, which connects anew in the
  background (with backoff) until the database is back; a connection that finds the database
  read-only (a replica after a failover) has the pool replace every connection, so the next
  ones can reach the new primary (`target_session_attrs=read-write` in the DSN picks it among
  several hosts).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import psycopg
from psycopg import errors
from psycopg_pool import ConnectionPool, PoolTimeout

from proxy.codes.pgsettings import PostgresSettings
from proxy.codes.store import StoreUnavailable

# Shown to the DBA in pg_stat_activity.
APPLICATION_NAME = "apppass"

# A transaction left open by a client that stopped talking would hold its locks (a code's row)
# until TCP notices; the server ends it after this. Our transactions never wait on the client.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000

# TCP keepalive for a database host that disappears without a reset (libpq's defaults are the
# kernel's: two hours): the first probe after this many seconds idle, then one a second, and
# unacknowledged data gives up after connect_timeout (tcp_user_timeout). Only where the DSN does
# not set them.
KEEPALIVE_INTERVAL_S = 1
KEEPALIVE_COUNT = 3

# The pool logs each failed connection attempt as a warning; the store says the same once per
# refused call instead (StoreUnavailable, with libpq's reason), where the proxy reports it.
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

# SQLSTATEs after which no pooled connection should be used again: a read-only transaction
# (25006: a hot standby, the old primary after a failover, default_transaction_read_only). New
# connections may reach the new primary (libpq's target_session_attrs=read-write among several
# hosts), or pick up the database's settings as they are now.
_REPLACE_CONNECTIONS = (errors.ReadOnlySqlTransaction,)

# Replace them at most this often: a database that stays read-only for a while would otherwise
# have every refused write reconnect the whole pool.
REPLACE_INTERVAL_S = 1.0

# SQLite's placeholders, and what holds none: string literals, quoted names, `::` casts, dollar
# quoting. psycopg reads every % (quoted or not) as its own, so a literal one is doubled.
_TOKENS = re.compile(
    r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\$\$.*?\$\$|::|\?|:([A-Za-z_]\w*)|%", re.S
)


@functools.lru_cache(maxsize=512)
def pg_sql(sql: str) -> str:
    """A statement in SQLite's placeholder style (`?` or `:name`) in psycopg's (`%s`,
    `%(name)s`)."""

    def swap(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "?":
            return "%s"
        if match.group(1):
            return f"%({match.group(1)})s"
        return token.replace("%", "%%")  # psycopg reads % even inside quotes

    return _TOKENS.sub(swap, sql)


class Row:
    """One row, by position or by column name, like sqlite3.Row."""

    __slots__ = ("_names", "_values")

    def __init__(self, values: Sequence[Any], names: dict[str, int]) -> None:
        self._values = tuple(values)
        self._names = names

    def __getitem__(self, key: int | str) -> Any:
        return self._values[self._names[key] if isinstance(key, str) else key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._names)

    def __repr__(self) -> str:  # no values: a row may hold a hash or a token
        return f"Row({', '.join(self._names)})"


def _row_maker(cursor: Any) -> Any:
    names = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: Row(values, names)


class Result:
    """What one statement gave, read in full before its connection went back to the pool."""

    def __init__(self, rows: list[Row], rowcount: int, lastrowid: int | None = None) -> None:
        self.rows = rows
        self.rowcount = rowcount
        self.lastrowid = lastrowid

    def fetchone(self) -> Row | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Row]:
        return list(self.rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)


def read_result(cursor: psycopg.Cursor[Any]) -> Result:
    rows: list[Row] = cursor.fetchall() if cursor.description is not None else []
    inserted = (cursor.statusmessage or "").startswith("INSERT")
    lastrowid = rows[0][0] if inserted and rows and isinstance(rows[0][0], int) else None
    return Result(rows, cursor.rowcount, lastrowid)


def describe(exc: BaseException) -> str:
    """One line for an error from psycopg or the pool: libpq's first line (never the password,
    which libpq does not repeat), and the SQLSTATE when there is one."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    state = getattr(exc, "sqlstate", None)
    return f"{text} (SQLSTATE {state})" if state else text


class Watchdog:
    """Shuts down the socket of a call that outlives its deadline, so that the thread waiting in
    libpq gets an error (and the pool drops the connection) instead of waiting on a server that
    will not answer. One thread per store, sleeping until the nearest deadline."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._due: dict[int, tuple[float, int]] = {}  # token -> (deadline, socket fd)
        self._tokens = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.fired = 0  # calls cut off so far (for tests and diagnostics)

    @contextmanager
    def guard(self, conn: psycopg.Connection[Any], seconds: float) -> Iterator[None]:
        token = next(self._tokens)
        with self._cond:
            self._due[token] = (time.monotonic() + seconds, conn.pgconn.socket)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:  # the connection is still open here: its fd is still its own
                self._due.pop(token, None)

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                for token, (deadline, fd) in list(self._due.items()):
                    if deadline <= now:
                        del self._due[token]
                        self.fired += 1
                        _shut_down(fd)
                nearest = min((d for d, _ in self._due.values()), default=None)
                self._cond.wait(None if nearest is None else max(nearest - now, 0.001))

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()


def _shut_down(fd: int) -> None:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()  # closes the duplicate only; libpq still owns fd


class PgPool:
    """The store's connections: every call gets one from the pool, bounded by the watchdog, and
    any failure comes out as StoreUnavailable."""

    def __init__(self, settings: PostgresSettings) -> None:
        self.settings = settings
        connect = settings.connect_timeout.total_seconds()
        self._deadline = connect + settings.statement_timeout.total_seconds()
        self.watchdog = Watchdog("apppass-store-watchdog")
        self.last_connect_error: str | None = None  # why the last new connection failed
        self._replaced_at = -REPLACE_INTERVAL_S
        self._replace_lock = threading.Lock()
        self._pool = ConnectionPool(
            settings.dsn,
            connection_class=self._connection_class(),
            kwargs=_connect_args(settings),
            min_size=settings.pool_min,
            max_size=settings.pool_max,
            timeout=connect,
            name="apppass-store",
            configure=self._configure,
            open=False,
        )
        self._pool.open(wait=False)

    def _connection_class(self) -> type[psycopg.Connection[Any]]:
        """Connections that remember why the last attempt to open one failed: waiting for the
        pool times out with no reason of its own, and the reason is what an operator needs."""
        pool = self

        class Connection(psycopg.Connection[Any]):
            @classmethod
            def connect(cls, *args: Any, **kwargs: Any) -> Any:
                try:
                    conn = super().connect(*args, **kwargs)
                except psycopg.Error as exc:
                    pool.last_connect_error = describe(exc)
                    raise
                pool.last_connect_error = None
                return conn

        return Connection

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        """Each new connection: the server ends a statement, or a transaction left open, after
        its timeout (set here, not in the DSN's `options`, which PgBouncer refuses)."""
        ms = int(self.settings.statement_timeout.total_seconds() * 1000)
        conn.execute(
            "SELECT set_config('statement_timeout', %s, false),"
            " set_config('idle_in_transaction_session_timeout', %s, false)",
            (str(ms), str(IDLE_IN_TRANSACTION_TIMEOUT_MS)),
        )

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection for one call (autocommit: a statement is its own transaction)."""
        try:
            with self._pool.connection() as conn:
                try:
                    with self.watchdog.guard(conn, self._deadline):
                        yield conn
                except _REPLACE_CONNECTIONS:
                    conn.close()  # the pool drops it
                    self._replace_all()
                    raise
        except PoolTimeout:
            waited = self.settings.connect_timeout.total_seconds()
            why = self.last_connect_error or "every connection busy"
            raise StoreUnavailable(f"postgresql: no connection within {waited:g}s: {why}") from None
        except psycopg.Error as exc:  # OperationalError, a read-only database …
            raise StoreUnavailable(f"postgresql: {describe(exc)}") from None

    def _replace_all(self) -> None:
        now = time.monotonic()
        with self._replace_lock:
            if now - self._replaced_at < REPLACE_INTERVAL_S:
                return
            self._replaced_at = now
        self._pool.drain()  # idle ones now; those in use when they come back

    def run(self, sql: str, params: Any = ()) -> Result:
        with self.connection() as conn:
            return execute(conn, sql, params)

    def transaction(self, statements: list[tuple[str, Any]]) -> list[Result]:
        """The statements in one transaction, sent together in one round trip (libpq's
        pipeline mode) where libpq has it: the server runs them in order, each seeing what the
        ones before it did (and, under READ COMMITTED, what others committed before it began)."""
        with self.connection() as conn:
            pipeline = conn.pipeline() if psycopg.Pipeline.is_supported() else nullcontext()
            with pipeline, conn.transaction():
                cursors = [_send(conn, sql, params) for sql, params in statements]
            return [read_result(cursor) for cursor in cursors]

    def close(self) -> None:
        self.watchdog.stop()
        self._pool.close(timeout=self.settings.connect_timeout.total_seconds())


def _send(conn: psycopg.Connection[Any], sql: str, params: Any) -> psycopg.Cursor[Any]:
    cursor = conn.cursor(row_factory=_row_maker)
    cursor.execute(pg_sql(sql), params)
    return cursor


def execute(conn: psycopg.Connection[Any], sql: str, params: Any = ()) -> Result:
    """One statement on a connection already taken (e.g. inside `conn.transaction()`)."""
    return read_result(_send(conn, sql, params))


def _connect_args(settings: PostgresSettings) -> dict[str, Any]:
    """libpq parameters apppass sets (the DSN keeps the rest, and its own keepalive settings)."""
    connect = max(int(settings.connect_timeout.total_seconds()), 2)
    args: dict[str, Any] = {
        "autocommit": True,
        "connect_timeout": connect,
        "application_name": APPLICATION_NAME,
    }
    if settings.password is not None:
        args["password"] = settings.password
    given = psycopg.conninfo.conninfo_to_dict(settings.dsn)
    defaults = {
        "keepalives": 1,
        "keepalives_idle": max(int(settings.statement_timeout.total_seconds()), 1),
        "keepalives_interval": KEEPALIVE_INTERVAL_S,
        "keepalives_count": KEEPALIVE_COUNT,
        "tcp_user_timeout": connect * 1000,
    }
    args.update({k: v for k, v in defaults.items() if k not in given})
    if "application_name" in given:
        del args["application_name"]
    return args

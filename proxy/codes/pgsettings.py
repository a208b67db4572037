"""The PostgreSQL store's settings: `store: {postgresql: {...}}` in apppass.yaml, every default
and rule in one place (the store itself is proxy/codes/postgres.py).

The connection string is libpq's own (https://www.postgresql.org/docs/current/libpq-connect.html),
so TLS is set there as libpq does it: `sslmode=verify-full sslrootcert=FILE`. The password never
goes into it: it comes from `password_file`, and neither appears in a repr, a log line or an
error message.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from proxy.configschema import Invalid, Node, duration, integer, secret_file, text

# Connections each proxy keeps open at least, and may open at most. PostgreSQL allows 100
# connections by default (max_connections): 8 per node leaves room for a dozen nodes, the CLI
# and the DBA. The proxy runs this many store calls at once (its store threads).
DEFAULT_POOL_MIN = 1
DEFAULT_POOL_MAX = 8
MAX_POOL = 100

# How long to wait for a connection, a new one (libpq's connect_timeout, which it counts in whole
# seconds, at least 2) or a free one from the pool. PgBouncer's server_connect_timeout is 15 s;
# a login must fail over well inside a mail client's own patience (Outlook: 30 s).
DEFAULT_CONNECT_TIMEOUT = timedelta(seconds=5)
MIN_CONNECT_TIMEOUT = timedelta(seconds=2)

# The longest a statement may run on the server before PostgreSQL cancels it (statement_timeout).
# A claim takes about a millisecond; waiting seconds means a lock held elsewhere or an overloaded
# server, and the login is better refused as temporary than kept waiting.
DEFAULT_STATEMENT_TIMEOUT = timedelta(seconds=5)
MIN_STATEMENT_TIMEOUT = timedelta(seconds=1)

# libpq's sslmode values, and the one that checks both the certificate and the server's name.
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
VERIFIED_SSL_MODE = "verify-full"
LIBPQ_DEFAULT_SSL_MODE = "prefer"

# A password written into the connection string itself: as `password=…`, or in a URI's userinfo.
_INLINE_PASSWORD = re.compile(r"(?i)(^|\s)password\s*=|^postgres(ql)?://[^/@]*:[^/@]*@")


@dataclass(frozen=True)
class PostgresSettings:
    dsn: str  # libpq connection string, without the password
    password: str | None = field(default=None, repr=False)  # from password_file
    pool_min: int = DEFAULT_POOL_MIN
    pool_max: int = DEFAULT_POOL_MAX
    connect_timeout: timedelta = DEFAULT_CONNECT_TIMEOUT
    statement_timeout: timedelta = DEFAULT_STATEMENT_TIMEOUT
    # Read from the DSN when the config is loaded, for the clear-text warnings (exposure.py):
    # the hosts ("" or a path for a Unix socket) and the sslmode in force.
    hosts: tuple[str, ...] = ()
    sslmode: str = LIBPQ_DEFAULT_SSL_MODE

    def worst_wait(self) -> timedelta:
        """The longest one store call may take: a connection, then its statements."""
        return self.connect_timeout + self.statement_timeout


def dsn_parts(dsn: str) -> dict[str, str]:
    """The DSN as libpq reads it (key=value or a postgresql:// URI); Invalid if it cannot.

    libpq's message may quote the DSN; a DSN holding a password is refused before parsing."""
    if _INLINE_PASSWORD.search(dsn):
        raise Invalid("must not hold the password: put it in password_file")
    try:
        from psycopg import conninfo
    except ImportError as exc:  # psycopg is a dependency; libpq is what may be missing
        raise Invalid(
            f"needs psycopg and the PostgreSQL client library libpq ({exc}): install libpq5,"
            " or psycopg[binary]"
        ) from None
    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except Exception as exc:  # psycopg.ProgrammingError: libpq's own words
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "cannot be parsed"
        raise Invalid(f"is not a libpq connection string: {first}") from None
    if parts.get("password"):
        raise Invalid("must not hold the password: put it in password_file")
    mode = parts.get("sslmode")
    if mode is not None and mode not in SSL_MODES:
        raise Invalid(f"sslmode must be one of {', '.join(SSL_MODES)}")
    return {k: str(v) for k, v in parts.items() if v is not None}


def read_postgres(node: Node) -> PostgresSettings | None:
    """`store.postgresql` from its node; None (with the mistakes recorded) if it is wrong."""
    dsn = node.get("dsn", text)
    parts: dict[str, str] = {}
    if dsn is not None:
        try:
            parts = dsn_parts(dsn)
        except Invalid as exc:  # never echo the value: it may hold a secret
            node.ctx.error(node.key_path("dsn"), str(exc))
            dsn = None
    password = node.get("password_file", secret_file, None)
    pool_min = node.get("pool_min", integer(0, MAX_POOL), DEFAULT_POOL_MIN)
    pool_max = node.get("pool_max", integer(1, MAX_POOL), DEFAULT_POOL_MAX)
    connect_timeout = node.get(
        "connect_timeout", duration(minimum=MIN_CONNECT_TIMEOUT), DEFAULT_CONNECT_TIMEOUT
    )
    statement_timeout = node.get(
        "statement_timeout", duration(minimum=MIN_STATEMENT_TIMEOUT), DEFAULT_STATEMENT_TIMEOUT
    )
    if pool_min > pool_max:
        node.ctx.error(
            node.key_path("pool_min"),
            f"must not be more than pool_max ({pool_max}) (got {pool_min})",
        )
    if dsn is None:
        return None
    return PostgresSettings(
        dsn=dsn,
        password=password,
        pool_min=pool_min,
        pool_max=pool_max,
        connect_timeout=connect_timeout,
        statement_timeout=statement_timeout,
        hosts=_hosts(parts),
        sslmode=parts.get("sslmode") or os.environ.get("PGSSLMODE") or LIBPQ_DEFAULT_SSL_MODE,
    )


def _hosts(parts: dict[str, Any]) -> tuple[str, ...]:
    """Where libpq connects: each of host (or hostaddr); none means the local Unix socket."""
    names = parts.get("host") or parts.get("hostaddr") or os.environ.get("PGHOST") or ""
    return tuple(h.strip() for h in str(names).split(",")) if names else ("",)


def timeout_problem(settings: PostgresSettings, login_timeout: timedelta) -> str | None:
    """A store call must end (answered or refused) inside the login it serves."""
    worst = settings.worst_wait()
    if worst >= login_timeout:
        return (
            f"connect_timeout + statement_timeout ({int(worst.total_seconds())}s) must be less"
            f" than auth.login_timeout ({int(login_timeout.total_seconds())}s)"
        )
    return None

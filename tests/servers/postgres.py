"""A private PostgreSQL cluster for integration tests: initdb in a short folder under /tmp, the
server on a loopback high port, run as the `postgres` user (the server refuses root).

    data/        the cluster (initdb)        output.log   the server's log (stderr)
    .s.PGSQL.N   its Unix socket, for the superuser (trust); TCP needs a password (scram)

The store connects as the role APP_ROLE over TCP with the password in `password_file`, as a
production node would (without TLS: loopback). Each test gets a database of its own
(`pg_database`); the cluster is shared by the session (`postgres`). A test may stop, restart,
pause (SIGSTOP: a server that accepts but never answers) or make read-only the session's
server, and must leave it running and writable (the fixtures check).
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from proxy.codes.pgsettings import PostgresSettings, dsn_parts
from proxy.config import StoreSettings
from tests.servers.common import (
    LOOPBACK,
    ServerError,
    ServerProcess,
    chown,
    ensure_installed,
    free_port,
    remove_tree,
    run_checked,
    short_tempdir,
    wait_until,
)

PG_LIB = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"
APP_ROLE = "apppass"
APP_PASSWORD = "pg-Secret-4-apppass"

# The server drops privileges to this user; setpriv execs (no fork), so the pid we hold is the
# postmaster's and signals reach it.
RUN_AS = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]

# Server settings for tests: nothing here must survive a power cut, the race tests open a
# store (and so a connection) per thread, and a connection attempt left unanswered while the
# server was paused must not hold its database (DROP DATABASE waits for it) for the default
# authentication_timeout of a minute.
SERVER_SETTINGS = {
    "authentication_timeout": "3s",
    "listen_addresses": LOOPBACK,
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
}

# Each test database's collation (ICU: available whatever locales the machine generated).
DATABASE_LOCALE = "en-US"

# Fast shutdown (SIGINT) ends client sessions at once; smart shutdown (SIGTERM) would wait for
# the pools of the stores under test.
STOP_WAIT = 30.0


def pg_bin(name: str) -> str:
    """A program of the newest PostgreSQL installed (Debian keeps each major in its folder)."""
    versions = sorted(
        (p for p in PG_LIB.glob("*/bin") if (p / "postgres").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not versions:
        return str(PG_LIB / "15" / "bin" / name)  # what ensure_postgres installs
    return str(versions[-1] / name)


def ensure_postgres() -> None:
    ensure_installed((pg_bin("postgres"), pg_bin("initdb"), "setpriv"))


class Postgres:
    """A private cluster; its port is chosen at construction and kept across restarts."""

    def __init__(self, name: str = "postgres", primary: Postgres | None = None) -> None:
        self.name = name
        self.primary = primary  # a hot standby of this one (pg_basebackup), if given
        self.root = short_tempdir("pg-")
        self.host = LOOPBACK
        self.port = free_port()
        self.data = self.root / "data"
        self.password_file = self.root / "apppass-password"
        self.process: ServerProcess | None = None
        self._paused = False
        self._initialised = False

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        ensure_postgres()
        if not self._initialised:
            if self.primary is None:
                self._initdb()
            else:
                self._basebackup()
        settings = [f"-c{key}={value}" for key, value in SERVER_SETTINGS.items()]
        argv = [
            *RUN_AS,
            pg_bin("postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-k",
            str(self.root),
            *settings,
        ]
        self.process = ServerProcess(self.name, argv, output=self.root / "output.log")
        self.process.start()
        try:
            wait_until(self._answers, timeout, f"{self.name} to answer", process=self.process)
            if not self._initialised:
                if self.primary is None:
                    self._create_role()
                self._initialised = True
        except BaseException:
            self.process.stop()
            raise

    def _initdb(self) -> None:
        chown(self.root, "postgres")
        self.password_file.write_text(APP_PASSWORD + "\n")
        run_checked(
            [
                *RUN_AS,
                pg_bin("initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            f"initdb for {self.name}",
        )

    def _basebackup(self) -> None:
        """A copy of the primary that follows it (-R: standby.signal and primary_conninfo)."""
        assert self.primary is not None
        chown(self.root, "postgres")
        run_checked(
            [
                *RUN_AS,
                pg_bin("pg_basebackup"),
                "-D",
                str(self.data),
                "-h",
                str(self.primary.root),
                "-p",
                str(self.primary.port),
                "-U",
                SUPERUSER,
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",  # the default, spread, waits minutes for the primary
                "--no-sync",
            ],
            f"pg_basebackup for {self.name}",
        )

    def promote(self) -> None:
        """The failover: the standby becomes a primary and takes writes."""
        with self.admin() as conn:
            conn.execute("SELECT pg_promote(true, 30)")

    def _create_role(self) -> None:
        with self.admin() as conn:
            conn.execute(
                f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{APP_PASSWORD}'"  # test secret
            )

    def _answers(self) -> bool:
        try:
            with psycopg.connect(self._superuser_dsn("postgres"), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def stop(self) -> None:
        """Fast shutdown: sessions are ended, the cluster is left consistent."""
        if self.process is None:
            return
        self.resume()
        if self.process.running and self.process.pid is not None:
            os.kill(self.process.pid, signal.SIGINT)
            wait_until(lambda: not self.process.running, STOP_WAIT, f"{self.name} to stop")
        self.process.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP the server and its backends: connections are accepted by the kernel (and
        their data acknowledged) but nothing answers, like a server hung on its disk."""
        if self.process is None or self.process.pid is None or not self.process.running:
            raise ServerError(f"{self.name} is not running")
        os.kill(self.process.pid, signal.SIGSTOP)  # first, so it starts no new backend
        for pid in _children(self.process.pid):  # each in a session of its own (setsid)
            os.kill(pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        if self._paused and self.process is not None and self.process.pid is not None:
            for pid in _children(self.process.pid):
                os.kill(pid, signal.SIGCONT)
            os.kill(self.process.pid, signal.SIGCONT)
        self._paused = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def cleanup(self) -> None:
        self.stop()
        remove_tree(self.root)

    # --- using it ------------------------------------------------------------------------

    def _superuser_dsn(self, dbname: str) -> str:
        return f"host={self.root} port={self.port} user={SUPERUSER} dbname={dbname}"

    def admin(self, dbname: str = "postgres") -> psycopg.Connection:
        """A superuser connection over the Unix socket (autocommit; close it, or use `with`)."""
        return psycopg.connect(self._superuser_dsn(dbname), autocommit=True, connect_timeout=5)

    def dsn(self, dbname: str) -> str:
        """What a node's config says (no password: that is in password_file)."""
        return f"host={self.host} port={self.port} dbname={dbname} user={APP_ROLE} sslmode=disable"

    def create_database(self) -> str:
        """A new database in a language's collation, as production databases usually are
        (en_US.UTF-8), not the C order that would hide a difference from SQLite."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self.admin() as conn:
            conn.execute(
                f"CREATE DATABASE {name} OWNER {APP_ROLE} TEMPLATE template0"
                f" LOCALE_PROVIDER icu ICU_LOCALE '{DATABASE_LOCALE}'"
            )
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def standby(self, name: str = "postgres-standby") -> Postgres:
        """A running hot standby of this cluster (stop it with cleanup())."""
        standby = Postgres(name, primary=self)
        standby.start()
        return standby

    def settings(self, dbname: str, **changes) -> PostgresSettings:
        dsn = self.dsn(dbname)
        parts = dsn_parts(dsn)
        base = PostgresSettings(
            dsn=dsn,
            password=APP_PASSWORD,
            pool_min=1,
            pool_max=4,
            connect_timeout=timedelta(seconds=2),
            statement_timeout=timedelta(seconds=2),
            hosts=(parts["host"],),
            sslmode=parts["sslmode"],
        )
        return replace(base, **changes)

    def log_text(self) -> str:
        try:
            return (self.root / "output.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _children(parent: int) -> list[int]:
    """The processes whose parent is `parent` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


class PgDatabase:
    """One test's database on the session's cluster."""

    def __init__(self, server: Postgres) -> None:
        self.server = server
        self.name = server.create_database()

    @property
    def dsn(self) -> str:
        return self.server.dsn(self.name)

    def settings(self, **changes) -> PostgresSettings:
        return self.server.settings(self.name, **changes)

    def store_settings(self, **changes) -> StoreSettings:
        return StoreSettings("postgresql", None, self.settings(**changes))

    def admin(self) -> psycopg.Connection:
        return self.server.admin(self.name)

    def config(self) -> dict:
        """The `store:` section of an apppass.yaml for this database."""
        return {
            "postgresql": {
                "dsn": self.dsn,
                "password_file": str(self.server.password_file),
                "connect_timeout": "2s",
                "statement_timeout": "2s",
            }
        }


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """The session's running cluster. A test that stops, pauses or changes it puts it back."""
    server = Postgres(name="postgres-session")
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_database(postgres: Postgres) -> Iterator[PgDatabase]:
    """A fresh, empty database owned by APP_ROLE, dropped after the test."""
    if not postgres.running:
        postgres.start()  # a test before this one stopped it and failed before restarting it
    database = PgDatabase(postgres)
    try:
        yield database
    finally:
        postgres.resume()
        if not postgres.running:
            postgres.start()
        postgres.drop_database(database.name)

"""The PostgreSQL store's parts that need no server: its settings and their mistakes, the
warning for a connection that is not verified, SQLite-style SQL for psycopg, rows like
sqlite3.Row, and the watchdog that cuts off a call nobody answers. The store itself runs the
store contract on a real PostgreSQL in tests/integration/test_store_postgres.py."""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import yaml

from proxy.cli import main
from proxy.codes.open import store_threads
from proxy.codes.pgconn import Result, Row, Watchdog, pg_sql
from proxy.config import ConfigError, StoreSettings, parse
from proxy.exposure import clear_text_warnings

DB_SECRET = "Db-Sekr3t-9"


def config(tmp_path, store, auth=None):
    (tmp_path / "users.yaml").write_text("accounts: {}\n")
    (tmp_path / "db-password").write_text(DB_SECRET + "\n")
    data = {"store": store, "directory": {"static": "users.yaml"}, "listeners": []}
    if auth:
        data["auth"] = auth
    return data


def load(tmp_path, store, auth=None):
    return parse(config(tmp_path, store, auth), source="apppass.yaml", base_dir=tmp_path)


def problems(tmp_path, store, auth=None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, store, auth)
    return caught.value.problems


# -- settings ------------------------------------------------------------------------------------


def test_a_postgresql_store_reads_every_key(tmp_path):
    s = load(
        tmp_path,
        {
            "postgresql": {
                "dsn": "host=db1,db2 dbname=apppass user=apppass sslmode=verify-full"
                " sslrootcert=/etc/apppass/db-ca.pem target_session_attrs=read-write",
                "password_file": "db-password",
                "pool_min": 2,
                "pool_max": 16,
                "connect_timeout": "3s",
                "statement_timeout": "4s",
            }
        },
    ).store
    pg = s.postgresql
    assert s.kind == "postgresql" and s.target is None and pg is not None
    assert (pg.password, pg.pool_min, pg.pool_max) == (DB_SECRET, 2, 16)
    assert (pg.connect_timeout, pg.statement_timeout) == (
        timedelta(seconds=3),
        timedelta(seconds=4),
    )
    assert (pg.hosts, pg.sslmode) == (("db1", "db2"), "verify-full")
    assert DB_SECRET not in repr(s) and DB_SECRET not in repr(pg)
    assert store_threads(s) == 16


def test_postgresql_defaults(tmp_path):
    s = load(tmp_path, {"postgresql": {"dsn": "dbname=apppass"}}).store
    pg = s.postgresql
    assert (pg.password, pg.pool_min, pg.pool_max) == (None, 1, 8)
    assert pg.connect_timeout == pg.statement_timeout == timedelta(seconds=5)
    assert pg.hosts == ("",) and pg.sslmode == "prefer"  # the local Unix socket
    assert store_threads(load(tmp_path, {"sqlite": "a.db"}).store) == 1


@pytest.mark.parametrize(
    "section, expected",
    [
        (
            {"dsn": f"host=db1 password={DB_SECRET}"},
            "store.postgresql.dsn: must not hold the password: put it in password_file",
        ),
        (
            {"dsn": f"postgresql://apppass:{DB_SECRET}@db1/apppass"},
            "store.postgresql.dsn: must not hold the password: put it in password_file",
        ),
        (
            {"dsn": "host=db1 nonsense"},
            "store.postgresql.dsn: is not a libpq connection string: missing",
        ),
        (
            {"dsn": "host=db1 sslmode=verify"},
            "store.postgresql.dsn: sslmode must be one of disable, allow, prefer, require,"
            " verify-ca, verify-full",
        ),
        ({}, "store.postgresql.dsn: is required"),
        (
            {"dsn": "host=db1", "pool_min": 9, "pool_max": 4},
            "store.postgresql.pool_min: must not be more than pool_max (4) (got 9)",
        ),
        (
            {"dsn": "host=db1", "pool_max": 0},
            "store.postgresql.pool_max: must be an integer >= 1 and <= 100 (got 0)",
        ),
        (
            {"dsn": "host=db1", "connect_timeout": "1s"},
            "store.postgresql.connect_timeout: must be at least 2s",
        ),
        (
            {"dsn": "host=db1", "password_file": "missing"},
            "store.postgresql.password_file: file not found",
        ),
        (
            {"dsn": "host=db1", "password": DB_SECRET},
            "store.postgresql.password: unknown key; did you mean 'password_file'?",
        ),
        (
            {"dsn": "host=db1", "statement_timeout": "40s", "connect_timeout": "30s"},
            "store.postgresql: connect_timeout + statement_timeout (70s) must be less than"
            " auth.login_timeout (60s)",
        ),
    ],
)
def test_postgresql_mistakes_name_the_key_and_never_show_the_password(tmp_path, section, expected):
    found = problems(tmp_path, {"postgresql": section})
    assert any(p.startswith(f"apppass.yaml: {expected}") for p in found), found
    assert not any(DB_SECRET in p for p in found)


def test_one_store_only(tmp_path):
    found = problems(tmp_path, {"sqlite": "a.db", "postgresql": {"dsn": "host=db1"}})
    assert found[0].startswith("apppass.yaml: store: must set exactly one of sqlite, postgresql")


def test_check_config_reports_a_dsn_with_a_password_without_showing_it(tmp_path, capsys):
    file = tmp_path / "apppass.yaml"
    store = {"postgresql": {"dsn": f"host=db1 password={DB_SECRET}"}}
    file.write_text(yaml.safe_dump(config(tmp_path, store)))
    assert main(["-c", str(file), "check-config"]) == 2
    err = capsys.readouterr().err
    assert "store.postgresql.dsn: must not hold the password" in err and DB_SECRET not in err


# -- the connection's protection -------------------------------------------------------------


@pytest.mark.parametrize(
    "dsn, warned",
    [
        ("host=db1 dbname=apppass", "sslmode=prefer to db1, so the database password"),
        ("host=db1 sslmode=require", "sslmode=require to db1, so the database password"),
        ("host=db1 sslmode=verify-ca", "goes to a server whose name is not checked"),
        ("host=127.0.0.1,db2 sslmode=disable", "sslmode=disable to db2, so"),
        ("host=db1 sslmode=verify-full sslrootcert=ca.pem", None),
        ("host=127.0.0.1 sslmode=disable", None),
        ("host=/run/postgresql", None),
        ("dbname=apppass", None),
    ],
)
def test_a_database_connection_that_is_not_verified_is_warned_about(tmp_path, dsn, warned):
    s = load(tmp_path, {"postgresql": {"dsn": dsn, "password_file": "db-password"}})
    warnings = clear_text_warnings(s)
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warned in warnings[0]
        assert warnings[0].startswith("store.postgresql.dsn: ") and "verify-full" in warnings[0]


# -- SQL written once for both stores --------------------------------------------------------


@pytest.mark.parametrize(
    "sqlite, psycopg",
    [
        ("SELECT * FROM codes WHERE id = ?", "SELECT * FROM codes WHERE id = %s"),
        ("UPDATE t SET a = :a WHERE id = :id", "UPDATE t SET a = %(a)s WHERE id = %(id)s"),
        ("SELECT CAST(:ip AS inet), x::text", "SELECT CAST(%(ip)s AS inet), x::text"),
        ("SELECT :ip::inet", "SELECT %(ip)s::inet"),
        ("SELECT 'what? :no' || ?", "SELECT 'what? :no' || %s"),
        ("SELECT 'it''s ?', \"col?\"", "SELECT 'it''s ?', \"col?\""),
        (
            "SELECT 1 WHERE x LIKE '%a%' AND y % 2 = 0",
            "SELECT 1 WHERE x LIKE '%%a%%' AND y %% 2 = 0",
        ),
        ("SELECT $$ ? :x % $$", "SELECT $$ ? :x %% $$"),
    ],
)
def test_statements_in_sqlites_style_become_psycopgs(sqlite, psycopg):
    assert pg_sql(sqlite) == psycopg


def test_rows_read_like_sqlite_rows_and_never_show_their_values():
    row = Row((7, "$argon2id$secret"), {"id": 0, "hash": 1})
    assert (row[0], row["id"], row[1], row["hash"]) == (
        7,
        7,
        "$argon2id$secret",
        "$argon2id$secret",
    )
    assert list(row) == [7, "$argon2id$secret"] and len(row) == 2 and row.keys() == ["id", "hash"]
    assert "secret" not in repr(row)
    result = Result([row], 1, 7)
    assert result.fetchone() is row and result.fetchall() == [row] and list(result) == [row]
    assert (result.rowcount, result.lastrowid) == (1, 7)
    assert Result([], 0).fetchone() is None


# -- the watchdog ----------------------------------------------------------------------------


def _conn(sock: socket.socket):
    return SimpleNamespace(pgconn=SimpleNamespace(socket=sock.fileno()))


def test_the_watchdog_cuts_off_a_call_that_outlives_its_deadline():
    ours, server = socket.socketpair()  # a server that accepts and never answers
    dog = Watchdog("test-watchdog")
    began = time.monotonic()
    with dog.guard(_conn(ours), 0.2):
        ours.settimeout(10)
        assert ours.recv(1) == b""  # shut down: the wait ends, as libpq's would
    assert 0.15 < time.monotonic() - began < 5 and dog.fired == 1
    dog.stop()
    ours.close()
    server.close()


def test_the_watchdog_leaves_a_call_that_ends_in_time_alone():
    ours, server = socket.socketpair()
    dog = Watchdog("test-watchdog")
    for _ in range(20):
        with dog.guard(_conn(ours), 0.2):
            server.sendall(b"x")
            assert ours.recv(1) == b"x"
    done = threading.Event()
    threading.Timer(0.4, done.set).start()
    done.wait(5)  # past every deadline: nothing may fire for calls that ended
    server.sendall(b"y")
    assert ours.recv(1) == b"y" and dog.fired == 0
    dog.stop()
    ours.close()
    server.close()


def test_sqlite_store_settings_need_no_postgresql():
    assert store_threads(StoreSettings("sqlite", None)) == 1


def test_the_example_configs_postgresql_section_is_valid_and_verified(tmp_path):
    """config/apppass.example.yaml documents the PostgreSQL store in comments: uncommented,
    it must load, and it must not be warned about."""
    from pathlib import Path

    text = (Path(__file__).parents[2] / "config" / "apppass.example.yaml").read_text()
    lines = text.splitlines()
    start = lines.index("  # postgresql:")
    block = []
    for line in lines[start:]:
        if not line.startswith("  #"):
            break
        block.append(line.replace("  # ", "  ", 1))
    section = yaml.safe_load("\n".join(block))["postgresql"]
    section["password_file"] = "db-password"
    s = load(tmp_path, {"postgresql": section})
    assert s.store.postgresql.sslmode == "verify-full" and clear_text_warnings(s) == []

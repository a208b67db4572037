"""The code store's contract (tests/support/store_contract.py) on real SQLite files, and what only
the SQLite store has: its file, PRAGMA user_version. PostgreSQL runs the same contract in
tests/integration/test_store_postgres.py."""

import sqlite3

import pytest

from proxy.codes.sqlite import SqliteCodeStore
from proxy.codes.store import Claim, StoreUnavailable
from proxy.config import StoreSettings
from tests.support.store_contract import NOW, SCHEMA_VERSION, StoreContract, new, use


class TestSqliteStore(StoreContract):
    @pytest.fixture
    def store_settings(self, tmp_path):
        return StoreSettings("sqlite", tmp_path / "codes.db")


def test_a_store_of_the_first_schema_is_migrated_keeping_its_codes(tmp_path):
    from proxy.codes.sqlite import MIGRATIONS

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        old.execute(statement)
    old.execute("PRAGMA user_version=1")
    old.execute(
        "INSERT INTO codes (account_key, account_login, label, selector, hash, scopes,"
        " created_at, max_uses, created_by) VALUES ('k', 'alice', 'phone', 'AbCd', 'h',"
        " ',imap,', 0, 1, 'cli')"
    )
    old.commit()
    old.close()
    s = SqliteCodeStore(path)
    (rec,) = s.list()
    assert s.version() == SCHEMA_VERSION and use(s, rec) == "ok" and use(s, rec) == Claim.USED_UP
    s.close()


def test_store_refuses_a_schema_newer_than_itself(tmp_path):
    s = SqliteCodeStore(tmp_path / "m.db")
    s.run("PRAGMA user_version=99")
    with pytest.raises(StoreUnavailable, match="newer than this apppass"):
        s.migrate()
    s.close()


def test_a_store_that_is_not_a_database_is_unavailable_not_a_crash(tmp_path):
    path = tmp_path / "codes.db"
    s = SqliteCodeStore(path)
    rec = s.create(new(), cap=25, now=NOW)
    s.close()
    path.write_bytes(b"this is not an SQLite database" * 200)
    broken = SqliteCodeStore(path, migrate=False)
    with pytest.raises(StoreUnavailable):
        broken.get(rec.id)
    broken.close()

"""The code store on a real PostgreSQL (tests/servers/postgres.py): the same contract as SQLite
(tests/support/store_contract.py), the same schema, and what a shared database on the network
adds: nodes migrating at once, and a database that is down, read-only or slow giving temporary
failures in bounded time, never a grant, and working again by itself."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import timedelta

import pytest

from proxy.codes.open import open_store
from proxy.codes.pgschema import MIGRATIONS as PG_MIGRATIONS
from proxy.codes.pgschema import VERSION_TABLE
from proxy.codes.postgres import PostgresCodeStore
from proxy.codes.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from proxy.codes.store import Claim, Reservation, StoreUnavailable
from tests.servers.common import wait_until
from tests.servers.postgres import APP_PASSWORD, APP_ROLE
from tests.support.store_contract import NOW, SCHEMA_VERSION, StoreContract, new, use

pytestmark = pytest.mark.integration

# The store settings of these tests (tests/servers/postgres.py): connect_timeout 2 s,
# statement_timeout 2 s. A call must end within both, plus scheduling slack.
WORST_CALL = 2.0 + 2.0 + 1.5
# How long a database that came back may take to serve the same store object again (the pool
# reconnects with backoff: 1 s, then doubling, with jitter).
RECOVERY = 30.0


class TestPostgresStore(StoreContract):
    @pytest.fixture
    def store_settings(self, pg_database):
        return pg_database.store_settings()


# -- the schema --------------------------------------------------------------------------------


def _sqlite_columns() -> dict[str, list[str]]:
    db = sqlite3.connect(":memory:")
    for step in SQLITE_MIGRATIONS:
        for statement in step:
            db.execute(statement)
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {
        t: [c[1] for c in db.execute(f"PRAGMA table_info({t})")]
        for t in tables
        if t != "sqlite_sequence"
    }


def test_the_schema_has_sqlites_tables_and_columns(pg_database):
    store = PostgresCodeStore(pg_database.settings())
    store.close()
    with pg_database.admin() as conn:
        rows = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name <> 'schema_version'"
            " ORDER BY table_name, ordinal_position"
        ).fetchall()
    columns: dict[str, list[str]] = {}
    for table, column in rows:
        columns.setdefault(table, []).append(column)
    assert columns == _sqlite_columns()
    assert len(PG_MIGRATIONS) == len(SQLITE_MIGRATIONS) == SCHEMA_VERSION


def test_a_store_of_the_first_schema_is_migrated_keeping_its_codes(pg_database):
    with pg_database.admin() as conn:
        conn.execute(f"SET ROLE {APP_ROLE}")  # the tables are the store's role's, as its own
        conn.execute(VERSION_TABLE)
        for statement in PG_MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (1, 0)")
        conn.execute(
            "INSERT INTO codes (account_key, account_login, label, selector, hash, scopes,"
            " created_at, max_uses, created_by) VALUES ('k', 'alice', 'phone', 'AbCd', 'h',"
            " '{imap}', 0, 1, 'cli')"
        )
    store = PostgresCodeStore(pg_database.settings())
    try:
        (rec,) = store.list()
        assert store.version() == SCHEMA_VERSION
        assert use(store, rec) == "ok" and use(store, rec) == Claim.USED_UP
    finally:
        store.close()


def test_store_refuses_a_schema_newer_than_itself(pg_database):
    store = PostgresCodeStore(pg_database.settings())
    store.run("INSERT INTO schema_version VALUES (99, 0)")
    with pytest.raises(StoreUnavailable, match="newer than this apppass"):
        store.migrate()
    store.close()
    with pytest.raises(StoreUnavailable, match="newer than this apppass"):
        PostgresCodeStore(pg_database.settings())


def test_nodes_starting_at_once_migrate_the_schema_once(pg_database):
    settings = pg_database.store_settings()
    barrier = threading.Barrier(6)
    opened, failed = [], []

    def start_node():
        barrier.wait()
        try:
            opened.append(open_store(settings))
        except Exception as exc:
            failed.append(exc)

    nodes = [threading.Thread(target=start_node) for _ in range(6)]
    for node in nodes:
        node.start()
    for node in nodes:
        node.join()
    for store in opened:
        store.close()
    assert failed == [] and len(opened) == 6
    with pg_database.admin() as conn:
        applied = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
    assert applied == list(range(1, SCHEMA_VERSION + 1))


def test_a_node_starts_on_a_read_only_database_whose_schema_is_current(pg_database):
    """Migrating a current schema writes nothing: a node can start on a replica (and refuse
    writes as temporary until it is promoted)."""
    PostgresCodeStore(pg_database.settings()).close()
    with pg_database.admin() as conn:
        conn.execute(f"ALTER DATABASE {pg_database.name} SET default_transaction_read_only = on")
    store = PostgresCodeStore(pg_database.settings())
    try:
        assert store.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)
    finally:
        store.close()


def test_a_change_committed_late_is_not_skipped_by_readers(pg_database):
    """Two revocations on two nodes: the one that took its change id first commits last. A
    reader must not move past its id before it is visible (it would never end those sessions
    early): the second writer waits for the first."""
    store = PostgresCodeStore(pg_database.settings())
    first = store.create(new("AAAA"), cap=25, now=NOW)
    second = store.create(new("BBBB"), cap=25, now=NOW)
    last, _ = store.changes_since(None)
    other_node = PostgresCodeStore(pg_database.settings(), migrate=False)
    with pg_database.admin() as slow_node:
        slow_node.execute(f"SET ROLE {APP_ROLE}")
        slow_node.execute("BEGIN")
        slow_node.execute("UPDATE codes SET revoked_at = 1 WHERE id = %s", (first.id,))
        revoking = threading.Thread(target=other_node.revoke, args=(second.id,))
        revoking.start()
        wait_until(  # the other node's revoke waits (for the first one's lock)
            lambda: (
                store.run(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                ).fetchone()[0]
                == 1
            ),
            10,
            "the second revocation to wait",
        )
        seen_early = store.changes_since(last)
        slow_node.execute("COMMIT")
        revoking.join(10)
    other_node.close()
    assert seen_early == (last, [])
    assert store.changes_since(last)[1] == [first.id, second.id]
    store.close()


# -- trouble: never a grant, never a hang, back by itself --------------------------------------


def _timed(call):
    began = time.monotonic()
    try:
        return call(), time.monotonic() - began
    except StoreUnavailable as exc:
        return exc, time.monotonic() - began


def _claims_again(store, code_id: int):
    """Poll (with a deadline) until a claim of this code succeeds on this same store object."""

    def works():
        try:
            held = store.claim(code_id, "imap", "10.0.0.1")
        except StoreUnavailable:
            return None
        return held if isinstance(held, Reservation) else None

    return wait_until(works, RECOVERY, "the store to work again", interval=0.2)


def _logs_in_again(store, code_id: int) -> None:
    """Poll (with a deadline) until a whole login (claim, then confirm) succeeds on this store."""

    def works():
        try:
            held = store.claim(code_id, "imap", "10.0.0.1")
            if not isinstance(held, Reservation):
                return False
        except StoreUnavailable:
            return False
        try:
            return store.confirm(held, "imap", "10.0.0.1")
        except StoreUnavailable:
            try:
                store.release(held)  # as the proxy does; else the hold lapses by itself
            except StoreUnavailable:
                pass
            return False

    wait_until(works, RECOVERY, "logins to work again", interval=0.2)


def test_a_database_stopped_under_load_refuses_promptly_and_the_same_store_recovers(
    postgres, pg_database
):
    store = PostgresCodeStore(pg_database.settings())
    rec = store.create(new(max_uses=100_000), cap=25, now=NOW)
    outcomes: list[tuple[float, str, float, str]] = []  # (start, outcome, seconds, message)
    lock = threading.Lock()
    stop = threading.Event()

    def login() -> tuple[str, str]:
        try:
            held = store.claim(rec.id, "imap", "10.0.0.1")
        except StoreUnavailable as exc:
            return "unavailable", str(exc)
        if not isinstance(held, Reservation):
            return str(held), ""
        try:
            return ("ok" if store.confirm(held, "imap", "10.0.0.1") else "unconfirmed"), ""
        except StoreUnavailable as exc:  # the commit's fate is unknown: counted, or not
            return "confirm unavailable", str(exc)

    def load():
        while not stop.is_set():
            began = time.monotonic()
            outcome, message = login()
            with lock:
                outcomes.append((began, outcome, time.monotonic() - began, message))

    workers = [threading.Thread(target=load) for _ in range(6)]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: len(outcomes) > 50, 10, "logins before the stop")
        postgres.stop()
        stopped = time.monotonic()
        wait_until(
            lambda: sum(o[0] > stopped for o in outcomes) >= 12,
            30,
            "logins while the database is down",
        )
        down = [o for o in list(outcomes) if o[0] > stopped]
    finally:
        if not postgres.running:
            postgres.start()
    try:
        restarted = time.monotonic()
        wait_until(
            lambda: any(o[0] > restarted and o[1] == "ok" for o in outcomes),
            RECOVERY,
            "logins to work again on the same store",
        )
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    store.close()
    # While it was down: every login refused as temporary, each within its bound, no secret.
    assert {o[1] for o in down} == {"unavailable"}
    assert max(o[2] for o in down) < WORST_CALL
    assert not any(APP_PASSWORD in o[3] for o in outcomes)
    # No use lost or counted twice: each "ok" is one use; a confirm cut off by the stop may or
    # may not have committed (its session did not start).
    check = PostgresCodeStore(pg_database.settings(), migrate=False)
    counted = check.get(rec.id).use_count
    check.close()
    ok = sum(o[1] == "ok" for o in outcomes)
    uncertain = sum(o[1] == "confirm unavailable" for o in outcomes)
    assert ok <= counted <= ok + uncertain


def test_a_read_only_database_refuses_writes_and_recovers_when_writable(postgres, pg_database):
    """A replica after a failover, or `default_transaction_read_only`: writes (and so every
    claim, which locks the code) fail as temporary; reads still work; a connection that met
    the read-only database is replaced, so the store writes again once the database does."""
    store = PostgresCodeStore(pg_database.settings())
    rec = store.create(new(max_uses=5), cap=25, now=NOW)
    unlimited = store.create(new("BBBB"), cap=25, now=NOW)
    with postgres.admin() as conn:  # not from the database itself: it turns read-only
        conn.execute(f"ALTER DATABASE {pg_database.name} SET default_transaction_read_only = on")
        conn.execute(  # the failover: the old primary's sessions are gone
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (pg_database.name,),
        )
    try:
        writes = {
            "claim": lambda: store.claim(rec.id, "imap", "10.0.0.1"),
            "claim of a code without max_uses": lambda: store.claim(
                unlimited.id, "imap", "10.0.0.1"
            ),
            "create": lambda: store.create(new("CCCC"), cap=25),
            "revoke": lambda: store.revoke(rec.id),
            "record_failure": lambda: store.record_failure(rec.id, "10.0.0.1"),
        }
        for name, write in writes.items():
            said = []
            while not said or "read-only" not in said[-1]:  # pooled connections that were
                assert len(said) <= 5, (name, said)  # terminated fail first
                result, took = _timed(write)
                assert isinstance(result, StoreUnavailable), (name, result)
                assert took < WORST_CALL
                said.append(str(result))
        assert store.get(rec.id).use_count == 0  # reads still work
    finally:
        with postgres.admin() as conn:
            conn.execute(f"ALTER DATABASE {pg_database.name} RESET default_transaction_read_only")
    assert store.get(rec.id).revoked_at is None
    _logs_in_again(store, rec.id)
    assert store.get(rec.id).use_count == 1  # nothing was counted while read-only
    store.close()


def test_after_a_read_only_answer_every_pooled_connection_is_replaced(postgres, pg_database):
    """Connections opened while the database was read-only stay so (the old primary after a
    failover, a session's read-only default): the first refused write replaces them all, so
    one login is refused, not one per pooled connection."""
    PostgresCodeStore(pg_database.settings()).close()  # the schema
    with postgres.admin() as conn:
        conn.execute(f"ALTER DATABASE {pg_database.name} SET default_transaction_read_only = on")
    store = PostgresCodeStore(pg_database.settings(pool_min=4, pool_max=4))
    wait_until(
        lambda: store.pool._pool.get_stats()["pool_available"] == 4,
        10,
        "four read-only connections in the pool",
    )
    with postgres.admin() as conn:
        conn.execute(f"ALTER DATABASE {pg_database.name} RESET default_transaction_read_only")
    refused = 0
    while True:
        try:
            store.record_failure(1, "10.0.0.1")  # a write
            break
        except StoreUnavailable as exc:
            assert "read-only" in str(exc)
            refused += 1
            assert refused < 10
    store.close()
    assert refused == 1


def test_a_node_on_a_hot_standby_reads_refuses_writes_and_writes_once_it_is_promoted(
    postgres, pg_database
):
    """A real replica (pg_basebackup, streaming): a node starts on it (the schema is current),
    reads, refuses every write as temporary; after the failover (promotion) the same store
    object writes, with no restart."""
    primary = PostgresCodeStore(pg_database.settings())
    rec = primary.create(new(max_uses=5), cap=25, now=NOW)
    primary.close()
    standby = postgres.standby()
    try:
        store = PostgresCodeStore(standby.settings(pg_database.name))
        assert store.get(rec.id) == rec
        for write in (
            lambda: store.claim(rec.id, "imap", "10.0.0.1"),
            lambda: store.create(new("CCCC"), cap=25),
            lambda: store.revoke(rec.id),
        ):
            result, took = _timed(write)
            assert isinstance(result, StoreUnavailable) and "read-only" in str(result)
            assert took < WORST_CALL
        standby.promote()
        _logs_in_again(store, rec.id)
        assert store.get(rec.id).use_count == 1
        store.close()
    finally:
        standby.cleanup()


def test_a_slow_database_refuses_within_the_statement_timeout(pg_database):
    """A code whose row another transaction keeps locked: the claim waits for it only until
    statement_timeout, then is refused as temporary."""
    store = PostgresCodeStore(pg_database.settings())
    rec = store.create(new(max_uses=5), cap=25, now=NOW)
    with pg_database.admin() as blocker:
        blocker.execute("BEGIN")
        blocker.execute("SELECT * FROM codes WHERE id = %s FOR UPDATE", (rec.id,))
        result, took = _timed(lambda: store.claim(rec.id, "imap", "10.0.0.1"))
        blocker.execute("ROLLBACK")
    assert isinstance(result, StoreUnavailable) and "statement timeout" in str(result)
    assert 1.5 < took < WORST_CALL
    assert isinstance(store.claim(rec.id, "imap", "10.0.0.1"), Reservation)
    store.close()


def test_a_database_that_stops_answering_is_cut_off_and_the_store_recovers(postgres, pg_database):
    """SIGSTOP: the kernel still accepts and acknowledges, nothing answers, and the server's
    own statement_timeout cannot fire. The watchdog ends the call; new connections time out."""
    store = PostgresCodeStore(pg_database.settings(pool_min=1, pool_max=1))
    rec = store.create(new(), cap=25, now=NOW)
    postgres.pause()
    try:
        first, took_first = _timed(lambda: store.claim(rec.id, "imap", "10.0.0.1"))
        second, took_second = _timed(lambda: store.claim(rec.id, "imap", "10.0.0.1"))
    finally:
        postgres.resume()
    assert isinstance(first, StoreUnavailable) and isinstance(second, StoreUnavailable)
    assert took_first < WORST_CALL and took_second < WORST_CALL
    assert store.pool.watchdog.fired == 1
    _claims_again(store, rec.id)
    store.close()


def test_the_password_is_never_shown(pg_database):
    settings = pg_database.settings(password="Wrong-" + APP_PASSWORD)
    assert APP_PASSWORD not in repr(settings) and APP_PASSWORD not in repr(
        pg_database.store_settings()
    )
    with pytest.raises(StoreUnavailable) as refused:
        PostgresCodeStore(settings)
    assert "password authentication failed" in str(refused.value)
    assert APP_PASSWORD not in str(refused.value)


def test_statements_run_with_the_configured_timeout_and_name(pg_database):
    store = PostgresCodeStore(
        pg_database.settings(statement_timeout=timedelta(seconds=3), pool_max=1)
    )
    row = store.run(
        "SELECT current_setting('statement_timeout'), current_setting('application_name')"
    ).fetchone()
    assert (row[0], row[1]) == ("3s", "apppass")
    store.close()


def test_a_row_reads_by_name_and_position_and_never_shows_its_values(pg_database):
    store = PostgresCodeStore(pg_database.settings())
    rec = store.create(new(), cap=25, now=NOW)
    row = store.run("SELECT id, hash FROM codes WHERE id = ?", (rec.id,)).fetchone()
    assert row["id"] == row[0] == rec.id and list(row) == [rec.id, "$argon2id$fake"]
    assert "argon2" not in repr(row)
    store.close()

"""The code store's operations on real SQLite files (every backend must pass these)."""

import sqlite3
import threading
from datetime import UTC, datetime, timedelta

import pytest

from proxy.codes.sqlite import SqliteCodeStore
from proxy.codes.store import (
    RESERVATION_SECONDS,
    CapReached,
    Claim,
    NewCode,
    Reservation,
    State,
    StoreUnavailable,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path):
    s = SqliteCodeStore(tmp_path / "codes.db")
    yield s
    s.close()


def new(selector="AbCd", account="acct-1", **kw):
    fields = {
        "account_key": account,
        "account_login": "alice",
        "label": "phone",
        "selector": selector,
        "hash": "$argon2id$fake",
        "scopes": ("imap", "smtp"),
    }
    fields.update(kw)
    return NewCode(**fields)


def test_create_then_get_returns_the_full_record(store):
    rec = store.create(
        new(networks=("10.0.0.0/8",), max_uses=3, expires_at=NOW + timedelta(days=1)),
        cap=25,
        now=NOW,
    )
    got = store.get(rec.id)
    assert got == rec
    assert (got.account_key, got.label, got.selector, got.scopes) == (
        "acct-1",
        "phone",
        "AbCd",
        ("imap", "smtp"),
    )
    assert got.networks == ("10.0.0.0/8",) and got.max_uses == 3 and got.use_count == 0
    assert got.created_at == NOW and got.expires_at == NOW + timedelta(days=1)
    assert got.state(NOW) == State.ACTIVE


def test_find_by_account_and_selector(store):
    rec = store.create(new(), cap=25, now=NOW)
    assert store.find("acct-1", "AbCd") == rec
    assert store.find("acct-2", "AbCd") is None
    assert store.find("acct-1", "abcd") is None  # selectors are case-sensitive


def test_cap_counts_live_codes_only(store):
    a = store.create(new("AAAA"), cap=2, now=NOW)
    store.create(new("BBBB"), cap=2, now=NOW)
    with pytest.raises(CapReached):
        store.create(new("CCCC"), cap=2, now=NOW)
    store.revoke(a.id, now=NOW)
    store.create(new("CCCC"), cap=2, now=NOW)


def use(store, rec, protocol="imap", ip="10.0.0.1", now=NOW, **kw):
    """A whole login: claim, then confirm as after a successful upstream login."""
    held = store.claim(rec.id, protocol, ip, now=now, **kw)
    if isinstance(held, Reservation):
        assert store.confirm(held, protocol, ip, now=now)
        return "ok"
    return held


def test_confirm_counts_the_use_and_records_where_from(store):
    rec = store.create(new(), cap=25, now=NOW)
    held = store.claim(rec.id, "imap", "192.0.2.7", now=NOW + timedelta(minutes=1))
    assert held == Reservation(rec.id) and store.get(rec.id).use_count == 0
    assert store.confirm(held, "imap", "192.0.2.7", now=NOW + timedelta(minutes=1))
    got = store.get(rec.id)
    assert got.use_count == 1
    assert (got.last_used_at, got.last_used_ip, got.last_used_protocol) == (
        NOW + timedelta(minutes=1),
        "192.0.2.7",
        "imap",
    )


@pytest.mark.parametrize(
    "change,protocol,ip,expected",
    [
        (lambda s, r: s.revoke(r.id, now=NOW), "imap", "10.1.1.1", Claim.REVOKED),
        (lambda s, r: s.set_disabled(r.id, True), "imap", "10.1.1.1", Claim.DISABLED),
        (None, "pop3", "10.1.1.1", Claim.SCOPE),
        (None, "imap", "192.0.2.1", Claim.NETWORK),
        (None, "imap", "not-an-ip", Claim.NETWORK),
    ],
)
def test_claim_refusals_say_why(store, change, protocol, ip, expected):
    rec = store.create(new(networks=("10.0.0.0/8",)), cap=25, now=NOW)
    if change:
        change(store, rec)
    assert use(store, rec, protocol, ip) == expected
    assert store.get(rec.id).use_count == 0


def test_claim_after_expiry_is_refused(store):
    rec = store.create(new(expires_at=NOW + timedelta(hours=1)), cap=25, now=NOW)
    assert use(store, rec, now=NOW + timedelta(minutes=59)) == "ok"
    assert use(store, rec, now=NOW + timedelta(hours=1)) == Claim.EXPIRED


def test_claim_stops_at_max_uses(store):
    rec = store.create(new(max_uses=2), cap=25, now=NOW)
    assert [use(store, rec, "smtp") for _ in range(3)] == ["ok", "ok", Claim.USED_UP]
    assert store.get(rec.id).use_count == 2
    assert store.get(rec.id).state(NOW) == State.USED_UP


def test_claim_refuses_codes_created_before_a_password_change(store):
    rec = store.create(new(), cap=25, now=NOW)
    assert use(store, rec, not_before=NOW + timedelta(seconds=1)) == Claim.SUPERSEDED
    assert use(store, rec, not_before=NOW) == "ok"


def test_ipv4_mapped_ipv6_client_matches_ipv4_network(store):
    rec = store.create(new(networks=("10.0.0.0/8",)), cap=25, now=NOW)
    assert use(store, rec, ip="::ffff:10.2.3.4") == "ok"


def test_disable_enable_and_revoked_codes_stay_revoked(store):
    rec = store.create(new(), cap=25, now=NOW)
    assert store.set_disabled(rec.id, True)
    assert store.get(rec.id).state(NOW) == State.DISABLED
    assert store.set_disabled(rec.id, False)
    assert store.revoke(rec.id, now=NOW)
    assert not store.revoke(rec.id, now=NOW)
    assert not store.set_disabled(rec.id, False)
    assert store.get(rec.id).state(NOW) == State.REVOKED


def test_revoke_all_revokes_only_that_accounts_live_codes(store):
    store.create(new("AAAA"), cap=25, now=NOW)
    store.create(new("BBBB"), cap=25, now=NOW)
    other = store.create(new("AAAA", account="acct-2"), cap=25, now=NOW)
    assert store.revoke_all("acct-1", now=NOW) == 2
    assert store.revoke_all("acct-1", now=NOW) == 0
    assert store.get(other.id).revoked_at is None


def test_list_hides_dead_codes_unless_asked(store):
    live = store.create(new("AAAA"), cap=25, now=NOW)
    dead = store.create(new("BBBB"), cap=25, now=NOW)
    store.revoke(dead.id, now=NOW)
    assert [r.id for r in store.list("acct-1", now=NOW)] == [live.id]
    assert [r.id for r in store.list("acct-1", include_inactive=True, now=NOW)] == [
        live.id,
        dead.id,
    ]
    assert store.list("acct-9", include_inactive=True) == []


def test_purge_deletes_only_old_tombstones(store):
    old = store.create(new("AAAA"), cap=25, now=NOW - timedelta(days=60))
    store.revoke(old.id, now=NOW - timedelta(days=40))
    recent = store.create(new("BBBB"), cap=25, now=NOW)
    store.revoke(recent.id, now=NOW)
    expired = store.create(
        new("CCCC", expires_at=NOW - timedelta(days=31)), cap=25, now=NOW - timedelta(days=90)
    )
    live = store.create(new("DDDD"), cap=25, now=NOW - timedelta(days=90))
    assert store.purge(NOW - timedelta(days=30)) == 2
    assert store.get(old.id) is None and store.get(expired.id) is None
    assert store.get(recent.id) is not None and store.get(live.id) is not None


def test_record_failure_counts_wrong_secrets(store):
    rec = store.create(new(), cap=25, now=NOW)
    store.record_failure(rec.id, "192.0.2.9", now=NOW)
    store.record_failure(rec.id, "192.0.2.9", now=NOW)
    got = store.get(rec.id)
    assert got.failed_count == 2 and got.last_failed_at == NOW


def test_migrate_is_idempotent_and_versioned(tmp_path):
    s = SqliteCodeStore(tmp_path / "m.db")
    assert s.migrate() == (4, 4)
    assert s.version() == 4
    s.close()


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
    assert s.version() == 4 and use(s, rec) == "ok" and use(s, rec) == Claim.USED_UP
    s.close()


def test_store_refuses_a_schema_newer_than_itself(tmp_path):
    s = SqliteCodeStore(tmp_path / "m.db")
    s.run("PRAGMA user_version=99")
    with pytest.raises(StoreUnavailable, match="newer than this apppass"):
        s.migrate()
    s.close()


def test_fifty_threads_racing_for_a_code_with_ten_uses_get_exactly_ten(tmp_path):
    path = tmp_path / "race.db"
    setup = SqliteCodeStore(path)
    rec = setup.create(new(max_uses=10), cap=25, now=NOW)
    barrier = threading.Barrier(50)
    results = []
    lock = threading.Lock()

    def worker():
        store = SqliteCodeStore(path, migrate=False)  # its own connection, as another process would
        barrier.wait()
        outcome = use(store, rec, now=None)
        with lock:
            results.append(outcome)
        store.close()

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 10
    assert results.count(Claim.USED_UP) == 40
    assert setup.get(rec.id).use_count == 10
    setup.close()


def test_a_claim_counts_nothing_until_confirmed_and_release_gives_the_use_back(store):
    rec = store.create(new(max_uses=1), cap=25, now=NOW)
    held = store.claim(rec.id, "imap", "10.0.0.1", now=NOW)
    assert isinstance(held, Reservation) and held.token is not None
    assert store.get(rec.id).use_count == 0
    # While the first login is still logging in upstream, its place is taken.
    assert store.claim(rec.id, "imap", "10.0.0.2", now=NOW) == Claim.USED_UP
    store.release(held)  # the upstream was down: the one-shot code is not spent
    assert store.get(rec.id).use_count == 0
    assert use(store, rec) == "ok"
    assert store.get(rec.id).use_count == 1
    assert use(store, rec) == Claim.USED_UP


def test_a_hold_left_by_a_proxy_that_died_lapses_by_itself(store):
    rec = store.create(new(max_uses=1), cap=25, now=NOW)
    assert isinstance(store.claim(rec.id, "imap", "10.0.0.1", now=NOW), Reservation)
    later = NOW + timedelta(seconds=RESERVATION_SECONDS)
    assert store.claim(rec.id, "imap", "10.0.0.1", now=later - timedelta(seconds=1)) == (
        Claim.USED_UP
    )
    assert use(store, rec, now=later) == "ok"


def test_confirm_refuses_a_code_revoked_while_its_login_ran(store):
    rec = store.create(new(), cap=25, now=NOW)
    held = store.claim(rec.id, "imap", "10.0.0.1", now=NOW)
    store.revoke(rec.id, now=NOW)
    assert not store.confirm(held, "imap", "10.0.0.1", now=NOW)
    assert store.get(rec.id).use_count == 0


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


def test_changes_made_by_any_writer_are_seen_by_readers(tmp_path):
    path = tmp_path / "codes.db"
    proxy_side = SqliteCodeStore(path)
    cli_side = SqliteCodeStore(path, migrate=False)  # another process, as the CLI is
    a = cli_side.create(new("AAAA"), cap=25, now=NOW)
    b = cli_side.create(new("BBBB"), cap=25, now=NOW)
    last, changed = proxy_side.changes_since(None)
    assert changed == []
    assert proxy_side.changes_since(last) == (last, [])
    cli_side.set_disabled(a.id, True)
    cli_side.revoke(b.id)
    cli_side.revoke(b.id)  # already revoked: no change
    last, changed = proxy_side.changes_since(last)
    assert changed == [a.id, b.id]
    cli_side.set_disabled(a.id, False)
    assert proxy_side.changes_since(last)[1] == [a.id]
    proxy_side.close()
    cli_side.close()

"""The code store's contract: what every backend does (docs/architecture.md, "Adding a directory
or a store"). `StoreContract` holds the tests; a backend's test module subclasses it and gives the
fixture `store_settings` (a StoreSettings opening a fresh, empty store):
tests/unit/test_store.py runs it on SQLite files, tests/integration/test_store_postgres.py on a
real PostgreSQL. Stores are opened as the proxy opens them (proxy/codes/open.py), migrated.
"""

from __future__ import annotations

import multiprocessing
import threading
from datetime import UTC, datetime, timedelta

import pytest

from proxy.codes.open import open_store
from proxy.codes.sending import SendingPolicy
from proxy.codes.store import (
    RESERVATION_SECONDS,
    CapReached,
    Claim,
    NewCode,
    Reservation,
    State,
    day_of,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)

# The schema version both stores' migrations reach (SQLite's PRAGMA user_version, PostgreSQL's
# schema_version): a step added to one store must be added to the other.
SCHEMA_VERSION = 7

# Bounds for the cross-process race: the children start a Python each and open a store.
PROCESS_DEADLINE = 120.0


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


def use(store, rec, protocol="imap", ip="10.0.0.1", now=NOW, **kw):
    """A whole login: claim, then confirm as after a successful upstream login."""
    held = store.claim(rec.id, protocol, ip, now=now, **kw)
    if isinstance(held, Reservation):
        assert store.confirm(held, protocol, ip, now=now)
        return "ok"
    return held


def race(store, code_id: int, threads: int) -> list[str]:
    """`threads` logins at once with one code on one store object: each outcome."""
    barrier = threading.Barrier(threads)
    outcomes: list[str] = []
    lock = threading.Lock()

    def login():
        barrier.wait()
        held = store.claim(code_id, "imap", "10.0.0.1")
        if isinstance(held, Reservation):
            outcome = "ok" if store.confirm(held, "imap", "10.0.0.1") else "unconfirmed"
        else:
            outcome = str(held)
        with lock:
            outcomes.append(outcome)

    workers = [threading.Thread(target=login) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return outcomes


def race_in_process(settings, code_id, threads, ready, start, results) -> None:
    """A child process (a second node): its own store, then `threads` logins once told to go."""
    store = open_store(settings)
    try:
        ready.put(True)
        if not start.wait(PROCESS_DEADLINE):
            results.put(["never started"])
            return
        results.put(race(store, code_id, threads))
    finally:
        store.close()


class StoreContract:
    """Every backend passes these. Subclasses give `store_settings`."""

    @pytest.fixture
    def store(self, store_settings):
        s = open_store(store_settings)
        yield s
        s.close()

    @pytest.fixture
    def reopen(self, store_settings):
        """Another store object on the same database: another process or node would have it."""
        made = []

        def make():
            s = open_store(store_settings)
            made.append(s)
            return s

        yield make
        for s in made:
            s.close()

    def test_create_then_get_returns_the_full_record(self, store):
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

    def test_find_by_account_and_selector(self, store):
        rec = store.create(new(), cap=25, now=NOW)
        assert store.find("acct-1", "AbCd") == rec
        assert store.find("acct-2", "AbCd") is None
        assert store.find("acct-1", "abcd") is None  # selectors are case-sensitive

    def test_cap_counts_live_codes_only(self, store):
        a = store.create(new("AAAA"), cap=2, now=NOW)
        store.create(new("BBBB"), cap=2, now=NOW)
        with pytest.raises(CapReached):
            store.create(new("CCCC"), cap=2, now=NOW)
        store.revoke(a.id, now=NOW)
        store.create(new("CCCC"), cap=2, now=NOW)

    def test_confirm_counts_the_use_and_records_where_from(self, store):
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
    def test_claim_refusals_say_why(self, store, change, protocol, ip, expected):
        rec = store.create(new(networks=("10.0.0.0/8",)), cap=25, now=NOW)
        if change:
            change(store, rec)
        assert use(store, rec, protocol, ip) == expected
        assert store.get(rec.id).use_count == 0

    def test_claim_after_expiry_is_refused(self, store):
        rec = store.create(new(expires_at=NOW + timedelta(hours=1)), cap=25, now=NOW)
        assert use(store, rec, now=NOW + timedelta(minutes=59)) == "ok"
        assert use(store, rec, now=NOW + timedelta(hours=1)) == Claim.EXPIRED

    def test_claim_stops_at_max_uses(self, store):
        rec = store.create(new(max_uses=2), cap=25, now=NOW)
        assert [use(store, rec, "smtp") for _ in range(3)] == ["ok", "ok", Claim.USED_UP]
        assert store.get(rec.id).use_count == 2
        assert store.get(rec.id).state(NOW) == State.USED_UP

    def test_claim_refuses_codes_created_before_a_password_change(self, store):
        rec = store.create(new(), cap=25, now=NOW)
        assert use(store, rec, not_before=NOW + timedelta(seconds=1)) == Claim.SUPERSEDED
        assert use(store, rec, not_before=NOW) == "ok"

    def test_ipv4_mapped_ipv6_client_matches_ipv4_network(self, store):
        rec = store.create(new(networks=("10.0.0.0/8",)), cap=25, now=NOW)
        assert use(store, rec, ip="::ffff:10.2.3.4") == "ok"

    def test_disable_enable_and_revoked_codes_stay_revoked(self, store):
        rec = store.create(new(), cap=25, now=NOW)
        assert store.set_disabled(rec.id, True)
        assert store.get(rec.id).state(NOW) == State.DISABLED
        assert store.set_disabled(rec.id, False)
        assert store.revoke(rec.id, now=NOW)
        assert not store.revoke(rec.id, now=NOW)
        assert not store.set_disabled(rec.id, False)
        assert store.get(rec.id).state(NOW) == State.REVOKED

    def test_revoke_all_revokes_only_that_accounts_live_codes(self, store):
        store.create(new("AAAA"), cap=25, now=NOW)
        store.create(new("BBBB"), cap=25, now=NOW)
        other = store.create(new("AAAA", account="acct-2"), cap=25, now=NOW)
        assert store.revoke_all("acct-1", now=NOW) == 2
        assert store.revoke_all("acct-1", now=NOW) == 0
        assert store.get(other.id).revoked_at is None

    def test_list_hides_dead_codes_unless_asked(self, store):
        live = store.create(new("AAAA"), cap=25, now=NOW)
        dead = store.create(new("BBBB"), cap=25, now=NOW)
        store.revoke(dead.id, now=NOW)
        assert [r.id for r in store.list("acct-1", now=NOW)] == [live.id]
        assert [r.id for r in store.list("acct-1", include_inactive=True, now=NOW)] == [
            live.id,
            dead.id,
        ]
        assert store.list("acct-9", include_inactive=True) == []

    def test_purge_deletes_only_old_tombstones(self, store):
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

    def test_record_failure_counts_wrong_secrets(self, store):
        rec = store.create(new(), cap=25, now=NOW)
        store.record_failure(rec.id, "192.0.2.9", now=NOW)
        store.record_failure(rec.id, "192.0.2.9", now=NOW)
        got = store.get(rec.id)
        assert got.failed_count == 2 and got.last_failed_at == NOW

    def test_a_claim_counts_nothing_until_confirmed_and_release_gives_the_use_back(self, store):
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

    def test_a_hold_left_by_a_proxy_that_died_lapses_by_itself(self, store):
        rec = store.create(new(max_uses=1), cap=25, now=NOW)
        assert isinstance(store.claim(rec.id, "imap", "10.0.0.1", now=NOW), Reservation)
        later = NOW + timedelta(seconds=RESERVATION_SECONDS)
        assert store.claim(rec.id, "imap", "10.0.0.1", now=later - timedelta(seconds=1)) == (
            Claim.USED_UP
        )
        assert use(store, rec, now=later) == "ok"

    def test_confirm_refuses_a_code_revoked_while_its_login_ran(self, store):
        rec = store.create(new(), cap=25, now=NOW)
        held = store.claim(rec.id, "imap", "10.0.0.1", now=NOW)
        store.revoke(rec.id, now=NOW)
        assert not store.confirm(held, "imap", "10.0.0.1", now=NOW)
        assert store.get(rec.id).use_count == 0

    def test_migrate_is_idempotent_and_versioned(self, store):
        assert store.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)
        assert store.version() == SCHEMA_VERSION

    def test_fifty_threads_racing_for_a_code_with_ten_uses_get_exactly_ten(self, store, reopen):
        rec = store.create(new(max_uses=10), cap=25, now=NOW)
        barrier = threading.Barrier(50)
        stores = [reopen() for _ in range(50)]  # each its own connection, as another process
        results = []
        lock = threading.Lock()

        def worker(own):
            barrier.wait()
            outcome = use(own, rec, now=None)
            with lock:
                results.append(outcome)

        threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count("ok") == 10, results
        assert results.count(Claim.USED_UP) == 40, results  # the reason too, however they race
        assert store.get(rec.id).use_count == 10

    def test_two_processes_racing_for_a_code_with_ten_uses_get_exactly_ten(
        self, store, store_settings
    ):
        rec = store.create(new(max_uses=10), cap=25, now=NOW)
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing shared
        ready, start, results = spawn.Queue(), spawn.Event(), spawn.Queue()
        nodes = [
            spawn.Process(
                target=race_in_process, args=(store_settings, rec.id, 25, ready, start, results)
            )
            for _ in range(2)
        ]
        for node in nodes:
            node.start()
        try:
            for _ in nodes:
                ready.get(timeout=PROCESS_DEADLINE)
            start.set()
            outcomes = [o for _ in nodes for o in results.get(timeout=PROCESS_DEADLINE)]
        finally:
            start.set()
            for node in nodes:
                node.join(PROCESS_DEADLINE)
                if node.is_alive():
                    node.kill()
        assert len(outcomes) == 50
        assert outcomes.count("ok") == 10
        assert outcomes.count(Claim.USED_UP) == 40
        assert store.get(rec.id).use_count == 10

    def test_creations_racing_for_the_last_places_under_the_cap_stop_at_the_cap(
        self, store, reopen
    ):
        store.create(new("AAAA"), cap=5, now=NOW)
        stores = [reopen() for _ in range(12)]
        barrier = threading.Barrier(len(stores))
        outcomes = []
        lock = threading.Lock()

        def create(own, n):
            barrier.wait()
            try:
                own.create(new(f"S{n:03}"), cap=5, now=NOW)
                outcome = "created"
            except CapReached:
                outcome = "cap"
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=create, args=(s, n)) for n, s in enumerate(stores)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes.count("created") == 4 and outcomes.count("cap") == 8
        assert len(store.list("acct-1")) == 5

    def test_changes_made_by_any_writer_are_seen_by_readers(self, store, reopen):
        proxy_side = store
        cli_side = reopen()  # another process, as the CLI is
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

    def test_a_new_sending_policy_is_stored_and_followed_as_a_change(self, store, reopen):
        proxy_side = store
        cli_side = reopen()
        rec = cli_side.create(new(), cap=25, now=NOW)
        last, _ = proxy_side.changes_since(None)
        printer = SendingPolicy(("scan@example.org",), ("example.org",), 20)
        assert cli_side.set_sending(rec.id, printer)
        assert proxy_side.get(rec.id).sending == printer
        last, changed = proxy_side.changes_since(last)
        assert changed == [rec.id]
        assert cli_side.set_sending(rec.id, printer)  # the same again: nothing changed
        assert proxy_side.changes_since(last) == (last, [])
        assert cli_side.set_sending(rec.id, SendingPolicy())
        assert proxy_side.get(rec.id).sending == SendingPolicy()
        last, changed = proxy_side.changes_since(last)
        assert changed == [rec.id]
        cli_side.revoke(rec.id)
        assert not cli_side.set_sending(rec.id, printer)  # a revoked code keeps what it had
        assert proxy_side.get(rec.id).sending == SendingPolicy()

    def test_a_custodian_is_changed_or_removed_until_the_code_is_revoked(self, store):
        rec = store.create(new(custodian="print-team@example.org"), cap=25, now=NOW)
        assert store.set_custodian(rec.id, "facilities@example.org")
        assert store.get(rec.id).custodian == "facilities@example.org"
        assert store.set_custodian(rec.id, None)
        assert store.get(rec.id).custodian is None
        store.revoke(rec.id)
        assert not store.set_custodian(rec.id, "late@example.org")
        assert store.get(rec.id).custodian is None

    def test_list_orders_logins_by_their_bytes_whatever_the_database_language(self, store):
        for n, login in enumerate(["alice", "Bob", "_x", "Zed", "\u00e9ric"]):
            store.create(new(account=f"acct-{n}", account_login=login), cap=25, now=NOW)
        logins = [r.account_login for r in store.list(now=NOW)]
        assert (
            logins
            == sorted(logins, key=lambda s: s.encode())
            == [
                "Bob",
                "Zed",
                "_x",
                "alice",
                "\u00e9ric",
            ]
        )

    def test_run_takes_sqlite_style_statements_on_every_store(self, store):
        """The web records and the tests write SQL once (`?`, `:name`); every store runs it."""
        rec = store.create(new(), cap=25, now=NOW)
        assert store.run("UPDATE codes SET expires_at = 1 WHERE id = ?", (rec.id,)).rowcount == 1
        row = store.run(
            "SELECT id, expires_at FROM codes WHERE id = :id", {"id": rec.id}
        ).fetchone()
        assert (row[0], row["expires_at"]) == (rec.id, 1)
        assert store.get(rec.id).state(NOW) == State.EXPIRED
        done, counted = store.transaction(
            [
                ("UPDATE codes SET label = ? WHERE id = ?", ("a 100% label", rec.id)),
                ("SELECT count(*) FROM codes WHERE label LIKE '%100%'", ()),
            ]
        )
        assert done.rowcount == 1 and counted.fetchone()[0] == 1

    # -- stale devices, the sending policy, messages per day, notices, idle codes ---------------

    def test_create_stores_the_sending_policy_and_the_custodian(self, store):
        policy = SendingPolicy(("scanner@example.org", "*@example.net"), ("example.org",), 10)
        rec = store.create(new(sending=policy, custodian="print-team@example.org"), cap=25, now=NOW)
        got = store.get(rec.id)
        assert got == rec and got.sending == policy and got.custodian == "print-team@example.org"
        plain = store.create(new("EfGh"), cap=25, now=NOW)
        assert store.get(plain.id).sending == SendingPolicy() and plain.custodian is None

    def test_tries_after_a_code_stopped_working_are_counted_with_when_and_where(self, store):
        rec = store.create(new(), cap=25, now=NOW)
        store.revoke(rec.id, now=NOW)
        for hours in (1, 2, 30):
            store.record_stale(rec.id, "10.0.4.17", now=NOW + timedelta(hours=hours))
        got = store.get(rec.id)
        assert (got.stale_count, got.stale_since, got.stale_last_at, got.stale_last_ip) == (
            3,
            NOW + timedelta(hours=1),
            NOW + timedelta(hours=30),
            "10.0.4.17",
        )
        assert got.still_retrying(NOW) == (
            "still retrying: 3 attempts since 2026-11-25 from 10.0.4.17"
        )
        assert got.failed_count == 0  # not a wrong secret

    def test_enabling_a_code_again_starts_its_stale_count_and_idle_clock_afresh(self, store):
        rec = store.create(new(), cap=25, now=NOW - timedelta(days=200))
        assert store.disable_idle(rec.id, NOW - timedelta(days=90), now=NOW)
        store.record_stale(rec.id, "10.0.4.17", now=NOW)
        assert store.get(rec.id).still_retrying(NOW) is not None
        assert store.set_disabled(rec.id, False, now=NOW + timedelta(hours=1))
        got = store.get(rec.id)
        assert (got.stale_count, got.stale_since, got.idle_disabled_at) == (0, None, None)
        assert got.enabled_at == NOW + timedelta(hours=1) and got.still_retrying(NOW) is None
        assert store.idle(NOW - timedelta(days=1), now=NOW + timedelta(days=2)) == []

    def test_purge_keeps_the_record_of_a_code_a_device_still_tries(self, store):
        tried = store.create(new("AAAA"), cap=25, now=NOW - timedelta(days=100))
        quiet = store.create(new("BBBB"), cap=25, now=NOW - timedelta(days=100))
        for rec in (tried, quiet):
            store.revoke(rec.id, now=NOW - timedelta(days=60))
        store.record_stale(quiet.id, "10.0.4.18", now=NOW - timedelta(days=45))
        store.record_stale(tried.id, "10.0.4.17", now=NOW - timedelta(days=2))
        assert store.purge(NOW - timedelta(days=30)) == 1
        assert store.get(quiet.id) is None and store.get(tried.id) is not None

    def test_a_daily_cap_holds_places_and_counts_what_was_sent_on_the_day(self, store):
        rec = store.create(new(), cap=25, now=NOW)
        day = day_of(NOW)
        held = [store.hold_message(rec.id, 3, now=NOW) for _ in range(4)]
        assert held == [day, day, day, None]  # three places, all held by messages on their way
        store.release_message(rec.id, day)  # one was not sent after all
        store.message_sent(rec.id, day)
        store.message_sent(rec.id, day)
        assert store.sent_on([rec.id], day) == {rec.id: 2}
        assert store.hold_message(rec.id, 3, now=NOW) == day
        store.message_sent(rec.id, day)
        assert store.hold_message(rec.id, 3, now=NOW) is None
        assert store.sent_on([rec.id], day) == {rec.id: 3}
        tomorrow = NOW + timedelta(days=1)
        assert store.hold_message(rec.id, 3, now=tomorrow) == day + 1
        assert store.sent_on([rec.id, 999], day + 1) == {}

    def test_threads_racing_for_the_last_messages_of_the_day_send_exactly_the_cap(
        self, store, reopen
    ):
        rec = store.create(new(), cap=25, now=NOW)
        stores = [reopen() for _ in range(30)]  # each its own connection, as another node
        barrier = threading.Barrier(len(stores))
        sent = []
        lock = threading.Lock()

        def send(own):
            barrier.wait()
            day = own.hold_message(rec.id, 10, now=NOW)
            if day is not None:
                own.message_sent(rec.id, day)
            with lock:
                sent.append(day is not None)

        threads = [threading.Thread(target=send, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sent.count(True) == 10
        assert store.sent_on([rec.id], day_of(NOW)) == {rec.id: 10}

    def test_send_refusals_are_counted_on_the_code(self, store):
        rec = store.create(new(), cap=25, now=NOW)
        store.record_send_refusals(rec.id, 3, now=NOW)
        store.record_send_refusals(rec.id, 2, now=NOW + timedelta(minutes=5))
        got = store.get(rec.id)
        assert (got.send_refused_count, got.last_send_refused_at) == (
            5,
            NOW + timedelta(minutes=5),
        )

    def test_a_notice_is_claimed_once_and_one_that_failed_may_be_claimed_again(self, store, reopen):
        rec = store.create(new(), cap=25, now=NOW)
        other_node = reopen()
        assert store.claim_notice(rec.id, "expiry-14", 123, now=NOW)
        assert not other_node.claim_notice(rec.id, "expiry-14", 123, now=NOW)
        assert other_node.claim_notice(rec.id, "expiry-3", 123, now=NOW)
        other_node.drop_notice(rec.id, "expiry-3", 123)  # sending failed
        assert store.claim_notice(rec.id, "expiry-3", 123, now=NOW)
        store.notice_sent(rec.id, "expiry-3", 123, now=NOW)
        store.drop_notice(rec.id, "expiry-3", 123)  # a sent notice stays
        assert not store.claim_notice(rec.id, "expiry-3", 123, now=NOW)
        assert store.notices(rec.id) == [("expiry-14", 123, None), ("expiry-3", 123, NOW)]

    def test_idle_codes_are_the_live_ones_unused_since_and_disabling_checks_again(self, store):
        cut = NOW - timedelta(days=90)
        never_used = store.create(new("AAAA"), cap=25, now=NOW - timedelta(days=100))
        used = store.create(new("BBBB"), cap=25, now=NOW - timedelta(days=100))
        use(store, used, now=NOW - timedelta(days=10))
        store.create(new("CCCC"), cap=25, now=NOW - timedelta(days=10))  # new
        revoked = store.create(new("DDDD"), cap=25, now=NOW - timedelta(days=100))
        store.revoke(revoked.id, now=NOW - timedelta(days=95))
        late = store.create(new("EEEE"), cap=25, now=NOW - timedelta(days=100))
        assert [r.id for r in store.idle(cut, now=NOW)] == [never_used.id, late.id]
        use(store, late, now=NOW)  # a login came after the list was read
        assert not store.disable_idle(late.id, cut, now=NOW)
        assert store.disable_idle(never_used.id, cut, now=NOW)
        assert not store.disable_idle(never_used.id, cut, now=NOW)  # once
        got = store.get(never_used.id)
        assert got.state(NOW) == State.DISABLED and got.idle_disabled_at == NOW
        assert use(store, got, now=NOW) == Claim.DISABLED

    def test_purge_drops_old_day_counts_and_the_notices_of_purged_codes(self, store):
        old = store.create(new("AAAA"), cap=25, now=NOW - timedelta(days=100))
        store.revoke(old.id, now=NOW - timedelta(days=60))
        store.claim_notice(old.id, "idle", 1, now=NOW - timedelta(days=90))
        kept = store.create(new("BBBB"), cap=25, now=NOW)
        store.claim_notice(kept.id, "expiry-14", 2, now=NOW)
        long_ago = day_of(datetime.now(UTC)) - 5
        store.message_sent(kept.id, long_ago)
        store.message_sent(kept.id, day_of(datetime.now(UTC)))
        assert store.purge(NOW - timedelta(days=30)) == 1
        assert store.notices(old.id) == [] and len(store.notices(kept.id)) == 1
        assert store.sent_on([kept.id], long_ago) == {}
        assert store.sent_on([kept.id], day_of(datetime.now(UTC))) == {kept.id: 1}

"""The Authenticator's decisions on the static directory and a real SQLite store."""

import io
import json
import threading
from datetime import UTC, datetime, timedelta

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from proxy.audit import Audit
from proxy.auth.authenticator import Authenticator
from proxy.auth.decision import Attempt, Refusal
from proxy.codes.hashing import CodeHasher
from proxy.codes.issue import issue_code
from proxy.codes.sqlite import SqliteCodeStore
from proxy.codes.store import AsyncCodeStore
from proxy.config import parse
from proxy.directory.static import StaticDirectory
from proxy.protocols import MailProtocol as Protocol

USERS = """
accounts:
  alice: {id: key-alice, aliases: [alice@example.test], groups: [legacy-mail],
    upstream: alice@example.test}
  bob: {id: key-bob, groups: [staff]}
  carol: {id: key-carol, groups: [legacy-mail]}
"""


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def env(tmp_path):
    (tmp_path / "users.yaml").write_text(USERS)
    settings = parse(
        {
            "store": {"sqlite": "codes.db"},
            "directory": {"static": "users.yaml"},
            "policy": {"legacy_group": "legacy-mail"},
            "auth": {"ip_failures_per_minute": 3, "cache_ttl": "60s"},
            "codes": {"argon2": {"memory_kib": 8192, "time_cost": 1}},
        },
        base_dir=tmp_path,
    )
    directory = StaticDirectory(settings.directory.static_file, legacy_group="legacy-mail")
    sync_store = SqliteCodeStore(settings.store.target)
    hasher = CodeHasher(settings.codes.argon2)
    hasher.start(reactor)
    store = AsyncCodeStore(sync_store, reactor)
    out = io.StringIO()
    clock = Clock()
    auth = Authenticator(settings, directory, store, hasher, Audit(out), reactor, clock=clock)

    class Env:
        pass

    e = Env()
    e.settings, e.directory, e.sync_store, e.hasher, e.auth, e.audit, e.clock = (
        settings,
        directory,
        sync_store,
        hasher,
        auth,
        out,
        clock,
    )

    def issue(login="alice", **kw):
        return issue_code(
            settings,
            directory,
            sync_store,
            hasher,
            login=login,
            label=kw.pop("label", "phone"),
            **kw,
        )

    e.issue = issue

    @defer.inlineCallbacks
    def attempt(login, secret, protocol=Protocol.IMAP, ip="192.0.2.10", upstream_ok=True):
        """A login as the frontend runs it: the decision, then (after a Grant) the use confirmed
        as after a successful upstream login, or released as after a failed one."""
        attempt = Attempt(protocol, login, secret, ip, session="s1")
        decision = yield auth.authenticate(attempt)
        if decision.ok:
            if upstream_ok:
                assert (yield defer.ensureDeferred(auth.confirm(decision, attempt)))
            else:
                auth.release(decision)
        return decision

    e.attempt = attempt
    e.events = lambda: [json.loads(line) for line in out.getvalue().splitlines()]
    yield e
    auth.stop()
    hasher.stop()
    store.stop()


@pytest_twisted.inlineCallbacks
def test_good_code_is_granted_and_counted(env):
    issued = env.issue()
    decision = yield env.attempt("alice", issued.code.grouped())
    assert decision.ok
    assert (decision.code_id, decision.upstream_identity, decision.code_label) == (
        issued.record.id,
        "alice@example.test",
        "phone",
    )
    rec = env.sync_store.get(issued.record.id)
    assert (rec.use_count, rec.last_used_ip, rec.last_used_protocol) == (1, "192.0.2.10", "imap")


@pytest_twisted.inlineCallbacks
def test_code_works_with_any_login_name_of_the_account(env):
    issued = env.issue()
    assert (yield env.attempt("ALICE@example.test", issued.code.value)).ok


@pytest_twisted.inlineCallbacks
def test_wrong_secret_is_bad_credentials_and_counted_on_the_code(env):
    issued = env.issue()
    wrong = (
        issued.code.value[:4]
        + ("A" if issued.code.value[4] != "A" else "B")
        + issued.code.value[5:]
    )
    decision = yield env.attempt("alice", wrong)
    assert (decision.ok, decision.refusal) == (False, Refusal.CREDENTIALS)
    assert env.sync_store.get(issued.record.id).failed_count == 1


@pytest.mark.parametrize(
    "login,secret,reason",
    [
        ("nobody", "AbCdEfGhJkMnPqRs", "unknown login"),
        ("alice", "short", "not an app password (wrong length or characters)"),
        ("alice", "ZZZZEfGhJkMnPqRs", "no app password with this selector"),
        ("alice\x00bob", "AbCdEfGhJkMnPqRs", "invalid login name (control characters)"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_failures_before_verification_are_only_bad_credentials(env, login, secret, reason):
    env.issue()
    decision = yield env.attempt(login, secret)
    assert (decision.refusal, decision.reason) == (Refusal.CREDENTIALS, reason)


@pytest_twisted.inlineCallbacks
def test_account_not_allowed_is_forbidden_only_after_the_code_verified(env):
    issued = env.issue(login="carol")
    env.directory.legacy_group = "nobody-group"  # carol loses the group after getting a code
    env.directory.reload()
    decision = yield env.attempt("carol", issued.code.value)
    assert decision.refusal == Refusal.FORBIDDEN
    assert decision.reason == "account not allowed legacy sign-in (not a member of legacy-mail)"
    bad = yield env.attempt("carol", issued.code.value[:4] + "x" * 12)
    assert bad.refusal == Refusal.CREDENTIALS


@pytest.mark.parametrize(
    "change,protocol,refusal,reason",
    [
        ("revoke", Protocol.IMAP, Refusal.EXPIRED, "app password {id} revoked"),
        ("disable", Protocol.IMAP, Refusal.FORBIDDEN, "app password {id} disabled"),
        (None, Protocol.POP3, Refusal.FORBIDDEN, "app password {id} not valid for pop3"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_claim_refusals_after_verification(env, change, protocol, refusal, reason):
    issued = env.issue(scopes=("imap", "smtp"))
    if change == "revoke":
        env.sync_store.revoke(issued.record.id)
    elif change == "disable":
        env.sync_store.set_disabled(issued.record.id, True)
    decision = yield env.attempt("alice", issued.code.value, protocol=protocol)
    assert (decision.refusal, decision.reason) == (refusal, reason.format(id=issued.record.id))


@pytest_twisted.inlineCallbacks
def test_expired_used_up_and_network_refusals(env):
    now = datetime.now(UTC)
    expired = env.issue(label="a", expires_at=now - timedelta(seconds=1))
    used = env.issue(label="b", max_uses=1)
    netted = env.issue(label="c", networks=("10.0.0.0/8",))
    assert (yield env.attempt("alice", expired.code.value)).refusal == Refusal.EXPIRED
    assert (yield env.attempt("alice", used.code.value)).ok
    assert (yield env.attempt("alice", used.code.value)).refusal == Refusal.EXPIRED
    assert (yield env.attempt("alice", netted.code.value)).refusal == Refusal.FORBIDDEN
    assert (yield env.attempt("alice", netted.code.value, ip="10.9.8.7")).ok


@pytest_twisted.inlineCallbacks
def test_cache_skips_argon2_but_never_the_claim(env):
    issued = env.issue()
    assert (yield env.attempt("alice", issued.code.value)).ok
    env.sync_store.revoke(issued.record.id)
    decision = yield env.attempt("alice", issued.code.value)
    assert decision.refusal == Refusal.EXPIRED


@pytest_twisted.inlineCallbacks
def test_repeated_failures_from_one_address_are_limited_then_forgotten(env):
    issued = env.issue()
    for _ in range(3):
        assert (yield env.attempt("alice", "AbCd" + "x" * 12)).refusal == Refusal.CREDENTIALS
    assert (yield env.attempt("alice", issued.code.value)).refusal == Refusal.LIMIT
    assert (
        yield env.attempt("alice", issued.code.value, ip="192.0.2.11")
    ).ok  # other clients unaffected
    env.clock.now += 61
    assert (yield env.attempt("alice", issued.code.value)).ok


@pytest_twisted.inlineCallbacks
def test_password_change_supersedes_older_codes(env, tmp_path):
    issued = env.issue()
    later = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
    env.directory.file.write_text(
        USERS.replace(
            "upstream: alice@example.test}",
            f"upstream: alice@example.test, password_changed: '{later}'}}",
        )
    )
    env.directory.reload()
    decision = yield env.attempt("alice", issued.code.value)
    assert decision.refusal == Refusal.EXPIRED
    assert "last password change" in decision.reason


@pytest_twisted.inlineCallbacks
def test_audit_has_one_event_per_decision_and_never_the_secret(env):
    issued = env.issue()
    yield env.attempt("alice", issued.code.value)
    yield env.attempt("alice", issued.code.value[:4] + "y" * 12)
    events = env.events()
    assert [(e["event"], e["result"]) for e in events] == [("auth", "grant"), ("auth", "deny")]
    assert events[0]["code"] == issued.record.id and events[0]["account"] == "key-alice"
    assert events[1]["reason"] == f"wrong secret for app password {issued.record.id}"
    text = env.audit.getvalue()
    assert issued.code.value not in text and "yyyyyyyyyyyy" not in text


@pytest_twisted.inlineCallbacks
def test_an_address_flooding_the_hash_queue_is_limited_before_the_queue_drains(env):
    from proxy.fairqueue import ClientShareFull

    env.issue()
    original = env.hasher.verify
    env.hasher.verify = lambda *a, **k: defer.fail(ClientShareFull())
    try:
        decisions = []
        for _ in range(3):
            decisions.append((yield env.attempt("alice", "AbCd" + "x" * 12)))
    finally:
        env.hasher.verify = original
    assert [d.refusal for d in decisions] == [Refusal.LIMIT] * 3
    assert env.auth.limiter.blocked("192.0.2.10", env.clock())


@pytest_twisted.inlineCallbacks
def test_a_login_whose_upstream_failed_does_not_spend_a_one_shot_code(env):
    issued = env.issue(max_uses=1)
    code = issued.code.grouped()
    first = yield env.attempt("alice", code, upstream_ok=False)
    assert first.ok
    yield env.auth.store.get(issued.record.id)  # the release has gone through the store's queue
    assert env.sync_store.get(issued.record.id).use_count == 0
    second = yield env.attempt("alice", code)
    assert second.ok and env.sync_store.get(issued.record.id).use_count == 1
    third = yield env.attempt("alice", code)
    assert not third.ok and third.refusal == Refusal.EXPIRED


@pytest_twisted.inlineCallbacks
def test_twenty_devices_behind_one_address_with_the_same_code_verify_once(env):
    issued = env.issue()
    code = issued.code.grouped()
    verifications = []
    verify = env.hasher.verify

    def counting(*args, **kwargs):
        verifications.append(1)
        return verify(*args, **kwargs)

    env.hasher.verify = counting
    decisions = yield defer.gatherResults([env.attempt("alice", code) for _ in range(20)])
    assert all(d.ok for d in decisions), [d.reason for d in decisions if not d.ok]
    assert len(verifications) == 1
    assert env.sync_store.get(issued.record.id).use_count == 20


@pytest_twisted.inlineCallbacks
def test_a_wrong_code_sent_by_many_at_once_fails_for_each_of_them(env):
    issued = env.issue()
    wrong = issued.code.grouped()[:-1] + ("x" if issued.code.grouped()[-1] != "x" else "y")
    decisions = yield defer.gatherResults(
        [env.attempt("alice", wrong, ip=f"192.0.2.{20 + i}") for i in range(5)]
    )
    assert [d.refusal for d in decisions] == [Refusal.CREDENTIALS] * 5
    assert env.sync_store.get(issued.record.id).failed_count == 5


class SlowDirectory:
    """The static directory behind a gate, as a slow LDAP server would be: lookups block a
    directory thread until the test opens the gate."""

    blocking = True

    def __init__(self, directory):
        self.directory = directory
        self.gate = threading.Event()
        self.lookups = []

    def lookup(self, login):
        self.lookups.append(login)
        self.gate.wait(10)
        return self.directory.lookup(login)


@pytest_twisted.inlineCallbacks
def test_concurrent_lookups_of_one_login_query_the_directory_once(env):
    issued = env.issue()
    slow = env.auth.directory = SlowDirectory(env.directory)
    pending = [env.attempt("alice", issued.code.grouped()) for _ in range(10)]
    slow.gate.set()
    decisions = yield defer.gatherResults(pending)
    assert all(d.ok for d in decisions)
    assert slow.lookups == ["alice"]


@pytest_twisted.inlineCallbacks
def test_a_burst_from_one_address_cannot_fill_the_directory_queue(env):
    from proxy.auth.authenticator import DIRECTORY_QUEUE, DIRECTORY_THREADS

    slow = env.auth.directory = SlowDirectory(env.directory)
    share = DIRECTORY_QUEUE // 8
    burst = [env.attempt(f"user{i}", "Abcd-Efgh-Jkmn-Pqrs") for i in range(share + 20)]
    refused = [d for d in burst if d.called]  # answered at once, without waiting for LDAP
    assert len(refused) == len(burst) - DIRECTORY_THREADS - share
    assert all(d.result.refusal == Refusal.LIMIT for d in refused)
    other = env.attempt("alice", env.issue().code.grouped(), ip="203.0.113.5")
    assert not other.called  # another address still gets a place in the queue
    slow.gate.set()
    decision = yield other
    assert decision.ok
    yield defer.gatherResults([d for d in burst if d not in refused])


@pytest.mark.parametrize(
    "identity,problem",
    [
        ("[x\r\nMAIL FROM:<ceo@example.test>", "contains control characters"),
        ("[x ADDR=10.0.0.1 LOGIN=bob@example.test", "contains a space"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_an_unusable_upstream_identity_is_forbidden_whatever_the_directory_says(
    env, identity, problem
):
    issued = env.issue()
    env.directory.file.write_text(
        USERS.replace("upstream: alice@example.test}", f"upstream: {json.dumps(identity)}}}")
    )
    env.directory.reload()
    assert env.directory.lookup("alice").upstream_identity == identity
    decision = yield env.attempt("alice", issued.code.value)
    assert (decision.refusal, decision.reason) == (
        Refusal.FORBIDDEN,
        f"upstream identity {problem}: unusable as a SASL authzid or XCLIENT LOGIN",
    )
    (event,) = [e for e in env.events() if e["event"] == "auth"]
    assert (event["result"], event["reason"]) == ("deny", decision.reason)
    # Only a verified code learns more than "failed".
    wrong = yield env.attempt("alice", issued.code.value[:4] + "x" * 12)
    assert wrong.refusal == Refusal.CREDENTIALS


# -- stale devices and the sending policy ------------------------------------------------------


def _wrong(code: str) -> str:
    return code[:4] + ("A" if code[4] != "A" else "B") + code[5:]


@pytest.mark.parametrize(
    "stop,refusal",
    [
        ("revoke", Refusal.EXPIRED),
        ("expire", Refusal.EXPIRED),
        ("use up", Refusal.EXPIRED),
        ("disable", Refusal.FORBIDDEN),
    ],
)
@pytest_twisted.inlineCallbacks
def test_a_stale_device_is_counted_on_its_code_and_never_locks_out_its_address(env, stop, refusal):
    """A printer retrying a code that stopped working, far more often than the address's limit
    (3 a minute here), is refused with the code's own reason, counted on the code, and its
    neighbours behind the same address still log in."""
    kw = {"max_uses": 1} if stop == "use up" else {}
    if stop == "expire":
        kw["expires_at"] = datetime.now(UTC) - timedelta(seconds=1)
    stale = env.issue(label="old printer", **kw)
    fresh = env.issue(label="new printer")
    if stop == "use up":
        assert (yield env.attempt("alice", stale.code.value, ip="10.0.4.17")).ok
    elif stop == "revoke":
        env.sync_store.revoke(stale.record.id)
    elif stop == "disable":
        env.sync_store.set_disabled(stale.record.id, True)
    for _ in range(10):
        decision = yield env.attempt("alice", stale.code.value, ip="10.0.4.17")
        assert (decision.refusal, decision.stale) == (refusal, True)
    assert not env.auth.limiter.blocked("10.0.4.17", env.clock())
    assert (yield env.attempt("alice", fresh.code.value, ip="10.0.4.17")).ok
    rec = env.sync_store.get(stale.record.id)
    assert (rec.stale_count, rec.stale_last_ip, rec.failed_count) == (10, "10.0.4.17", 0)
    assert rec.still_retrying().startswith("still retrying: 10 attempts since ")
    denials = [e for e in env.events() if e.get("result") == "deny"]
    assert len(denials) == 10 and all(e["stale"] is True for e in denials)


@pytest_twisted.inlineCallbacks
def test_a_wrong_secret_under_a_stale_codes_selector_still_counts_against_the_address(env):
    stale = env.issue(label="old printer")
    env.sync_store.revoke(stale.record.id)
    for _ in range(3):
        decision = yield env.attempt("alice", _wrong(stale.code.value), ip="10.0.4.17")
        assert (decision.refusal, decision.stale) == (Refusal.CREDENTIALS, False)
    assert (yield env.attempt("alice", stale.code.value, ip="10.0.4.17")).refusal == Refusal.LIMIT
    rec = env.sync_store.get(stale.record.id)
    assert (rec.failed_count, rec.stale_count) == (3, 0)


@pytest_twisted.inlineCallbacks
def test_a_grant_carries_the_codes_sending_rules_with_the_accounts_own_addresses(env):
    from proxy.codes.sending import SendingPolicy

    policed = env.issue(
        label="scanner",
        scopes=("smtp",),
        sending=SendingPolicy(("own", "scanner@example.org"), ("example.org",), 10),
    )
    plain = env.issue(label="phone", scopes=("smtp",))
    for _ in range(2):  # the second from the verified cache
        decision = yield env.attempt("alice", policed.code.value, protocol=Protocol.SMTP)
        rules = decision.sending.rules
        assert rules.senders == {"alice@example.test", "scanner@example.org"}
        assert (rules.rcpt_domains, rules.max_per_day) == ({"example.org"}, 10)
        assert decision.sending.messages.code_id == policed.record.id
        assert decision.sending_policy == policed.record.sending  # a change ends the session
    plain_login = yield env.attempt("alice", plain.code.value, protocol=Protocol.SMTP)
    assert plain_login.sending is None and plain_login.sending_policy == SendingPolicy()

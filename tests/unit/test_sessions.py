"""Specification of the session checks (proxy/sessions.py): which live sessions end, and that
the checks keep running whatever the store does. A real SQLite store and static directory; the
clock is Twisted's Clock."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from proxy.audit import Audit
from proxy.auth.decision import Grant
from proxy.codes.sending import SendingPolicy
from proxy.codes.sqlite import SqliteCodeStore
from proxy.codes.store import NewCode, Reservation, utcnow
from proxy.config import PolicySettings
from proxy.directory.account import Account
from proxy.sessions import SessionGuard

CODE_EVERY, ACCOUNT_EVERY = 15.0, 60.0
ALICE = Account(key="uid-alice", login="alice", upstream_identity="alice@example.org")


@dataclass(eq=False)
class FakeSession:
    grant: Grant | None
    session_id: str = "s1"
    ended: list[str] = field(default_factory=list)

    def end(self, reason: str) -> None:
        self.ended.append(reason)

    def drain(self) -> None:
        pass


class Env:
    def __init__(self, tmp_path, policy: PolicySettings | None = None):
        self.store = SqliteCodeStore(tmp_path / "codes.db")
        self.accounts = {ALICE.key: ALICE}
        self.clock = Clock()
        self.out = io.StringIO()
        self.broken: Exception | None = None
        self.dropped: list[int] = []
        self.guard = SessionGuard(
            codes=self.codes,
            account=lambda key: defer.succeed(self.accounts.get(key)),
            changes=lambda last: defer.maybeDeferred(self.store.changes_since, last),
            changed=self.dropped.append,
            policy=policy or PolicySettings(),
            audit=Audit(self.out),
            reactor=self.clock,
            code_interval=CODE_EVERY,
            account_interval=ACCOUNT_EVERY,
        )

    def codes(self, ids):
        if self.broken is not None:
            return defer.fail(self.broken)
        return defer.maybeDeferred(self.store.get_many, ids)

    def session(self, smtp: bool = False, **code) -> FakeSession:
        scopes = ("imap", "smtp")
        selector = f"S{len(self.guard.sessions):03d}"
        new = NewCode(ALICE.key, "alice", "phone", selector, "h", scopes, **code)
        rec = self.store.create(new, cap=100, now=utcnow() - timedelta(hours=1))
        grant = Grant(ALICE, rec.id, "phone", ALICE.upstream_identity, Reservation(rec.id))
        if smtp:  # as the Authenticator grants an SMTP login: the policy it logged in under
            grant = replace(grant, sending_policy=rec.sending)
        s = FakeSession(grant)
        self.guard.add(s)
        return s

    def events(self, name):
        return [e for e in map(json.loads, self.out.getvalue().splitlines()) if e["event"] == name]


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    e.guard.start()
    yield e
    e.guard.stop()
    e.store.close()


def test_a_revocation_by_any_process_ends_its_sessions_within_a_second(env, tmp_path):
    session, other = env.session(), env.session()
    cli = SqliteCodeStore(tmp_path / "codes.db", migrate=False)  # as `apppass codes revoke`
    cli.revoke(session.grant.code_id)
    cli.close()
    env.clock.advance(1)
    assert session.ended == [f"app password {session.grant.code_id} revoked"]
    assert not other.ended
    assert env.dropped == [session.grant.code_id]  # the verified cache forgets it


def test_a_revoked_or_disabled_code_ends_its_sessions_at_once(env):
    revoked, disabled, fine = env.session(), env.session(), env.session()
    env.store.revoke(revoked.grant.code_id)
    env.store.set_disabled(disabled.grant.code_id, True)
    env.clock.advance(1)
    assert revoked.ended == [f"app password {revoked.grant.code_id} revoked"]
    assert disabled.ended == [f"app password {disabled.grant.code_id} disabled"]
    assert not fine.ended
    assert {e["code"] for e in env.events("session_ended")} == {
        revoked.grant.code_id,
        disabled.grant.code_id,
    }


def test_a_changed_sending_policy_ends_the_codes_smtp_sessions_only(env, tmp_path):
    printer = SendingPolicy(("own",), (), 10)
    smtp = env.session(smtp=True, sending=printer)
    code_id = smtp.grant.code_id
    imap = FakeSession(replace(smtp.grant, sending_policy=None), "s2")  # the same code, IMAP
    env.guard.add(imap)
    other = env.session(smtp=True, sending=printer)
    cli = SqliteCodeStore(tmp_path / "codes.db", migrate=False)  # as `apppass codes sending`
    cli.set_sending(code_id, SendingPolicy(("own",), ("example.org",), 10))
    cli.close()
    env.clock.advance(1)
    assert smtp.ended == [f"app password {code_id} sending policy changed"]
    assert not imap.ended and not other.ended
    env.guard.discard(smtp)  # as its frontend does once the connection is gone
    env.clock.advance(CODE_EVERY)  # the full check agrees: nothing more ends
    assert not imap.ended and not other.ended


def test_a_session_that_logged_in_under_an_old_policy_ends_and_the_cache_forgets_it(env):
    # A login verified just before a change can hold (and cache) the old policy after the
    # change log was read: the full check still finds it.
    session = env.session(smtp=True, sending=SendingPolicy(("own",), (), 10))
    code_id = session.grant.code_id
    session.grant = replace(session.grant, sending_policy=SendingPolicy(("*",), (), None))
    env.clock.advance(CODE_EVERY)
    assert session.ended == [f"app password {code_id} sending policy changed"]
    assert env.dropped == [code_id]


def test_disabling_a_used_up_code_ends_its_session(env):
    session = env.session(max_uses=1)
    code_id = session.grant.code_id
    assert env.store.confirm(env.store.claim(code_id, "imap", "10.0.0.1"), "imap", "10.0.0.1")
    env.clock.advance(CODE_EVERY)
    assert not session.ended  # used up: the session that used it goes on
    env.store.set_disabled(code_id, True)
    env.clock.advance(1)
    assert session.ended == [f"app password {code_id} disabled"]


def test_an_expired_code_ends_its_sessions(env):
    session = env.session(expires_at=utcnow() + timedelta(seconds=30))
    env.clock.advance(CODE_EVERY)
    assert not session.ended
    env.store.run("UPDATE codes SET expires_at = ?", (int(utcnow().timestamp()) - 1,))
    env.clock.advance(CODE_EVERY)
    assert session.ended == [f"app password {session.grant.code_id} expired"]


def test_the_checks_survive_a_broken_store_and_say_so_once(env):
    session = env.session()
    env.broken = RuntimeError("file is not a database")
    for _ in range(5):
        env.clock.advance(CODE_EVERY)
    assert not session.ended
    (trouble,) = [e for e in env.events("session_check") if e["check"] == "codes"]
    assert trouble["result"] == "fail" and "not a database" in trouble["reason"]
    env.broken = None
    env.store.revoke(session.grant.code_id)
    env.clock.advance(CODE_EVERY)
    assert session.ended
    codes = [e["result"] for e in env.events("session_check") if e["check"] == "codes"]
    assert codes == ["fail", "ok"]


@pytest.mark.parametrize(
    "change,reason",
    [
        (lambda a: replace(a, enabled=False, disabled_reason="locked"), "account locked"),
        (lambda a: replace(a, legacy_allowed=False), "account not allowed legacy sign-in"),
        (lambda a: None, "account gone from the directory"),
        (
            lambda a: replace(a, password_changed_at=datetime.now(UTC)),
            "account password changed after the app password was made",
        ),
    ],
)
def test_an_account_that_may_no_longer_sign_in_ends_its_sessions(env, change, reason):
    session = env.session()
    env.clock.advance(ACCOUNT_EVERY)
    assert not session.ended
    changed = change(ALICE)
    if changed is None:
        del env.accounts[ALICE.key]
    else:
        env.accounts[ALICE.key] = changed
    env.clock.advance(ACCOUNT_EVERY - 1)
    assert not session.ended
    env.clock.advance(1)
    assert len(session.ended) == 1 and session.ended[0].startswith(reason)
    (ended,) = env.events("session_ended")
    assert ended["account"] == ALICE.key and ended["reason"].startswith(reason)


def test_a_password_change_ends_sessions_only_under_revoke_on_password_change(tmp_path):
    env = Env(tmp_path, PolicySettings(revoke_on_password_change=False))
    env.guard.start()
    session = env.session()
    env.accounts[ALICE.key] = replace(ALICE, password_changed_at=datetime.now(UTC))
    env.clock.advance(ACCOUNT_EVERY)
    assert not session.ended
    env.guard.stop()
    env.store.close()


def test_a_change_missed_by_the_change_log_is_caught_by_the_full_check(env):
    session = env.session()
    env.store.revoke(session.grant.code_id)
    env.store.run("DELETE FROM code_changes")  # as if the log was purged before it was read
    env.clock.advance(CODE_EVERY - 1)
    assert not session.ended
    env.clock.advance(1)
    assert session.ended

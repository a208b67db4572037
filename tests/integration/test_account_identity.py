"""Who a code belongs to, and when an account's state refuses it, against real slapd and Samba AD.

- An entry deleted and recreated under the same name (OpenLDAP: a new entryUUID; AD: a new
  objectGUID) is another account: the old entry's codes are refused for the new one, listed as
  orphaned by `apppass codes list` and revocable by their old key.
- AD's "must change password at next logon" (pwdLastSet 0) counts as a password change now:
  codes created before it stop working. AD "password expired" and ppolicy's pwdStartTime have
  their own refusals; a value that cannot be read refuses the account.

Each test runs the Authenticator (real SQLite store, argon2, the LDAP directory with its cache
off) and the `apppass` CLI on the same config.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import ldap3
import pytest
import pytest_twisted
import yaml
from twisted.internet import reactor

from proxy.audit import Audit
from proxy.auth.authenticator import Authenticator
from proxy.auth.decision import Attempt, Refusal
from proxy.auth.policy import account_refusal
from proxy.cli import main as cli_main
from proxy.codes.hashing import CodeHasher
from proxy.codes.issue import issue_code
from proxy.codes.sqlite import SqliteCodeStore
from proxy.codes.store import AsyncCodeStore
from proxy.config import Settings, load
from proxy.directory.ldap.directory import LdapDirectory
from proxy.protocols import MailProtocol
from tests.integration.harness import FAST_ARGON2
from tests.servers.samba import SAMBA_PYTHON, SambaDC, SeedUser, to_filetime
from tests.servers.slapd import Slapd

pytestmark = pytest.mark.integration

CLIENT = "192.0.2.10"


@dataclass
class Env:
    """The Authenticator and the CLI over one config, store and directory."""

    folder: Path
    settings: Settings
    directory: LdapDirectory
    store: SqliteCodeStore
    auth: Authenticator

    def issue(self, login: str) -> tuple[int, str]:
        hasher = CodeHasher(self.settings.codes.argon2)
        issued = issue_code(
            self.settings, self.directory, self.store, hasher, login=login, label="phone"
        )
        return issued.record.id, issued.code.value

    def attempt(self, login: str, code: str):
        return self.auth.authenticate(Attempt(MailProtocol.IMAP, login, code, CLIENT, session="s1"))

    def cli(self, *args: str) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = cli_main(["-c", str(self.folder / "apppass.yaml"), *args])
        return status, out.getvalue()


class FakeNow:
    """Wall time (UTC) that a test moves forward: the directory's idea of now."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@pytest.fixture
def now() -> FakeNow:
    return FakeNow()


@pytest.fixture
def env_for(tmp_path: Path, now: FakeNow) -> Iterator[Callable[[dict], Env]]:
    """Make an Env for a `directory.ldap` config (its bind password given inline)."""
    made: list[tuple[Env, CodeHasher, AsyncCodeStore]] = []

    def make(ldap: dict) -> Env:
        ldap = {**ldap, "cache_ttl": "0s", "negative_cache_ttl": "0s"}
        (tmp_path / "bind-password").write_text(ldap.pop("bind_password") + "\n")
        config = {
            "store": {"sqlite": "codes.db"},
            "directory": {"ldap": {**ldap, "bind_password_file": "bind-password"}},
            "codes": {"argon2": FAST_ARGON2},
        }
        (tmp_path / "apppass.yaml").write_text(yaml.safe_dump(config))
        settings = load(tmp_path / "apppass.yaml")
        assert settings.directory.ldap is not None
        directory = LdapDirectory(settings.directory.ldap, utcnow=now)
        store = SqliteCodeStore(settings.store.target)
        hasher = CodeHasher(settings.codes.argon2)
        hasher.start(reactor)
        async_store = AsyncCodeStore(store, reactor)
        auth = Authenticator(
            settings, directory, async_store, hasher, Audit(io.StringIO()), reactor
        )
        env = Env(tmp_path, settings, directory, store, auth)
        made.append((env, hasher, async_store))
        return env

    yield make
    for env, hasher, async_store in made:
        env.auth.stop()
        hasher.stop()
        async_store.stop()
        env.directory.close()
        env.store.close()


def slapd_config(server: Slapd) -> dict:
    assert server.tls is not None
    return {
        "preset": "openldap",
        "uris": [server.ldaps_uri],
        "ca_file": str(server.tls.ca),
        "bind_dn": server.service_dn,
        "bind_password": server.service_password,
        "base_dn": server.base_dn,
    }


def samba_config(dc: SambaDC) -> dict:
    assert dc.tls is not None
    return {
        "preset": "active_directory",
        "uris": [dc.ldaps_uri],
        "ca_file": str(dc.tls.ca),
        "bind_dn": dc.service_bind_dn,
        "bind_password": dc.service_password,
        "base_dn": dc.base_dn,
    }


def assert_orphaned_and_revocable_by_key(env: Env, code_id: int, old_key: str) -> None:
    status, out = env.cli("codes", "list", "--json")
    listed = {r["id"]: r for r in json.loads(out)}
    assert status == 0 and listed[code_id]["orphaned"] is True
    assert listed[code_id]["account_key"] == old_key
    status, out = env.cli("codes", "list")
    assert f"revoke with: apppass codes revoke-all --key {old_key}" in out
    status, out = env.cli("codes", "revoke-all", "--key", old_key)
    assert (status, out) == (0, f"revoked 1 code of account key '{old_key}'\n")
    assert env.store.get(code_id).revoked_at is not None


# === an entry deleted and recreated is another account ======================================


@pytest_twisted.inlineCallbacks
def test_openldap_an_entry_recreated_with_the_same_uid_does_not_inherit_codes(
    slapd_factory, env_for
):
    server = slapd_factory()
    env = env_for(slapd_config(server))
    old_key = env.directory.lookup("bob").key
    code_id, code = env.issue("bob")
    assert (yield env.attempt("bob", code)).ok

    with server.admin() as conn:  # bob leaves; later a new bob arrives
        conn.delete(server.user_dn("bob"))
        conn.add(
            server.user_dn("bob"),
            ["inetOrgPerson"],
            {"uid": "bob", "cn": "Bob Newcomer", "sn": "N", "mail": "robert@example.org"},
        )
    new = env.directory.lookup("bob")
    assert new.key != old_key  # slapd gave the new entry its own entryUUID
    decision = yield env.attempt("bob", code)
    assert (decision.ok, decision.refusal) == (False, Refusal.CREDENTIALS)
    assert decision.account.key == new.key
    assert_orphaned_and_revocable_by_key(env, code_id, old_key)


def new_ad_user(dc: SambaDC, prefix: str) -> SeedUser:
    """A user of the test's own (sAMAccountName at most 20 characters)."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    user = SeedUser(name, "Pw-1-" + uuid.uuid4().hex[:8], f"{name}@example.com", "Test", name)
    dc.add_user(user)
    return user


@pytest_twisted.inlineCallbacks
def test_ad_a_user_recreated_with_the_same_name_does_not_inherit_codes(samba_dc, env_for):
    env = env_for(samba_config(samba_dc))
    user = new_ad_user(samba_dc, "reuse")
    old_key = env.directory.lookup(user.name).key
    code_id, code = env.issue(user.name)
    assert (yield env.attempt(user.name, code)).ok

    samba_dc.samba_tool("user", "delete", user.name)
    samba_dc.add_user(user)  # the same sAMAccountName, UPN and mail: a new objectGUID
    new = env.directory.lookup(user.name)
    assert new.key != old_key
    decision = yield env.attempt(user.name, code)
    assert (decision.ok, decision.refusal) == (False, Refusal.CREDENTIALS)
    assert decision.account.key == new.key
    assert_orphaned_and_revocable_by_key(env, code_id, old_key)


# === Active Directory: must change at next logon, password expired ==========================


@pytest_twisted.inlineCallbacks
def test_ad_must_change_password_at_next_logon_stops_older_codes(samba_dc, env_for, now):
    env = env_for(samba_config(samba_dc))
    user = new_ad_user(samba_dc, "reset")
    code_id, code = env.issue(user.name)
    assert (yield env.attempt(user.name, code)).ok

    # The incident-response reset: "must change password at next logon".
    samba_dc.modify(user.dn, {"pwdLastSet": [(ldap3.MODIFY_REPLACE, ["0"])]})
    now.offset = timedelta(minutes=1)  # the lookup happens a while after the code was made
    decision = yield env.attempt(user.name, code)
    assert (decision.ok, decision.refusal) == (False, Refusal.EXPIRED)
    assert f"app password {code_id}" in decision.reason
    assert "before the account's last password change" in decision.reason
    account = env.directory.lookup(user.name)
    assert account.enabled and account.extra["password_must_change"]
    assert abs(account.password_changed_at - now()) < timedelta(seconds=30)
    status, out = env.cli("directory", "check", user.name)
    assert status == 0, out
    assert "(must change at next logon: counts as now)" in out


def age_password(dc: SambaDC, user: SeedUser, when: datetime) -> None:
    """Set pwdLastSet to a past moment. Over LDAP AD takes only 0 and -1, so this writes the
    domain partition's database directly, without Samba's modules (the running DC reads it)."""
    partition = dc.root / "private" / "sam.ldb.d" / f"{dc.base_dn.upper()}.ldb"
    script = (
        "import sys, ldb\n"
        "db = ldb.Ldb(sys.argv[1], options=['modules:'])\n"
        "m = ldb.Message(); m.dn = ldb.Dn(db, sys.argv[2])\n"
        "m['pwdLastSet'] = ldb.MessageElement(sys.argv[3], ldb.FLAG_MOD_REPLACE, 'pwdLastSet')\n"
        "db.modify(m)\n"
    )
    subprocess.run(
        [SAMBA_PYTHON, "-c", script, f"tdb://{partition}", user.dn, str(to_filetime(when))],
        check=True,
        capture_output=True,
        timeout=60,
    )


def test_ad_an_expired_password_is_refused_with_its_own_reason(samba_dc, env_for):
    env = env_for(samba_config(samba_dc))
    user = new_ad_user(samba_dc, "aged")
    assert env.directory.lookup(user.name).enabled
    # A fine-grained password policy for this user only: passwords last 2 days.
    pso = f"pso-{user.name}"
    samba_dc.samba_tool("domain", "passwordsettings", "pso", "create", pso, "1", "--max-pwd-age=2")
    samba_dc.samba_tool("domain", "passwordsettings", "pso", "apply", pso, user.name)
    age_password(samba_dc, user, datetime.now(UTC) - timedelta(days=3))
    account = env.directory.lookup(user.name)
    assert (account.enabled, account.disabled_reason) == (False, "password expired")
    assert "PASSWORD_EXPIRED" in account.extra["reasons"]["enabled"]
    assert account_refusal(account, env.settings.policy) == "account password expired"


# === OpenLDAP: not yet valid, and values that cannot be read ================================


def test_openldap_before_pwdStartTime_an_account_is_not_yet_valid(slapd_factory, env_for):
    server = slapd_factory()
    env = env_for(slapd_config(server))
    start = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y%m%d%H%M%SZ")
    server.modify(server.user_dn("bob"), {"pwdStartTime": [(ldap3.MODIFY_REPLACE, [start])]})
    bob = env.directory.lookup("bob")
    assert (bob.enabled, bob.disabled_reason) == (False, "not yet valid")
    assert account_refusal(bob, env.settings.policy) == "account not yet valid"
    status, out = env.cli("codes", "create", "bob", "--label", "x")
    assert (status, out.strip()) == (1, "apppass: bob: account not yet valid")


@pytest_twisted.inlineCallbacks
def test_openldap_a_value_that_cannot_be_read_refuses_the_account(slapd_factory, env_for, caplog):
    server = slapd_factory()
    # A site that keeps an expiry time in a text attribute (employeeType holds any string).
    env = env_for({**slapd_config(server), "expiry_attributes": ["pwdEndTime", "employeeType"]})
    _, code = env.issue("bob")
    assert (yield env.attempt("bob", code)).ok
    server.modify(server.user_dn("bob"), {"employeeType": [(ldap3.MODIFY_REPLACE, ["soon"])]})
    decision = yield env.attempt("bob", code)
    assert (decision.ok, decision.refusal) == (False, Refusal.FORBIDDEN)
    assert decision.reason == "account unreadable employeeType"
    assert (
        f"LDAP entry {server.user_dn('bob')}: employeeType 'soon' is not a GeneralizedTime"
        in caplog.text
    )
    assert "Traceback" not in caplog.text
    status, out = env.cli("directory", "check", "bob")
    assert status == 1 and "verdict            refused: account unreadable employeeType" in out

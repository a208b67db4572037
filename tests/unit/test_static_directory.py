"""The static directory and the account-policy verdicts (the LDAP directory passes the same)."""

from datetime import UTC, datetime

import pytest

from proxy.auth.policy import account_refusal
from proxy.config import ConfigError, PolicySettings
from proxy.directory.static import StaticDirectory

USERS = """
accounts:
  alice:
    id: key-alice
    aliases: [alice@example.test, Alice.Example@example.test]
    upstream: alice@example.test
    groups: [legacy-mail, staff]
    mfa: true
    password_changed: 2026-11-01T09:30:00Z
  bob: {groups: [staff]}
  carol: {groups: [legacy-mail], enabled: false}
  dave: {groups: [legacy-mail], expires: 2001-01-01}
  printer1: {groups: [Legacy-Mail]}
"""


@pytest.fixture
def directory(tmp_path):
    f = tmp_path / "users.yaml"
    f.write_text(USERS)
    return StaticDirectory(f, legacy_group="legacy-mail", mfa_group=None)


def test_login_by_name_or_alias_case_insensitively(directory):
    a = directory.lookup("alice")
    assert directory.lookup("ALICE@example.test") == a
    assert directory.lookup("alice.example@EXAMPLE.test") == a
    assert (a.key, a.login, a.upstream_identity) == ("key-alice", "alice", "alice@example.test")
    assert a.password_changed_at == datetime(2026, 11, 1, 9, 30, tzinfo=UTC)


def test_defaults_id_and_upstream_to_the_login(directory):
    b = directory.lookup("bob")
    assert (b.key, b.upstream_identity) == ("bob", "bob")


@pytest.mark.parametrize("login", ["nobody", "alice\x00x", "alice\r\n", ""])
def test_unknown_or_invalid_names_resolve_to_nothing(directory, login):
    assert directory.lookup(login) is None


POLICY = PolicySettings(legacy_group="legacy-mail")


@pytest.mark.parametrize(
    "login,policy,refusal",
    [
        ("alice", POLICY, None),
        ("printer1", POLICY, None),  # group names match case-insensitively
        ("bob", POLICY, "account not allowed legacy sign-in (not a member of legacy-mail)"),
        ("carol", POLICY, "account disabled"),
        ("dave", POLICY, "account expired"),
        (
            "printer1",
            PolicySettings(legacy_group="legacy-mail", require_mfa=True),
            "account has no second factor and policy.require_mfa is on",
        ),
        ("alice", PolicySettings(legacy_group="legacy-mail", require_mfa=True), None),
    ],
)
def test_account_policy_verdicts(directory, login, policy, refusal):
    assert account_refusal(directory.lookup(login), policy) == refusal


def test_no_legacy_group_means_everyone_enabled_may(tmp_path):
    f = tmp_path / "users.yaml"
    f.write_text(USERS)
    d = StaticDirectory(f, legacy_group=None)
    assert account_refusal(d.lookup("bob"), PolicySettings()) is None


def test_mfa_group_marks_accounts_with_a_second_factor(tmp_path):
    f = tmp_path / "users.yaml"
    f.write_text(USERS)
    d = StaticDirectory(f, legacy_group="legacy-mail", mfa_group="staff")
    assert d.lookup("bob").mfa and not d.lookup("printer1").mfa


def test_file_edits_are_picked_up_and_broken_edits_keep_the_last_good_file(directory):
    directory.file.write_text("accounts: {erin: {groups: [legacy-mail]}}\n")
    directory.reload()
    assert directory.lookup("erin") is not None and directory.lookup("alice") is None
    directory.file.write_text("accounts: [broken\n")
    directory.reload()
    assert directory.lookup("erin") is not None


def test_by_key(directory):
    assert directory.by_key("key-alice").login == "alice"
    assert directory.by_key("nope") is None


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "accounts: {alice: {enabled: maybe}}",
            'users.yaml: accounts.alice.enabled: must be true or false (got "maybe")',
        ),
        (
            "accounts: {alice: {grups: [x]}}",
            "users.yaml: accounts.alice.grups: unknown key; did you mean 'groups'?",
        ),
        (
            "accounts: {alice: {}, bob: {aliases: [alice]}}",
            'users.yaml: accounts.bob: login name "alice" belongs to two accounts',
        ),
        (
            "accounts: {alice: {id: x}, bob: {id: x}}",
            'users.yaml: accounts.bob.id: must be unique ("x" is used twice)',
        ),
        ("users: {}", "users.yaml: accounts: is required"),
    ],
)
def test_bad_users_file_names_the_key(tmp_path, text, message):
    f = tmp_path / "users.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        StaticDirectory(f)
    assert message in info.value.problems


def test_example_users_file_has_the_documented_accounts():
    from pathlib import Path

    d = StaticDirectory(
        Path(__file__).parents[2] / "config" / "users.example.yaml", legacy_group="legacy-mail"
    )
    assert account_refusal(d.lookup("alice"), POLICY) is None
    assert account_refusal(d.lookup("bob"), POLICY).startswith("account not allowed legacy sign-in")
    assert account_refusal(d.lookup("printer1"), POLICY) is None

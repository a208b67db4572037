"""The static directory: its file's rules (a stable id per account), re-reading and broken edits,
and the account-policy verdicts (the LDAP directory passes the same)."""

import logging
import re
import uuid
from datetime import UTC, datetime

import pytest

from proxy.auth.policy import account_refusal
from proxy.config import ConfigError, PolicySettings
from proxy.directory.static import LOGGED_PROBLEMS, RECHECK_SECONDS, StaticDirectory

USERS = """
accounts:
  alice:
    id: key-alice
    aliases: [alice@example.test, Alice.Example@example.test]
    upstream: alice@example.test
    groups: [legacy-mail, staff]
    mfa: true
    password_changed: 2026-11-01T09:30:00Z
  bob: {id: 4b1d, groups: [staff]}
  carol: {id: key-carol, groups: [legacy-mail], enabled: false}
  dave: {id: key-dave, groups: [legacy-mail], expires: 2001-01-01}
  printer1: {id: 1017, groups: [Legacy-Mail]}
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


def test_upstream_defaults_to_the_login_and_a_numeric_id_is_text(directory):
    b = directory.lookup("bob")
    assert (b.key, b.upstream_identity) == ("4b1d", "bob")
    assert directory.lookup("printer1").key == "1017"


def test_an_account_without_an_id_is_an_error_naming_the_key_with_a_fresh_uuid(tmp_path):
    f = tmp_path / "users.yaml"
    f.write_text("accounts: {jsmith: {groups: [legacy-mail]}, alice: {id: key-alice}}\n")
    with pytest.raises(ConfigError) as info:
        StaticDirectory(f)
    [problem] = info.value.problems
    assert problem.startswith("users.yaml: accounts.jsmith.id: is required: ")
    suggested = re.search(r'"id: ([0-9a-f-]{36})"', problem)
    assert suggested and uuid.UUID(suggested.group(1)).version == 4
    assert '"id: jsmith" keeps' in problem  # how to keep codes made before ids were required


@pytest.mark.parametrize("value", ["true", '""', '"  "', '"a\\x00b"', "[a, b]"])
def test_an_id_must_be_text_without_control_characters(tmp_path, value):
    f = tmp_path / "users.yaml"
    f.write_text(f"accounts: {{jsmith: {{id: {value}}}}}\n")
    with pytest.raises(ConfigError) as info:
        StaticDirectory(f)
    assert info.value.problems[0].startswith(
        "users.yaml: accounts.jsmith.id: must be a non-empty string without control characters"
    )


def test_a_reused_login_with_a_new_id_is_another_account(tmp_path):
    f = tmp_path / "users.yaml"
    f.write_text("accounts: {jsmith: {id: john-1, name: John Smith}}\n")
    d = StaticDirectory(f)
    assert d.lookup("jsmith").key == "john-1"
    f.write_text("accounts: {jsmith: {id: jane-2, name: Jane Smith}}\n")
    d.reload()
    assert d.lookup("jsmith").key == "jane-2"
    assert d.by_key("john-1") is None  # John's codes resolve to nobody: orphaned


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
            "account has no second factor, which app passwords require here",
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
    directory.file.write_text("accounts: {erin: {id: key-erin, groups: [legacy-mail]}}\n")
    directory.reload()
    assert directory.lookup("erin") is not None and directory.lookup("alice") is None
    directory.file.write_text("accounts: [broken\n")
    directory.reload()
    assert directory.lookup("erin") is not None


class Clock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


GOOD = "accounts: {erin: {id: key-erin, groups: [legacy-mail]}}\n"
BROKEN = "accounts: {erin: {id: key-erin, enabled: nope}}\n"  # the edit meant to disable erin
FIXED = "accounts: {erin: {id: key-erin, enabled: false}}\n"
LOGGER = "proxy.directory.static"


def errors(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]


def test_a_broken_edit_is_logged_at_each_check_and_the_last_good_file_served(tmp_path, caplog):
    f = tmp_path / "users.yaml"
    f.write_text(GOOD)
    clock = Clock()
    d = StaticDirectory(f, clock=clock)
    caplog.set_level(logging.INFO, LOGGER)
    f.write_text(BROKEN)
    clock.now += RECHECK_SECONDS
    assert d.lookup("erin").enabled  # the last good version still answers
    [logged] = errors(caplog)
    message = logged.getMessage()
    assert str(f) in message and "still serving its last good version" in message
    assert 'users.yaml: accounts.erin.enabled: must be true or false (got "nope")' in message
    assert logged.exc_info is None and "Traceback" not in caplog.text
    assert d.problems == ('users.yaml: accounts.erin.enabled: must be true or false (got "nope")',)

    assert d.lookup("erin").enabled  # checked at most once a second: not logged again yet
    assert len(errors(caplog)) == 1
    f.write_text(BROKEN + "# still broken\n")
    clock.now += RECHECK_SECONDS
    assert d.lookup("erin").enabled
    assert len(errors(caplog)) == 2  # logged again on the next check
    d.reload()  # SIGHUP
    assert len(errors(caplog)) == 3

    f.write_text(FIXED)
    clock.now += RECHECK_SECONDS
    erin = d.lookup("erin")
    assert not erin.enabled and erin.disabled_reason == "disabled"
    assert d.problems == () and len(errors(caplog)) == 3
    assert "fixed" in caplog.records[-1].getMessage()


def test_a_users_file_that_is_not_yaml_or_is_gone_is_logged_with_the_file(tmp_path, caplog):
    f = tmp_path / "users.yaml"
    f.write_text(GOOD)
    clock = Clock()
    d = StaticDirectory(f, clock=clock)
    f.write_text("accounts: [broken\n")
    with caplog.at_level(logging.ERROR, LOGGER):
        d.reload()
    assert "users.yaml: not valid YAML at line 2, column 1: " in caplog.text
    assert "\n" not in errors(caplog)[0].getMessage()  # one line
    f.unlink()
    clock.now += RECHECK_SECONDS
    with caplog.at_level(logging.ERROR, LOGGER):
        assert d.lookup("erin") is not None
    assert f"{f}: cannot read: No such file or directory" in errors(caplog)[-1].getMessage()


def test_a_long_list_of_problems_is_cut_in_the_log_line(tmp_path, caplog):
    f = tmp_path / "users.yaml"
    f.write_text(GOOD)
    d = StaticDirectory(f)
    f.write_text("accounts: {" + ", ".join(f"u{i}: {{groups: x}}" for i in range(8)) + "}\n")
    with caplog.at_level(logging.ERROR, LOGGER):
        d.reload()
    message = errors(caplog)[0].getMessage()
    assert message.count("users.yaml: accounts.u") == LOGGED_PROBLEMS
    assert f"(and {len(d.problems) - LOGGED_PROBLEMS} more: apppass check-config lists them)" in (
        message
    )


def test_by_key(directory):
    assert directory.by_key("key-alice").login == "alice"
    assert directory.by_key("nope") is None


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "accounts: {alice: {id: a, enabled: maybe}}",
            'users.yaml: accounts.alice.enabled: must be true or false (got "maybe")',
        ),
        (
            "accounts: {alice: {id: a, grups: [x]}}",
            "users.yaml: accounts.alice.grups: unknown key; did you mean 'groups'?",
        ),
        (
            "accounts: {alice: {id: a}, bob: {id: b, aliases: [alice]}}",
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

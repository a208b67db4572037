"""Signing in to the portal, without sockets: the users file's password hashes (and their
config errors), `apppass users hash-password`, the second factor against a real SQLite store
(a TOTP step is used once, a recovery code once), and the admins' view of the audit file."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pyotp
import pytest
import yaml
from argon2 import PasswordHasher, Type

from proxy.cli import main as cli
from proxy.codes.sqlite import SqliteCodeStore
from proxy.config import ConfigError
from proxy.directory.account import Account
from proxy.directory.passwords import hash_password, password_hash_problem
from proxy.directory.static import StaticDirectory
from proxy.web.auditlog import recent_events
from proxy.web.records import WebRecords
from proxy.web.signin import (
    check_password,
    check_second_factor,
    enrolment_secret,
    finish_enrolment,
)

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password(PASSWORD)


def users_file(tmp_path: Path, **alice) -> Path:
    path = tmp_path / "users.yaml"
    entry = {"id": "key-alice", "aliases": ["alice@example.org"], **alice}
    path.write_text(yaml.safe_dump({"accounts": {"alice": entry, "printer": {"id": "key-p"}}}))
    return path


def test_a_static_account_signs_in_with_its_password_by_any_of_its_names(tmp_path, password_hash):
    directory = StaticDirectory(users_file(tmp_path, password_hash=password_hash))
    for name in ("alice", "ALICE@example.org"):
        checked = check_password(directory, name, PASSWORD)
        assert checked.ok and checked.account is not None and checked.account.key == "key-alice"
    wrong = check_password(directory, "alice", PASSWORD + "!")
    assert (wrong.ok, wrong.reason) == (False, "wrong password")
    assert check_password(directory, "nobody", PASSWORD).reason == "unknown login"
    assert check_password(directory, "alice", "").reason == "empty or overlong password"
    assert check_password(directory, "ali\x00ce", PASSWORD).reason == "invalid login name"


def test_an_account_without_a_password_hash_cannot_sign_in(tmp_path, password_hash):
    directory = StaticDirectory(users_file(tmp_path, password_hash=password_hash))
    printer = directory.lookup("printer")
    assert printer is not None and not directory.verify_password(printer, "")
    assert not directory.verify_password(printer, "anything")


def test_the_hash_is_kept_out_of_reprs(tmp_path, password_hash):
    directory = StaticDirectory(users_file(tmp_path, password_hash=password_hash))
    assert password_hash not in repr(directory.lookup("alice"))


@pytest.mark.parametrize(
    "value,problem",
    [
        ("hunter2", "must be an argon2id hash made with `apppass users hash-password`"),
        (PasswordHasher(type=Type.I).hash("x"), "must be an argon2id hash (got argon2i)"),
        (12345, "must be text"),
    ],
)
def test_a_bad_password_hash_is_a_config_error_that_never_shows_the_value(tmp_path, value, problem):
    with pytest.raises(ConfigError) as caught:
        StaticDirectory(users_file(tmp_path, password_hash=value))
    assert caught.value.problems == [f"users.yaml: accounts.alice.password_hash: {problem}"]
    assert str(value) not in str(caught.value.problems)


def test_hash_password_makes_argon2id_hashes():
    assert password_hash_problem(hash_password("x")) is None


def run_cli(monkeypatch, capsys, stdin: str, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = cli(["users", "hash-password", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_users_hash_password_reads_standard_input_and_prints_a_hash(monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, PASSWORD + "\n")
    assert code == 0 and err == "" and PASSWORD not in out
    directory = StaticDirectory(users_file(tmp_path, password_hash=out.strip()))
    assert check_password(directory, "alice", PASSWORD).ok


def test_users_hash_password_refuses_an_empty_password(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "\n")
    assert (code, out) == (2, "") and "a password is 1 to 1024 characters" in err


def test_users_hash_password_takes_no_password_argument(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "", "secret-on-the-command-line")
    assert (code, out) == (2, "") and "unrecognized arguments" in err


# -- the second factor, on a real store --------------------------------------------------------


@pytest.fixture
def records(tmp_path):
    store = SqliteCodeStore(tmp_path / "codes.db")
    yield WebRecords(store)
    store.close()


def enrol(records: WebRecords, now: float) -> tuple[str, list[str]]:
    secret = enrolment_secret(records, "key-alice")
    assert secret is not None
    assert enrolment_secret(records, "key-alice") == secret  # a reload shows the same secret
    codes = finish_enrolment(records, "key-alice", pyotp.TOTP(secret).at(now), now)
    assert codes is not None and len(codes) == 10
    return secret, codes


def test_enrolment_needs_a_current_code(records):
    now = time.time()
    secret = enrolment_secret(records, "key-alice")
    assert secret is not None
    assert finish_enrolment(records, "key-alice", "abcdef", now) is None
    assert finish_enrolment(records, "key-alice", pyotp.TOTP(secret).at(now - 300), now) is None
    assert enrolment_secret(records, "key-alice") == secret  # still enrolling


def test_a_totp_step_signs_in_once(records):
    now = time.time()
    secret, _ = enrol(records, now)
    # The code used to enrol is spent: the same step is refused as a replay.
    replay = check_second_factor(records, "key-alice", pyotp.TOTP(secret).at(now), now)
    assert (replay.ok, replay.reason) == (False, "TOTP code already used (replay)")
    later = now + 30
    first = check_second_factor(records, "key-alice", pyotp.TOTP(secret).at(later), later)
    again = check_second_factor(records, "key-alice", pyotp.TOTP(secret).at(later), later)
    assert first.ok and first.method == "totp" and not again.ok
    # An older step, still within the drift window, is refused too: steps only move forward.
    older = check_second_factor(records, "key-alice", pyotp.TOTP(secret).at(now), later)
    assert not older.ok


def test_a_recovery_code_signs_in_once(records):
    now = time.time()
    _, codes = enrol(records, now)
    typed = codes[3].upper().replace("-", " ")
    first = check_second_factor(records, "key-alice", typed, now)
    again = check_second_factor(records, "key-alice", codes[3], now)
    assert first.ok and first.method == "recovery"
    assert (again.ok, again.reason) == (False, "not an unused recovery code")
    assert check_second_factor(records, "key-alice", codes[4], now).ok


def test_no_second_factor_before_enrolment(records):
    checked = check_second_factor(records, "key-alice", "123456", time.time())
    assert (checked.ok, checked.reason) == (False, "no second factor enrolled")


# -- recent audit events for admins -------------------------------------------------------------

ALICE = Account(key="key-alice", login="alice", upstream_identity="alice", names=("alice", "a@x"))


def test_recent_events_are_the_accounts_newest_first(tmp_path):
    path = tmp_path / "audit.jsonl"
    lines = [
        {"event": "auth", "login": "A@X", "result": "deny", "n": 1},
        {"event": "auth", "login": "bob", "account": "key-bob", "n": 2},
        "not json",
        {"event": "manage", "action": "create", "account": "key-alice", "n": 3},
        {"event": "portal_signin", "login": "alice", "result": "ok", "n": 4},
    ]
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    found = recent_events(path, ALICE, limit=2)
    assert found.available and [e["n"] for e in found.events] == [4, 3]
    assert [e["n"] for e in recent_events(path, ALICE).events] == [4, 3, 1]


def test_recent_events_say_where_to_look_when_the_log_goes_to_stdout(tmp_path):
    found = recent_events(None, ALICE)
    assert not found.available and "standard output" in found.why
    missing = recent_events(tmp_path / "nope.jsonl", ALICE)
    assert not missing.available and "cannot be read" in missing.why

"""`apppass codes …`, `check-config` and `directory check` as an admin uses them."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.cli import main

USERS = """
accounts:
  alice: {id: key-alice, aliases: [alice@example.test], groups: [legacy-mail]}
  bob: {id: key-bob, groups: [staff]}
  carol: {id: key-carol, groups: [legacy-mail], enabled: false}
"""


@pytest.fixture
def config(tmp_path):
    (tmp_path / "users.yaml").write_text(USERS)
    cfg = tmp_path / "apppass.yaml"
    cfg.write_text(
        "store: {sqlite: codes.db}\n"
        "directory: {static: users.yaml}\n"
        "policy: {legacy_group: legacy-mail}\n"
        "codes: {max_per_account: 2, argon2: {memory_kib: 8192, time_cost: 1}}\n"
    )
    return cfg


def run(config, capsys, *args):
    code = main(["-c", str(config), *args])
    out, err = capsys.readouterr()
    return code, out, err


def create(config, capsys, *extra, login="alice", label="phone"):
    return run(config, capsys, "codes", "create", login, "--label", label, *extra)


def test_create_prints_the_code_once_grouped_with_a_warning(config, capsys):
    code, out, err = create(config, capsys, "--scope", "smtp,imap", "--expires", "90d")
    assert code == 0, err
    assert re.search(
        r"^    [A-Za-z2-9]{4}-[A-Za-z2-9]{4}-[A-Za-z2-9]{4}-[A-Za-z2-9]{4}$", out, re.M
    )
    assert "It will not be shown again." in out
    assert "Scopes: smtp, imap" in out


def test_create_by_alias_belongs_to_the_same_account(config, capsys):
    create(config, capsys, login="alice@example.test")
    _code, out, _ = run(config, capsys, "codes", "list", "alice", "--json")
    assert [r["account_key"] for r in json.loads(out)] == ["key-alice"]


def test_create_json_includes_the_code_and_record(config, capsys):
    code, out, _ = create(config, capsys, "--json", "--max-uses", "5", "--net", "10.0.4.0/24")
    data = json.loads(out)
    assert code == 0
    assert (
        data["max_uses"] == 5 and data["networks"] == ["10.0.4.0/24"] and data["state"] == "active"
    )
    assert len(data["code"]) == 19


@pytest.mark.parametrize(
    "login,message",
    [
        ("nobody", "apppass: unknown login 'nobody'"),
        ("bob", "apppass: bob: account not allowed legacy sign-in (not a member of legacy-mail)"),
        ("carol", "apppass: carol: account disabled"),
    ],
)
def test_create_refuses_accounts_with_a_reason(config, capsys, login, message):
    code, out, err = create(config, capsys, login=login)
    assert (code, err.strip(), out) == (1, message, "")


def test_create_refuses_past_the_cap(config, capsys):
    create(config, capsys)
    create(config, capsys)
    code, _, err = create(config, capsys)
    assert code == 1
    assert err.strip() == "apppass: alice already has 2 codes (codes.max_per_account is 2)"


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ("--expires", "soon"),
            "apppass: invalid expiry 'soon': use a duration like 90d or 12h, a date like "
            "2027-06-30, or never",
        ),
        (("--expires", "2001-01-01"), "apppass: invalid expiry '2001-01-01': it is in the past"),
        (
            ("--net", "10.0.0.0/33"),
            "apppass: invalid CIDR '10.0.0.0/33': use a network like 10.0.4.0/24 or 2001:db8::/48",
        ),
        (
            ("--scope", "imap,http"),
            "apppass: invalid scope 'http': use a comma-separated list of imap, pop3, smtp",
        ),
        (("--max-uses", "0"), "apppass: --max-uses must be a whole number >= 1"),
    ],
)
def test_create_usage_errors_exit_2_with_one_line(config, capsys, args, message):
    code, out, err = create(config, capsys, *args)
    assert (code, err.strip(), out) == (2, message, "")


def test_list_shows_an_aligned_table_with_states(config, capsys):
    create(config, capsys, "--max-uses", "3", label="3rd floor printer")
    create(config, capsys, label="old phone")
    run(config, capsys, "codes", "disable", "2")
    code, out, _ = run(config, capsys, "codes", "list")
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == [
        "ID",
        "LOGIN",
        "LABEL",
        "SCOPES",
        "CREATED",
        "EXPIRES",
        "USES",
        "LAST",
        "USED",
        "FAILED",
        "STATE",
    ]
    assert (
        "3rd floor printer" in lines[1]
        and lines[1].rstrip().endswith("active")
        and "0/3" in lines[1]
    )
    assert lines[2].rstrip().endswith("disabled")
    assert lines[0].index("STATE") == lines[1].index("active")


def test_revoked_codes_are_listed_only_with_all(config, capsys):
    create(config, capsys)
    assert run(config, capsys, "codes", "revoke", "1")[1] == "code 1 (alice, phone) revoked\n"
    assert run(config, capsys, "codes", "list")[1].startswith("no codes")
    assert "revoked" in run(config, capsys, "codes", "list", "--all")[1]
    code, _, err = run(config, capsys, "codes", "revoke", "1")
    assert (code, err.strip()) == (1, "apppass: app password 1 was already revoked")


def test_show_enable_and_unknown_ids(config, capsys):
    create(config, capsys)
    run(config, capsys, "codes", "disable", "1")
    assert run(config, capsys, "codes", "enable", "1")[0] == 0
    code, out, _ = run(config, capsys, "codes", "show", "1", "--json")
    assert json.loads(out)["disabled"] is False
    code, out, err = run(config, capsys, "codes", "show", "42")
    assert (code, err.strip()) == (1, "apppass: no app password with id 42")


def test_revoke_all_and_purge(config, capsys):
    create(config, capsys)
    create(config, capsys)
    assert run(config, capsys, "codes", "revoke-all", "alice")[1] == "revoked 2 codes of alice\n"
    code, out, _ = run(config, capsys, "codes", "purge", "--older-than", "30d")
    assert code == 0 and out.startswith("purged 0 ")
    code, _, err = run(config, capsys, "codes", "purge", "--older-than", "a month")
    assert (code, err.strip()) == (
        2,
        "apppass: invalid duration 'a month': use a duration like 30d, 12h or 15m",
    )


def test_directory_check_shows_every_verdict(config, capsys):
    code, out, _ = run(config, capsys, "directory", "check", "bob")
    assert code == 1
    assert "legacy sign-in     not allowed (not in legacy-mail)" in out
    assert "verdict            refused: account not allowed legacy sign-in" in out
    code, out, _ = run(config, capsys, "directory", "check", "alice@example.test")
    assert code == 0 and "stable id          key-alice" in out


def test_check_config_reports_all_errors_and_exits_2(tmp_path, capsys):
    cfg = tmp_path / "apppass.yaml"
    cfg.write_text(
        "store: {sqlite: x.db}\ndirectory: {static: nope.yaml}\ncodes: {alphabet: upper}\n"
    )
    code, _out, err = run(cfg, capsys, "check-config")
    assert code == 2
    assert err.splitlines() == [
        'apppass.yaml: codes.alphabet: must be one of mixed, lower (got "upper")'
    ]


def test_check_config_reports_a_missing_users_file(tmp_path, capsys):
    cfg = tmp_path / "apppass.yaml"
    cfg.write_text("store: {sqlite: x.db}\ndirectory: {static: nope.yaml}\n")
    code, _, err = run(cfg, capsys, "check-config")
    assert code == 2 and "nope.yaml: cannot read" in err


def test_no_traceback_reaches_the_user_from_the_console_script(tmp_path):
    cfg = tmp_path / "apppass.yaml"
    cfg.write_text("store: [oops\n")
    exe = Path(sys.executable).parent / "apppass"
    proc = subprocess.run(
        [str(exe), "-c", str(cfg), "codes", "list"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("apppass.yaml: not valid YAML at line")


def test_unknown_command_is_a_usage_error(config, capsys):
    code, _, err = run(config, capsys, "codes", "frobnicate")
    assert code == 2 and "invalid choice" in err


def test_check_config_loads_listener_certificates(tmp_path, capsys):
    (tmp_path / "users.yaml").write_text("accounts: {}\n")
    (tmp_path / "master").write_text("x\n")
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    cfg = tmp_path / "apppass.yaml"
    cfg.write_text(
        "store: {sqlite: x.db}\ndirectory: {static: users.yaml}\n"
        "upstream: {imap: {host: 127.0.0.1, master_user: m, master_password_file: master}}\n"
        "listeners: [{protocol: imap, bind: '127.0.0.1:1993', tls: implicit,"
        " cert_file: cert.pem, key_file: key.pem}]\n"
    )
    code, _, err = run(cfg, capsys, "check-config")
    assert code == 2
    assert err.startswith(f"apppass.yaml: listeners[0]: {tmp_path}/cert.pem:"), err


def test_directory_check_refuses_an_unusable_upstream_identity(config, capsys):
    users = config.parent / "users.yaml"
    users.write_text(
        USERS + '  mallory: {id: key-m, groups: [legacy-mail], upstream: "[x\\r\\nRCPT TO:<c>"}\n'
    )
    code, out, _ = run(config, capsys, "directory", "check", "mallory")
    assert code == 1
    assert "upstream identity  '[x\\r\\nRCPT TO:<c>' (unusable)" in out
    assert (
        "verdict            refused: upstream identity contains control characters: "
        "unusable as a SASL authzid or XCLIENT LOGIN"
    ) in out
    assert "\r" not in out


# -- orphaned codes: the account is gone from the directory (issue: reused logins) -----------

WITHOUT_ALICE = USERS.replace(
    "  alice: {id: key-alice, aliases: [alice@example.test], groups: [legacy-mail]}\n", ""
)


def test_codes_of_a_deleted_account_are_listed_orphaned(config, capsys):
    create(config, capsys, label="phone")
    create(config, capsys, label="tablet")
    (config.parent / "users.yaml").write_text(WITHOUT_ALICE)
    code, out, _ = run(config, capsys, "codes", "list")
    lines = out.splitlines()
    assert code == 0
    assert lines[1].rstrip().endswith("active, orphaned: account gone")
    assert lines[2].rstrip().endswith("active, orphaned: account gone")
    assert lines[-1] == (
        "orphaned: account gone: codes 1, 2 of account key 'key-alice', which the directory no "
        "longer has; revoke with: apppass codes revoke-all --key key-alice"
    )
    _, out, _ = run(config, capsys, "codes", "list", "--json")
    assert [(r["state"], r["orphaned"]) for r in json.loads(out)] == [("active", True)] * 2


def test_codes_of_a_deleted_account_are_revocable_by_id_and_by_the_old_key(config, capsys):
    create(config, capsys, label="phone")
    create(config, capsys, label="tablet")
    (config.parent / "users.yaml").write_text(WITHOUT_ALICE)
    code, _, err = run(config, capsys, "codes", "revoke-all", "alice")
    assert code == 1 and err.startswith("apppass: unknown login 'alice' (")
    assert "--key KEY" in err
    assert run(config, capsys, "codes", "revoke", "1")[1] == "code 1 (alice, phone) revoked\n"
    code, out, _ = run(config, capsys, "codes", "list", "--key", "key-alice")
    assert code == 0 and "tablet" in out and "phone" not in out
    code, out, _ = run(config, capsys, "codes", "revoke-all", "--key", "key-alice")
    assert (code, out) == (0, "revoked 1 code of account key 'key-alice'\n")
    code, out, _ = run(config, capsys, "codes", "list", "--all")
    assert out.count("revoked, orphaned: account gone") == 2
    assert "revoke with" not in out  # nothing left to revoke


def test_codes_of_a_present_account_are_not_orphaned(config, capsys):
    create(config, capsys)
    _, out, _ = run(config, capsys, "codes", "list", "--json")
    assert json.loads(out)[0]["orphaned"] is False
    assert "orphaned" not in run(config, capsys, "codes", "list")[1]


@pytest.mark.parametrize(
    "args,message",
    [
        ((), "apppass: give a LOGIN, or --key KEY for an account the directory no longer has"),
        (("alice", "--key", "key-alice"), "apppass: give a LOGIN or --key KEY, not both"),
    ],
)
def test_revoke_all_takes_a_login_or_a_key(config, capsys, args, message):
    code, out, err = run(config, capsys, "codes", "revoke-all", *args)
    assert (code, err.strip(), out) == (2, message, "")


# -- a broken users file ------------------------------------------------------------------------


@pytest.mark.parametrize("command", [("check-config",), ("directory", "check", "alice")])
def test_a_broken_users_file_is_named_with_key_and_rule(config, capsys, command):
    users = config.parent / "users.yaml"
    users.write_text(USERS.replace("groups: [staff]}", "groups: [staff], enabled: maybe}"))
    code, out, err = run(config, capsys, *command)
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        'users.yaml: accounts.bob.enabled: must be true or false (got "maybe")',
        f"{users}: a running apppass keeps serving the last good version of this file (and "
        "logs these problems) until it is fixed",
    ]


def test_codes_are_listed_while_the_users_file_is_broken(config, capsys):
    create(config, capsys)
    (config.parent / "users.yaml").write_text("accounts: [broken\n")
    code, out, err = run(config, capsys, "codes", "list")
    assert code == 0 and "phone" in out and "orphaned" not in out
    assert err.startswith("apppass: orphaned codes not marked: users.yaml: not valid YAML at line")
    assert run(config, capsys, "codes", "revoke", "1")[0] == 0


def test_check_config_names_an_account_without_an_id(config, capsys):
    (config.parent / "users.yaml").write_text("accounts: {jsmith: {groups: [legacy-mail]}}\n")
    code, _, err = run(config, capsys, "check-config")
    assert code == 2
    assert err.startswith("users.yaml: accounts.jsmith.id: is required: a stable id that is ")


def test_expires_never_overrides_the_default_expiry(config, capsys):
    config.write_text(config.read_text().replace("codes: {", "codes: {default_expires: 90d, "))
    code, out, _ = run(config, capsys, "codes", "create", "alice", "--label", "a", "--json")
    assert code == 0 and json.loads(out)["expires_at"] is not None
    code, out, _ = run(
        config, capsys, "codes", "create", "alice", "--label", "b", "--expires", "never", "--json"
    )
    assert code == 0 and json.loads(out)["expires_at"] is None


def test_create_with_a_sending_policy_and_a_custodian_shows_them(config, capsys):
    code, out, err = create(
        config,
        capsys,
        "--scope",
        "smtp",
        "--mail-from",
        "Scanner@Example.org",
        "--rcpt-domain",
        "example.org",
        "--max-messages-per-day",
        "10",
        "--custodian",
        "print-team@example.org",
    )
    assert code == 0, err
    assert (
        "It sends as scanner@example.org; to example.org; 10 messages a day; "
        "custodian: print-team@example.org" in out
    )
    _, listed, _ = run(config, capsys, "codes", "list")
    assert re.search(
        r"^code 1 \(alice, phone\): sends as scanner@example.org; to example.org; "
        r"10 messages a day \(0 sent today\)$",
        listed,
        re.M,
    )
    _, shown, _ = run(config, capsys, "codes", "show", "1", "--json")
    record = json.loads(shown)
    assert (record["mail_from"], record["rcpt_domains"], record["max_messages_per_day"]) == (
        ["scanner@example.org"],
        ["example.org"],
        10,
    )
    assert (record["sent_today"], record["custodian"]) == (0, "print-team@example.org")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--mail-from", "scanner"], "'scanner' is not a mail address"),
        (["--rcpt-domain", "example..org"], "'example..org' is not a domain"),
        (["--max-messages-per-day", "0"], "messages per day is a whole number from 1"),
        (["--custodian", "team"], "'team' is not a mail address like team@example.org"),
        (["--scope", "imap", "--rcpt-domain", "example.org"], "include smtp in the scopes"),
    ],
)
def test_create_refuses_a_sending_policy_it_cannot_apply(config, capsys, args, message):
    code, out, err = create(config, capsys, *args)
    assert (code, out) == (2, "") and message in err, err


def test_sending_replaces_a_codes_policy_or_lifts_it(config, capsys):
    assert create(config, capsys, "--scope", "smtp", "--max-messages-per-day", "10")[0] == 0
    code, out, err = run(
        config,
        capsys,
        "codes",
        "sending",
        "1",
        "--mail-from",
        "*@Example.org",
        "--rcpt-domain",
        "example.org",
    )
    assert (code, err) == (0, "")
    assert out == "code 1 (alice, phone) sends as *@example.org; to example.org\n"
    code, out, _ = run(config, capsys, "codes", "sending", "1", "--none")
    assert (code, out) == (
        0,
        "code 1 (alice, phone) sends as anyone, to anyone, without a daily cap\n",
    )
    _, shown, _ = run(config, capsys, "codes", "show", "1", "--json")
    record = json.loads(shown)
    assert (record["mail_from"], record["rcpt_domains"], record["max_messages_per_day"]) == (
        [],
        [],
        None,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "give the new policy"),
        (["--none", "--max-messages-per-day", "5"], "give the new policy"),
        (["--mail-from", "scanner"], "'scanner' is not a mail address"),
    ],
)
def test_sending_refuses_no_policy_or_a_bad_one(config, capsys, args, message):
    create(config, capsys, "--scope", "smtp")
    code, out, err = run(config, capsys, "codes", "sending", "1", *args)
    assert (code, out) == (2, "") and message in err, err


def test_custodian_is_changed_or_removed(config, capsys):
    assert create(config, capsys)[0] == 0
    code, out, _ = run(config, capsys, "codes", "custodian", "1", "Team@Example.org")
    assert (code, out) == (0, "code 1 (alice, phone): notices also to team@example.org\n")
    code, out, _ = run(config, capsys, "codes", "custodian", "1", "--none")
    assert (code, out) == (0, "code 1 (alice, phone): notices to the account only\n")
    for args in ([], ["x@example.org", "--none"]):
        code, out, err = run(config, capsys, "codes", "custodian", "1", *args)
        assert (code, out) == (2, "") and "give the custodian's ADDRESS" in err
    code, _, err = run(config, capsys, "codes", "custodian", "1", "team")
    assert code == 2 and "'team' is not a mail address" in err


def test_list_stale_shows_the_codes_devices_still_try_and_from_where(config, capsys):
    from datetime import UTC, datetime

    from proxy.codes.sqlite import SqliteCodeStore

    create(config, capsys, label="old printer")
    create(config, capsys, label="new printer")
    assert run(config, capsys, "codes", "revoke", "1")[0] == 0
    store = SqliteCodeStore(config.parent / "codes.db")
    for _ in range(212):
        store.record_stale(1, "10.0.4.17", now=datetime(2026, 11, 24, 8, 0, tzinfo=UTC))
    store.close()
    code, out, _ = run(config, capsys, "codes", "list", "--stale")
    assert code == 0 and "new printer" not in out
    assert (
        "code 1 (alice, old printer): still retrying: 212 attempts since 2026-11-24 "
        "from 10.0.4.17" in out
    )
    _, shown, _ = run(config, capsys, "codes", "show", "1")
    assert re.search(r"^still_retrying +still retrying: 212 attempts since 2026-11-24", shown, re.M)
    assert run(config, capsys, "codes", "list", "bob", "--stale")[1] == (
        "no codes that a device still tries\n"
    )

"""`apppass tokens create|list|revoke`: the admin API's bearer tokens as an admin makes them."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest

from proxy.cli import main
from proxy.codes.sqlite import SqliteCodeStore
from proxy.web.records import WebRecords

TOKEN = re.compile(r"^    (apt_[A-Za-z0-9]{8}_[A-Za-z0-9]{40})$", re.M)


@pytest.fixture
def config(tmp_path):
    (tmp_path / "users.yaml").write_text("accounts:\n  alice: {id: key-alice}\n")
    cfg = tmp_path / "apppass.yaml"
    cfg.write_text(
        "store: {sqlite: codes.db}\ndirectory: {static: users.yaml}\naudit: {file: audit.jsonl}\n"
    )
    return cfg


def run(config, capsys, *args):
    status = main(["-c", str(config), "tokens", *args])
    out, err = capsys.readouterr()
    return status, out, err


def records(config) -> WebRecords:
    return WebRecords(SqliteCodeStore(config.parent / "codes.db"))


def test_create_prints_the_token_once_and_keeps_only_its_digest(config, capsys):
    status, out, _ = run(config, capsys, "create", "--label", "helpdesk tool")
    assert status == 0
    found = TOKEN.search(out)
    assert found is not None, "no token printed"
    assert "It will not be shown again." in out and "read and write" in out
    store = records(config)
    token = store.authenticate_token(found.group(1), "192.0.2.1")
    assert token is not None and (token.label, token.read_only) == ("helpdesk tool", False)
    database = (config.parent / "codes.db").read_bytes()
    stored_in_clear = found.group(1).encode() in database
    assert not stored_in_clear


def test_a_read_only_token_with_an_expiry(config, capsys):
    status, out, _ = run(config, capsys, "create", "--label", "audit", "--read-only", "--expires",
                         "30d")  # fmt: skip
    assert status == 0 and "read-only" in out
    (token,) = records(config).tokens()
    assert token.read_only
    assert timedelta(days=29) < token.expires_at - datetime.now(UTC) <= timedelta(days=30)


@pytest.mark.parametrize(
    "args,message",
    [
        (("--expires", "soon"), "invalid expiry 'soon'"),
        (("--expires", "2001-01-01"), "it is in the past"),
    ],
)
def test_a_bad_expiry_is_a_usage_error(config, capsys, args, message):
    status, out, err = run(config, capsys, "create", "--label", "x", *args)
    assert (status, out) == (2, "") and message in err
    assert records(config).tokens() == []


@pytest.mark.parametrize("label", ["", "   ", "tab\there", "x" * 101])
def test_a_bad_label_is_refused_naming_the_rule(config, capsys, label):
    status, out, err = run(config, capsys, "create", "--label", label)
    assert (status, out) == (2, "") and "label is 1 to 100 printable characters" in err


def test_list_shows_access_last_use_and_state_never_a_value(config, capsys):
    _, out, _ = run(config, capsys, "create", "--label", "script")
    value = TOKEN.search(out).group(1)
    run(config, capsys, "create", "--label", "reader", "--read-only")
    store = records(config)
    store.authenticate_token(value, "192.0.2.7")
    store.create_token("contractor", False, datetime.now(UTC) - timedelta(days=1), "cli")
    status, out, _ = run(config, capsys, "list")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "LABEL", "ACCESS", "CREATED", "EXPIRES", "LAST", "USED",
                                "STATE"]  # fmt: skip
    assert "read-write" in lines[1] and "192.0.2.7" in lines[1] and lines[1].endswith("active")
    assert "read-only" in lines[2] and "never" in lines[2]
    assert lines[3].endswith("expired")
    status, out, _ = run(config, capsys, "list", "--json")
    listed = json.loads(out)
    assert [(t["label"], t["read_only"], t["state"]) for t in listed] == [
        ("script", False, "active"),
        ("reader", True, "active"),
        ("contractor", False, "expired"),
    ]
    assert listed[0]["last_used_ip"] == "192.0.2.7"
    shows_value = value in out or value.split("_")[2] in out
    assert not shows_value


def test_list_without_tokens_says_how_to_make_one(config, capsys):
    assert run(config, capsys, "list")[1] == (
        "no API tokens (apppass tokens create --label TEXT makes one)\n"
    )


def test_revoke_stops_a_token_and_says_so_once(config, capsys):
    _, out, _ = run(config, capsys, "create", "--label", "offboarding")
    value = TOKEN.search(out).group(1)
    (token,) = records(config).tokens()
    status, out, _ = run(config, capsys, "revoke", str(token.id))
    assert (status, out) == (0, f"API token {token.id} (offboarding) revoked\n")
    assert records(config).authenticate_token(value, "192.0.2.1") is None
    status, _, err = run(config, capsys, "revoke", str(token.id))
    assert (status, err) == (1, f"apppass: API token {token.id} was already revoked\n")
    status, _, err = run(config, capsys, "revoke", "99")
    assert (status, err) == (1, "apppass: no API token with id 99\n")
    assert run(config, capsys, "list", "--json")[1].count('"revoked"') == 1


def test_creating_and_revoking_are_audited_without_the_value(config, capsys):
    _, out, _ = run(config, capsys, "create", "--label", "ci")
    value = TOKEN.search(out).group(1)
    run(config, capsys, "revoke", "1")
    audit = (config.parent / "audit.jsonl").read_text()
    events = [json.loads(line) for line in audit.splitlines()]
    assert [(e["event"], e["action"], e["label"]) for e in events] == [
        ("token", "create", "ci"),
        ("token", "revoke", "ci"),
    ]
    written_down = value in audit or value.split("_")[2] in audit
    assert not written_down

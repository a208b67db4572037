"""`apppass notify` as the systemd timer runs it (the installed command, in its own process)
against a real Postfix delivering into Dovecot: expiry notices reach the account and the code's
custodian once however often it runs, through the upstream logged in as the account or through
a relay with its own login; an unused code is disabled, audited and its account told."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from proxy.codes.hashing import CodeHasher
from proxy.codes.issue import issue_code
from proxy.codes.sqlite import SqliteCodeStore
from proxy.codes.store import State
from proxy.config import load
from proxy.directory.static import StaticDirectory
from tests.integration.harness import FAST_ARGON2, USERS
from tests.servers.dovecot import DEFAULT_USERS

pytestmark = pytest.mark.integration

APPPASS = Path(sys.executable).parent / "apppass"


class Site:
    """A config, users file and store in a folder, as an installed apppass has them."""

    def __init__(self, folder: Path, postfix, test_ca, files=None, **config) -> None:
        self.folder = folder
        folder.mkdir()
        (folder / "users.yaml").write_text(yaml.safe_dump(USERS))
        for name, text in (files or {}).items():
            (folder / name).write_text(text)
        data = {
            "hostname": "apppass.example.test",
            "store": {"sqlite": "codes.db"},
            "directory": {"static": "users.yaml"},
            "policy": {"legacy_group": "legacy-mail"},
            "codes": {"argon2": FAST_ARGON2, **config.pop("codes", {})},
            "audit": {"file": "audit.jsonl"},
            "upstream": {
                "smtp": {
                    "host": "127.0.0.1",
                    "port": postfix.smtp_port,
                    "tls": "starttls",
                    "ca_file": str(test_ca.ca),
                    "login": "xclient",
                }
            },
            **config,
        }
        self.config = folder / "apppass.yaml"
        self.config.write_text(yaml.safe_dump(data))
        self.settings = load(self.config)
        self.store = SqliteCodeStore(self.settings.store.target)
        self.directory = StaticDirectory(self.settings.directory.static_file)

    def issue(self, login: str, label: str, **kw):
        return issue_code(
            self.settings,
            self.directory,
            self.store,
            CodeHasher(self.settings.codes.argon2),
            login=login,
            label=label,
            **kw,
        ).record

    def notify(self, *args: str) -> tuple[int, str]:
        done = subprocess.run(
            [str(APPPASS), "-c", str(self.config), "notify", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return done.returncode, done.stdout + done.stderr

    def audit(self) -> list[dict]:
        path = self.folder / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def site(postfix, test_ca, tmp_path):
    made: list[Site] = []

    def make(**config) -> Site:
        s = Site(tmp_path / f"site{len(made)}", postfix, test_ca, **config)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_an_expiry_notice_reaches_account_and_custodian_once_sent_as_the_account(site, dovecot):
    s = site(notify={"from": "IT helpdesk <it@example.test>"})
    label = f"tablet {uuid.uuid4()}"
    code = s.issue(
        "alice",
        label,
        expires_at=datetime.now(UTC) + timedelta(days=10),
        custodian="bob@example.test",
    )
    status, out = s.notify()
    assert status == 0, out
    sent = f"sent expiry-14 notice for code {code.id} (alice, {label})"
    assert f"{sent} to alice@example.test, bob@example.test" in out
    for user in ("alice", "bob"):
        notice = dovecot.wait_for_message(user, label)
        assert notice["Subject"] == f'App password "{label}" stops working in 10 days'
        assert notice["From"] == "IT helpdesk <it@example.test>"
        assert notice["Return-Path"] == "<alice@example.test>"  # logged in as alice
        assert notice["Auto-Submitted"] == "auto-generated"
    status, out = s.notify()
    assert status == 0 and "0 notices sent" in out, out
    # A later notice, delivered after the second run, finds the first one still alone.
    marker = s.issue(
        "alice", f"marker {uuid.uuid4()}", expires_at=datetime.now(UTC) + timedelta(days=2)
    )
    assert s.notify()[0] == 0
    dovecot.wait_for_message("alice", marker.label)
    copies = [m for m in dovecot.messages("alice") if label in m["Subject"]]
    assert len(copies) == 1


def test_an_unused_code_is_disabled_and_told_through_a_relay_with_its_own_login(
    site, dovecot, postfix, test_ca
):
    s = site(
        files={"relay-password": DEFAULT_USERS["bob"] + "\n"},
        codes={"disable_after_unused": "90d"},
        notify={
            "from": "it@example.test",
            "smtp": {
                "host": "127.0.0.1",
                "port": postfix.submission_port,
                "tls": "starttls",
                "ca_file": str(test_ca.ca),
                "login": "bob",
                "password_file": "relay-password",
            },
        },
    )
    label = f"old phone {uuid.uuid4()}"
    code = s.issue("alice", label)
    long_ago = int((datetime.now(UTC) - timedelta(days=120)).timestamp())
    s.store.run("UPDATE codes SET created_at = ? WHERE id = ?", (long_ago, code.id))

    status, out = s.notify("--dry-run")
    assert status == 0, out
    assert f"would disable code {code.id} (alice, {label}): unused since " in out
    assert "would send idle notice" in out and f'Subject: App password "{label}" was' in out
    assert s.store.get(code.id).state() is State.ACTIVE and s.store.notices(code.id) == []

    status, out = s.notify()
    assert status == 0, out
    assert f"disabled code {code.id} (alice, {label})" in out
    got = s.store.get(code.id)
    assert got.state() is State.DISABLED and got.idle_disabled_at is not None
    assert got.revoked_at is None
    notice = dovecot.wait_for_message("alice", label)
    assert notice["Subject"] == f'App password "{label}" was disabled: not used for 120 days'
    assert notice["Return-Path"] == "<it@example.test>"  # from notify.from, through the relay
    assert "Authenticated sender: bob" in notice.as_string()
    (event,) = [e for e in s.audit() if e["event"] == "manage" and e.get("code") == code.id]
    assert (event["action"], event["reason"], event["by"]) == (
        "disable",
        "unused for 90 days",
        "apppass notify",
    )
    assert "0 notices sent" in s.notify()[1]

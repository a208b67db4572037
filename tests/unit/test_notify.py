"""Specification of `apppass notify` (proxy/notify): which notices are due, their text (the
site's templates win), idle codes disabled, and each notice sent once, on a real SQLite store with
the mail server replaced by a recording one (tests/integration/test_notify.py sends through a
real Postfix)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import pytest

from proxy.audit import Audit
from proxy.codes.hashing import CodeHasher
from proxy.codes.issue import issue_code
from proxy.codes.sqlite import SqliteCodeStore
from proxy.codes.store import State
from proxy.config import parse
from proxy.directory.static import StaticDirectory
from proxy.manage import Manager
from proxy.notify.notices import NotifyError, due
from proxy.notify.run import Notifier

USERS = """
accounts:
  alice: {id: key-alice, name: Alice Example, aliases: [alice@example.test],
    groups: [legacy-mail], upstream: alice}
  printer1: {id: key-printer1, groups: [legacy-mail], upstream: printer1}
"""

NOW = datetime(2026, 11, 25, 6, 0, tzinfo=UTC)


class RecordingMailer:
    """The mail server: what it was given, or a refusal while `down`."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[str, ...], str]] = []
        self.down = False

    def send(self, msg, sender, to, identity):
        if self.down:
            raise NotifyError("127.0.0.1:25: Connection refused")
        self.sent.append((sender, to, msg.as_string()))


@pytest.fixture
def env(tmp_path):
    (tmp_path / "users.yaml").write_text(USERS)
    (tmp_path / "site").mkdir()

    def make(notify=None, idle="90d"):
        return parse(
            {
                "hostname": "apppass.example.test",
                "store": {"sqlite": "codes.db"},
                "directory": {"static": "users.yaml"},
                "policy": {"legacy_group": "legacy-mail"},
                "codes": {
                    "argon2": {"memory_kib": 8192, "time_cost": 1},
                    "disable_after_unused": idle,
                },
                "upstream": {"smtp": {"host": "127.0.0.1", "port": 25, "login": "xclient"}},
                "web": {"public_url": "https://apppass.example.test"},
                "notify": {
                    "from": "IT <it@example.test>",
                    "smtp": {"host": "127.0.0.1", "tls": "none"},
                    **(notify or {}),
                },
            },
            base_dir=tmp_path,
        )

    class Env:
        pass

    e = Env()
    e.folder = tmp_path
    e.settings = make()
    e.remake = lambda **kw: setattr(e, "settings", make(**kw))
    e.store = SqliteCodeStore(e.settings.store.target)
    e.directory = StaticDirectory(e.settings.directory.static_file, legacy_group="legacy-mail")
    e.audit = io.StringIO()
    e.mailer = RecordingMailer()
    e.said: list[str] = []

    def issue(login="alice", label="phone", created=NOW, **kw):
        rec = issue_code(
            e.settings,
            e.directory,
            e.store,
            CodeHasher(e.settings.codes.argon2),
            login=login,
            label=label,
            **kw,
        ).record
        e.store.run(
            "UPDATE codes SET created_at = ? WHERE id = ?", (int(created.timestamp()), rec.id)
        )
        return e.store.get(rec.id)

    def run(dry_run=False, now=NOW):
        manager = Manager(
            e.settings, e.directory, e.store, CodeHasher(e.settings.codes.argon2), Audit(e.audit)
        )
        e.said.clear()
        return Notifier(e.settings, manager, e.mailer, e.said.append, dry_run).run(now)

    e.issue, e.run = issue, run
    e.events = lambda: [json.loads(line) for line in e.audit.getvalue().splitlines()]
    yield e
    e.store.close()


def test_notices_are_due_14_and_3_days_before_the_expiry_and_after_an_idle_disable(env):
    soon = env.issue(label="a", expires_at=NOW + timedelta(days=2, hours=1))
    later = env.issue(label="b", expires_at=NOW + timedelta(days=13, hours=2))
    far = env.issue(label="c", expires_at=NOW + timedelta(days=15))
    env.store.disable_idle(env.issue(label="d", created=NOW - timedelta(days=100)).id, NOW, NOW)
    found = {
        (n.code.label, n.kind, n.days) for n in due(env.store.list(include_inactive=True), NOW)
    }
    assert found == {("a", "expiry-3", 3), ("b", "expiry-14", 14), ("d", "idle", 100)}
    assert far.id and soon.id and later.id


def test_a_run_sends_each_notice_once_to_the_account_and_the_custodian(env):
    code = env.issue(
        "printer1",
        "Printer 3rd floor",
        expires_at=NOW + timedelta(days=10),
        custodian="print-team@example.test",
    )
    assert env.run().sent == 1
    ((sender, to, text),) = env.mailer.sent
    assert to == ("print-team@example.test",)  # printer1 has no mail address of its own
    assert sender == "it@example.test"  # through a relay: from notify.from
    assert 'Subject: App password "Printer 3rd floor" stops working in 10 days' in text
    assert "From: IT <it@example.test>" in text and "Auto-Submitted: auto-generated" in text
    assert "https://apppass.example.test" in text and "three days before" in text
    assert env.run().sent == 0 and len(env.mailer.sent) == 1  # twice: nothing twice
    assert env.store.notices(code.id)[0][:2] == ("expiry-14", int(code.expires_at.timestamp()))
    assert env.run(now=NOW + timedelta(days=7, hours=1)).sent == 1  # 3 days before: the last
    assert "stops working in 3 days" in env.mailer.sent[-1][2]
    assert env.said[-1] == "notify: 0 codes disabled, 1 notice sent, 0 failed, 0 skipped"


def test_an_unused_code_is_disabled_audited_and_its_account_told_once(env):
    idle = env.issue(label="old phone", created=NOW - timedelta(days=120))
    used = env.issue(label="laptop", created=NOW - timedelta(days=120))
    env.store.run(
        "UPDATE codes SET last_used_at = ? WHERE id = ?", (int(NOW.timestamp()) - 60, used.id)
    )
    outcome = env.run()
    assert (outcome.disabled, outcome.sent) == (1, 1)
    got = env.store.get(idle.id)
    assert got.state(NOW) is State.DISABLED and got.idle_disabled_at == NOW
    assert got.revoked_at is None and env.store.get(used.id).state(NOW) is State.ACTIVE
    (event,) = [e for e in env.events() if e["event"] == "manage"]
    assert (event["action"], event["code"], event["reason"], event["by"]) == (
        "disable",
        idle.id,
        "unused for 90 days",
        "apppass notify",
    )
    ((_, to, text),) = env.mailer.sent
    assert to == ("alice@example.test",)
    assert "was not used for 120 days (never used)" in text and "Hello Alice Example" in text
    assert env.run().sent == 0 and env.run().disabled == 0


def test_a_dry_run_changes_and_sends_nothing_and_prints_what_it_would(env):
    idle = env.issue(label="old phone", created=NOW - timedelta(days=120))
    env.issue(label="tablet", expires_at=NOW + timedelta(days=3))
    outcome = env.run(dry_run=True)
    assert (outcome.disabled, outcome.sent) == (1, 2) and env.mailer.sent == []
    assert env.store.get(idle.id).state(NOW) is State.ACTIVE
    assert env.store.notices(idle.id) == []
    text = "\n".join(env.said)
    assert f"would disable code {idle.id} (alice, old phone): unused since 2026-07-28" in text
    assert 'Subject: App password "tablet" stops working in 3 days' in text
    assert "    To: alice@example.test" in text
    assert env.said[-1].startswith("notify: 1 code would be disabled, 2 notices would be sent")


def test_a_notice_that_could_not_be_sent_is_tried_again_by_the_next_run(env):
    env.issue(label="tablet", expires_at=NOW + timedelta(days=3))
    env.mailer.down = True
    assert env.run().failed == 1
    assert "not sent: 127.0.0.1:25: Connection refused (the next run tries again)" in env.said[0]
    env.mailer.down = False
    assert env.run().sent == 1


def test_without_notify_from_idle_codes_are_still_disabled_and_the_notice_waits(env, tmp_path):
    env.settings = env.settings.__class__(
        **{**env.settings.__dict__, "notify": env.settings.notify.__class__()}
    )
    idle = env.issue(label="old phone", created=NOW - timedelta(days=120))
    outcome = env.run()
    assert (outcome.disabled, outcome.sent, outcome.skipped) == (1, 0, 1)
    assert "notices not sent: notify.from is not set" in env.said[1]
    assert env.store.notices(idle.id) == []  # not claimed: sent once notify.from is set


def test_the_sites_template_replaces_the_built_in_one(env):
    (env.folder / "site" / "expiry.txt").write_text(
        "Subject: {{ code.label }}: {{ days }} days left\n\nCall the helpdesk, {{ name }}.\n"
    )
    env.remake(notify={"templates": "site"})
    env.issue(label="tablet", expires_at=NOW + timedelta(days=3))
    env.run()
    text = env.mailer.sent[0][2]
    assert "Subject: tablet: 3 days left" in text and "Call the helpdesk, Alice Example." in text


@pytest.mark.parametrize(
    "template,why",
    [
        ("no subject line\n\nbody\n", "must start with one Subject: line"),
        ("Subject: {{ nothing.here }}\n\nbody\n", "'nothing' is undefined"),
        ("Subject: {{ code.__class__.__mro__ }}\n\nbody\n", "unsafe"),
    ],
)
def test_a_broken_template_is_named_and_its_notice_tried_again(env, template, why):
    (env.folder / "site" / "expiry.txt").write_text(template)
    env.remake(notify={"templates": "site"})
    code = env.issue(label="tablet", expires_at=NOW + timedelta(days=3))
    assert env.run().failed == 1 and env.mailer.sent == []
    assert "template expiry.txt: " in env.said[0] and why in env.said[0], env.said
    assert env.store.notices(code.id) == []


def test_without_a_relay_a_notice_goes_upstream_from_the_accounts_own_address(env):
    env.remake(notify={"smtp": None})
    env.issue(label="tablet", expires_at=NOW + timedelta(days=3))
    printer = env.issue(
        "printer1", "scanner", expires_at=NOW + timedelta(days=3), custodian="t@example.test"
    )
    assert env.run().sent == 2
    senders = sorted((to, sender) for sender, to, _ in env.mailer.sent)
    assert senders == [
        (("alice@example.test",), "alice@example.test"),  # as alice, from her own address
        (("t@example.test",), "it@example.test"),  # printer1 has none: notify.from
    ]
    assert printer.custodian == "t@example.test"

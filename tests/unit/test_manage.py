"""Specification of the one service layer (proxy/manage.py) the CLI, the portal and the API
share: who may act on what, what a new code may be, and how each refusal is named."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import pytest

from proxy.audit import Audit
from proxy.codes.hashing import CodeHasher
from proxy.codes.sending import SendingPolicy
from proxy.codes.sqlite import SqliteCodeStore
from proxy.config import parse
from proxy.directory.static import StaticDirectory
from proxy.manage import Actor, CodeRequest, ManageError, Manager, SendingChange

USERS = """
accounts:
  alice: {id: key-alice, name: Alice Example, aliases: [alice@example.test],
    groups: [legacy-mail], upstream: alice@example.test}
  bob: {id: key-bob, groups: [staff]}
  printer1: {id: key-printer1, name: 3rd floor printer, groups: [legacy-mail, devices]}
  broken: {id: key-broken, groups: [legacy-mail], upstream: "a b"}
"""

CLI = Actor("cli", "root")
ADMIN = Actor("admin", "helpdesk-carol")
ALICE = Actor("portal", "alice", account_key="key-alice")
READ_ONLY = Actor("api", "audit script", read_only=True)


@pytest.fixture
def env(tmp_path):
    (tmp_path / "users.yaml").write_text(USERS)
    settings = parse(
        {
            "store": {"sqlite": "codes.db"},
            "directory": {"static": "users.yaml"},
            "policy": {"legacy_group": "legacy-mail", "mfa_group": "mfa"},
            "codes": {"max_per_account": 3, "argon2": {"memory_kib": 8192, "time_cost": 1}},
        },
        base_dir=tmp_path,
    )
    store = SqliteCodeStore(settings.store.target)
    out = io.StringIO()
    manager = Manager(
        settings,
        StaticDirectory(settings.directory.static_file, legacy_group="legacy-mail"),
        store,
        CodeHasher(settings.codes.argon2),
        Audit(out),
    )
    manager.audited = lambda: [json.loads(line) for line in out.getvalue().splitlines()]
    yield manager
    store.close()


def refused(call, *args) -> tuple[str, str | None]:
    with pytest.raises(ManageError) as info:
        call(*args)
    return info.value.code, info.value.field


def test_a_portal_user_manages_only_their_own_codes(env):
    alice = env.account("alice")
    printer = env.account("printer1")
    mine = env.create(ALICE, alice, CodeRequest("phone")).record
    theirs = env.create(ADMIN, printer, CodeRequest("scanner")).record
    assert [r.id for r in env.codes(ALICE, alice.key)] == [mine.id]
    assert refused(env.codes, ALICE, printer.key) == ("forbidden", None)
    assert refused(env.create, ALICE, printer, CodeRequest("x")) == ("forbidden", None)
    # Someone else's code does not exist, as far as a portal user can tell.
    assert refused(env.code, ALICE, theirs.id) == ("not_found", "id")
    assert refused(env.revoke, ALICE, theirs.id) == ("not_found", "id")
    assert env.revoke(ADMIN, theirs.id).revoked_at is not None


def test_codes_record_who_made_them_and_every_change_is_audited(env):
    printer = env.account("printer1")
    rec = env.create(ADMIN, printer, CodeRequest("scanner", scopes=("smtp",))).record
    assert rec.created_by == "admin:helpdesk-carol" and rec.scopes == ("smtp",)
    env.set_disabled(CLI, rec.id, True)
    env.set_disabled(CLI, rec.id, False)
    env.revoke(CLI, rec.id)
    events = env.audited()
    assert [(e["action"], e["actor"], e["by"]) for e in events] == [
        ("create", "admin", "helpdesk-carol"),
        ("disable", "cli", "root"),
        ("enable", "cli", "root"),
        ("revoke", "cli", "root"),
    ]
    assert all(e["code"] == rec.id and e["account"] == "key-printer1" for e in events)


def test_a_read_only_token_changes_nothing(env):
    alice = env.account("alice")
    rec = env.create(CLI, alice, CodeRequest("phone")).record
    assert env.code(READ_ONLY, rec.id) == rec
    assert refused(env.create, READ_ONLY, alice, CodeRequest("x")) == ("forbidden", None)
    assert refused(env.revoke, READ_ONLY, rec.id) == ("forbidden", None)
    assert refused(env.revoke_all, READ_ONLY, alice.key) == ("forbidden", None)


@pytest.mark.parametrize(
    "request_,field",
    [
        (CodeRequest(""), "label"),
        (CodeRequest("x" * 101), "label"),
        (CodeRequest("tab\there"), "label"),
        (CodeRequest("phone", scopes=("imap", "http")), "scopes"),
        (CodeRequest("phone", scopes=()), "scopes"),
        (CodeRequest("phone", max_uses=0), "max_uses"),
        (CodeRequest("phone", expires_at=datetime.now(UTC) - timedelta(minutes=1)), "expires_at"),
        (CodeRequest("phone", networks=("10.0.0.0/33",)), "networks"),
        (CodeRequest("phone", networks=tuple(f"10.0.{i}.0/24" for i in range(17))), "networks"),
    ],
)
def test_a_bad_request_names_its_field(env, request_, field):
    assert refused(env.create, CLI, env.account("alice"), request_) == ("invalid", field)


def test_policy_and_the_cap_refuse_with_their_own_codes(env):
    assert refused(env.create, CLI, env.account("bob"), CodeRequest("x"))[0] == "forbidden"
    assert refused(env.create, CLI, env.account("broken"), CodeRequest("x"))[0] == "forbidden"
    alice = env.account("alice")
    for i in range(3):
        env.create(CLI, alice, CodeRequest(f"device {i}"))
    assert refused(env.create, CLI, alice, CodeRequest("one more")) == ("cap_reached", None)
    assert refused(env.account, "nobody") == ("not_found", "login")


def test_revoking_twice_and_enabling_a_revoked_code_are_conflicts(env):
    rec = env.create(CLI, env.account("alice"), CodeRequest("phone")).record
    env.revoke(CLI, rec.id)
    assert refused(env.revoke, CLI, rec.id) == ("conflict", None)
    assert refused(env.set_disabled, CLI, rec.id, False) == ("conflict", None)


def test_a_codes_sending_policy_is_replaced_whole_checked_and_audited(env):
    printer = env.account("printer1")
    request = CodeRequest("scanner", scopes=("smtp",), max_messages_per_day=50)
    rec = env.create(ADMIN, printer, request).record
    assert rec.sending == SendingPolicy(("own",), (), 50)
    change = SendingChange(("Scan@Example.test",), ("example.test",), None)
    after = env.set_sending(ADMIN, rec.id, change)
    assert after.sending == SendingPolicy(("scan@example.test",), ("example.test",), None)
    assert env.set_sending(CLI, rec.id, SendingChange()).sending == SendingPolicy()
    changes = [e for e in env.audited() if e["action"] == "sending"]
    assert [(e["by"], e["sending"]) for e in changes] == [
        ("helpdesk-carol", "as scan@example.test; to example.test"),
        ("root", "any sender, any recipient, no daily cap"),
    ]


def test_a_sending_policy_change_is_refused_as_a_new_code_would_be(env):
    alice = env.account("alice")
    imap_only = env.create(CLI, alice, CodeRequest("tablet", scopes=("imap",))).record
    printer = env.create(ADMIN, env.account("printer1"), CodeRequest("scanner")).record
    assert refused(env.set_sending, CLI, imap_only.id, SendingChange(max_messages_per_day=5)) == (
        "invalid",
        "scopes",
    )
    assert refused(env.set_sending, CLI, printer.id, SendingChange(("not an address",))) == (
        "invalid",
        "mail_from",
    )
    assert refused(env.set_sending, CLI, printer.id, SendingChange((), ("-bad-",))) == (
        "invalid",
        "rcpt_domains",
    )
    assert refused(env.set_sending, CLI, printer.id, SendingChange(max_messages_per_day=0)) == (
        "invalid",
        "max_messages_per_day",
    )
    change = SendingChange(max_messages_per_day=5)
    assert refused(env.set_sending, ALICE, printer.id, change) == ("not_found", "id")
    assert refused(env.set_sending, READ_ONLY, printer.id, change) == ("forbidden", None)
    env.revoke(CLI, printer.id)
    assert refused(env.set_sending, CLI, printer.id, change) == ("conflict", None)
    assert env.code(CLI, printer.id).sending == SendingPolicy()


def test_a_codes_custodian_is_changed_checked_and_audited(env):
    rec = env.create(ADMIN, env.account("printer1"), CodeRequest("scanner")).record
    assert env.set_custodian(ADMIN, rec.id, " Print-Team@Example.test ").custodian == (
        "print-team@example.test"
    )
    assert env.set_custodian(CLI, rec.id, None).custodian is None
    assert refused(env.set_custodian, CLI, rec.id, "team") == ("invalid", "custodian")
    assert refused(env.set_custodian, ALICE, rec.id, None) == ("not_found", "id")
    assert refused(env.set_custodian, READ_ONLY, rec.id, None) == ("forbidden", None)
    changes = [e for e in env.audited() if e["action"] == "custodian"]
    assert [(e["by"], e.get("custodian")) for e in changes] == [
        ("helpdesk-carol", "print-team@example.test"),
        ("root", None),
    ]
    env.revoke(CLI, rec.id)
    assert refused(env.set_custodian, CLI, rec.id, "a@example.test") == ("conflict", None)


def test_verdicts_say_what_is_wrong_and_what_to_do(env):
    alice = env.check(env.account("alice"))
    assert alice.allowed and all(v.ok and not v.advice for v in alice.verdicts)
    bob = env.check(env.account("bob"))
    assert not bob.allowed
    (legacy,) = [v for v in bob.verdicts if not v.ok]
    assert legacy.check == "legacy" and "legacy-mail" in legacy.advice
    assert bob.refusal == legacy.detail
    broken = env.check(env.account("broken"))
    assert [v.check for v in broken.verdicts if not v.ok] == ["identity"]


def test_search_finds_accounts_by_any_name_or_display_name(env):
    assert [a.login for a in env.search("printer")] == ["printer1"]
    assert [a.login for a in env.search("EXAMPLE")] == ["alice"]
    assert refused(env.search, "  ") == ("invalid", "q")


def test_codes_default_expires_applies_unless_never_is_asked_for(env):
    from dataclasses import replace

    env.settings = replace(
        env.settings, codes=replace(env.settings.codes, default_expires=timedelta(days=30))
    )
    alice = env.account("alice")
    dated = env.create(CLI, alice, CodeRequest("phone")).record
    assert timedelta(days=29) < dated.expires_at - datetime.now(UTC) <= timedelta(days=30)
    assert (
        env.create(CLI, alice, CodeRequest("printer", never_expires=True)).record.expires_at is None
    )
    later = datetime.now(UTC) + timedelta(days=1)
    both = CodeRequest("x", expires_at=later, never_expires=True)
    assert refused(env.create, CLI, alice, both) == ("invalid", "expires_at")

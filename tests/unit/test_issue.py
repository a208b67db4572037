"""Issuing codes (proxy/codes/issue.py): what may be issued to whom."""

from __future__ import annotations

import pytest

from proxy.codes.hashing import CodeHasher
from proxy.codes.issue import Refused, issue_code
from proxy.codes.sqlite import SqliteCodeStore
from proxy.config import parse
from proxy.directory.account import Account


class OneAccount:
    """A directory that knows one account (what an LDAP directory would return)."""

    def __init__(self, account: Account) -> None:
        self.account = account

    def lookup(self, login: str) -> Account | None:
        return self.account if login == self.account.login else None


def issue(tmp_path, account: Account, **policy):
    settings = parse(
        {
            "store": {"sqlite": "codes.db"},
            "directory": {"static": "users.yaml"},
            "policy": policy,
            "codes": {"argon2": {"memory_kib": 8192, "time_cost": 1}},
        },
        base_dir=tmp_path,
    )
    store = SqliteCodeStore(tmp_path / "codes.db")
    try:
        return issue_code(
            settings,
            OneAccount(account),
            store,
            CodeHasher(settings.codes.argon2),
            login=account.login,
            label="phone",
        )
    finally:
        store.close()


ALICE = Account(key="k", login="alice", upstream_identity="alice@example.org")


def test_no_code_for_an_account_that_must_change_its_password_first(tmp_path):
    must_change = Account(**{**ALICE.__dict__, "extra": {"password_must_change": True}})
    with pytest.raises(Refused, match="must change its password first"):
        issue(tmp_path, must_change)
    assert issue(tmp_path, must_change, revoke_on_password_change=False).record.label == "phone"


def test_no_code_for_an_account_whose_upstream_identity_is_unusable(tmp_path):
    broken = Account(**{**ALICE.__dict__, "upstream_identity": "[x\r\nMAIL FROM:<ceo@x>"})
    with pytest.raises(Refused, match="upstream identity contains control characters"):
        issue(tmp_path, broken)

"""Issuing codes: resolve the login, check the account may have app passwords, generate, hash
and store. Shared by the CLI, the portal and the admin API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from proxy.auth.policy import account_refusal
from proxy.codes.generate import Code, generate
from proxy.codes.hashing import CodeHasher
from proxy.codes.sending import SendingPolicy
from proxy.codes.store import CodeRecord, CodeStore, NewCode
from proxy.config import Settings
from proxy.directory.account import Account
from proxy.sasl import identity_problem

# A label names a device ("3rd floor printer"); long enough for that, short enough for a table.
MAX_LABEL = 100


class Refused(Exception):
    """The request is understood but not allowed (unknown login, policy, cap). Exit code 1."""


@dataclass(frozen=True)
class Issued:
    record: CodeRecord
    code: Code  # shown once, then forgotten


def resolve(directory, login: str) -> Account:
    account = directory.lookup(login)
    if account is None:
        raise Refused(f"unknown login {login!r}")
    return account


def issue_code(
    settings: Settings,
    directory,
    store: CodeStore,
    hasher: CodeHasher,
    *,
    login: str,
    label: str,
    scopes: tuple[str, ...] | None = None,
    expires_at: datetime | None = None,
    max_uses: int | None = None,
    networks: tuple[str, ...] = (),
    created_by: str = "cli",
    sending: SendingPolicy | None = None,
    custodian: str | None = None,
) -> Issued:
    label = label.strip()
    if not label or len(label) > MAX_LABEL or any(ord(c) < 0x20 for c in label):
        raise Refused(f"a label must be 1 to {MAX_LABEL} printable characters")
    account = resolve(directory, login)
    refusal = account_refusal(account, settings.policy) or identity_problem(
        account.upstream_identity
    )
    must_change = account.extra.get("password_must_change")
    if refusal is None and must_change and settings.policy.revoke_on_password_change:
        # Codes made now would stop working at once under revoke_on_password_change.
        refusal = "the account must change its password first (Active Directory pwdLastSet 0)"
    if refusal:
        raise Refused(f"{account.login}: {refusal}")
    code = generate(settings.codes.alphabet, store.selectors(account.key))
    record = store.create(
        NewCode(
            account_key=account.key,
            account_login=account.login,
            label=label,
            selector=code.selector,
            hash=hasher.hash(code.value),
            scopes=tuple(scopes or settings.codes.default_scopes),
            networks=tuple(networks),
            expires_at=expires_at,
            max_uses=max_uses,
            created_by=created_by,
            sending=sending or SendingPolicy(),
            custodian=custodian,
        ),
        cap=settings.codes.max_per_account,
    )
    return Issued(record, code)

"""Signing in to the portal: the directory password (an LDAP bind as the person, or the users
file's `password_hash`), the second factor (TOTP or a recovery code, enrolled on first
sign-in), and the names an SSO proxy vouches for.

These are the blocking checks, plain functions the portal runs off the reactor; each answers
with a `Checked` whose reason goes to the audit log (never a password or a code). Counting
failures in the rate limits is the portal's (the limiters live on the reactor thread).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.directory.account import Account
from proxy.directory.passwords import MAX_PASSWORD, verify_password_hash
from proxy.directory.static import StaticDirectory
from proxy.sasl import MAX_FIELD, is_valid_login
from proxy.web.records import WebRecords, digest
from proxy.web.totp import (
    matching_step,
    new_recovery_codes,
    new_secret,
    normal_recovery_code,
)


@dataclass(frozen=True)
class Checked:
    ok: bool
    account: Account | None = None
    reason: str = ""  # for the audit log
    method: str = ""  # password, totp, recovery, header


def usable_login(login: str) -> bool:
    """A name worth a directory lookup: what the mail side would accept (RFC 4616 lengths)."""
    return bool(login) and len(login.encode()) <= MAX_FIELD and is_valid_login(login)


def check_password(directory: Any, login: str, password: str) -> Checked:
    """Whether `password` is the password of the account `login` names (any name the mail side
    accepts: it resolves to the account first). Raises DirectoryUnavailable."""
    login = login.strip()
    if not usable_login(login):
        return Checked(False, None, "invalid login name", "password")
    if not password or len(password) > MAX_PASSWORD:
        return Checked(False, None, "empty or overlong password", "password")
    account = directory.lookup(login)
    if account is None:
        if isinstance(directory, StaticDirectory):
            # As long as a known name's check takes (an LDAP bind to nobody costs nothing).
            verify_password_hash(None, password)
        return Checked(False, None, "unknown login", "password")
    if not directory.verify_password(account, password):
        return Checked(False, account, "wrong password", "password")
    return Checked(True, account, "", "password")


def check_header_login(directory: Any, login: str) -> Checked:
    """The account an SSO proxy named in web.trusted_header. Raises DirectoryUnavailable."""
    login = login.strip()
    if not usable_login(login):
        return Checked(False, None, "invalid login name in the trusted header", "header")
    account = directory.lookup(login)
    if account is None:
        return Checked(False, None, "unknown login in the trusted header", "header")
    return Checked(True, account, "", "header")


def enrolled(records: WebRecords, account_key: str) -> bool:
    totp = records.totp(account_key)
    return totp is not None and totp.enrolled_at is not None


def check_second_factor(records: WebRecords, account_key: str, typed: str, now: float) -> Checked:
    """A TOTP code (each time step once: a code seen by someone looking over a shoulder is
    spent) or an unused recovery code (spent by this use)."""
    totp = records.totp(account_key)
    if totp is None or totp.enrolled_at is None:
        return Checked(False, None, "no second factor enrolled", "totp")
    step = matching_step(totp.secret, typed, now)
    if step is not None:
        if records.use_step(account_key, step):
            return Checked(True, None, "", "totp")
        return Checked(False, None, "TOTP code already used (replay)", "totp")
    recovery = normal_recovery_code(typed)
    if recovery is not None:
        if records.use_recovery(account_key, recovery):
            return Checked(True, None, "", "recovery")
        return Checked(False, None, "not an unused recovery code", "recovery")
    return Checked(False, None, "wrong TOTP code", "totp")


def enrolment_secret(records: WebRecords, account_key: str) -> str | None:
    """The secret being enrolled (the same one until enrolment ends, so a reload shows the same
    QR code); None once enrolled."""
    totp = records.totp(account_key)
    if totp is not None and totp.enrolled_at is not None:
        return None
    if totp is None:
        records.start_totp(account_key, new_secret())
        totp = records.totp(account_key)
    return totp.secret if totp is not None else None


def finish_enrolment(
    records: WebRecords, account_key: str, typed: str, now: float
) -> list[str] | None:
    """The recovery codes (shown once) if `typed` is a current code of the secret being
    enrolled; None otherwise."""
    totp = records.totp(account_key)
    if totp is None or totp.enrolled_at is not None:
        return None
    step = matching_step(totp.secret, typed, now)
    if step is None:
        return None
    codes = new_recovery_codes()
    if not records.finish_totp(account_key, step, [digest(c) for c in codes]):
        return None
    return codes

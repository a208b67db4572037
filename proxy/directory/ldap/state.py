"""An LDAP account's state, read from its entry: disabled, not yet valid, expired, password
expired or locked, and when its password last changed. Each refusal has its own reason.

Every value a decision rests on (times, flags, numbers) must read as what its attribute holds:
one that does not fails closed. The account is refused as "unreadable <attribute>", the
verdict says which value and why, and the log says so once per read, never with a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import ldap3

from proxy.directory.ldap.cache import TtlCache
from proxy.directory.ldap.search import Entry, matches, search
from proxy.directory.ldap.settings import LdapSettings
from proxy.directory.ldap.values import (
    PPOLICY_ADMIN_LOCK,
    UF_ACCOUNTDISABLE,
    UF_LOCKOUT,
    UF_PASSWORD_EXPIRED,
    Unreadable,
    attribute_time,
    normalize_dn,
    parse_generalized_time,
    read_int,
)

log = logging.getLogger(__name__)

# AD's "must change password at next logon" is pwdLastSet = 0 (MS-ADA3 pwdLastSet), the usual
# reset after an incident. It counts as a password change happening now: with
# policy.revoke_on_password_change, codes created before it stop working, until the user has
# set a new password (then pwdLastSet is that moment).
MUST_CHANGE_ATTRIBUTE = "pwdlastset"
MUST_CHANGE_VALUE = "0"


@dataclass(frozen=True)
class AccountState:
    """What an entry says about its account's state and password."""

    enabled: bool
    disabled_reason: str  # "", "disabled", "not yet valid", "expired", "password expired"…
    why: str  # the enabled verdict's explanation
    password_changed_at: datetime | None = None
    password_must_change: bool = False  # pwdLastSet 0: password_changed_at is the read's time
    password_why: str = ""


class StateReader:
    """Reads AccountStates; thread-safe. Lockout durations of password policies are cached."""

    def __init__(self, settings: LdapSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self._lockout_durations: TtlCache[int] = TtlCache(clock)  # by password policy DN

    def read(self, conn: ldap3.Connection, entry: Entry, now: datetime) -> AccountState:
        try:
            enabled, reason, why = self._state(conn, entry, now)
        except Unreadable as exc:
            return self._unreadable(entry, exc)
        try:
            changed, must_change, password_why = self._password(entry, now)
        except Unreadable as exc:
            return self._unreadable(entry, exc) if enabled else AccountState(False, reason, why)
        return AccountState(enabled, reason, why, changed, must_change, password_why)

    @staticmethod
    def _unreadable(entry: Entry, exc: Unreadable) -> AccountState:
        log.error("LDAP entry %s: %s; the account is refused until it is fixed", entry.dn, exc)
        return AccountState(
            False, f"unreadable {exc.attribute}", f"{exc}: a value that cannot be read refuses"
        )

    def _state(self, conn: ldap3.Connection, entry: Entry, now: datetime) -> tuple[bool, str, str]:
        """(enabled, disabled_reason, explanation): disabled, then not yet valid, expired,
        password expired and locked. Raises Unreadable."""
        s = self.settings
        control = _integer(entry, s.account_control_attribute)
        if control is not None and control & UF_ACCOUNTDISABLE:
            return False, "disabled", f"{s.account_control_attribute} has ACCOUNTDISABLE"
        locked_at = entry.text(s.locked_time_attribute) if s.locked_time_attribute else ""
        if locked_at == PPOLICY_ADMIN_LOCK:
            return (
                False,
                "disabled",
                f"{s.locked_time_attribute} is {PPOLICY_ADMIN_LOCK} (locked by an administrator)",
            )
        if s.disabled_filter and matches(conn, s, entry.dn, s.disabled_filter):
            return False, "disabled", "matches disabled_filter"
        for attr in s.valid_from_attributes:
            starts = _time(entry, attr)
            if starts is not None and starts > now:
                return False, "not yet valid", f"{attr} {starts.isoformat()} is still to come"
        for attr in s.expiry_attributes:
            expires = _time(entry, attr)
            if expires is not None and expires <= now:
                return False, "expired", f"{attr} {expires.isoformat()} has passed"
        computed = _integer(entry, s.computed_account_control_attribute)
        if computed is not None and computed & UF_PASSWORD_EXPIRED and not self._must_change(entry):
            return (
                False,
                "password expired",
                f"{s.computed_account_control_attribute} has PASSWORD_EXPIRED",
            )
        if computed is not None and computed & UF_LOCKOUT:
            return False, "locked", f"{s.computed_account_control_attribute} has LOCKOUT"
        if locked_at:
            when = parse_generalized_time(locked_at)  # unreadable: locked until unlocked
            duration = self._lockout_duration(conn, entry)
            if when is None or duration == 0 or now < when + timedelta(seconds=duration):
                until = (
                    "until unlocked"
                    if not duration or when is None
                    else f"until {(when + timedelta(seconds=duration)).isoformat()}"
                )
                return False, "locked", f"{s.locked_time_attribute} {locked_at} ({until})"
        return True, "", "not disabled, not yet valid, expired or locked"

    def _must_change(self, entry: Entry) -> bool:
        attr = self.settings.password_changed_attribute
        return (
            attr is not None
            and attr.lower() == MUST_CHANGE_ATTRIBUTE
            and entry.text(attr) == MUST_CHANGE_VALUE
        )

    def _password(self, entry: Entry, now: datetime) -> tuple[datetime | None, bool, str]:
        """(last change, must change at next logon, explanation). Raises Unreadable."""
        attr = self.settings.password_changed_attribute
        if not attr:
            return None, False, "no password_changed_attribute configured"
        if self._must_change(entry):
            return now, True, f"{attr} is 0: must change at next logon, counts as changed now"
        raw = entry.text(attr)
        changed = attribute_time(attr, raw) if raw else None
        return changed, False, f"{attr} {changed.isoformat()}" if changed else f"no {attr}"

    def _lockout_duration(self, conn: ldap3.Connection, entry: Entry) -> int:
        """pwdLockoutDuration of the entry's password policy, in seconds; 0 = until unlocked
        (also when it cannot be read: fails closed)."""
        policy = entry.text("pwdPolicySubentry") or self.settings.password_policy_dn
        if not policy:
            return 0
        hit, cached = self._lockout_durations.get(normalize_dn(policy))
        if hit and cached is not None:
            return cached
        found = search(
            conn, self.settings, policy, ldap3.BASE, "(objectClass=*)", ["pwdLockoutDuration"]
        )
        raw = found[0].text("pwdLockoutDuration") if found else ""
        try:
            duration = read_int("pwdLockoutDuration", raw) if raw else 0
        except Unreadable as exc:
            log.error("password policy %s: %s; locked accounts stay locked", policy, exc)
            duration = 0
        duration = max(duration, 0)
        self._lockout_durations.put(normalize_dn(policy), duration, self.settings.cache_ttl)
        return duration


def _integer(entry: Entry, attr: str | None) -> int | None:
    raw = entry.text(attr) if attr else ""
    return read_int(attr, raw) if attr and raw else None


def _time(entry: Entry, attr: str) -> datetime | None:
    raw = entry.text(attr)
    return attribute_time(attr, raw) if raw else None

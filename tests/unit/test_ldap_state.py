"""An LDAP account's state from its entry's values, without a server: each refusal with its own
reason, AD's "must change password at next logon", and values that cannot be read failing
closed. (Against real slapd and Samba: tests/integration/test_account_identity.py.)"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from proxy.auth.policy import account_refusal
from proxy.config import PolicySettings
from proxy.directory.account import Account
from proxy.directory.ldap.search import Entry
from proxy.directory.ldap.settings import LdapSettings
from proxy.directory.ldap.state import AccountState, StateReader

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
AD = LdapSettings.active_directory()
OPENLDAP = LdapSettings.openldap()
LOGGER = "proxy.directory.ldap.state"
# FILETIMEs: 2020-01-01, and "never".
JAN_2020, NEVER = "132223104000000000", "9223372036854775807"
PASSWORD_EXPIRED, LOCKOUT = str(0x800000), str(0x10)


def state(settings: LdapSettings, **values: str) -> AccountState:
    entry = Entry(
        "cn=someone,dc=example,dc=org", {k.lower(): (v.encode(),) for k, v in values.items()}
    )
    return StateReader(settings, clock=lambda: 0.0).read(None, entry, NOW)  # type: ignore[arg-type]


def refusal(s: AccountState) -> str | None:
    account = Account(
        "k", "someone", "someone", enabled=s.enabled, disabled_reason=s.disabled_reason
    )
    return account_refusal(account, PolicySettings())


def ad(**values: str) -> AccountState:
    return state(AD, **{"userAccountControl": "512", "pwdLastSet": JAN_2020, **values})


# --- Active Directory -----------------------------------------------------------------------


def test_an_ordinary_ad_account_is_enabled_with_its_last_password_change():
    s = ad(accountExpires=NEVER, **{"msDS-User-Account-Control-Computed": "0"})
    assert (s.enabled, s.password_changed_at, s.password_must_change) == (
        True,
        datetime(2020, 1, 1, tzinfo=UTC),
        False,
    )


def test_must_change_at_next_logon_counts_as_a_password_change_now():
    # Samba and AD also set PASSWORD_EXPIRED in the computed flags for pwdLastSet 0.
    s = ad(pwdLastSet="0", **{"msDS-User-Account-Control-Computed": PASSWORD_EXPIRED})
    assert s.enabled and s.password_must_change
    assert s.password_changed_at == NOW  # codes created before now stop working
    assert "must change at next logon" in s.password_why


def test_an_expired_password_is_refused_with_its_own_reason():
    s = ad(**{"msDS-User-Account-Control-Computed": PASSWORD_EXPIRED})
    assert (s.enabled, s.disabled_reason) == (False, "password expired")
    assert refusal(s) == "account password expired"
    assert "PASSWORD_EXPIRED" in s.why


def test_lockout_and_disabled_keep_their_reasons():
    assert ad(**{"msDS-User-Account-Control-Computed": LOCKOUT}).disabled_reason == "locked"
    assert ad(userAccountControl="514").disabled_reason == "disabled"
    assert ad(accountExpires=JAN_2020).disabled_reason == "expired"


@pytest.mark.parametrize(
    "values,attribute",
    [
        ({"userAccountControl": "512x"}, "userAccountControl"),
        ({"msDS-User-Account-Control-Computed": "lots"}, "msDS-User-Account-Control-Computed"),
        ({"accountExpires": "next year"}, "accountExpires"),
        ({"accountExpires": "-1"}, "accountExpires"),
        ({"pwdLastSet": "yesterday"}, "pwdLastSet"),
    ],
)
def test_an_ad_value_that_cannot_be_read_refuses_the_account_and_is_logged(
    values, attribute, caplog
):
    with caplog.at_level(logging.ERROR, LOGGER):
        s = ad(**values)
    assert (s.enabled, s.disabled_reason) == (False, f"unreadable {attribute}")
    assert refusal(s) == f"account unreadable {attribute}"
    assert s.why.startswith(f"{attribute} {next(iter(values.values()))!r} is not ")
    [record] = caplog.records
    assert "cn=someone,dc=example,dc=org" in record.getMessage() and attribute in (
        record.getMessage()
    )
    assert record.exc_info is None and "Traceback" not in caplog.text


def test_a_disabled_account_with_an_unreadable_password_time_stays_disabled(caplog):
    s = ad(userAccountControl="514", pwdLastSet="yesterday")
    assert (s.enabled, s.disabled_reason) == (False, "disabled")


# --- OpenLDAP ppolicy and shadow ------------------------------------------------------------


def gtime(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%SZ")


def test_before_pwdStartTime_an_account_is_not_yet_valid():
    s = state(OPENLDAP, pwdStartTime=gtime(NOW + timedelta(days=1)))
    assert (s.enabled, s.disabled_reason) == (False, "not yet valid")
    assert refusal(s) == "account not yet valid"
    assert "pwdStartTime" in s.why
    assert state(OPENLDAP, pwdStartTime=gtime(NOW - timedelta(days=1))).enabled


def test_after_pwdEndTime_an_account_is_expired():
    s = state(OPENLDAP, pwdEndTime=gtime(NOW - timedelta(seconds=1)))
    assert (s.enabled, s.disabled_reason) == (False, "expired")
    assert state(OPENLDAP, pwdEndTime=gtime(NOW + timedelta(days=1))).enabled


@pytest.mark.parametrize(
    "values,attribute",
    [
        ({"pwdStartTime": "soon"}, "pwdStartTime"),
        ({"pwdEndTime": "2020-01-01"}, "pwdEndTime"),
        ({"shadowExpire": "never"}, "shadowExpire"),
        ({"pwdChangedTime": "20201301000000Z"}, "pwdChangedTime"),  # month 13
    ],
)
def test_an_openldap_value_that_cannot_be_read_refuses_the_account(values, attribute, caplog):
    with caplog.at_level(logging.ERROR, LOGGER):
        s = state(OPENLDAP, **values)
    assert (s.enabled, s.disabled_reason) == (False, f"unreadable {attribute}")
    assert len(caplog.records) == 1


def test_pwdChangedTime_of_zero_is_unreadable_not_a_must_change():
    # Only AD's pwdLastSet has the "must change" meaning for 0.
    s = state(OPENLDAP, pwdChangedTime="0")
    assert (s.enabled, s.disabled_reason) == (False, "unreadable pwdChangedTime")

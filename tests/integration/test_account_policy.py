"""One account-policy specification, passed by every directory: the static file, OpenLDAP and
Active Directory. Each directory names its own accounts for the same situations."""

from __future__ import annotations

import pytest

from proxy.auth.policy import account_refusal
from proxy.config import PolicySettings
from proxy.directory.ldap.directory import LdapDirectory
from proxy.directory.ldap.settings import LdapSettings
from proxy.directory.static import StaticDirectory

pytestmark = pytest.mark.integration

STATIC_USERS = """
accounts:
  alice: {id: key-alice, aliases: [alice@example.org], groups: [legacy-mail, mfa-enrolled]}
  bob: {id: key-bob, aliases: [robert@example.org], groups: [staff]}
  printer1: {id: key-printer1, groups: [legacy-mail]}
  carol: {id: key-carol, groups: [legacy-mail], enabled: false}
  dave: {id: key-dave, groups: [legacy-mail], expires: 2020-01-01}
"""

# situation -> login in each directory
ACCOUNTS = {
    "static": {
        "allowed": "alice",
        "alias": "alice@example.org",
        "device": "printer1",
        "not_in_group": "bob",
        "disabled": "carol",
        "expired": "dave",
    },
    "openldap": {
        "allowed": "alice",
        "alias": "alice@example.org",
        "device": "printer1",
        "not_in_group": "bob",
        "disabled": "carol",
        "expired": "dave",
    },
    "active_directory": {
        "allowed": "alice",
        "alias": "alice@example.com",
        "device": "printer1",
        "not_in_group": "bob",
        "disabled": "dora",
        "expired": "eve",
    },
}

POLICY = PolicySettings(legacy_group="legacy-mail", mfa_group="mfa-enrolled")


@pytest.fixture(params=["static", "openldap", "active_directory"])
def directory(request, tmp_path):
    kind = request.param
    if kind == "static":
        (tmp_path / "users.yaml").write_text(STATIC_USERS)
        d = StaticDirectory(
            tmp_path / "users.yaml", legacy_group="legacy-mail", mfa_group="mfa-enrolled"
        )
    elif kind == "openldap":
        server = request.getfixturevalue("slapd")
        d = LdapDirectory(
            LdapSettings.openldap(
                uris=(server.uri,),
                bind_dn=server.service_dn,
                bind_password=server.service_password,
                base_dn=server.base_dn,
            ),
            legacy_group="legacy-mail",
            legacy_filter=None,
            mfa_group="mfa-enrolled",
            mfa_filter=None,
        )
    else:
        dc = request.getfixturevalue("samba_dc")
        d = LdapDirectory(
            LdapSettings.active_directory(
                uris=(dc.ldaps_uri,),
                ca_file=str(dc.tls.ca),
                bind_dn=dc.service_bind_dn,
                bind_password=dc.service_password,
                base_dn=dc.base_dn,
            ),
            legacy_group="legacy-mail",
            legacy_filter=None,
            mfa_group="mfa-enrolled",
            mfa_filter=None,
        )
    yield kind, d
    d.close()


def account(directory, situation):
    kind, d = directory
    return d.lookup(ACCOUNTS[kind][situation])


def test_an_allowed_account_may_use_app_passwords(directory):
    assert account_refusal(account(directory, "allowed"), POLICY) is None


def test_an_alias_resolves_to_the_same_account(directory):
    assert account(directory, "alias").key == account(directory, "allowed").key


def test_a_device_account_in_the_group_is_allowed(directory):
    assert account_refusal(account(directory, "device"), POLICY) is None


def test_an_account_outside_the_legacy_group_is_refused_with_the_reason(directory):
    refusal = account_refusal(account(directory, "not_in_group"), POLICY)
    assert refusal.startswith("account not allowed legacy sign-in (not a member of legacy-mail")


def test_a_disabled_account_is_refused(directory):
    assert account_refusal(account(directory, "disabled"), POLICY) == "account disabled"


def test_an_expired_account_is_refused(directory):
    assert account_refusal(account(directory, "expired"), POLICY) == "account expired"


def test_mfa_comes_from_the_group(directory):
    assert account(directory, "allowed").mfa and not account(directory, "device").mfa
    strict = PolicySettings(legacy_group="legacy-mail", require_mfa=True)
    assert account_refusal(account(directory, "allowed"), strict) is None
    assert account_refusal(account(directory, "device"), strict) == (
        "account has no second factor, which app passwords require here"
    )


def test_unknown_and_injected_names_resolve_to_nothing(directory):
    _, d = directory
    for login in ("nobody", "*)(uid=*", "*", "alice\x00", "alice)(|(uid=*"):
        assert d.lookup(login) is None

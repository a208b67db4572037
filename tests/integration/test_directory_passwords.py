"""The portal's sign-in password against real directories: a simple bind as the person on
OpenLDAP (slapd) and Active Directory (Samba), whatever name form the mail side accepts, never
on a pooled connection, never logged; trouble is DirectoryUnavailable."""

from __future__ import annotations

import logging

import pytest

from proxy.directory.account import Account, DirectoryUnavailable
from proxy.directory.ldap.directory import LdapDirectory
from proxy.directory.ldap.settings import LdapSettings
from proxy.web.signin import check_password
from tests.servers.samba import SambaDC
from tests.servers.slapd import Slapd

pytestmark = pytest.mark.integration

ALICE_LDAP = "alice-Pw-1"  # tests/servers/slapd.py SEED_USERS
ALICE_AD = "Alice-Pw-1"  # tests/servers/samba.py SEED_USERS


@pytest.fixture(scope="module")
def own_slapd(test_ca):
    """A slapd of this module's own: wrong passwords count towards ppolicy's lockout."""
    server = Slapd(test_ca, name="slapd-passwords")
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def openldap(own_slapd):
    directory = LdapDirectory(
        LdapSettings.openldap(
            uris=(own_slapd.uri,),
            start_tls=True,
            ca_file=str(own_slapd.tls.ca),
            bind_dn=own_slapd.service_dn,
            bind_password=own_slapd.service_password,
            base_dn=own_slapd.base_dn,
            timeout=2.0,
            connect_timeout=2.0,
        )
    )
    yield directory
    directory.close()


@pytest.fixture
def active_directory(samba_dc: SambaDC):
    directory = LdapDirectory(
        LdapSettings.active_directory(
            uris=(samba_dc.ldaps_uri,),
            ca_file=str(samba_dc.tls.ca),
            bind_dn=samba_dc.service_bind_dn,
            bind_password=samba_dc.service_password,
            base_dn=samba_dc.base_dn,
        )
    )
    yield directory
    directory.close()


def test_openldap_binds_as_the_person_whatever_name_they_type(openldap, caplog):
    caplog.set_level(logging.DEBUG)
    openldap.lookup("bob")  # the pool's service connection is open
    pool = openldap.stats()
    for name in ("alice", "ALICE", "alice@example.org"):
        checked = check_password(openldap, name, ALICE_LDAP)
        assert checked.ok, name
    assert not check_password(openldap, "alice", "alice-Pw-wrong").ok
    after = openldap.stats()  # the person's binds never became pooled connections
    assert (after["opened"], after["open"], after["idle"]) == (
        pool["opened"],
        pool["open"],
        pool["idle"],
    )
    assert ALICE_LDAP not in caplog.text and "alice-Pw-wrong" not in caplog.text


def test_openldap_refuses_an_empty_password_which_would_be_an_anonymous_bind(openldap):
    alice = openldap.lookup("alice")
    assert alice is not None
    assert not openldap.verify_password(alice, "")


def test_openldap_refuses_the_right_password_of_a_locked_account(openldap):
    carol = openldap.lookup("carol")  # pwdAccountLockedTime: locked by an administrator
    assert carol is not None and not openldap.verify_password(carol, "carol-Pw-4")


def test_openldap_bind_to_an_unknown_dn_is_a_wrong_password(openldap):
    ghost = Account(key="k", login="ghost", upstream_identity="ghost", dn="uid=ghost,dc=nowhere")
    assert not openldap.verify_password(ghost, "whatever-Pw-1")


def test_a_directory_that_does_not_answer_is_unavailable_not_a_wrong_password(test_ca):
    server = Slapd(test_ca, name="slapd-down")
    server.start()
    directory = LdapDirectory(
        LdapSettings.openldap(
            uris=(server.uri,),
            start_tls=True,
            ca_file=str(test_ca.ca),
            bind_dn=server.service_dn,
            bind_password=server.service_password,
            base_dn=server.base_dn,
            timeout=1.0,
            connect_timeout=1.0,
        )
    )
    try:
        alice = directory.lookup("alice")
        assert alice is not None
        server.stop()
        with pytest.raises(DirectoryUnavailable):
            directory.verify_password(alice, ALICE_LDAP)
    finally:
        directory.close()
        server.cleanup()


def test_active_directory_binds_as_the_person_by_every_name_form(active_directory):
    for name in ("alice", "SAMDOM\\alice", "alice@samdom.example.com", "alice@example.com"):
        checked = check_password(active_directory, name, ALICE_AD)
        assert checked.ok, name
    wrong = check_password(active_directory, "carl", "Carl-Pw-wrong")
    assert (wrong.ok, wrong.reason) == (False, "wrong password")


def test_active_directory_refuses_a_disabled_account_with_its_right_password(active_directory):
    dora = active_directory.lookup("dora")
    assert dora is not None and not active_directory.verify_password(dora, "Dora-Pw-6")

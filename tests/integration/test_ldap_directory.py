"""The LDAP directory against real servers: OpenLDAP (slapd with the ppolicy overlay) and a
Samba Active Directory domain controller.

Each test names the behaviour it specifies. Time is injected: `clock` (monotonic: cache
lifetimes, failover retry) and `now` (wall time: lockout durations) are fakes a test moves
forward, so nothing here sleeps to wait for a cache or a retry.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import ldap3
import pytest
import pytest_twisted

from proxy.directory.account import DirectoryUnavailable
from proxy.directory.ldap.directory import LdapDirectory
from proxy.directory.ldap.filters import LoginQuery
from proxy.directory.ldap.settings import (
    DEFAULT_CACHE_TTL,
    DEFAULT_NEGATIVE_CACHE_TTL,
    LdapSettings,
)
from tests.servers.common import remove_tree, short_tempdir
from tests.servers.samba import SambaDC
from tests.servers.slapd import LOCKOUT_DURATION, Slapd, entry_uuid
from tests.support.ca import TestCA

pytestmark = pytest.mark.integration

LOGGER = "proxy.directory.ldap"  # the package: its modules log to child loggers
OLD_CHANGE = datetime(2020, 1, 1, tzinfo=UTC)
# Generous bounds for "fails fast" on a loaded CI machine; the timeouts below are 1 s.
SHORT_TIMEOUT = 1.0
FAILS_WITHIN = 6.0
SKIPPED_WITHIN = 0.5


class FakeClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeNow:
    """Wall time (UTC) that a test can move forward."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def now() -> FakeNow:
    return FakeNow()


@pytest.fixture
def directories(clock: FakeClock, now: FakeNow) -> Iterator[Callable[..., LdapDirectory]]:
    """Make LdapDirectory instances on the fake clocks; all are closed after the test."""
    made: list[LdapDirectory] = []

    def make(settings: LdapSettings, **policy) -> LdapDirectory:
        directory = LdapDirectory(settings, clock=clock, utcnow=now, **policy)
        made.append(directory)
        return directory

    yield make
    for directory in made:
        directory.close()


def openldap(server: Slapd, *, tls: str = "ldaps", **overrides) -> LdapSettings:
    """Settings for a slapd fixture: the openldap preset plus URIs, bind and base."""
    uris = {"ldaps": (server.ldaps_uri,), "starttls": (server.uri,), "plain": (server.uri,)}[tls]
    values = {
        "uris": uris,
        "start_tls": tls == "starttls",
        "ca_file": str(server.tls.ca) if server.tls else "",
        "bind_dn": server.service_dn,
        "bind_password": server.service_password,
        "base_dn": server.base_dn,
        "timeout": SHORT_TIMEOUT,
        "connect_timeout": SHORT_TIMEOUT,
    }
    values.update(overrides)
    return LdapSettings.openldap(**values)


def active_directory(dc: SambaDC, *, tls: str = "ldaps", **overrides) -> LdapSettings:
    uris = {"ldaps": (dc.ldaps_uri,), "starttls": (dc.uri,), "plain": (dc.uri,)}[tls]
    values = {
        "uris": uris,
        "start_tls": tls == "starttls",
        "ca_file": str(dc.tls.ca),
        "bind_dn": dc.service_bind_dn,
        "bind_password": dc.service_password,
        "base_dn": dc.base_dn,
    }
    values.update(overrides)
    return LdapSettings.active_directory(**values)


# === OpenLDAP ==================================================================================

# --- names ---------------------------------------------------------------------------------


def test_login_by_uid_and_by_mail_give_the_same_account(slapd, directories):
    directory = directories(openldap(slapd))
    by_uid = directory.lookup("alice")
    by_mail = directory.lookup("alice@example.org")
    assert by_uid is not None and by_mail is not None
    assert by_uid.key == by_mail.key == entry_uuid(slapd.user_dn("alice"))
    assert by_uid.login == "alice"  # the canonical name is the uid, however one logs in
    assert by_mail.login == "alice"


def test_login_names_match_case_insensitively(slapd, directories):
    directory = directories(openldap(slapd))
    assert directory.lookup("ALICE").key == directory.lookup("Alice@Example.ORG").key


def test_account_carries_ids_upstream_identity_names_groups_and_password_change(slapd, directories):
    account = directories(openldap(slapd)).lookup("alice")
    assert account.key == entry_uuid(slapd.user_dn("alice"))
    assert account.upstream_identity == "alice@example.org"
    assert account.display_name == "Alice Liddell"
    assert set(account.names) == {"alice", "alice@example.org"}
    assert set(account.groups) == {"legacy-mail", "mfa-enrolled", "staff"}
    assert account.dn == slapd.user_dn("alice")
    assert account.enabled and account.disabled_reason == ""
    assert account.password_changed_at == OLD_CHANGE
    assert account.extra["server"] == slapd.ldaps_uri


def test_user_at_domain_maps_to_the_uid_when_the_domain_is_configured(slapd, directories):
    # bob's mail is robert@example.org: bob@example.org is only an implicit name.
    assert directories(openldap(slapd)).lookup("bob@example.org") is None
    directory = directories(openldap(slapd, dns_domains=("example.org",)))
    bob = directory.lookup("bob@example.org")
    assert bob is not None and bob.login == "bob"
    assert bob.upstream_identity == "robert@example.org"
    assert "bob@example.org" in bob.names
    assert directory.lookup("bob@elsewhere.example") is None


def test_domain_backslash_user_maps_to_the_uid_of_a_configured_domain(slapd, directories, caplog):
    assert directories(openldap(slapd)).lookup("EXAMPLE\\alice") is None
    directory = directories(openldap(slapd, netbios_domains=("EXAMPLE",)))
    alice = directory.lookup("EXAMPLE\\alice")
    assert alice is not None and alice.key == entry_uuid(slapd.user_dn("alice"))
    assert directory.lookup("example\\ALICE").key == alice.key
    with caplog.at_level(logging.INFO, LOGGER):
        assert directory.lookup("OTHER\\alice") is None
    assert "unknown domain 'OTHER'" in caplog.text


def test_an_unknown_login_is_none_and_cached_negatively_for_a_short_while(
    slapd_factory, directories, clock
):
    server = slapd_factory()
    directory = directories(openldap(server))
    assert directory.lookup("zoe") is None
    with server.admin() as conn:
        conn.add(
            server.user_dn("zoe"),
            ["inetOrgPerson"],
            {"cn": "Zoe", "sn": "Z", "mail": "zoe@example.org"},
        )
    assert directory.lookup("zoe") is None  # the negative answer is cached
    clock.advance(DEFAULT_NEGATIVE_CACHE_TTL + 0.1)
    assert directory.lookup("zoe").upstream_identity == "zoe@example.org"


def test_a_cached_account_is_refreshed_after_the_cache_lifetime(slapd_factory, directories, clock):
    server = slapd_factory()
    directory = directories(openldap(server))
    assert directory.lookup("bob").enabled
    server.modify(
        server.user_dn("bob"), {"pwdAccountLockedTime": [(ldap3.MODIFY_REPLACE, ["000001010000Z"])]}
    )
    assert directory.lookup("bob").enabled  # cached
    clock.advance(DEFAULT_CACHE_TTL + 0.1)
    bob = directory.lookup("bob")
    assert not bob.enabled and bob.disabled_reason == "disabled"


def test_a_name_two_entries_answer_to_logs_in_as_nobody(slapd_factory, directories, caplog):
    server = slapd_factory()
    with server.admin() as conn:  # mail "alice" on another entry: uid=alice or mail=alice?
        conn.add(
            server.user_dn("alice2"),
            ["inetOrgPerson"],
            {"cn": "Alice Two", "sn": "T", "mail": "alice"},
        )
    with caplog.at_level(logging.WARNING, LOGGER):
        assert directories(openldap(server)).lookup("alice") is None
    assert "ambiguous" in caplog.text


def test_by_key_finds_the_account_and_an_unknown_key_finds_nothing(slapd, directories):
    directory = directories(openldap(slapd))
    alice = directory.by_key(entry_uuid(slapd.user_dn("alice")))
    assert alice is not None and alice.login == "alice" and alice.legacy_allowed
    assert directory.by_key(str(uuid.uuid4())) is None
    assert directory.by_key("not-a-uuid*") is None


# --- account state -------------------------------------------------------------------------


def test_an_account_locked_by_an_administrator_is_refused_as_disabled(slapd, directories):
    carol = directories(openldap(slapd)).lookup("carol")
    assert carol is not None
    assert not carol.enabled and carol.disabled_reason == "disabled"
    assert "000001010000Z" in carol.extra["reasons"]["enabled"]


def test_disabled_filter_marks_matching_accounts_disabled(slapd, directories):
    assert directories(openldap(slapd)).lookup("heidi").enabled
    heidi = directories(openldap(slapd, disabled_filter="(employeeType=disabled)")).lookup("heidi")
    assert not heidi.enabled and heidi.disabled_reason == "disabled"
    assert heidi.extra["reasons"]["enabled"] == "matches disabled_filter"


def test_accounts_past_pwdEndTime_or_shadowExpire_are_refused_as_expired(slapd, directories):
    directory = directories(openldap(slapd))
    for uid, attribute in (("dave", "pwdEndTime"), ("erin", "shadowExpire")):
        account = directory.lookup(uid)
        assert not account.enabled and account.disabled_reason == "expired", uid
        assert attribute in account.extra["reasons"]["enabled"]


def test_failed_binds_lock_the_account_until_the_lockout_duration_passes(
    slapd_factory, directories, now
):
    server = slapd_factory()
    directory = directories(
        openldap(server, password_policy_dn=server.policy_dn, cache_ttl=0, negative_cache_ttl=0)
    )
    assert directory.lookup("frank").enabled
    server.fail_binds("frank")
    frank = directory.lookup("frank")
    assert not frank.enabled and frank.disabled_reason == "locked"
    assert "(until 20" in frank.extra["reasons"]["enabled"]  # a time: the policy's duration
    now.advance(LOCKOUT_DURATION + 1)
    assert directory.lookup("frank").enabled  # ppolicy would let frank bind again too


def test_without_a_known_lockout_duration_a_locked_account_stays_locked(
    slapd_factory, directories, now
):
    server = slapd_factory()
    server.fail_binds("frank")
    directory = directories(openldap(server))  # no password_policy_dn: fail closed
    now.advance(LOCKOUT_DURATION + 1)
    frank = directory.lookup("frank")
    assert not frank.enabled and frank.disabled_reason == "locked"


def test_an_account_without_the_upstream_identity_attribute_is_not_enabled(slapd, directories):
    nomail = directories(openldap(slapd)).lookup("nomail")
    assert nomail.upstream_identity == ""
    assert not nomail.enabled and nomail.disabled_reason == "no upstream identity"


# --- policy groups and filters -------------------------------------------------------------


@pytest.mark.parametrize(
    "legacy",
    [
        {"legacy_group": "legacy-mail"},
        {"legacy_group": "cn=legacy-mail,ou=groups,dc=example,dc=org"},
        {"legacy_group": "CN=Legacy-Mail, OU=Groups, DC=Example, DC=Org"},
        {"legacy_filter": "(|(uid=alice)(uid=printer1))"},
    ],
    ids=["group-name", "group-dn", "group-dn-other-spelling", "filter"],
)
def test_legacy_sign_in_is_allowed_by_group_name_dn_or_filter(slapd, directories, legacy):
    directory = directories(openldap(slapd), **legacy)
    assert directory.lookup("alice").legacy_allowed
    assert directory.lookup("printer1").legacy_allowed
    bob = directory.lookup("bob")
    assert not bob.legacy_allowed
    assert bob.extra["reasons"]["legacy"].startswith(("not a member of", "does not match"))


def test_without_a_legacy_group_or_filter_everyone_may_use_app_passwords(slapd, directories):
    assert directories(openldap(slapd)).lookup("bob").legacy_allowed


def test_posix_group_membership_by_memberUid_counts(slapd, directories):
    directory = directories(openldap(slapd), legacy_group="staff")
    assert directory.lookup("bob").legacy_allowed
    assert not directory.lookup("printer1").legacy_allowed


def test_a_legacy_group_that_does_not_exist_allows_nobody(slapd, directories, caplog):
    with caplog.at_level(logging.WARNING, LOGGER):
        alice = directories(openldap(slapd), legacy_group="no-such-group").lookup("alice")
    assert not alice.legacy_allowed
    assert "not found" in alice.extra["reasons"]["legacy"]
    assert "no-such-group" in caplog.text


def test_legacy_group_and_filter_together_must_both_hold(slapd, directories):
    directory = directories(
        openldap(slapd), legacy_group="legacy-mail", legacy_filter="(uid=printer1)"
    )
    assert directory.lookup("printer1").legacy_allowed
    assert not directory.lookup("alice").legacy_allowed


@pytest.mark.parametrize(
    "mfa",
    [{"mfa_group": "mfa-enrolled"}, {"mfa_filter": "(cn=Alice Liddell)"}],
    ids=["group", "filter"],
)
def test_mfa_is_present_for_members_of_the_mfa_group_or_filter(slapd, directories, mfa):
    directory = directories(openldap(slapd), **mfa)
    assert directory.lookup("alice").mfa
    assert not directory.lookup("printer1").mfa
    assert not directories(openldap(slapd)).lookup("alice").mfa  # nothing configured


# --- password changes ----------------------------------------------------------------------


def test_a_password_change_moves_password_changed_at(slapd_factory, directories, clock):
    server = slapd_factory()
    directory = directories(openldap(server))
    assert directory.lookup("grace").password_changed_at == OLD_CHANGE
    before = datetime.now(UTC).replace(microsecond=0)
    server.set_password("grace", "grace-New-Pw-1")
    clock.advance(DEFAULT_CACHE_TTL + 0.1)
    changed = directory.lookup("grace").password_changed_at
    assert changed is not None and changed >= before
    assert changed - before < timedelta(minutes=1)


# --- hostile names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "login",
    [
        "*)(uid=*",
        "*",
        "alice)(uid=*",
        "al*",
        "(uid=alice)",
        "alice\x00",
        "alice\x00@evil.example",
        "\x00",
        "alice\r\n",
        "EXAMPLE\\*",
        "a\\b\\c",
    ],
)
def test_filter_injection_and_control_characters_match_nothing_and_are_logged_as_invalid(
    slapd, directories, caplog, login
):
    directory = directories(openldap(slapd, netbios_domains=("EXAMPLE",)))
    with caplog.at_level(logging.WARNING, LOGGER):
        assert directory.lookup(login) is None
    assert "invalid login name" in caplog.text
    assert directory.stats()["opened"] == 0  # refused before any query


def test_escaped_filters_built_from_hostile_input_match_nothing_on_the_server(slapd):
    user_filter = LdapSettings.openldap().user_filter
    assert slapd.count_entries("(uid=*)") >= 5
    for hostile in ("*)(uid=*", "*", "alice)(|(uid=*", "\\2a", "alice\x00", "*)(objectClass=*"):
        query = LoginQuery(hostile, (("uid", hostile), ("mail", hostile)))
        assert slapd.count_entries(query.filter(user_filter)) == 0, hostile


# --- servers down, slow, failover, TLS -----------------------------------------------------


def test_stopping_slapd_gives_temporary_failures_and_a_restart_recovers(
    slapd_factory, directories, clock
):
    server = slapd_factory()
    directory = directories(openldap(server))
    key = directory.lookup("alice").key  # a pooled, bound connection now exists
    server.stop()
    clock.advance(DEFAULT_CACHE_TTL + 0.1)
    for login in ("alice", "bob"):
        began = time.monotonic()
        with pytest.raises(DirectoryUnavailable):
            directory.lookup(login)
        assert time.monotonic() - began < FAILS_WITHIN
    server.start()
    assert directory.lookup("alice").key == key  # the same directory object recovers
    assert directory.lookup("bob") is not None


def test_an_unresponsive_slapd_times_out_as_a_temporary_failure_and_recovers(
    slapd_factory, directories, clock
):
    server = slapd_factory()
    directory = directories(openldap(server))
    assert directory.lookup("alice") is not None
    server.pause()
    try:
        clock.advance(DEFAULT_CACHE_TTL + 0.1)
        began = time.monotonic()
        with pytest.raises(DirectoryUnavailable):
            directory.lookup("alice")
        assert time.monotonic() - began < FAILS_WITHIN
    finally:
        server.resume()
    assert directory.lookup("alice") is not None


def test_failover_to_the_second_slapd_and_back_to_the_first(slapd_factory, directories, clock):
    first, second = slapd_factory("first"), slapd_factory("second")
    settings = openldap(first, uris=(first.ldaps_uri, second.ldaps_uri))
    directory = directories(settings)
    alice = directory.lookup("alice")
    assert alice.extra["server"] == first.ldaps_uri
    first.stop()
    clock.advance(DEFAULT_CACHE_TTL + 0.1)
    again = directory.lookup("alice")
    assert again.extra["server"] == second.ldaps_uri
    assert again.key == alice.key  # replicas share entryUUIDs
    first.start()
    assert directory.lookup("bob").extra["server"] == second.ldaps_uri  # first still skipped
    clock.advance(settings.retry_after + 0.1)
    assert directory.lookup("printer1").extra["server"] == first.ldaps_uri  # retried, preferred


def test_a_hung_first_server_is_skipped_quickly_once_it_failed(slapd_factory, directories, clock):
    first, second = slapd_factory("first"), slapd_factory("second")
    directory = directories(openldap(first, uris=(first.ldaps_uri, second.ldaps_uri)))
    first.pause()
    try:
        began = time.monotonic()
        assert directory.lookup("alice").extra["server"] == second.ldaps_uri
        assert time.monotonic() - began < FAILS_WITHIN  # one timeout, then the second server
        directory.reset_connections()  # the next lookup needs a new connection
        began = time.monotonic()
        assert directory.lookup("bob").extra["server"] == second.ldaps_uri
        assert time.monotonic() - began < SKIPPED_WITHIN  # the hung server is not tried again
        assert directory.stats()["servers"][0]["down"]
    finally:
        first.resume()


def test_starttls_with_the_ca_file_works(slapd, directories):
    account = directories(openldap(slapd, tls="starttls")).lookup("alice")
    assert account.extra["server"] == slapd.uri


def test_a_server_certificate_from_another_ca_is_a_temporary_failure(slapd, directories):
    other = short_tempdir("ca2-")
    try:
        other_ca = TestCA.create(other)
        for tls in ("ldaps", "starttls"):
            directory = directories(openldap(slapd, tls=tls, ca_file=str(other_ca.ca)))
            with pytest.raises(DirectoryUnavailable):
                directory.lookup("alice")
    finally:
        remove_tree(other)


def test_a_wrong_service_password_is_a_temporary_failure_and_is_never_logged(
    slapd, directories, caplog
):
    secret = "Wrong-Service-Secret-42"
    directory = directories(openldap(slapd, bind_password=secret))
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(DirectoryUnavailable) as raised:
            directory.lookup("alice")
    assert "invalidCredentials" in str(raised.value)
    assert secret not in str(raised.value) and secret not in caplog.text
    assert secret not in repr(directory.settings)


def test_the_service_password_can_come_from_a_file(slapd, directories, tmp_path):
    password_file = tmp_path / "bind-password"
    password_file.write_text(slapd.service_password + "\n")
    directory = directories(
        openldap(slapd, bind_password="", bind_password_file=str(password_file))
    )
    assert directory.lookup("alice") is not None


@pytest_twisted.ensureDeferred
async def test_lookups_from_the_twisted_thread_pool_share_a_bounded_connection_pool(slapd):
    from twisted.internet import reactor, threads

    settings = openldap(slapd, pool_size=3, cache_ttl=0, negative_cache_ttl=0)
    directory = LdapDirectory(settings)
    try:
        logins = ["alice", "bob", "printer1", "carol", "nobody"] * 8
        pool = reactor.getThreadPool()
        results = []
        for login in logins:
            results.append(threads.deferToThreadPool(reactor, pool, directory.lookup, login))
        from twisted.internet.defer import gatherResults

        accounts = await gatherResults(results, consumeErrors=True)
        assert [a.login if a else None for a in accounts] == [
            None if login == "nobody" else login for login in logins
        ]
        stats = directory.stats()
        assert stats["opened"] <= settings.pool_size
        assert stats["open"] == stats["idle"]  # every connection came back to the pool
    finally:
        directory.close()


def test_check_reports_the_search_the_account_and_each_verdict(slapd, directories):
    directory = directories(openldap(slapd), legacy_group="legacy-mail", mfa_group="mfa-enrolled")
    report = directory.check("alice@example.org")
    assert report.outcome == "found" and report.allowed
    assert [(v.name, v.ok) for v in report.verdicts] == [
        ("enabled", True),
        ("legacy sign-in", True),
        ("mfa", True),
    ]
    text = str(report)
    for expected in (
        entry_uuid(slapd.user_dn("alice")),
        "alice@example.org",
        "legacy-mail, mfa-enrolled",
        "yes (member of cn=legacy-mail",
        "2020-01-01T00:00:00+00:00",
        "(mail=alice@example.org)",
    ):
        assert expected in text, expected
    carol = directory.check("carol")
    assert not carol.allowed and "no (disabled: pwdAccountLockedTime" in str(carol)
    assert directory.check("*)(uid=*").outcome == "invalid"
    assert directory.check("nobody").outcome == "not found"


def test_check_reports_an_unreachable_directory_instead_of_raising(slapd_factory, directories):
    server = slapd_factory(start=False)
    report = directories(openldap(server)).check("alice")
    assert report.outcome == "unavailable" and "no LDAP server answered" in report.reason


# === Samba Active Directory ====================================================================


def objectguid(dc: SambaDC, name: str) -> str:
    return str(uuid.UUID(bytes_le=dc.read(dc.user_dn(name), ["objectGUID"])["objectGUID"][0]))


def test_ad_login_by_every_name_form_gives_the_same_account(samba_dc, directories):
    directory = directories(active_directory(samba_dc))
    key = objectguid(samba_dc, "alice")
    for login in (
        "alice",
        "ALICE",
        "alice@samdom.example.com",
        "Alice@SAMDOM.EXAMPLE.COM",
        "alice@example.com",
        "SAMDOM\\alice",
        "samdom\\Alice",
    ):
        account = directory.lookup(login)
        assert account is not None, login
        assert account.key == key, login
        assert account.login == "alice@samdom.example.com"
        assert account.upstream_identity == "alice@example.com"
    assert {"alice", "alice@example.com", "SAMDOM\\alice"} <= set(account.names)


def test_ad_user_at_dns_domain_works_without_a_userPrincipalName(samba_dc, directories):
    assert (
        samba_dc.read(samba_dc.user_dn("noupn"), ["userPrincipalName"]).get("userPrincipalName", [])
        == []
    )
    account = directories(active_directory(samba_dc)).lookup("noupn@samdom.example.com")
    assert account is not None and account.key == objectguid(samba_dc, "noupn")
    assert account.upstream_identity == "noupn-mail@example.com"


def test_ad_names_in_another_domain_match_nothing(samba_dc, directories):
    directory = directories(active_directory(samba_dc))
    assert directory.lookup("OTHER\\alice") is None
    assert directory.lookup("alice@other.example") is None


def test_ad_account_fields_and_by_key(samba_dc, directories):
    directory = directories(active_directory(samba_dc))
    alice = directory.lookup("alice")
    assert alice.dn == samba_dc.user_dn("alice")
    assert alice.display_name == "Alice Liddell"
    assert set(alice.groups) == {"legacy-mail", "mfa-enrolled"}
    assert alice.enabled and alice.password_changed_at is not None
    assert directory.by_key(alice.key).dn == alice.dn
    assert directory.by_key(str(uuid.uuid4())) is None
    assert directory.by_key("not-a-guid") is None


def test_ad_disabled_and_expired_accounts_are_refused_with_reasons(samba_dc, directories):
    directory = directories(active_directory(samba_dc))
    dora = directory.lookup("dora")
    assert not dora.enabled and dora.disabled_reason == "disabled"
    assert "ACCOUNTDISABLE" in dora.extra["reasons"]["enabled"]
    eve = directory.lookup("eve")
    assert not eve.enabled and eve.disabled_reason == "expired"
    assert "accountExpires 2020-01-01" in eve.extra["reasons"]["enabled"]


def test_ad_failed_binds_lock_the_account(samba_dc, directories):
    samba_dc.fail_binds("larry")
    larry = directories(active_directory(samba_dc)).lookup("larry")
    assert not larry.enabled and larry.disabled_reason == "locked"


def test_ad_an_account_without_mail_is_not_enabled(samba_dc, directories):
    nomail = directories(active_directory(samba_dc)).lookup("nomail")
    assert not nomail.enabled and nomail.disabled_reason == "no upstream identity"


@pytest.mark.parametrize(
    "legacy",
    [
        {"legacy_group": "legacy-mail"},
        {"legacy_group": "CN=legacy-mail,CN=Users,DC=samdom,DC=example,DC=com"},
    ],
    ids=["group-name", "group-dn"],
)
def test_ad_legacy_group_counts_nested_members(samba_dc, directories, legacy):
    directory = directories(active_directory(samba_dc), **legacy)
    assert directory.lookup("alice").legacy_allowed
    carl = directory.lookup("carl")  # member of mail-staff, itself a member of legacy-mail
    assert carl.legacy_allowed and "nested" in carl.extra["reasons"]["legacy"]
    assert not directory.lookup("bob").legacy_allowed


def test_ad_legacy_filter_is_evaluated_by_the_server(samba_dc, directories):
    direct = "(memberOf=CN=legacy-mail,CN=Users,DC=samdom,DC=example,DC=com)"
    directory = directories(active_directory(samba_dc), legacy_filter=direct)
    assert directory.lookup("alice").legacy_allowed
    assert not directory.lookup("carl").legacy_allowed  # memberOf lists direct groups only
    assert not directory.lookup("bob").legacy_allowed


def test_ad_mfa_group(samba_dc, directories):
    directory = directories(active_directory(samba_dc), mfa_group="mfa-enrolled")
    assert directory.lookup("alice").mfa
    assert not directory.lookup("bob").mfa


def test_ad_a_password_change_moves_pwdLastSet(samba_dc, directories, clock):
    directory = directories(active_directory(samba_dc))
    before = directory.lookup("pat").password_changed_at
    samba_dc.set_password("pat", f"Pat-New-Pw-{uuid.uuid4().hex[:8]}")
    clock.advance(DEFAULT_CACHE_TTL + 0.1)
    after = directory.lookup("pat").password_changed_at
    assert before is not None and after is not None and after > before
    assert abs(datetime.now(UTC) - after) < timedelta(minutes=1)


@pytest.mark.parametrize(
    "login",
    [
        "*)(sAMAccountName=*",
        "*",
        "SAMDOM\\*",
        "alice\x00",
        "SAMDOM\\alice\x00",
        "*@samdom.example.com",
    ],
)
def test_ad_filter_injection_and_nul_match_nothing(samba_dc, directories, caplog, login):
    directory = directories(active_directory(samba_dc))
    with caplog.at_level(logging.WARNING, LOGGER):
        assert directory.lookup(login) is None
    assert "invalid login name" in caplog.text
    assert directory.stats()["opened"] == 0  # not even the domain discovery ran


def test_ad_escaped_filters_built_from_hostile_input_match_nothing(samba_dc):
    user_filter = LdapSettings.active_directory().user_filter
    assert samba_dc.count_entries(f"(&{user_filter}(sAMAccountName=*))") >= 5
    for hostile in ("*)(sAMAccountName=*", "*", "\\2a", "alice)(|(sAMAccountName=*"):
        query = LoginQuery(hostile, (("sAMAccountName", hostile), ("userPrincipalName", hostile)))
        assert samba_dc.count_entries(query.filter(user_filter)) == 0, hostile


def test_ad_samba_cuts_assertion_values_at_nul_so_nul_logins_never_reach_a_filter(
    samba_dc, directories
):
    # Escaped or not, Samba compares "alice\x00" as "alice": the reason to refuse
    # control characters before any lookup (Dovecot cuts names at NUL too).
    user_filter = LdapSettings.active_directory().user_filter
    query = LoginQuery("alice\x00", (("sAMAccountName", "alice\x00"),))
    assert samba_dc.count_entries(query.filter(user_filter)) == 1
    directory = directories(active_directory(samba_dc))
    assert directory.lookup("alice\x00") is None
    assert directory.lookup("SAMDOM\\alice\x00") is None
    assert directory.stats()["opened"] == 0


def test_ad_over_starttls_and_plain_ldap(samba_dc, directories):
    for tls in ("starttls", "plain"):
        account = directories(active_directory(samba_dc, tls=tls)).lookup("SAMDOM\\bob")
        assert account is not None and account.extra["server"] == samba_dc.uri


def test_ad_check_shows_the_discovered_domain_forms(samba_dc, directories):
    report = directories(active_directory(samba_dc), legacy_group="legacy-mail").check(
        "samdom\\carl"
    )
    assert report.outcome == "found" and report.form == "DOMAIN\\user"
    assert "(sAMAccountName=carl)" in report.filter
    assert "through nested groups" in str(report)

"""LDAP settings: the presets, and every rule reported once, with the field (or the config's key
path), the rule and the value, whether the settings come from Python or from apppass.yaml."""

from __future__ import annotations

import copy

import pytest

from proxy.config import ConfigError, parse
from proxy.directory.ldap.settings import LdapSettings, LdapSettingsError

# --- presets -----------------------------------------------------------------------------


def test_presets_fill_everything_but_servers_bind_and_base():
    ad = LdapSettings.active_directory(
        uris=("ldaps://dc1.example.com",),
        bind_dn="CN=svc,CN=Users,DC=example,DC=com",
        bind_password="x",
        base_dn="DC=example,DC=com",
    )
    assert ad.id_attribute == "objectGUID" and ad.id_format == "guid"
    assert ad.group_membership == "memberof" and ad.nested_groups
    assert ad.password_changed_attribute == "pwdLastSet"
    assert ad.account_control_attribute == "userAccountControl"
    ol = LdapSettings.preset("openldap", base_dn="dc=example,dc=org")
    assert ol.id_attribute == "entryUUID" and ol.group_membership == "search"
    assert ol.locked_time_attribute == "pwdAccountLockedTime"
    assert ol.password_changed_attribute == "pwdChangedTime"


def test_the_openldap_preset_is_the_defaults():
    assert LdapSettings.openldap() == LdapSettings()


def test_an_empty_optional_value_is_unset():
    settings = LdapSettings(ca_file="", bind_password="", locked_time_attribute="")
    assert settings.ca_file is None and settings.bind_password is None
    assert settings.locked_time_attribute is None


def test_a_single_string_is_a_list_of_one():
    assert LdapSettings(uris="ldaps://ldap.example.org").uris == ("ldaps://ldap.example.org",)


# --- rules, from Python ------------------------------------------------------------------


def test_the_bind_password_is_not_in_the_settings_repr():
    assert "hunter2" not in repr(LdapSettings(bind_dn="cn=x", bind_password="hunter2"))


@pytest.mark.parametrize(
    "changes, field_name",
    [
        ({"uris": ()}, "uris"),
        ({"uris": ("http://ldap.example.com",)}, "uris"),
        ({"uris": ("ldap://",)}, "uris"),
        ({"uris": ("ldap://h:99999",)}, "uris"),
        ({"uris": ("ldap://h/dc=x",)}, "uris"),
        ({"uris": ("ldaps://h",), "start_tls": True}, "start_tls"),
        ({"base_dn": "not a dn"}, "base_dn"),
        ({"user_filter": "objectClass=person"}, "user_filter"),
        ({"user_filter": "(&(objectClass=person)"}, "user_filter"),
        ({"disabled_filter": "(a=b))("}, "disabled_filter"),
        ({"login_attributes": ()}, "login_attributes"),
        ({"login_attributes": ("uid", "bad attr")}, "login_attributes"),
        ({"id_attribute": "entry UUID"}, "id_attribute"),
        ({"group_membership": "nested"}, "group_membership"),
        ({"group_member_filter": "(member={user})"}, "group_member_filter"),
        ({"id_format": "binary"}, "id_format"),
        ({"netbios_domains": ("EX*",)}, "netbios_domains"),
        ({"timeout": 0}, "timeout"),
        ({"connect_timeout": float("nan")}, "connect_timeout"),
        ({"cache_ttl": -1}, "cache_ttl"),
        ({"pool_size": 0}, "pool_size"),
        ({"page_size": 0}, "page_size"),
        ({"bind_password": "x", "bind_password_file": "/run/secret"}, "bind_password"),
    ],
)
def test_invalid_settings_name_the_field(changes, field_name):
    with pytest.raises(ValueError) as raised:
        LdapSettings(**changes)
    assert str(raised.value).startswith(field_name)


def test_an_unknown_preset_is_an_error():
    with pytest.raises(ValueError, match="preset"):
        LdapSettings.preset("novell")


def test_every_broken_rule_is_named_with_the_value():
    with pytest.raises(LdapSettingsError) as raised:
        LdapSettings(uris=("http://ldap",), pool_size=0)
    assert [p.field for p in raised.value.problems] == ["uris", "pool_size"]
    assert str(raised.value) == (
        'uris: must be a list of ldap:// or ldaps:// URIs; "http://ldap" is not one '
        '(got ["http://ldap"]); '
        "pool_size: must be an integer >= 1 and <= 256 (got 0)"
    )


def test_an_error_never_shows_the_bind_password():
    with pytest.raises(LdapSettingsError) as raised:
        LdapSettings(bind_password="hunter2", bind_password_file="/run/secret")
    assert "hunter2" not in str(raised.value)


# --- rules, from apppass.yaml ------------------------------------------------------------


@pytest.fixture
def base(tmp_path):
    (tmp_path / "master").write_text("s3cret-master\n")
    (tmp_path / "bind-password").write_text("s3cret-bind\n")
    (tmp_path / "ca.pem").write_text("x")
    return {
        "store": {"sqlite": "var/apppass.db"},
        "directory": {
            "ldap": {
                "uris": ["ldap://ldap.example.org"],
                "start_tls": True,
                "ca_file": "ca.pem",
                "bind_dn": "cn=apppass,ou=services,dc=example,dc=org",
                "bind_password_file": "bind-password",
                "base_dn": "dc=example,dc=org",
            }
        },
        "upstream": {
            "imap": {
                "host": "127.0.0.1",
                "port": 143,
                "master_user": "proxy",
                "master_password_file": "master",
            }
        },
        "listeners": [
            {
                "protocol": "imap",
                "bind": "127.0.0.1:1143",
                "tls": "none",
                "plaintext_auth_from": ["127.0.0.0/8"],
            }
        ],
    }


DELETE = object()


def with_ldap(base, key, value):
    data = copy.deepcopy(base)
    if value is DELETE:
        del data["directory"]["ldap"][key]
    else:
        data["directory"]["ldap"][key] = value
    return data


def errors(data, tmp_path):
    with pytest.raises(ConfigError) as info:
        parse(data, source="apppass.yaml", base_dir=tmp_path)
    return info.value.problems


P = "apppass.yaml: directory.ldap."

CASES = [
    (
        "uris",
        "http://ldap.example.org",
        P
        + 'uris: must be a list of ldap:// or ldaps:// URIs; "http://ldap.example.org" is not one '
        '(got "http://ldap.example.org")',
    ),
    ("uris", [], P + "uris: must be a list of ldap:// or ldaps:// URIs (got [])"),
    (
        "uris",
        ["ldap://"],
        P + 'uris: must be a list of ldap:// or ldaps:// URIs; "ldap://" has no host '
        '(got ["ldap://"])',
    ),
    (
        "uris",
        ["ldap://ldap.example.org/dc=example,dc=org"],
        P + "uris: must be a list of ldap:// or ldaps:// URIs; "
        '"ldap://ldap.example.org/dc=example,dc=org" has '
        'more than scheme, host and port (got ["ldap://ldap.example.org/dc=example,dc=org"])',
    ),
    ("uris", DELETE, P + "uris: is required"),
    ("base_dn", DELETE, P + "base_dn: is required"),
    (
        "base_dn",
        "example.org",
        P + "base_dn: must be a DN like dc=example,dc=org (attribute type not present) "
        '(got "example.org")',
    ),
    ("base_nd", "dc=example,dc=org", P + "base_nd: unknown key; did you mean 'base_dn'?"),
    (
        "bind_password",
        "hunter2",
        P + "bind_password: unknown key; did you mean 'bind_password_file'?",
    ),
    ("bind_password_file", DELETE, P + "bind_password_file: is required when bind_dn is set"),
    (
        "bind_password_file",
        "missing",
        P + 'bind_password_file: file not found: {tmp}/missing (got "missing")',
    ),
    ("ca_file", "", P + 'ca_file: must be a file path (got "")'),
    ("preset", "novell", P + 'preset: must be one of openldap, active_directory (got "novell")'),
    ("start_tls", "yes", P + 'start_tls: must be true or false (got "yes")'),
    (
        "uris",
        ["ldaps://ldap.example.org"],
        P + "start_tls: must be false with ldaps:// URIs (they are TLS from the start) (got true)",
    ),
    ("id_format", "binary", P + 'id_format: must be one of text, guid (got "binary")'),
    (
        "group_membership",
        "nested",
        P + 'group_membership: must be one of memberof, search (got "nested")',
    ),
    (
        "user_filter",
        "objectClass=person",
        P + "user_filter: must be an LDAP filter in parentheses, like (objectClass=person) "
        '(got "objectClass=person")',
    ),
    (
        "group_member_filter",
        "(member={user})",
        P
        + "group_member_filter: must be an LDAP filter whose only placeholders are {dn} and {name} "
        '(got "(member={user})")',
    ),
    (
        "login_attributes",
        ["uid", "e mail"],
        P + 'login_attributes: must be a list of attribute names like uid; "e mail" is not one '
        '(got ["uid", "e mail"])',
    ),
    (
        "netbios_domains",
        ["EX*"],
        P + "netbios_domains: must be a list of domain names like EXAMPLE or example.org; "
        '"EX*" is not one '
        '(got ["EX*"])',
    ),
    ("timeout", "fast", P + 'timeout: must be a duration like 30s, 15m, 12h, 90d (got "fast")'),
    ("timeout", "0s", P + 'timeout: must be more than 0 seconds (got "0s")'),
    ("pool_size", 0, P + "pool_size: must be an integer >= 1 and <= 256 (got 0)"),
    ("page_size", "many", P + 'page_size: must be an integer >= 1 and <= 100000 (got "many")'),
]


@pytest.mark.parametrize("key,value,message", CASES, ids=[f"{c[0]}={c[1]!r}"[:40] for c in CASES])
def test_a_bad_ldap_setting_is_reported_with_key_path_rule_and_value(
    base, tmp_path, key, value, message
):
    problems = errors(with_ldap(base, key, value), tmp_path)
    assert problems == [message.replace("{tmp}", str(tmp_path))]


def test_every_ldap_mistake_is_reported_at_once(base, tmp_path):
    data = with_ldap(base, "timeout", "fast")
    data = with_ldap(data, "id_format", "binary")
    data = with_ldap(data, "colour", "blue")
    assert len(errors(data, tmp_path)) == 3


def test_a_valid_ldap_section_gives_typed_settings(base, tmp_path):
    data = with_ldap(base, "preset", "active_directory")
    data = with_ldap(data, "timeout", "2s")
    data = with_ldap(data, "computed_account_control_attribute", "")
    settings = parse(data, source="apppass.yaml", base_dir=tmp_path).directory.ldap
    assert settings is not None
    assert settings.uris == ("ldap://ldap.example.org",) and settings.timeout == 2.0
    assert settings.ca_file == str(tmp_path / "ca.pem")
    assert settings.bind_password_file == str(tmp_path / "bind-password")
    assert settings.bind_password is None  # read from the file at each new connection
    assert settings.id_format == "guid"  # from the preset
    assert settings.computed_account_control_attribute is None  # "" switches it off

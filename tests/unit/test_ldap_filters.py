"""LDAP filters, login name forms and directory values, without a server.

The filter properties are checked on the wire: each filter is compiled by ldap3 exactly as
Connection.search sends it (auto_escape and auto_encode on, its defaults), and the resulting
ASN.1 tree is compared. Whatever a user types, the tree keeps its shape and the assertion
values are the typed text's UTF-8 bytes, nothing more and nothing less.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ldap3 import DEREF_NEVER, SUBTREE
from ldap3.operation.search import search_operation

from proxy.directory.ldap.cache import TtlCache
from proxy.directory.ldap.filters import (
    LoginQuery,
    LoginRefused,
    any_of,
    both,
    check_filter,
    equality,
    escape_value,
    guid_filter,
    in_chain_filter,
    member_filter,
    parse_login,
)
from proxy.directory.ldap.settings import PRESETS
from proxy.directory.ldap.values import (
    Unreadable,
    attribute_time,
    filetime_to_datetime,
    guid_to_str,
    looks_like_dn,
    normalize_dn,
    parse_generalized_time,
    rdn_value,
    read_int,
)
from proxy.sasl import is_valid_login

# Any text Python can encode as UTF-8 (no lone surrogates): NUL, controls, ( ) * \, spaces,
# non-ASCII letters…
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
HOSTILE = st.text(st.sampled_from(list("()*\\\x00 =&|!~<>:a\u00e9\u2003\t\n")), max_size=20)
VALUES = st.one_of(ANY_TEXT, HOSTILE)

AD_ATTRS = ("userPrincipalName", "sAMAccountName", "mail")


def wire(text: str):
    """The filter as ldap3 puts it on the wire, as nested tuples."""
    request = search_operation(
        "dc=example,dc=org", text, SUBTREE, DEREF_NEVER, ["1.1"], 0, 0, False, True, True
    )
    return _tree(request["filter"])


def _tree(node):
    name, c = node.getName(), node.getComponent()
    if name in ("and", "or"):
        return (name, tuple(_tree(x) for x in c))
    if name == "notFilter":
        return ("not", _tree(c["innerNotFilter"]))
    if name == "equalityMatch":
        return (name, str(c["attributeDesc"]), bytes(c["assertionValue"]))
    if name == "extensibleMatch":
        return (
            name,
            str(c["matchingRule"]),
            str(c["type"]),
            bytes(c["matchValue"]),
            bool(c["dnAttributes"]),
        )
    if name == "present":
        return (name, str(c))
    raise AssertionError(f"unexpected filter item {name}")


def shape(tree):
    """The tree without its assertion values."""
    if tree[0] in ("and", "or"):
        return (tree[0], tuple(shape(t) for t in tree[1]))
    if tree[0] == "not":
        return ("not", shape(tree[1]))
    if tree[0] == "equalityMatch":
        return tree[:2]
    if tree[0] == "extensibleMatch":
        return (tree[0], tree[1], tree[2], tree[4])
    return tree


def values(tree) -> list[bytes]:
    if tree[0] in ("and", "or"):
        return [v for t in tree[1] for v in values(t)]
    if tree[0] == "not":
        return values(tree[1])
    if tree[0] == "equalityMatch":
        return [tree[2]]
    if tree[0] == "extensibleMatch":
        return [tree[3]]
    return []


# --- escaping: no input changes a filter's structure ------------------------------------


@given(VALUES)
@settings(max_examples=400)
def test_an_equality_filter_is_one_equality_whose_value_is_exactly_the_input(value):
    assert wire(equality("uid", value)) == ("equalityMatch", "uid", value.encode("utf-8"))


@given(
    st.lists(
        st.tuples(st.sampled_from(("uid", "mail", "sAMAccountName")), VALUES),
        min_size=1,
        max_size=4,
    )
)
def test_any_of_has_one_equality_per_term_whatever_the_values(terms):
    assert wire(any_of(terms)) == (
        "or",
        tuple(("equalityMatch", a, v.encode("utf-8")) for a, v in terms),
    )


@given(VALUES)
@settings(max_examples=300)
def test_a_login_query_filter_has_the_same_shape_for_every_login(login):
    user_filter = PRESETS["active_directory"].user_filter
    hostile = LoginQuery(login, tuple((a, login) for a in AD_ATTRS), (("sAMAccountName", login),))
    benign = LoginQuery("x", tuple((a, "x") for a in AD_ATTRS), (("sAMAccountName", "x"),))
    tree = wire(hostile.filter(user_filter))
    assert shape(tree) == shape(wire(benign.filter(user_filter)))
    assert values(tree)[2:] == [login.encode("utf-8")] * 4  # after objectCategory, objectClass


@given(VALUES, VALUES)
def test_the_group_member_filter_keeps_its_shape_for_any_dn_and_name(dn, name):
    template = PRESETS["openldap"].group_member_filter
    group_filter = PRESETS["openldap"].group_object_filter
    tree = wire(both(group_filter, member_filter(template, dn, name)))
    assert shape(tree) == shape(wire(both(group_filter, member_filter(template, "d", "n"))))
    assert values(tree)[-3:] == [dn.encode(), dn.encode(), name.encode()]


@given(VALUES)
def test_the_in_chain_filter_is_one_extensible_match_on_the_whole_dn(dn):
    assert wire(in_chain_filter(dn)) == (
        "extensibleMatch",
        "1.2.840.113556.1.4.1941",
        "memberOf",
        dn.encode(),
        False,
    )


@given(st.uuids())
def test_a_guid_filter_matches_the_little_endian_bytes_of_the_uuid(key):
    assert wire(guid_filter("objectGUID", str(key))) == (
        "equalityMatch",
        "objectGUID",
        key.bytes_le,
    )


def test_a_guid_filter_for_a_non_uuid_key_is_none():
    assert guid_filter("objectGUID", "*)(objectGUID=*") is None


@pytest.mark.parametrize(
    "value, escaped",
    [
        ("*)(uid=*", "\\2a\\29\\28uid=\\2a"),
        ("a\\b", "a\\5cb"),
        ("nul\x00", "nul\\00"),
        (" alice ", "\\20alice\\20"),  # ldap3 would strip them otherwise
        ("\u2003em", "\\e2\\80\\83em"),
        ("élise", "élise"),
    ],
)
def test_escape_value_examples(value, escaped):
    assert escape_value(value) == escaped


# --- login name forms -------------------------------------------------------------------


def ad_parse(login):
    return parse_login(login, AD_ATTRS, "sAMAccountName", ("SAMDOM",), ("samdom.example.com",))


@given(VALUES)
@settings(max_examples=400)
def test_parse_login_never_raises_and_never_lets_metacharacters_or_controls_through(login):
    result = ad_parse(login)
    if any(c in login for c in "()*\x00\r\n\t") or not login:
        assert isinstance(result, LoginRefused) and result.invalid
    if isinstance(result, LoginQuery):
        for _, value in result.terms:
            assert value and value in login and is_valid_login(value)
            assert not any(c in value for c in "()*\\")


def test_a_plain_name_is_searched_in_every_login_attribute():
    query = ad_parse("alice")
    assert query.explicit == (
        ("userPrincipalName", "alice"),
        ("sAMAccountName", "alice"),
        ("mail", "alice"),
    )
    assert query.implicit == () and query.form == "name"


def test_domain_backslash_user_is_the_short_name_in_a_known_domain():
    query = ad_parse("samdom\\Alice")
    assert query.explicit == (("sAMAccountName", "Alice"),) and query.form == "DOMAIN\\user"
    refused = ad_parse("OTHER\\alice")
    assert isinstance(refused, LoginRefused) and not refused.invalid
    assert "unknown domain" in refused.reason


@pytest.mark.parametrize("login", ["\\alice", "SAMDOM\\", "SAMDOM\\a\\b", "SAMDOM\\a@b"])
def test_malformed_domain_backslash_user_is_invalid(login):
    result = ad_parse(login)
    assert isinstance(result, LoginRefused) and result.invalid


def test_domain_backslash_user_without_a_known_domain_is_refused():
    result = parse_login("EXAMPLE\\alice", ("uid", "mail"), "uid")
    assert isinstance(result, LoginRefused) and "not enabled" in result.reason


def test_user_at_the_dns_domain_also_matches_the_short_name_as_a_fallback():
    query = ad_parse("alice@SAMDOM.example.com")
    assert ("userPrincipalName", "alice@SAMDOM.example.com") in query.explicit
    assert query.implicit == (("sAMAccountName", "alice"),)
    other = ad_parse("alice@example.com")
    assert ("mail", "alice@example.com") in other.explicit and other.implicit == ()


@pytest.mark.parametrize(
    "login", ["@example.com", "alice@", "", "a" * 256, "alice\x7f", "alice\x85"]
)
def test_malformed_or_overlong_names_are_invalid(login):
    result = ad_parse(login)
    assert isinstance(result, LoginRefused) and result.invalid


def test_the_cache_key_ignores_case():
    assert ad_parse("Alice@Example.COM").cache_key == ad_parse("alice@example.com").cache_key


# --- values -----------------------------------------------------------------------------


def test_filetime_never_values_and_a_known_time():
    assert filetime_to_datetime(0) is None
    assert filetime_to_datetime(0x7FFFFFFFFFFFFFFF) is None
    assert filetime_to_datetime(132223104000000000) == datetime(2020, 1, 1, tzinfo=UTC)
    # The Unix epoch in FILETIME, as in Microsoft's "Converting a time_t value to a FILETIME".
    assert filetime_to_datetime(116444736000000000) == datetime(1970, 1, 1, tzinfo=UTC)
    assert filetime_to_datetime(116444736000000000 + 15) == datetime(
        1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC
    )  # 100 ns units, truncated to µs


@pytest.mark.parametrize(
    "text, expected",
    [
        ("20240131120000Z", datetime(2024, 1, 31, 12, 0, 0, tzinfo=UTC)),
        ("20240131120000.5Z", datetime(2024, 1, 31, 12, 0, 0, 500000, tzinfo=UTC)),
        ("20261125141354.650544Z", datetime(2026, 11, 25, 14, 13, 54, 650544, tzinfo=UTC)),
        ("202401311200Z", datetime(2024, 1, 31, 12, 0, tzinfo=UTC)),
        ("20240131120000+0200", datetime(2024, 1, 31, 10, 0, tzinfo=UTC)),
        ("20240131120000-05", datetime(2024, 1, 31, 17, 0, tzinfo=UTC)),
        ("000001010000Z", None),  # year 0: not a time (ppolicy's administrative lock)
        ("20241331120000Z", None),
        ("yesterday", None),
    ],
)
def test_generalized_time(text, expected):
    assert parse_generalized_time(text) == expected


def test_attribute_time_picks_the_encoding_by_attribute():
    assert attribute_time("accountExpires", "9223372036854775807") is None
    assert attribute_time("pwdLastSet", "132223104000000000").year == 2020
    assert attribute_time("shadowExpire", "1") == datetime(1970, 1, 2, tzinfo=UTC)
    assert attribute_time("shadowExpire", "-1") is None
    assert attribute_time("pwdChangedTime", "20200101000000Z").year == 2020


@pytest.mark.parametrize(
    "attribute,raw,message",
    [
        ("pwdLastSet", "garbage", "pwdLastSet 'garbage' is not a FILETIME"),
        ("accountExpires", "-5", "accountExpires '-5' is not a FILETIME"),
        ("accountExpires", " 0", "accountExpires ' 0' is not a FILETIME"),
        ("shadowExpire", "soon", "shadowExpire 'soon' is not a number of days since 1970"),
        ("shadowExpire", "-2", "shadowExpire '-2' is not a number of days since 1970"),
        ("pwdEndTime", "2020-01-01", "pwdEndTime '2020-01-01' is not a GeneralizedTime"),
        ("pwdStartTime", "x" * 100, "pwdStartTime '" + "x" * 40 + "...' is not a Gener"),
    ],
)
def test_a_time_that_cannot_be_read_is_unreadable_not_never(attribute, raw, message):
    with pytest.raises(Unreadable) as info:
        attribute_time(attribute, raw)
    assert str(info.value).startswith(message) and info.value.attribute == attribute


@pytest.mark.parametrize("raw", ["", "abc", "1_0", "+1", " 1", "1.5", "0x10", "\u0661"])
def test_an_integer_that_cannot_be_read_is_unreadable(raw):
    with pytest.raises(Unreadable):
        read_int("userAccountControl", raw)
    assert read_int("userAccountControl", "-514") == -514


@given(st.uuids())
def test_object_guid_bytes_give_the_usual_guid_string(key):
    assert guid_to_str(key.bytes_le) == str(key)


def test_object_guid_known_vector():
    # The objectGUID of alice in one Samba run: base64 BkxUYFHULUy04BzuWnnmCQ==.
    raw = bytes.fromhex("064c546051d42d4cb4e01cee5a79e609")
    assert guid_to_str(raw) == "60544c06-d451-4c2d-b4e0-1cee5a79e609"


def test_dn_helpers():
    assert (
        normalize_dn("CN=Legacy-Mail, OU=Groups,DC=Example")
        == "cn=legacy-mail,ou=groups,dc=example"
    )
    assert rdn_value("CN=Smith\\, John,OU=People,DC=x") == "Smith, John"
    assert rdn_value("cn=caf\\C3\\A9,dc=x") == "café"  # hex pairs are UTF-8 bytes
    assert looks_like_dn("cn=legacy-mail,ou=groups,dc=example,dc=org")
    assert not looks_like_dn("legacy-mail")


def test_check_filter_accepts_extensible_and_nested_filters():
    check_filter(
        "legacy_filter", "(&(objectClass=user)(memberOf:1.2.840.113556.1.4.1941:=CN=G,DC=x))"
    )
    check_filter("legacy_filter", "(!(employeeType=contractor))")
    with pytest.raises(ValueError):
        check_filter("legacy_filter", "uid=alice")


# --- cache ------------------------------------------------------------------------------


def test_the_cache_forgets_after_the_lifetime_and_keeps_a_bounded_size():
    now = [0.0]
    cache = TtlCache(lambda: now[0], max_entries=3)
    cache.put("a", 1, 10)
    assert cache.get("a") == (True, 1)
    now[0] = 10.0
    assert cache.get("a") == (False, None)
    cache.put("none", None, 5)
    assert cache.get("none") == (True, None)  # a cached "no such account"
    cache.put("zero", 1, 0)
    assert cache.get("zero") == (False, None)  # ttl 0: not cached
    for key in "wxyz":
        cache.put(key, key, 100)
    assert len(cache) == 3 and cache.get("w") == (False, None)


def test_time_helpers_agree_with_timedelta_arithmetic():
    assert filetime_to_datetime(10_000_000) == datetime(1601, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert filetime_to_datetime(132223104000000000) - filetime_to_datetime(
        132223104000000000 - 36_000_000_000
    ) == timedelta(hours=1)


def test_uuid_strings_round_trip_through_guid_filter_and_guid_to_str():
    key = uuid.uuid4()
    assert guid_to_str(key.bytes_le) == str(key)

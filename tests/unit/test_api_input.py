"""The admin API's input rules (proxy/web/apiinput.py): routes, the query, JSON bodies and a new
code's fields, each refusal with its status, stable error code and field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.manage import SendingChange
from proxy.web.apiinput import (
    ROUTES,
    ApiError,
    code_request,
    custodian,
    json_object,
    match,
    no_fields,
    query,
    sending_change,
)

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def refused(call, *args) -> tuple[int, str, str | None]:
    with pytest.raises(ApiError) as info:
        call(*args)
    return info.value.status, info.value.code, info.value.field


# -- routes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path,action,params",
    [
        ("GET", b"/api/v1/openapi.json", "openapi", {}),
        ("GET", b"/api/v1/accounts/alice", "account", {"login": "alice"}),
        (
            "GET",
            b"/api/v1/accounts/alice%40example.test",
            "account",
            {"login": "alice@example.test"},
        ),
        ("GET", b"/api/v1/accounts/J%C3%BCrgen/codes", "codes", {"login": "Jürgen"}),
        ("GET", b"/api/v1/accounts/a%2Fb/codes", "codes", {"login": "a/b"}),
        ("POST", b"/api/v1/accounts/alice/codes", "create", {"login": "alice"}),
        ("POST", b"/api/v1/accounts/alice/revoke-all", "revoke_all", {"login": "alice"}),
        ("GET", b"/api/v1/codes/42", "code", {"id": 42}),
        ("POST", b"/api/v1/codes/42/disable", "disable", {"id": 42}),
        ("POST", b"/api/v1/codes/42/enable", "enable", {"id": 42}),
        ("POST", b"/api/v1/codes/9223372036854775807/revoke", "revoke", {"id": 2**63 - 1}),
        ("POST", b"/api/v1/codes/42/sending", "sending", {"id": 42}),
        ("POST", b"/api/v1/codes/42/custodian", "custodian", {"id": 42}),
    ],
)
def test_each_route_and_its_parameters(method, path, action, params):
    found = match(method, path)
    assert (found.route.action, found.params) == (action, params)


@pytest.mark.parametrize(
    "path",
    [
        b"/api",
        b"/api/",
        b"/api/v1",
        b"/api/v1/",
        b"/api/v2/codes/1",
        b"/api/v1/accounts",
        b"/api/v1/accounts/",
        b"/api/v1/accounts/alice/",
        b"/api/v1/accounts/alice/codes/1",
        b"/api/v1/codes/1/delete",
        b"/api/v1/openapi.yaml",
    ],
)
def test_a_path_the_api_does_not_have_is_404(path):
    assert refused(match, "GET", path) == (404, "not_found", None)


@pytest.mark.parametrize(
    "path",
    [
        b"/api/v1/codes/abc",
        b"/api/v1/codes/0",
        b"/api/v1/codes/-1",
        b"/api/v1/codes/1e3",
        b"/api/v1/codes/9223372036854775808",
        b"/api/v1/codes/" + b"9" * 40,
    ],
)
def test_an_id_that_cannot_be_one_is_404_naming_it(path):
    # Never an OverflowError from SQLite: ids past 2**63 - 1 are refused here.
    assert refused(match, "GET", path) == (404, "not_found", "id")


@pytest.mark.parametrize(
    "path",
    [
        b"/api/v1/accounts/ali%0Ace",
        b"/api/v1/accounts/%FF",
        b"/api/v1/accounts/%00/codes",
        b"/api/v1/accounts/" + b"a" * 257,
    ],
)
def test_a_login_that_cannot_be_one_is_400_naming_it(path):
    assert refused(match, "GET", path) == (400, "invalid", "login")


@pytest.mark.parametrize(
    "method,path,allow",
    [
        ("DELETE", b"/api/v1/codes/1", "GET"),
        ("HEAD", b"/api/v1/codes/1", "GET"),
        ("GET", b"/api/v1/codes/1/revoke", "POST"),
        ("PUT", b"/api/v1/accounts/alice/codes", "GET, POST"),
        ("POST", b"/api/v1/openapi.json", "GET"),
    ],
)
def test_a_method_the_path_does_not_take_is_405_with_allow(method, path, allow):
    with pytest.raises(ApiError) as info:
        match(method, path)
    assert (info.value.status, info.value.code, info.value.headers) == (
        405,
        "method_not_allowed",
        {"Allow": allow},
    )


def test_only_the_document_needs_no_token_and_only_three_routes_take_fields():
    assert [r.action for r in ROUTES if not r.auth] == ["openapi"]
    assert [r.action for r in ROUTES if r.body] == ["create", "sending", "custodian"]
    assert all(r.method == "POST" for r in ROUTES if r.body)


@given(st.binary(max_size=200))
def test_any_path_is_a_route_or_an_api_error(path):
    try:
        match("GET", b"/api/v1/" + path)
    except ApiError as exc:
        assert exc.status in (400, 404, 405)


# -- the query -------------------------------------------------------------------------------


def codes_route():
    return match("GET", b"/api/v1/accounts/alice/codes").route


def test_all_is_true_or_false_once():
    assert query(codes_route(), {}) == {}
    assert query(codes_route(), {b"all": [b"true"]}) == {"all": True}
    assert query(codes_route(), {b"all": [b"false"]}) == {"all": False}
    for values in ([b"yes"], [b""], [b"true", b"true"], [b"TRUE"]):
        assert refused(query, codes_route(), {b"all": values}) == (400, "invalid", "all")


def test_an_unknown_query_parameter_is_400_naming_it():
    assert refused(query, codes_route(), {b"limit": [b"5"]}) == (400, "invalid", "limit")
    account = match("GET", b"/api/v1/accounts/alice").route
    assert refused(query, account, {b"all": [b"true"]}) == (400, "invalid", "all")


# -- JSON bodies -------------------------------------------------------------------------------

JSON = "application/json"


def test_an_empty_body_is_an_empty_object_and_json_may_carry_a_charset():
    assert json_object(b"", None) == {} and json_object(b"  \r\n", "text/plain") == {}
    assert json_object(b'{"label": "x"}', "application/json; charset=utf-8") == {"label": "x"}
    assert json_object(b'{"label": "x"}', "Application/JSON") == {"label": "x"}


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_said_to_be_something_else_is_415(content_type):
    assert refused(json_object, b'{"label": "x"}', content_type) == (
        415,
        "unsupported_media_type",
        None,
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"[]",
        b'"text"',
        b"null",
        b"1",
        b'{"a": 1, "a": 2}',
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": "\xff"}',
        b"[" * 100_000,
        b'{"a": ' * 50_000,
    ],
)
def test_a_body_that_is_not_one_json_object_is_400_without_a_field(raw):
    assert refused(json_object, raw, JSON) == (400, "invalid", None)


def test_an_action_takes_no_fields():
    no_fields({})
    assert refused(no_fields, {"force": True}) == (400, "invalid", "force")


# -- a new code's fields -----------------------------------------------------------------------


def test_every_field_reaches_the_code_request():
    req = code_request(
        {
            "label": "printer",
            "scopes": ["smtp"],
            "expires_in": "90d",
            "max_uses": 10,
            "networks": ["10.0.4.0/24"],
        },
        NOW,
    )
    assert (req.label, req.scopes, req.max_uses, req.networks) == (
        "printer",
        ("smtp",),
        10,
        ("10.0.4.0/24",),
    )
    assert (req.expires_at, req.never_expires) == (NOW + timedelta(days=90), False)


def test_left_out_fields_mean_the_configured_defaults():
    req = code_request({"label": "phone"}, NOW)
    assert (req.scopes, req.expires_at, req.never_expires, req.max_uses, req.networks) == (
        None,
        None,
        False,
        None,
        (),
    )


@pytest.mark.parametrize(
    "fields,expires_at,never",
    [
        ({"expires_at": "2027-06-30"}, datetime(2027, 6, 30, 23, 59, 59, tzinfo=UTC), False),
        ({"expires_at": "2027-06-30T12:00:00Z"}, datetime(2027, 6, 30, 12, tzinfo=UTC), False),
        ({"expires_at": "2027-06-30T14:00:00+02:00"}, datetime(2027, 6, 30, 12, tzinfo=UTC), False),
        ({"expires_at": "2027-06-30T12:00:00"}, datetime(2027, 6, 30, 12, tzinfo=UTC), False),
        ({"expires_at": None}, None, True),
        ({"expires_in": "12h"}, NOW + timedelta(hours=12), False),
        ({"expires_in": "never"}, None, True),
        ({"expires_in": "NEVER"}, None, True),
    ],
)
def test_an_expiry_as_a_date_a_date_time_a_duration_or_never(fields, expires_at, never):
    req = code_request({"label": "x", **fields}, NOW)
    assert (req.expires_at, req.never_expires) == (expires_at, never)


@pytest.mark.parametrize(
    "fields,field",
    [
        ({}, "label"),
        ({"label": None}, "label"),
        ({"label": ["x"]}, "label"),
        ({"label": "x", "scopes": "imap"}, "scopes"),
        ({"label": "x", "scopes": [1]}, "scopes"),
        ({"label": "x", "networks": "10.0.0.0/8"}, "networks"),
        ({"label": "x", "networks": [None]}, "networks"),
        ({"label": "x", "max_uses": 1.5}, "max_uses"),
        ({"label": "x", "max_uses": "1"}, "max_uses"),
        ({"label": "x", "max_uses": False}, "max_uses"),
        ({"label": "x", "expires_at": 20270630}, "expires_at"),
        ({"label": "x", "expires_at": "90d"}, "expires_at"),
        ({"label": "x", "expires_at": "never"}, "expires_at"),
        ({"label": "x", "expires_at": "2027-02-30"}, "expires_at"),
        ({"label": "x", "expires_at": "2027-06-30T25:00"}, "expires_at"),
        ({"label": "x", "expires_in": "2027-06-30"}, "expires_in"),
        ({"label": "x", "expires_in": 90}, "expires_in"),
        ({"label": "x", "expires_in": None}, "expires_in"),
        ({"label": "x", "expires_in": "0s"}, "expires_in"),
        ({"label": "x", "expires_in": "90d", "expires_at": None}, "expires_in"),
        ({"label": "x", "secret": "y"}, "secret"),
        ({"label": "x", "Label": "y"}, "Label"),
    ],
)
def test_a_wrong_type_or_an_unknown_field_is_400_naming_it(fields, field):
    assert refused(code_request, fields, NOW) == (400, "invalid", field)


def test_a_field_name_is_repeated_only_printable_and_short():
    status, code, field = refused(code_request, {"label": "x", "a\nb" + "c" * 100: 1}, NOW)
    assert (status, code) == (400, "invalid")
    assert field is not None and "\n" not in field and len(field) <= 43


# -- a code's new sending policy -----------------------------------------------------------------


def test_a_sending_change_replaces_the_whole_policy():
    assert sending_change({"rcpt_domains": ["Example.org"]}) == SendingChange(
        (), ("Example.org",), None
    )  # the Manager checks and lower-cases the values
    assert sending_change(
        {"mail_from": ["scan@example.org"], "rcpt_domains": [], "max_messages_per_day": 20}
    ) == SendingChange(("scan@example.org",), (), 20)
    lifted = {"mail_from": [], "rcpt_domains": [], "max_messages_per_day": None}
    assert sending_change(lifted) == SendingChange()


@pytest.mark.parametrize(
    "body,field",
    [
        ({}, "mail_from"),  # an empty body lifts nothing by mistake
        ({"label": "x"}, "label"),
        ({"mail_from": "scan@example.org"}, "mail_from"),
        ({"max_messages_per_day": "10"}, "max_messages_per_day"),
        ({"max_messages_per_day": True}, "max_messages_per_day"),
    ],
)
def test_a_sending_change_that_cannot_be_one_is_400_naming_the_field(body, field):
    assert refused(sending_change, body) == (400, "invalid", field)


def test_a_custodian_change_names_an_address_or_null_and_nothing_else():
    assert custodian({"custodian": "team@example.org"}) == "team@example.org"
    assert custodian({"custodian": None}) is None
    assert refused(custodian, {}) == (400, "invalid", "custodian")
    assert refused(custodian, {"custodian": 7}) == (400, "invalid", "custodian")
    assert refused(custodian, {"custodian": None, "label": "x"}) == (400, "invalid", "label")

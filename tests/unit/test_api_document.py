"""The admin API's OpenAPI document (proxy/web/openapi.py) says what the router does, is valid
JSON Schema throughout, and the validator the API tests use (tests/support/openapi.py) refuses
what the document does not allow."""

from __future__ import annotations

import json
import re
import typing

import pytest
from jsonschema import Draft202012Validator

from proxy.codes.view import code_view
from proxy.manage import ErrorCode
from proxy.web.api import STATUS, account_view
from proxy.web.apiinput import ROUTES
from proxy.web.openapi import ERROR_CODES, document
from tests.support.openapi import OpenApi

DOC = OpenApi(document())
JSON = {"content-type": "application/json", "cache-control": "no-store"}


def test_the_document_has_exactly_the_router_s_operations():
    assert DOC.operations() == {(r.method, r.template) for r in ROUTES}


def test_each_operation_documents_its_path_parameters():
    for template, item in DOC.document["paths"].items():
        names = set(re.findall(r"{(\w+)}", template))
        for operation in item.values():
            params = [DOC.resolve(p["$ref"][1:])[1] for p in operation.get("parameters", [])]
            assert {p["name"] for p in params if p["in"] == "path"} == names, template


def test_each_call_documents_the_errors_it_can_answer():
    for route in ROUTES:
        responses = DOC.document["paths"][route.template][route.method.lower()]["responses"]
        expected = {"500"} | ({"400", "401", "404", "429", "503"} if route.auth else set())
        if route.method == "POST":
            expected |= {"403", "413", "415"}
        assert expected <= set(responses), route.template


def test_every_schema_is_valid_json_schema_and_every_reference_resolves():
    for schema in DOC.document["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)  # raises SchemaError naming the problem
    for ref in DOC.references():
        assert DOC.resolve(ref[1:])[1] is not None, ref


def test_every_error_code_the_api_answers_is_in_the_document():
    manager_codes = set(typing.get_args(ErrorCode))
    assert manager_codes <= set(STATUS) and set(STATUS) <= set(ERROR_CODES)


def test_the_document_is_json():
    assert json.loads(json.dumps(document())) == document()


# -- the validator refuses what the document does not allow ------------------------------------

GOOD_ERROR = json.dumps({"error": "not_found", "message": "no app password with id 3"}).encode()


def test_a_response_the_document_gives_passes():
    DOC.check("GET", "/api/v1/codes/3", 404, JSON, GOOD_ERROR)
    DOC.check("GET", "/api/v2/x", 404, JSON, GOOD_ERROR)
    body = json.dumps({"error": "method_not_allowed", "message": "GET only"}).encode()
    DOC.check("DELETE", "/api/v1/codes/3", 405, {**JSON, "allow": "GET"}, body)


@pytest.mark.parametrize(
    "method,path,status,headers,body,why",
    [
        ("GET", "/api/v1/codes/3", 418, JSON, GOOD_ERROR, "undocumented"),
        ("GET", "/api/v1/codes/3", 401, JSON, GOOD_ERROR, "WWW-Authenticate"),
        ("GET", "/api/v1/codes/3", 404, {"content-type": "text/html"}, GOOD_ERROR, "Content-Type"),
        ("GET", "/api/v1/codes/3", 200, JSON, b"{}", "required"),
        ("GET", "/api/v1/codes/3", 400, JSON, GOOD_ERROR, "enum"),
        ("GET", "/api/v1/codes/3", 404, JSON, b'{"error": "not_found"}', "required"),
        ("GET", "/api/v1/codes/3", 404, JSON, b'{"error": "nope", "message": ""}', "enum"),
        ("GET", "/api/v1/codes/3", 404, JSON, b'{"error": "not_found", "message": 1}', "type"),
        ("GET", "/api/v2/x", 200, JSON, b"{}", "not in the document"),
        ("DELETE", "/api/v1/codes/3", 404, JSON, GOOD_ERROR, "not in the document"),
    ],
)
def test_a_response_the_document_does_not_give_fails(method, path, status, headers, body, why):
    with pytest.raises(AssertionError, match=why):
        DOC.check(method, path, status, headers, body)


def test_a_success_without_cache_control_fails():
    with pytest.raises(AssertionError, match="Cache-Control"):
        DOC.check("GET", "/api/v1/codes/3", 200, {"content-type": "application/json"}, b"{}")


def test_the_views_give_what_the_schemas_require():
    """The API's views and the document name the same fields (the integration tests check the
    values on real answers)."""
    from datetime import UTC, datetime

    from proxy.codes.store import CodeRecord
    from proxy.directory.account import Account
    from proxy.manage import AccountCheck, Verdict

    now = datetime(2026, 11, 30, tzinfo=UTC)
    record = CodeRecord(
        3, "key-a", "alice", "phone", "sel1", "hash", ("imap",), (), now, None, None, 0, None,
        None, None, 0, None, False, None, "cli",
    )  # fmt: skip
    check = AccountCheck(Account("key-a", "alice", "alice"), (Verdict("enabled", True, "ok"),))
    schemas = DOC.document["components"]["schemas"]
    assert set(code_view(record)) == set(schemas["AppPassword"]["properties"])
    assert set(schemas["AppPassword"]["required"]) == set(code_view(record))
    assert set(account_view(check)) == set(schemas["Account"]["required"])
    assert "hash" not in code_view(record) and "selector" not in code_view(record)

"""The admin API's OpenAPI 3.1 document, served at /api/v1/openapi.json without a token.

It is the contract: tests/integration/test_api.py validates every response the API tests
receive against the schema this document gives for its path, method and status, and
tests/unit/test_api_input.py checks that its paths are exactly the router's (apiinput.ROUTES).
"""

from __future__ import annotations

import copy
from typing import Any

from proxy.codes.sending import MAX_DOMAINS, MAX_MESSAGES_PER_DAY, MAX_SENDERS
from proxy.config import SCOPES
from proxy.manage import MAX_NETWORKS, MAX_USES
from proxy.web.apiinput import OPENAPI, PREFIX

ERROR_CODES = (
    "invalid",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "cap_reached",
    "conflict",
    "too_large",
    "unsupported_media_type",
    "limited",
    "internal",
    "unavailable",
)

STATES = ("active", "disabled", "expired", "used up", "revoked")
CHECKS = ("enabled", "legacy", "mfa", "identity")


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _nullable(kind: str, **more: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **more}


TIME = _nullable("string", format="date-time")


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": False,
    }


# A code's sending policy (SMTP): part of CodeRequest, and the whole of SendingChange.
_SENDING: dict[str, Any] = {
    "mail_from": {
        "type": "array",
        "items": {"type": "string", "examples": ["scanner@example.org", "*@example.org"]},
        "maxItems": MAX_SENDERS,
        "description": 'SMTP: the senders it may use (addresses, "*@domain", "own", '
        '"*"); with rcpt_domains or max_messages_per_day and no mail_from: "own"',
    },
    "rcpt_domains": {
        "type": "array",
        "items": {"type": "string", "examples": ["example.org"]},
        "maxItems": MAX_DOMAINS,
        "description": "SMTP: it may send only to these domains",
    },
    "max_messages_per_day": _nullable(
        "integer",
        minimum=1,
        maximum=MAX_MESSAGES_PER_DAY,
        description="SMTP: at most this many messages a UTC day",
    ),
}


SCHEMAS: dict[str, Any] = {
    "Error": {
        **_object(
            ["error", "message"],
            error={"enum": list(ERROR_CODES), "description": "stable: match on it"},
            message={"type": "string", "description": "for a person; may change"},
            field={"type": "string", "description": "the input at fault, when there is one"},
        ),
    },
    "Verdict": _object(
        ["check", "ok", "detail", "advice"],
        check={"enum": list(CHECKS)},
        ok={"type": "boolean"},
        detail={"type": "string", "description": "what is so"},
        advice=_nullable("string", description="what to do about it, when not ok"),
    ),
    "Account": _object(
        [
            "login",
            "key",
            "display_name",
            "upstream_identity",
            "names",
            "groups",
            "enabled",
            "legacy_allowed",
            "mfa",
            "password_changed_at",
            "allowed",
            "refusal",
            "verdicts",
        ],
        login={"type": "string", "description": "the canonical login"},
        key={"type": "string", "description": "the directory's stable id; codes belong to it"},
        display_name={"type": "string"},
        upstream_identity={"type": "string"},
        names={"type": "array", "items": {"type": "string"}},
        groups={"type": "array", "items": {"type": "string"}},
        enabled={"type": "boolean"},
        legacy_allowed={"type": "boolean"},
        mfa={"type": "boolean"},
        password_changed_at=TIME,
        allowed={"type": "boolean", "description": "every verdict ok: may have app passwords"},
        refusal=_nullable("string", description="the first failed verdict's detail"),
        verdicts={"type": "array", "items": _ref("schemas", "Verdict")},
    ),
    "AppPassword": _object(
        [
            "id",
            "login",
            "account_key",
            "label",
            "scopes",
            "networks",
            "created_at",
            "created_by",
            "expires_at",
            "max_uses",
            "use_count",
            "last_used_at",
            "last_used_ip",
            "last_used_protocol",
            "failed_count",
            "last_failed_at",
            "disabled",
            "revoked_at",
            "state",
            "idle_disabled_at",
            "custodian",
            "mail_from",
            "rcpt_domains",
            "max_messages_per_day",
            "sent_today",
            "send_refused_count",
            "last_send_refused_at",
            "stale",
        ],
        id={"type": "integer", "minimum": 1},
        login={"type": "string", "description": "the login when it was made (display only)"},
        account_key={"type": "string"},
        label={"type": "string"},
        scopes={"type": "array", "items": {"enum": list(SCOPES)}},
        networks={"type": "array", "items": {"type": "string"}},
        created_at={"type": "string", "format": "date-time"},
        created_by={"type": "string", "description": 'cli, or "api:LABEL", "portal:LOGIN"…'},
        expires_at=TIME,
        max_uses=_nullable("integer", minimum=1),
        use_count={"type": "integer", "minimum": 0},
        last_used_at=TIME,
        last_used_ip=_nullable("string"),
        last_used_protocol=_nullable("string"),
        failed_count={"type": "integer", "minimum": 0},
        last_failed_at=TIME,
        disabled={"type": "boolean"},
        revoked_at=TIME,
        state={"enum": list(STATES)},
        idle_disabled_at={
            **TIME,
            "description": "when apppass notify disabled it for not being used "
            "(codes.disable_after_unused); null once enabled again",
        },
        custodian=_nullable("string", description="also mailed its expiry and idle notices"),
        mail_from={
            "type": "array",
            "items": {"type": "string"},
            "description": 'SMTP senders it may use: addresses, "*@domain", "own" (the '
            'account\'s own addresses) or "*"; empty: no sending policy',
        },
        rcpt_domains={
            "type": "array",
            "items": {"type": "string"},
            "description": "SMTP: the only recipient domains it may send to; empty: any",
        },
        max_messages_per_day=_nullable(
            "integer", minimum=1, description="SMTP: messages a UTC day; null: no cap"
        ),
        sent_today=_nullable(
            "integer",
            minimum=0,
            description="messages the upstream accepted today (UTC), for a code with a cap",
        ),
        send_refused_count={
            "type": "integer",
            "minimum": 0,
            "description": "commands its sending policy refused",
        },
        last_send_refused_at=TIME,
        stale=_ref("schemas", "Stale"),
    ),
    "Stale": _object(
        ["count", "since", "last_at", "last_ip", "still_retrying"],
        count={
            "type": "integer",
            "minimum": 0,
            "description": "logins with the right secret since the code stopped working "
            "(revoked, expired, used up, disabled): a device still set up with it",
        },
        since={**TIME, "description": "the first of them"},
        last_at={**TIME, "description": "the latest"},
        last_ip=_nullable("string", description="where the latest came from"),
        still_retrying=_nullable(
            "string",
            description='for people: "still retrying: 212 attempts since 2026-11-24 from '
            '10.0.4.17"; null while the code works or nothing retried it',
        ),
    ),
    "AppPasswordList": _object(
        ["codes"], codes={"type": "array", "items": _ref("schemas", "AppPassword")}
    ),
    "Created": _object(
        ["code", "record"],
        code={
            "type": "string",
            "pattern": "^[A-Za-z2-9]{4}(-[A-Za-z2-9]{4}){3}$",
            "description": "the app password, shown this once and never again",
        },
        record=_ref("schemas", "AppPassword"),
    ),
    "RevokedAll": _object(
        ["login", "revoked"],
        login={"type": "string"},
        revoked={"type": "integer", "minimum": 0, "description": "how many were revoked"},
    ),
    "SendingChange": {
        **_object([], **_SENDING),
        "minProperties": 1,
        "description": "the code's whole new sending policy: a field left out is empty; "
        "[] and null everywhere lift the policy",
    },
    "CustodianChange": _object(
        ["custodian"],
        custodian=_nullable(
            "string",
            description="also mailed the code's expiry and idle notices; null: the account only",
            examples=["print-team@example.org"],
        ),
    ),
    "CodeRequest": {
        **_object(
            ["label"],
            label={"type": "string", "minLength": 1, "maxLength": 100, "examples": ["iPhone"]},
            scopes={
                "type": "array",
                "items": {"enum": list(SCOPES)},
                "minItems": 1,
                "description": "default: codes.default_scopes",
            },
            expires_at=_nullable(
                "string",
                description="ISO 8601 date (the end of that day, UTC) or date-time; null: "
                "never. Without expires_at and expires_in: codes.default_expires",
                examples=["2027-06-30", "2027-06-30T12:00:00Z"],
            ),
            expires_in={
                "type": "string",
                "description": "a duration from now (30m, 12h, 90d, 2w) or never",
                "examples": ["90d"],
            },
            max_uses=_nullable("integer", minimum=1, maximum=MAX_USES),
            networks={
                "type": "array",
                "items": {"type": "string", "examples": ["10.0.4.0/24"]},
                "maxItems": MAX_NETWORKS,
                "description": "the code works only from these client networks",
            },
            **_SENDING,
            custodian=_nullable(
                "string",
                description="also mailed the code's expiry and idle notices",
                examples=["print-team@example.org"],
            ),
        ),
        "not": {"required": ["expires_at", "expires_in"]},
    },
}


def _error(description: str, codes: tuple[str, ...], **headers: str) -> dict[str, Any]:
    schema = {"allOf": [_ref("schemas", "Error"), {"properties": {"error": {"enum": list(codes)}}}]}
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        out["headers"] = {
            name: {"required": True, "description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return out


RESPONSES: dict[str, Any] = {
    "BadRequest": _error(
        "bad input: malformed JSON, a wrong type, an unknown field or a value out of range "
        "(`field` names it)",
        ("invalid",),
    ),
    "Unauthorized": _error(
        "no token, or one that is unknown, revoked or expired (a bad token counts against the "
        "client address, like a failed mail login)",
        ("unauthorized",),
        **{"WWW-Authenticate": 'Bearer realm="apppass"'},
    ),
    "Forbidden": _error(
        "a read-only token asked for a change, or the account may not have app passwords "
        "(the message says why)",
        ("forbidden",),
    ),
    "NotFound": _error("no such account, app password or API path", ("not_found",)),
    "MethodNotAllowed": _error(
        "the path does not take this method", ("method_not_allowed",), Allow="the methods it takes"
    ),
    "Conflict": _error(
        "cap_reached: the account has codes.max_per_account codes; conflict: the code is "
        "revoked (or already was)",
        ("cap_reached", "conflict"),
    ),
    "TooLarge": _error("the body is larger than 64 KiB", ("too_large",)),
    "UnsupportedMediaType": _error(
        "a body that is not Content-Type: application/json", ("unsupported_media_type",)
    ),
    "Limited": _error(
        "too many failed attempts from this address, or too many of its requests waiting",
        ("limited",),
        **{"Retry-After": "seconds to wait"},
    ),
    "Internal": _error("a bug; the operator's log has the details", ("internal",)),
    "Unavailable": _error(
        "the directory or the code store cannot answer now, or too many requests are waiting: "
        "try again",
        ("unavailable",),
    ),
}

PARAMETERS: dict[str, Any] = {
    "login": {
        "name": "login",
        "in": "path",
        "required": True,
        "description": "any name the account logs in with (percent-encoded)",
        "schema": {"type": "string", "minLength": 1, "maxLength": 256},
    },
    "id": {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "the app password's id",
        "schema": {"type": "integer", "minimum": 1},
    },
    "all": {
        "name": "all",
        "in": "query",
        "required": False,
        "description": "true: include revoked, expired and used-up codes",
        "schema": {"type": "boolean", "default": False},
    },
}

_NO_STORE = {
    "Cache-Control": {
        "required": True,
        "description": "no-store: never cached (a created code is shown once)",
        "schema": {"const": "no-store"},
    }
}


def _ok(schema: str, description: str, **headers: Any) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {**_NO_STORE, **headers},
        "content": {"application/json": {"schema": _ref("schemas", schema)}},
    }


def _operation(
    summary: str,
    ok: tuple[int, dict[str, Any]],
    errors: tuple[str, ...],
    params: tuple[str, ...] = (),
    body: dict[str, Any] | None = None,
    writes: bool = False,
) -> dict[str, Any]:
    statuses = {
        "BadRequest": "400",
        "Unauthorized": "401",
        "Forbidden": "403",
        "NotFound": "404",
        "Conflict": "409",
        "TooLarge": "413",
        "UnsupportedMediaType": "415",
        "Limited": "429",
        "Internal": "500",
        "Unavailable": "503",
    }
    common: tuple[str, ...] = (
        "BadRequest",
        "Unauthorized",
        "NotFound",
        "Limited",
        "Internal",
        "Unavailable",
    )
    if writes:
        common += ("Forbidden", "TooLarge", "UnsupportedMediaType")
    responses: dict[str, Any] = {str(ok[0]): ok[1]}
    for name in sorted(set(common + errors), key=lambda n: statuses[n]):
        responses[statuses[name]] = _ref("responses", name)
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = [_ref("parameters", p) for p in params]
    if body is not None:
        op["requestBody"] = body
    elif writes:
        op["requestBody"] = {
            "required": False,
            "description": "none, or an empty object",
            "content": {"application/json": {"schema": _object([])}},
        }
    return op


def _paths() -> dict[str, Any]:
    code_ok = (200, _ok("AppPassword", "the app password as it is now"))
    return {
        OPENAPI: {
            "get": {
                "summary": "this document",
                "security": [],
                "responses": {
                    "200": {
                        "description": "the OpenAPI document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "500": _ref("responses", "Internal"),
                },
            }
        },
        f"{PREFIX}/accounts/{{login}}": {
            "get": _operation(
                "an account and its verdicts: may it have app passwords, and if not, why",
                (200, _ok("Account", "the account")),
                (),
                ("login",),
            )
        },
        f"{PREFIX}/accounts/{{login}}/codes": {
            "get": _operation(
                "the account's app passwords (active and disabled; all=true adds the rest)",
                (200, _ok("AppPasswordList", "the app passwords, oldest first")),
                (),
                ("login", "all"),
            ),
            "post": _operation(
                "create an app password; the code is in this answer only",
                (
                    201,
                    _ok(
                        "Created",
                        "the code (shown once) and its record",
                        Location={
                            "required": True,
                            "description": "the new app password's URL",
                            "schema": {"type": "string"},
                        },
                    ),
                ),
                ("Conflict",),
                ("login",),
                body=_body("CodeRequest"),
                writes=True,
            ),
        },
        f"{PREFIX}/accounts/{{login}}/revoke-all": {
            "post": _operation(
                "revoke every app password of the account (offboarding)",
                (200, _ok("RevokedAll", "how many were revoked")),
                (),
                ("login",),
                writes=True,
            )
        },
        f"{PREFIX}/codes/{{id}}": {
            "get": _operation("one app password", (200, _ok("AppPassword", "it")), (), ("id",))
        },
        **{
            f"{PREFIX}/codes/{{id}}/{action}": {
                "post": _operation(
                    f"{action} an app password" + (" for good" if action == "revoke" else ""),
                    code_ok,
                    ("Conflict",),
                    ("id",),
                    writes=True,
                )
            }
            for action in ("disable", "enable", "revoke")
        },
        f"{PREFIX}/codes/{{id}}/custodian": _change(
            "change who else is mailed an app password's expiry and idle notices",
            "CustodianChange",
        ),
        f"{PREFIX}/codes/{{id}}/sending": _change(
            "replace an app password's sending policy (SMTP); its live SMTP sessions end and"
            " log in again under the new one",
            "SendingChange",
        ),
    }


def _body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref("schemas", schema)}}}


def _change(summary: str, schema: str) -> dict[str, Any]:
    """A POST that changes one setting of an app password and answers with its record."""
    ok = (200, _ok("AppPassword", "the app password as it is now"))
    operation = _operation(summary, ok, ("Conflict",), ("id",), body=_body(schema), writes=True)
    return {"post": operation}


def document() -> dict[str, Any]:
    """The document, a copy of its own (callers may change it)."""
    return copy.deepcopy(_DOCUMENT)


_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "apppass admin API",
        "version": "1",
        "description": (
            "App passwords for legacy mail clients, managed by helpdesk tools and scripts. "
            "Authenticate with `Authorization: Bearer apt_…` (a token from `apppass tokens "
            "create`). Every answer is JSON; an error is `{error, message, field}` with a "
            "stable `error`. A path the API does not have answers 404 (NotFound), a method "
            "a path does not take 405 (MethodNotAllowed, with Allow)."
        ),
    },
    "security": [{"bearer": []}],
    "paths": _paths(),
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "apt_…"}
        },
        "schemas": SCHEMAS,
        "responses": RESPONSES,
        "parameters": PARAMETERS,
    },
}

"""What an admin API request says, checked before anything runs: which route its method and
path name, its query, and its JSON body turned into the Manager's values (proxy/manage.py).
Pure: no I/O, so the rules are unit-tested (tests/unit/test_api_input.py).

Every refusal is an `ApiError` with the API's stable `error` code and the field at fault; a
message names the field, never echoes a value that could be a secret sent by mistake.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_to_bytes

from proxy.configschema import Invalid, parse_duration, parse_expiry
from proxy.manage import CodeRequest, SendingChange

# A login in a path: the longest name a directory holds (LDAP uid, AD's UPN at 1024 is a
# theoretical bound) stays far below this.
MAX_LOGIN = 256

# Code ids are SQLite INTEGER PRIMARY KEYs: at most 2**63 - 1.
MAX_ID = 2**63 - 1

PREFIX = "/api/v1"
OPENAPI = f"{PREFIX}/openapi.json"

# An ISO 8601 date or date-time starts like this; anything else in expires_at is refused (a
# duration belongs in expires_in).
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class ApiError(Exception):
    """A refused request: HTTP status, stable error code, a message for a person, the field."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        out = {"error": self.code, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out


def invalid(message: str, field: str | None = None) -> ApiError:
    return ApiError(400, "invalid", message, field)


@dataclass(frozen=True)
class Route:
    method: str
    template: str  # as in the OpenAPI document; the audit names a call by it
    action: str  # the handler's name (proxy/web/api.py)
    query: tuple[str, ...] = ()  # query parameters it takes
    body: bool = False  # takes a JSON body (POST); others take none or {}
    auth: bool = True


ROUTES = (
    Route("GET", OPENAPI, "openapi", auth=False),
    Route("GET", f"{PREFIX}/accounts/{{login}}", "account"),
    Route("GET", f"{PREFIX}/accounts/{{login}}/codes", "codes", query=("all",)),
    Route("POST", f"{PREFIX}/accounts/{{login}}/codes", "create", body=True),
    Route("POST", f"{PREFIX}/accounts/{{login}}/revoke-all", "revoke_all"),
    Route("GET", f"{PREFIX}/codes/{{id}}", "code"),
    Route("POST", f"{PREFIX}/codes/{{id}}/disable", "disable"),
    Route("POST", f"{PREFIX}/codes/{{id}}/enable", "enable"),
    Route("POST", f"{PREFIX}/codes/{{id}}/revoke", "revoke"),
    Route("POST", f"{PREFIX}/codes/{{id}}/sending", "sending", body=True),
    Route("POST", f"{PREFIX}/codes/{{id}}/custodian", "custodian", body=True),
)


@dataclass(frozen=True)
class Match:
    route: Route
    params: dict[str, Any] = field(default_factory=dict)


def match(method: str, raw_path: bytes) -> Match:
    """The route for this method and (percent-encoded) path; ApiError 404 for a path the API
    does not have, 405 (with Allow) for a method the path does not take."""
    segments = raw_path.split(b"/")
    allowed: list[str] = []
    for route in ROUTES:
        params = _params(route.template, segments)
        if params is None:
            continue
        if route.method == method:
            return Match(route, params)
        allowed.append(route.method)
    if allowed:
        allow = ", ".join(sorted(set(allowed)))
        raise ApiError(
            405,
            "method_not_allowed",
            f"this path takes {allow}",
            headers={"Allow": allow},
        )
    raise ApiError(404, "not_found", "no such API path (see /api/v1/openapi.json)")


def _params(template: str, segments: list[bytes]) -> dict[str, Any] | None:
    """The path's parameters if it has the template's shape, else None; a parameter that is
    there but cannot be valid is an ApiError naming it."""
    parts = template.split("/")
    if len(parts) != len(segments):
        return None
    params: dict[str, Any] = {}
    for part, raw in zip(parts, segments, strict=True):
        if part.startswith("{") and raw:
            params[part[1:-1]] = raw
        elif raw != part.encode():
            return None
    for name, raw in params.items():
        params[name] = _login(raw) if name == "login" else _code_id(raw)
    return params


def _login(raw: bytes) -> str:
    try:
        login = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("a login is UTF-8 text (percent-encoded in the path)", "login") from None
    if not login or len(login) > MAX_LOGIN or not login.isprintable():
        raise invalid(f"a login is 1 to {MAX_LOGIN} printable characters", "login")
    return login


def _code_id(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 19 or not 1 <= int(raw) <= MAX_ID:
        raise ApiError(404, "not_found", "an app password id is a positive whole number", "id")
    return int(raw)


# -- the query --------------------------------------------------------------------------------


def query(route: Route, args: dict[bytes, list[bytes]]) -> dict[str, bool]:
    """The route's query parameters (only `all` exists: true or false)."""
    out: dict[str, bool] = {}
    for raw_name, values in args.items():
        name = raw_name.decode("utf-8", "replace")
        if name not in route.query:
            raise invalid(f"unknown query parameter {_shown(name)}", _shown(name))
        if len(values) != 1 or values[0] not in (b"true", b"false"):
            raise invalid(f"{name} is true or false, once", name)
        out[name] = values[0] == b"true"
    return out


def _shown(name: str) -> str:
    """A field name fit to repeat: printable and short (it came from the client)."""
    name = "".join(c if c.isprintable() else "?" for c in name)
    return name if len(name) <= 40 else name[:40] + "..."


# -- the body ---------------------------------------------------------------------------------


def json_object(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """The body as a JSON object; empty means {}. Refused: not JSON (415 when said to be
    something else), not an object, a key twice, NaN or Infinity, nesting past the parser."""
    if not raw.strip():
        return {}
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(
            415, "unsupported_media_type", "send the body as JSON (Content-Type: application/json)"
        )
    try:
        value = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise invalid("the body is not valid JSON (UTF-8)") from None
    if not isinstance(value, dict):
        raise invalid("the body is a JSON object")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("duplicate key")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


CODE_FIELDS = (
    "label",
    "scopes",
    "expires_at",
    "expires_in",
    "max_uses",
    "networks",
    "mail_from",
    "rcpt_domains",
    "max_messages_per_day",
    "custodian",
)


def code_request(body: dict[str, Any], now: datetime | None = None) -> CodeRequest:
    """A new code's request from its JSON body; the Manager checks the values themselves
    (label text, known scopes, max uses range, networks, a future expiry)."""
    for name in body:
        if name not in CODE_FIELDS:
            raise invalid(f"unknown field {_shown(name)}", _shown(name))
    if "label" not in body:
        raise invalid("label is required", "label")
    label = _typed(body, "label", str, "a string")
    scopes = _strings(body, "scopes")
    networks = _strings(body, "networks")
    max_uses = _whole(body, "max_uses")
    per_day = _whole(body, "max_messages_per_day")
    custodian = body.get("custodian")
    if custodian is not None and not isinstance(custodian, str):
        raise invalid("custodian is a mail address or null", "custodian")
    expires_at, never = _expiry(body, now or datetime.now(UTC).replace(microsecond=0))
    return CodeRequest(
        label=label,
        scopes=tuple(scopes) if scopes is not None else None,
        expires_at=expires_at,
        max_uses=max_uses,
        networks=tuple(networks or ()),
        never_expires=never,
        mail_from=tuple(_strings(body, "mail_from") or ()),
        rcpt_domains=tuple(_strings(body, "rcpt_domains") or ()),
        max_messages_per_day=per_day,
        custodian=custodian,
    )


SENDING_FIELDS = ("mail_from", "rcpt_domains", "max_messages_per_day")


def sending_change(body: dict[str, Any]) -> SendingChange:
    """A code's new sending policy from its JSON body: it replaces the old one whole (a field
    left out is empty). At least one field, so that an empty body lifts nothing by mistake."""
    for name in body:
        if name not in SENDING_FIELDS:
            raise invalid(f"unknown field {_shown(name)}", _shown(name))
    if not body:
        raise invalid(
            "give the new policy: mail_from, rcpt_domains, max_messages_per_day"
            " ([] and null lift it)",
            "mail_from",
        )
    return SendingChange(
        mail_from=tuple(_strings(body, "mail_from") or ()),
        rcpt_domains=tuple(_strings(body, "rcpt_domains") or ()),
        max_messages_per_day=_whole(body, "max_messages_per_day"),
    )


def custodian(body: dict[str, Any]) -> str | None:
    """The code's new custodian from its JSON body: {"custodian": "team@example.org"}, or null
    for the account only (the field is required, so that an empty body changes nothing)."""
    for name in body:
        if name != "custodian":
            raise invalid(f"unknown field {_shown(name)}", _shown(name))
    if "custodian" not in body:
        raise invalid("custodian is required: a mail address, or null", "custodian")
    value = body["custodian"]
    if value is not None and not isinstance(value, str):
        raise invalid("custodian is a mail address or null", "custodian")
    return value


def _whole(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise invalid(f"{name} is a whole number or null", name)
    return value


def no_fields(body: dict[str, Any]) -> None:
    """Actions that take no input accept no body or {}."""
    for name in body:
        raise invalid(f"unknown field {_shown(name)}: this call takes no fields", _shown(name))


def _typed(body: dict[str, Any], name: str, kind: type, what: str) -> Any:
    value = body[name]
    if not isinstance(value, kind):
        raise invalid(f"{name} is {what}", name)
    return value


def _strings(body: dict[str, Any], name: str) -> list[str] | None:
    if name not in body:
        return None
    value = body[name]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(f"{name} is a list of strings", name)
    return value


def _expiry(body: dict[str, Any], now: datetime) -> tuple[datetime | None, bool]:
    """(expires_at, never): `expires_at` an ISO 8601 date (the end of that day, UTC, as the
    CLI's --expires) or date-time, null for never; `expires_in` a duration like 90d, or never.
    Neither: codes.default_expires."""
    if "expires_at" in body and "expires_in" in body:
        raise invalid("give expires_at or expires_in, not both", "expires_in")
    if "expires_at" in body:
        value = body["expires_at"]
        if value is None:
            return None, True
        if not isinstance(value, str) or not _ISO_DATE.match(value.strip()):
            raise invalid(
                "expires_at is an ISO 8601 date or date-time, like 2027-06-30 or"
                " 2027-06-30T12:00:00Z, or null for never",
                "expires_at",
            )
        try:
            return parse_expiry(value, now), False
        except (ValueError, Invalid):
            raise invalid("expires_at is not a valid date or date-time", "expires_at") from None
    if "expires_in" in body:
        value = body["expires_in"]
        try:
            delta = parse_duration(value if isinstance(value, str) else None, allow_never=True)
        except Invalid:
            raise invalid(
                "expires_in is a duration like 90d, 12h or 2w, or never", "expires_in"
            ) from None
        if delta is None:
            return None, True
        if not delta:
            raise invalid("expires_in is longer than 0s", "expires_in")
        return now + delta, False
    return None, False

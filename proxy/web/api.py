"""The admin API under `/api/v1` (README "Admin API"): JSON for helpdesk tools and offboarding
scripts. A call authenticates with a bearer token (proxy/web/records.py), acts through the one
service layer (proxy/manage.py) as an Actor of kind "api" named by the token's label, and is
audited (`api`: method, path template, status, token, client; never a code or a token).

Which route a request names and what its input says is apiinput.py; the OpenAPI document,
which a test holds every response to, is openapi.py. Every answer is JSON, errors included
(`{"error", "message", "field"}`), never a traceback or an HTML page.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from proxy.codes.store import StoreUnavailable
from proxy.codes.view import code_view
from proxy.fairqueue import ClientShareFull, QueueFull
from proxy.manage import AccountCheck, Actor, CodeRequest, ManageError, Manager, SendingChange
from proxy.web.apiinput import (
    ApiError,
    Match,
    code_request,
    custodian,
    json_object,
    match,
    no_fields,
    query,
    sending_change,
)
from proxy.web.app import MAX_BODY, WebApp, client_ip
from proxy.web.openapi import document
from proxy.web.records import ApiToken

# HTTP status of each of the Manager's refusals (its codes are the API's `error`).
STATUS = {
    "invalid": 400,
    "forbidden": 403,
    "not_found": 404,
    "cap_reached": 409,
    "conflict": 409,
    "unavailable": 503,
}

# A token is "apt_" + 8 + "_" + 40 characters; a header much longer than that is not one and
# is not looked up.
MAX_TOKEN = 128

# What a failed token counts against in the limiter (the mail logins' count per address).
LIMITER_TARGET = "api-token"

# RFC 6750 §3: the challenge of a 401.
REALM = 'Bearer realm="apppass"'

log = Logger()


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def api_resource(app: WebApp) -> Resource:
    return ApiResource(app)


class ApiResource(Resource):
    """Everything under /api: one leaf that routes on the path itself (apiinput.ROUTES)."""

    isLeaf = True

    def __init__(self, app: WebApp) -> None:
        super().__init__()
        self.app = app

    def render(self, request: Request) -> Any:
        call = _Call(self.app, request)
        request.notifyFinish().addErrback(call.gone)
        call.run()
        return NOT_DONE_YET


class _Call:
    """One request: route, rate limit, token, input, the Manager, the answer, the audit."""

    def __init__(self, app: WebApp, request: Request) -> None:
        self.app = app
        self.request = request
        self.ip = client_ip(app, request)
        self.template: str | None = None
        self.token: ApiToken | None = None
        self.disconnected = False

    def gone(self, _failure: Any) -> None:
        self.disconnected = True

    def run(self) -> None:
        defer.ensureDeferred(self._run())

    async def _run(self) -> None:
        try:
            reply = await self._answer()
        except ApiError as exc:
            reply = _reply(exc)
        except ManageError as exc:
            status = STATUS.get(exc.code, 500)
            reply = Reply(status, ApiError(status, exc.code, exc.message, exc.field).body())
        except ClientShareFull:  # this address alone fills its share of the web queue
            reply = _reply(self._limited("too many requests from this address are waiting"))
        except QueueFull:
            reply = _unavailable("too many requests are waiting; try again shortly")
        except StoreUnavailable as exc:  # checking a token: fail closed, and not a bad token
            reply = _unavailable(f"the code store is unavailable: {exc}")
        except Exception as exc:  # a bug: said in the audit and the log, never to the client
            self.app.audit.event("error", where="api", type=type(exc).__name__, error=str(exc))
            log.failure("admin API request failed")
            reply = Reply(500, {"error": "internal", "message": "the request failed (see the log)"})
        self._send(reply)
        self.app.audit.event(
            "api",
            method=_method(self.request),
            path=self.template or "-",
            status=reply.status,
            error=reply.body.get("error") if reply.status >= 400 else None,
            token=self.token.label if self.token else None,
            token_id=self.token.id if self.token else None,
            client=self.ip,
        )

    async def _answer(self) -> Reply:
        request, app = self.request, self.app
        found = match(_method(request), request.path)
        route = found.route
        self.template = route.template
        if not route.auth:
            return Reply(200, document())
        actor = await self._authenticate()
        args = query(route, _query_args(request))
        body = self._body()
        if route.body:
            request_input: Any = BODIES[route.action](body)
        else:
            no_fields(body)
            request_input = args
        handler = HANDLERS[route.action]
        return await app.blocking(request, handler, app.manager, actor, found, request_input)

    async def _authenticate(self) -> Actor:
        """The bearer token's Actor; 429 for an address past the limiter, 401 for no token or
        one that is unknown, revoked or expired (counted against the address)."""
        limiter = self.app.limiter
        # The limiter's clock is the Authenticator's: monotonic seconds (auth/authenticator.py).
        if limiter.blocked(self.ip, time.monotonic()):
            raise self._limited("too many failed attempts from this address")
        value = _bearer(self.request)
        token = None
        if len(value) <= MAX_TOKEN:
            token = await self.app.blocking(
                self.request, self.app.records.authenticate_token, value, self.ip
            )
        if token is None:
            limiter.failure(self.ip, time.monotonic(), LIMITER_TARGET)
            raise ApiError(
                401,
                "unauthorized",
                "the token is not valid (unknown, revoked or expired)",
                headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
            )
        self.token = token
        return Actor("api", token.label, read_only=token.read_only)

    def _limited(self, why: str) -> ApiError:
        # The limiter forgets a failure after its window: a client that waits that long is
        # let in again (it may come back sooner as older failures age out).
        wait = str(math.ceil(self.app.limiter.window))
        return ApiError(
            429, "limited", f"{why}; try again in {wait} seconds", headers={"Retry-After": wait}
        )

    def _body(self) -> dict[str, Any]:
        """A POST's JSON object ({} for none); a GET's body is not read."""
        request = self.request
        if request.method != b"POST" or request.content is None:
            return {}
        raw = request.content.read(MAX_BODY + 1)  # BoundedRequest has dropped a larger one
        if getattr(request, "too_large", False) or len(raw) > MAX_BODY:
            raise ApiError(413, "too_large", f"the body is larger than {MAX_BODY // 1024} KiB")
        return json_object(raw, _header(request, b"content-type"))

    def _send(self, reply: Reply) -> None:
        if self.disconnected:
            return
        data = json.dumps(reply.body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        request = self.request
        request.setResponseCode(reply.status)
        request.setHeader(b"Content-Type", b"application/json")
        # Accounts and codes are nobody's to cache; a created code is shown once.
        request.setHeader(b"Cache-Control", b"no-store")
        for name, value in reply.headers.items():
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        request.setHeader(b"Content-Length", str(len(data)).encode("ascii"))
        request.write(data)
        request.finish()


def _method(request: Request) -> str:
    method = request.method.decode("ascii", "replace")
    return method if method.isalpha() and len(method) <= 16 else "?"


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _query_args(request: Request) -> dict[bytes, list[bytes]]:
    """The URL's query only (twisted.web's request.args also holds a form body's fields)."""
    _, _, raw = request.uri.partition(b"?")
    return parse_qs(raw, keep_blank_values=True)


def _bearer(request: Request) -> str:
    """The token in `Authorization: Bearer …`; 401 when there is none (not counted: nothing
    was guessed)."""
    values = request.requestHeaders.getRawHeaders(b"authorization") or []
    if len(values) == 1:
        scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    raise ApiError(
        401,
        "unauthorized",
        "send a token: Authorization: Bearer apt_… (apppass tokens create)",
        headers={"WWW-Authenticate": REALM},
    )


def _reply(exc: ApiError) -> Reply:
    return Reply(exc.status, exc.body(), exc.headers)


def _unavailable(message: str) -> Reply:
    return Reply(503, {"error": "unavailable", "message": message})


# -- the handlers: one call of the Manager each, in a thread (app.blocking) --------------------


def _account(m: Manager, actor: Actor, found: Match, _args: Any) -> Reply:
    return Reply(200, account_view(m.check(m.account(found.params["login"]))))


def _codes(m: Manager, actor: Actor, found: Match, args: dict[str, bool]) -> Reply:
    account = m.account(found.params["login"])
    records = m.codes(actor, account.key, include_inactive=args.get("all", False))
    return Reply(200, {"codes": [code_view(r) for r in records]})


def _create(m: Manager, actor: Actor, found: Match, request: CodeRequest) -> Reply:
    issued = m.create(actor, m.account(found.params["login"]), request)
    rec = issued.record
    return Reply(
        201,
        {"code": issued.code.grouped(), "record": code_view(rec)},
        {"Location": f"/api/v1/codes/{rec.id}"},
    )


def _revoke_all(m: Manager, actor: Actor, found: Match, _args: Any) -> Reply:
    account = m.account(found.params["login"])
    return Reply(200, {"login": account.login, "revoked": m.revoke_all(actor, account.key)})


def _code(m: Manager, actor: Actor, found: Match, _args: Any) -> Reply:
    return Reply(200, code_view(m.code(actor, found.params["id"])))


def _disable(m: Manager, actor: Actor, found: Match, _args: Any) -> Reply:
    return Reply(200, code_view(m.set_disabled(actor, found.params["id"], True)))


def _enable(m: Manager, actor: Actor, found: Match, _args: Any) -> Reply:
    return Reply(200, code_view(m.set_disabled(actor, found.params["id"], False)))


def _revoke(m: Manager, actor: Actor, found: Match, _args: Any) -> Reply:
    return Reply(200, code_view(m.revoke(actor, found.params["id"])))


def _sending(m: Manager, actor: Actor, found: Match, change: SendingChange) -> Reply:
    return Reply(200, code_view(m.set_sending(actor, found.params["id"], change)))


def _custodian(m: Manager, actor: Actor, found: Match, address: str | None) -> Reply:
    return Reply(200, code_view(m.set_custodian(actor, found.params["id"], address)))


HANDLERS: dict[str, Callable[[Manager, Actor, Match, Any], Reply]] = {
    "account": _account,
    "codes": _codes,
    "create": _create,
    "revoke_all": _revoke_all,
    "code": _code,
    "disable": _disable,
    "enable": _enable,
    "revoke": _revoke,
    "sending": _sending,
    "custodian": _custodian,
}

# The routes that take a JSON body, and how each is read (proxy/web/apiinput.py).
BODIES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "create": code_request,
    "sending": sending_change,
    "custodian": custodian,
}


# -- what the API shows (schemas Account and AppPassword in openapi.py) ------------------------


def _time(moment: Any) -> str | None:
    return moment.isoformat() if moment is not None else None


def account_view(check: AccountCheck) -> dict[str, Any]:
    a = check.account
    return {
        "login": a.login,
        "key": a.key,
        "display_name": a.display_name,
        "upstream_identity": a.upstream_identity,
        "names": list(a.names),
        "groups": list(a.groups),
        "enabled": a.enabled,
        "legacy_allowed": a.legacy_allowed,
        "mfa": a.mfa,
        "password_changed_at": _time(a.password_changed_at),
        "allowed": check.allowed,
        "refusal": check.refusal,
        "verdicts": [
            {"check": v.check, "ok": v.ok, "detail": v.detail, "advice": v.advice or None}
            for v in check.verdicts
        ],
    }
